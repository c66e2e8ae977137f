package cli

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/output"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

func newPolicyGetCommand(agent *agentOptions) *cobra.Command {
	var out outputFlag
	cmd := &cobra.Command{
		Use:   "get NAMESPACE/POD",
		Short: "Show the policy the agent enforces for one pod, entry by entry",
		Long: `Show the compiled policy of one endpoint as the agent of this node (or of
--node) holds it: for ingress and egress, the default verdict (deny once a
policy selects the pod for that direction) and every policy-map entry —
peer identity, port, verdict (and the audit verdict when audit-mode
policies change it), the rule that made it, and its hit and byte counters
when the pod runs on that node. The label set of every peer identity is
listed below the entries.

Exit codes:
  0  success
  2  usage error, or a pod the agent does not know
  3  the agent could not be reached or did not answer`,
		Example: `  meshctl policy get x/a
  meshctl policy get x/a -o json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := out.check(); err != nil {
				return err
			}
			peer, err := policy.ParsePeer(args[0])
			if err != nil || peer.Name == "" {
				return usageErrorf("want NAMESPACE/POD, not %q", args[0])
			}
			c, err := agent.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer c.Close()
			resp, err := unary(cmd.Context(), c, "get policy of "+args[0], func(ctx context.Context) (*agentv1.GetPolicyResponse, error) {
				return c.Client.GetPolicy(ctx, &agentv1.GetPolicyRequest{Namespace: peer.Namespace, Name: peer.Name})
			})
			if err != nil {
				return err
			}
			ids, err := listIdentities(cmd.Context(), c)
			if err != nil {
				return err
			}
			r, err := newPolicyReport(resp, ids, c.Status.Node)
			if err != nil {
				return &exitError{code: ExitUnreachable, err: err}
			}
			w := cmd.OutOrStdout()
			done, err := out.structured(w, r)
			if err != nil || done {
				return err
			}
			return writePolicy(w, output.PaletteFor(w), r)
		},
	}
	addOutputFlag(cmd, &out)
	return cmd
}

// policyReport is the -o json|yaml output of policy get.
type policyReport struct {
	Endpoint string   `json:"endpoint"`
	Node     string   `json:"node,omitempty"`
	IPs      []string `json:"ips"`
	Identity uint32   `json:"identity"`
	Labels   []string `json:"labels"`
	// Counters says whether hit counters were read: only the agent of the
	// pod's node has them.
	Counters bool                  `json:"counters"`
	Ingress  policyDirectionReport `json:"ingress"`
	Egress   policyDirectionReport `json:"egress"`
	// Peers are the label sets of the identities the entries name.
	Peers []identityReport `json:"peers"`
	Rules []ruleReport     `json:"rules"`
}

type policyDirectionReport struct {
	// Default is the verdict when no entry matches: "allow", or "deny"
	// once a policy selects the pod for this direction.
	Default      string        `json:"default"`
	AuditDefault string        `json:"auditDefault"`
	Entries      []entryReport `json:"entries"`
}

type entryReport struct {
	// Identity is the peer identity; 0 matches every peer.
	Identity     uint32 `json:"identity"`
	Port         string `json:"port"`
	Verdict      string `json:"verdict"`
	AuditVerdict string `json:"auditVerdict"`
	RuleID       uint32 `json:"ruleID"`
	Rule         string `json:"rule"`
	Hits         uint64 `json:"hits"`
	Bytes        uint64 `json:"bytes"`
}

type counterKey struct {
	direction string
	identity  uint32
	proto     string
	port      uint32
	prefixLen uint32
}

// newPolicyReport decodes the agent's answer; agentNode is the node of the
// agent that gave it.
func newPolicyReport(resp *agentv1.GetPolicyResponse, ids *agentv1.ListIdentitiesResponse, agentNode string) (policyReport, error) {
	var ep policy.Endpoint
	if err := json.Unmarshal(resp.EndpointJson, &ep); err != nil {
		return policyReport{}, fmt.Errorf("decode the agent's endpoint policy: %w", err)
	}
	var rules []policy.Rule
	if len(resp.RulesJson) > 0 {
		if err := json.Unmarshal(resp.RulesJson, &rules); err != nil {
			return policyReport{}, fmt.Errorf("decode the agent's policy rules: %w", err)
		}
	}
	labels := map[uint32][]string{}
	for _, id := range ids.Identities {
		labels[id.Id] = id.Labels
	}
	ruleByID := map[uint32]policy.Rule{}
	r := policyReport{
		Endpoint: ep.EndpointID.String(), Node: ep.Node, IPs: []string{}, Identity: uint32(ep.Identity),
		Labels:   labels[uint32(ep.Identity)],
		Counters: len(resp.Counters) > 0 || (ep.Node != "" && ep.Node == agentNode),
		Ingress: policyDirectionReport{
			Default:      defaultVerdict(ep.Defaults.IngressEnforce),
			AuditDefault: defaultVerdict(ep.Defaults.IngressAudit),
			Entries:      []entryReport{},
		},
		Egress: policyDirectionReport{
			Default:      defaultVerdict(ep.Defaults.EgressEnforce),
			AuditDefault: defaultVerdict(ep.Defaults.EgressAudit),
			Entries:      []entryReport{},
		},
		Peers: []identityReport{},
		Rules: []ruleReport{},
	}
	for _, ip := range ep.IPs {
		r.IPs = append(r.IPs, ip.String())
	}
	for _, rl := range rules {
		ruleByID[rl.ID] = rl
		r.Rules = append(r.Rules, ruleReport{
			ID: rl.ID, Policy: rl.Policy.String(), Kind: string(rl.Policy.Kind), Namespace: rl.Policy.Namespace, Name: rl.Policy.Name,
			Section: rl.Section, Peer: rl.Peer, Port: rl.Port,
		})
	}
	counters := map[counterKey]*agentv1.PolicyCounter{}
	for _, c := range resp.Counters {
		counters[counterKey{c.Direction, c.Identity, c.Protocol, c.Port, c.PortPrefixLen}] = c
	}
	peers := map[uint32]bool{}
	for _, e := range ep.Entries {
		er := entryReport{
			Identity: uint32(e.Identity), Port: entryPort(e.Key),
			Verdict: ruleVerdict(e.Enforce), AuditVerdict: ruleVerdict(e.Audit),
			RuleID: e.RuleID, Rule: entryRule(e, ruleByID),
		}
		if c := counters[counterKey{e.Direction.String(), uint32(e.Identity), policy.ProtoName(e.Proto), uint32(e.Port), uint32(e.PortPrefixLen)}]; c != nil {
			er.Hits, er.Bytes = c.Hits, c.Bytes
		}
		if e.Direction == policytypes.Egress {
			r.Egress.Entries = append(r.Egress.Entries, er)
		} else {
			r.Ingress.Entries = append(r.Ingress.Entries, er)
		}
		if e.Identity != identity.Any && !peers[uint32(e.Identity)] {
			peers[uint32(e.Identity)] = true
			r.Peers = append(r.Peers, identityReport{ID: uint32(e.Identity), Labels: peerLabels(e.Identity, labels)})
		}
	}
	slices.SortFunc(r.Peers, func(a, b identityReport) int { return cmp.Compare(a.ID, b.ID) })
	return r, nil
}

// peerLabels is the label set of a peer identity. CIDR identities have
// none: the rule that names the CIDR says which addresses they stand for.
func peerLabels(id identity.ID, labels map[uint32][]string) []string {
	if ls, ok := labels[uint32(id)]; ok {
		return ls
	}
	if n := id.ReservedName(); n != "" {
		return []string{"reserved:" + n}
	}
	if id >= identity.MinCIDR {
		return []string{"cidr: see the rule"}
	}
	return []string{}
}

func defaultVerdict(v policytypes.Verdict) string {
	if v == policytypes.Deny {
		return "deny"
	}
	return "allow"
}

// entryRule names the rule that made an entry.
func entryRule(e policytypes.Entry, rules map[uint32]policy.Rule) string {
	if rl, ok := rules[e.RuleID]; ok {
		return fmt.Sprintf("%s %s", rl.Policy, rl.Section)
	}
	if e.RuleID == policytypes.RuleLocalHost && e.Identity == identity.Host {
		return "built-in: the pod's own node may reach it"
	}
	return fmt.Sprintf("rule %d", e.RuleID)
}

// entryPort renders an entry's port key: "80/TCP", a range
// "8000-8191/TCP", "*/TCP" for every port, "any" for every protocol; for
// ICMP the type (and code) the key holds as type<<8|code.
func entryPort(k policytypes.Key) string {
	proto := policy.ProtoName(k.Proto)
	switch {
	case k.Proto == policytypes.ProtoAny:
		return "any"
	case k.PortPrefixLen == 0:
		return "*/" + proto
	case k.Proto == policytypes.ProtoICMP || k.Proto == policytypes.ProtoICMPv6:
		if k.PortPrefixLen >= 16 {
			return fmt.Sprintf("%d/%s code %d", k.Port>>8, proto, k.Port&0xff)
		}
		return fmt.Sprintf("%d/%s", k.Port>>8, proto)
	case k.PortPrefixLen >= 16:
		return fmt.Sprintf("%d/%s", k.Port, proto)
	}
	mask := uint16(0xffff) << (16 - k.PortPrefixLen)
	lo := k.Port & mask
	return fmt.Sprintf("%d-%d/%s", lo, lo|^mask, proto)
}

func writePolicy(w io.Writer, pal output.Palette, r policyReport) error {
	verdict := func(v string) string {
		switch v {
		case "allow":
			return pal.Green("ALLOW")
		case "deny":
			return pal.Red("DENY")
		}
		return pal.Plain("-")
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s  %s", pal.Bold(r.Endpoint), strings.Join(r.IPs, ","))
	if r.Node != "" {
		fmt.Fprintf(&b, "  node %s", r.Node)
	}
	fmt.Fprintf(&b, "\nidentity %d [%s]\n", r.Identity, strings.Join(r.Labels, " "))
	for _, d := range []struct {
		name string
		rep  policyDirectionReport
	}{{"ingress", r.Ingress}, {"egress", r.Egress}} {
		why := "no policy selects the pod for " + d.name
		if d.rep.Default == "deny" {
			why = "a policy selects the pod for " + d.name
		}
		fmt.Fprintf(&b, "\n%s: default %s (%s)", d.name, verdict(d.rep.Default), why)
		if d.rep.AuditDefault != d.rep.Default {
			fmt.Fprintf(&b, ", audit: default %s", verdict(d.rep.AuditDefault))
		}
		b.WriteString("\n")
		if len(d.rep.Entries) == 0 {
			b.WriteString("  no entries\n")
			continue
		}
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "  %s\tAUDIT\tPEER\tPORT\tRULE\tHITS\tBYTES\n", pal.Plain("VERDICT"))
		for _, e := range d.rep.Entries {
			audit := "-"
			if e.AuditVerdict != e.Verdict {
				audit = strings.ToUpper(e.AuditVerdict)
			}
			hits, bytes := "-", "-"
			if r.Counters {
				hits, bytes = fmt.Sprint(e.Hits), fmt.Sprint(e.Bytes)
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\n", verdict(e.Verdict), audit, peerName(e.Identity), e.Port, e.Rule, hits, bytes)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write policy: %w", err)
		}
	}
	if len(r.Peers) > 0 {
		b.WriteString("\npeers:\n")
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		for _, p := range r.Peers {
			fmt.Fprintf(tw, "  %d\t%s\n", p.ID, strings.Join(p.Labels, " "))
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write policy: %w", err)
		}
	}
	if !r.Counters {
		b.WriteString("\n(no counters: they are kept by the agent of the pod's node)\n")
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write policy: %w", err)
	}
	return nil
}

// peerName is an entry's peer in the table: the identity number, whose
// labels the peers list gives, or "any".
func peerName(id uint32) string {
	if id == uint32(identity.Any) {
		return "any"
	}
	if n := identity.ID(id).ReservedName(); n != "" {
		return fmt.Sprintf("%d (%s)", id, n)
	}
	return fmt.Sprint(id)
}
