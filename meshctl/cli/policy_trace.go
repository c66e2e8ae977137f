package cli

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/veilmesh/veil/meshctl/output"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

func newPolicyTraceCommand(agent *agentOptions) *cobra.Command {
	var (
		files      manifestFlags
		out        outputFlag
		from, to   string
		port       string
		exitOnDeny bool
	)
	cmd := &cobra.Command{
		Use:   "trace [-f FILE|DIR...] --from NS/POD|IP --to NS/POD|IP|svc/NS/NAME --port N[/PROTO]",
		Short: "Explain whether one flow is allowed, and by which rules",
		Long: `Decide whether a new flow from --from to --to on --port is allowed, as the
datapath would: the source pod's egress policy and the destination pod's
ingress policy must both allow it. Each side's decision is explained by the
rules that matched (deny rules first) or by the default that applied. When
audit-mode MeshPolicies would change a verdict, the audit verdict is shown
too.

Peers are NAMESPACE/POD, or an IP address (a pod's IP stands for that pod;
any other IP is outside the mesh, so no Veil policy applies on its side).

--to svc/NAMESPACE/NAME traces to a Service: --port is the Service's port,
and the flow is traced to each backend on the backend's port, since the
socket-level load balancer connects the client straight to a backend and
policy judges the backend (policy never names Service addresses). Offline,
the backends are the manifests' pods the Service's selector matches, with
the target port resolved on each; live, they are the ones the agent sends
clients to. The verdict is ALLOWED when every backend allows the flow,
DENIED when none does or there is no backend, PARTIAL otherwise; with
--exit-code anything but ALLOWED exits 1.

--port is N or N/PROTO with PROTO one of TCP (the default), UDP, SCTP or
ICMP. For ICMP, N is the ICMP type (code 0): --port 8/ICMP is an echo
request.

With -f, the manifests must be valid: trace refuses input that 'meshctl
policy validate' reports errors for. Without -f, trace asks the agent
(--socket, --node) to explain the flow against its live compiled state;
the answer is rendered exactly as an offline one.

Exit codes:
  0  the trace ran, whatever the verdict (without --exit-code)
  1  with --exit-code: the flow is DENIED
  2  usage or input error (a pod the agent does not know)
  3  without -f: the agent could not be reached or did not answer`,
		Example: `  meshctl policy trace -f manifests/ --from x/a --to y/b --port 80
  meshctl policy trace -f manifests/ --from 10.0.1.1 --to y/b --port 53/UDP -o json
  meshctl policy trace -f manifests/ --from x/a --to y/b --port 8/ICMP --exit-code
  meshctl policy trace --from x/a --to y/b --port 80          # live, local agent
  meshctl policy trace -f manifests/ --from demo/frontend --to svc/demo/backend --port 80`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.check(); err != nil {
				return err
			}
			fromPeer, err := policy.ParsePeer(from)
			if err != nil {
				return usageErrorf("--from: %w", err)
			}
			toService := strings.HasPrefix(to, servicePrefix)
			var toPeer policy.Peer
			if toService {
				if _, _, err := parseServiceRef(to); err != nil {
					return usageErrorf("--to: %w", err)
				}
			} else if toPeer, err = policy.ParsePeer(to); err != nil {
				return usageErrorf("--to: %w", err)
			}
			pp, err := parsePort(port)
			if err != nil {
				return err
			}
			var src interface {
				tracer
				serviceResolver
			}
			if len(files.paths) == 0 {
				c, err := agent.connect(cmd.Context())
				if err != nil {
					return err
				}
				defer c.Close()
				src = agentSource{c}
			} else {
				src, err = files.openSource(cmd.InOrStdin(), cmd.ErrOrStderr())
				if err != nil {
					return err
				}
			}
			if toService {
				return runServiceTrace(cmd, src, src, fromPeer, to, pp, &out, exitOnDeny)
			}
			tr, err := src.Trace(cmd.Context(), fromPeer, toPeer, pp)
			if err != nil {
				var ee *exitError
				if errors.As(err, &ee) {
					return err
				}
				return usageError(err)
			}
			report := newTraceReport(tr)
			w := cmd.OutOrStdout()
			done, err := out.structured(w, report)
			if err != nil {
				return err
			}
			if !done {
				if err := writeTrace(w, output.PaletteFor(w), report); err != nil {
					return err
				}
			}
			if exitOnDeny && !tr.Allowed {
				return failed()
			}
			return nil
		},
	}
	files.add(cmd)
	addOutputFlag(cmd, &out)
	cmd.Flags().StringVar(&from, "from", "", "source: NAMESPACE/POD or an IP address")
	cmd.Flags().StringVar(&to, "to", "", "destination: NAMESPACE/POD or an IP address")
	cmd.Flags().StringVar(&port, "port", "", "destination port N[/PROTO], PROTO TCP (default), UDP, SCTP or ICMP (N is then the ICMP type)")
	cmd.Flags().BoolVar(&exitOnDeny, "exit-code", false, "exit with status 1 when the flow is DENIED")
	for _, f := range []string{"from", "to", "port"} {
		_ = cmd.MarkFlagRequired(f) // cannot fail: the flags exist
	}
	return cmd
}

func runServiceTrace(cmd *cobra.Command, tr tracer, res serviceResolver, from policy.Peer, to string, pp policy.PortProto, out *outputFlag, exitOnDeny bool) error {
	if pp.Proto == policytypes.ProtoICMP {
		return usageErrorf("--port %s: a Service has no ICMP ports", portString(pp))
	}
	r, err := traceService(cmd.Context(), tr, res, from, to, pp)
	if err != nil {
		var ee *exitError
		if errors.As(err, &ee) {
			return err
		}
		return usageError(err)
	}
	w := cmd.OutOrStdout()
	done, err := out.structured(w, r)
	if err != nil {
		return err
	}
	if !done {
		if err := writeServiceTrace(w, output.PaletteFor(w), r); err != nil {
			return err
		}
	}
	if exitOnDeny && r.Verdict != "ALLOWED" {
		return failed()
	}
	return nil
}

// parsePort parses --port, refusing what the compiler's parser accepts but
// a trace cannot mean (port 0, protocols Veil policy has no rules for).
func parsePort(s string) (policy.PortProto, error) {
	pp, err := policy.ParsePortProto(s)
	if err != nil {
		return policy.PortProto{}, usageErrorf("--port: %w", err)
	}
	switch pp.Proto {
	case policytypes.ProtoTCP, policytypes.ProtoUDP, policytypes.ProtoSCTP:
		if pp.Port == 0 {
			return policy.PortProto{}, usageErrorf("--port %q: the port must be 1..65535", s)
		}
	case policytypes.ProtoICMP:
	default:
		return policy.PortProto{}, usageErrorf("--port %q: the protocol must be TCP, UDP, SCTP or ICMP", s)
	}
	return pp, nil
}

// portString renders a port as the user wrote it: "80/TCP", and for ICMP
// "8/ICMP" with the type rather than the compiler's type<<8|code.
func portString(pp policy.PortProto) string {
	if pp.Proto == policytypes.ProtoICMP || pp.Proto == policytypes.ProtoICMPv6 {
		return fmt.Sprintf("%d/%s", pp.Port>>8, policy.ProtoName(pp.Proto))
	}
	return pp.String()
}

// traceReport is the -o json|yaml output of policy trace. The compiler's
// types carry verdicts as numbers; this spells them out for scripts.
type traceReport struct {
	Verdict string `json:"verdict"`
	Allowed bool   `json:"allowed"`
	// AuditVerdict is what the verdict would be if audit-mode policies
	// were enforced too.
	AuditVerdict string          `json:"auditVerdict"`
	From         tracePeerReport `json:"from"`
	To           tracePeerReport `json:"to"`
	Port         string          `json:"port"`
	Egress       directionReport `json:"egress"`
	Ingress      directionReport `json:"ingress"`
}

type tracePeerReport struct {
	Peer         string   `json:"peer"`
	Pod          string   `json:"pod,omitempty"`
	IP           string   `json:"ip"`
	Identity     uint32   `json:"identity"`
	IdentityName string   `json:"identityName,omitempty"`
	Labels       []string `json:"labels,omitempty"`
	CIDR         string   `json:"cidr,omitempty"`
	CIDRIdentity uint32   `json:"cidrIdentity,omitempty"`
}

type directionReport struct {
	// Endpoint is the pod whose policy decided ("" when that side is not a
	// pod and no policy applies).
	Endpoint      string         `json:"endpoint,omitempty"`
	Applicable    bool           `json:"applicable"`
	Selected      bool           `json:"selected"`
	AuditSelected bool           `json:"auditSelected"`
	Verdict       string         `json:"verdict"`
	AuditVerdict  string         `json:"auditVerdict"`
	Reasons       []reasonReport `json:"reasons"`
}

type reasonReport struct {
	Verdict string      `json:"verdict"`
	Audit   bool        `json:"audit"`
	Message string      `json:"message"`
	Rule    *ruleReport `json:"rule,omitempty"`
}

type ruleReport struct {
	ID        uint32 `json:"id"`
	Policy    string `json:"policy"`
	Kind      string `json:"kind"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name"`
	Section   string `json:"section"`
	Peer      string `json:"peer"`
	Port      string `json:"port"`
}

func verdictWord(allowed bool) string {
	if allowed {
		return "ALLOWED"
	}
	return "DENIED"
}

func ruleVerdict(v policytypes.Verdict) string {
	switch v {
	case policytypes.Allow:
		return "allow"
	case policytypes.Deny:
		return "deny"
	}
	return "none"
}

func newTraceReport(tr policy.TraceResult) traceReport {
	r := traceReport{
		Verdict:      verdictWord(tr.Allowed),
		Allowed:      tr.Allowed,
		AuditVerdict: verdictWord(tr.AuditAllowed),
		From:         newPeerReport(tr.From),
		To:           newPeerReport(tr.To),
		Port:         portString(policy.PortProto{Proto: tr.Proto, Port: tr.Port}),
		Egress:       newDirectionReport(tr.Egress, tr.From),
		Ingress:      newDirectionReport(tr.Ingress, tr.To),
	}
	return r
}

func newPeerReport(p policy.TracePeer) tracePeerReport {
	r := tracePeerReport{Peer: p.Peer, IP: p.IP.String(), Identity: uint32(p.Identity), IdentityName: p.Identity.ReservedName()}
	if p.Pod != nil {
		r.Pod = p.Pod.String()
	}
	for _, l := range p.Labels {
		r.Labels = append(r.Labels, l.String())
	}
	if p.CIDR.IsValid() {
		r.CIDR, r.CIDRIdentity = p.CIDR.String(), uint32(p.CIDRIdentity)
	}
	return r
}

func newDirectionReport(d policy.DirectionTrace, owner policy.TracePeer) directionReport {
	r := directionReport{
		Applicable:    d.Applicable,
		Selected:      d.Selected,
		AuditSelected: d.AuditSelected,
		Verdict:       verdictWord(d.Allowed),
		AuditVerdict:  verdictWord(d.AuditAllowed),
		Reasons:       []reasonReport{},
	}
	if d.Applicable && owner.Pod != nil {
		r.Endpoint = owner.Pod.String()
	}
	for _, rs := range d.Reasons {
		rr := reasonReport{Verdict: ruleVerdict(rs.Verdict), Message: rs.Message}
		if rs.Rule != nil {
			rr.Audit = rs.Rule.Audit
			rr.Rule = &ruleReport{
				ID: rs.Rule.ID, Policy: rs.Rule.Policy.String(),
				Kind: string(rs.Rule.Policy.Kind), Namespace: rs.Rule.Policy.Namespace, Name: rs.Rule.Policy.Name,
				Section: rs.Rule.Section, Peer: rs.Rule.Peer, Port: rs.Rule.Port,
			}
		}
		r.Reasons = append(r.Reasons, rr)
	}
	return r
}

func writeTrace(w io.Writer, pal output.Palette, r traceReport) error {
	verdict := func(word string) string {
		if word == "ALLOWED" {
			return pal.Green(word)
		}
		return pal.Red(word)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s  %s → %s  %s\n", pal.Bold(verdict(r.Verdict)), r.From.Peer, r.To.Peer, r.Port)
	if r.AuditVerdict != r.Verdict {
		fmt.Fprintf(&b, "audit: would be %s if audit-mode policies were enforced\n", verdict(r.AuditVerdict))
	}
	b.WriteString("\n")
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	for _, p := range []struct {
		role string
		peer tracePeerReport
	}{{"from", r.From}, {"to", r.To}} {
		name := "-" // not a pod: the IP column says it all
		if p.peer.Pod != "" {
			name = p.peer.Pod
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.role, name, p.peer.IP, peerIdentity(p.peer))
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write trace: %w", err)
	}
	for _, d := range []struct {
		name string
		peer tracePeerReport
		rep  directionReport
	}{{"egress", r.From, r.Egress}, {"ingress", r.To, r.Ingress}} {
		b.WriteString("\n")
		if !d.rep.Applicable {
			fmt.Fprintf(&b, "%s: %s (%s is not a pod of the mesh: no policy applies)\n", d.name, verdict(d.rep.Verdict), d.peer.Peer)
			continue
		}
		fmt.Fprintf(&b, "%s of %s: %s", d.name, d.rep.Endpoint, verdict(d.rep.Verdict))
		if d.rep.AuditVerdict != d.rep.Verdict {
			fmt.Fprintf(&b, " (audit: would be %s)", verdict(d.rep.AuditVerdict))
		}
		b.WriteString("\n")
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		for _, rs := range d.rep.Reasons {
			tag := strings.ToUpper(rs.Verdict)
			if rs.Audit {
				tag += " (audit)"
			}
			fmt.Fprintf(tw, "  %s\t%s\n", tag, rs.Message)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write trace: %w", err)
		}
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write trace: %w", err)
	}
	return nil
}

// peerIdentity renders a peer's identity with its label set, since a
// number alone says nothing to an operator.
func peerIdentity(p tracePeerReport) string {
	s := fmt.Sprintf("identity %d", p.Identity)
	if p.IdentityName != "" {
		s += " (" + p.IdentityName + ")"
	}
	if len(p.Labels) > 0 {
		s += " [" + strings.Join(p.Labels, " ") + "]"
	}
	if p.CIDR != "" {
		s += fmt.Sprintf(", cidr %s identity %d", p.CIDR, p.CIDRIdentity)
	}
	if p.Identity == uint32(identity.Any) {
		s = "no identity"
	}
	return s
}
