package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/output"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
)

// defaultLast is how many stored flows observe shows without --follow
// and --last.
const defaultLast = 20

func newObserveCommand(agent *agentOptions) *cobra.Command {
	var (
		out            outputFlag
		fromPod, toPod string
		namespace      string
		labels         []string
		id             uint32
		verdict        string
		port           uint16
		protocol       string
		follow         bool
		last           int
		allNodes       bool
	)
	cmd := &cobra.Command{
		Use:   "observe",
		Short: "Show the flows the datapath saw, with verdicts, as they happen",
		Long: `Show flow events of this node's datapath (or of --node): each new
connection or packet the policy decided on, with source and destination
(pod, IP, port, identity), protocol, verdict and why: the drop reason, the
rule that decided, whether it was encrypted.

With --all-nodes, observe asks every node's agent (the nodes the API
server lists, each reached through it as --node is, several at a time)
and shows their flows merged by time with a NODE column. A node whose
agent cannot be reached is named on stderr with why, the other nodes'
flows are still shown, and the exit code is 3.

Without --follow, observe prints the last --last (default 20) stored flows
that match the filters, oldest first, and exits. With --follow it then
waits for new flows until interrupted (Ctrl-C ends it with exit code 0);
with --follow and no --last it shows only flows newer than its start.
--last 0 means every stored flow.

Filters are combined with AND:
  --from-pod, --to-pod NS/POD   the source, the destination pod
  --namespace NS                either side is a pod of NS
  --label KEY=VALUE             either side's identity carries the label
                                (pod, namespace or meta source; repeatable,
                                every label must match; SOURCE:KEY=VALUE
                                names the source)
  --identity N                  either side has identity N
  --verdict V                   ALLOWED, DENIED or AUDIT (allowed, but an
                                audit-mode policy would deny it)
  --port N, --protocol P        destination port, protocol (TCP, UDP,
                                SCTP, ICMP)

-o json prints one JSON object per line (JSON Lines) for scripts; -o yaml
one YAML document per flow.

Exit codes:
  0  success (also when --follow is interrupted)
  2  usage error
  3  the agent could not be reached or did not answer`,
		Example: `  meshctl observe --verdict DENIED
  meshctl observe --to-pod x/a --port 80 --follow
  meshctl observe --namespace x --label app=web --last 100 -o json | jq .dropReason
  meshctl observe --all-nodes --verdict DENIED --follow`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.check(); err != nil {
				return err
			}
			req := &agentv1.ObserveRequest{Namespace: namespace, Labels: labels, Identity: id, Port: uint32(port), Follow: follow}
			for _, p := range []struct{ flag, value string }{{"--from-pod", fromPod}, {"--to-pod", toPod}} {
				if p.value == "" {
					continue
				}
				if peer, err := policy.ParsePeer(p.value); err != nil || peer.Name == "" {
					return usageErrorf("%s %q: want NAMESPACE/POD", p.flag, p.value)
				}
			}
			req.FromPod, req.ToPod = fromPod, toPod
			for _, l := range labels {
				if k, _, ok := strings.Cut(l, "="); !ok || k == "" {
					return usageErrorf("--label %q: want KEY=VALUE", l)
				}
			}
			if verdict != "" {
				v := strings.ToUpper(verdict)
				switch v {
				case "ALLOWED", "DENIED", "AUDIT":
				default:
					return usageErrorf("--verdict %q: want ALLOWED, DENIED or AUDIT", verdict)
				}
				req.Verdict = v
			}
			if protocol != "" {
				p, err := policy.ParseProto(protocol)
				if err != nil {
					return usageErrorf("--protocol: %w", err)
				}
				req.Protocol = policy.ProtoName(p)
			}
			if last < 0 {
				return usageErrorf("--last %d: want 0 or more", last)
			}
			// The API's last=0 means every stored flow, so following from
			// now on is done by skipping what happened before the start.
			var notBefore int64
			switch {
			case cmd.Flags().Changed("last"):
				req.Last = uint32(last)
			case follow:
				notBefore = agent.env.now().UnixNano()
			default:
				req.Last = defaultLast
			}

			ctx := cmd.Context()
			if follow {
				var stop context.CancelFunc
				ctx, stop = signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
				defer stop()
			}
			w := cmd.OutOrStdout()
			if allNodes {
				if agent.node != "" || agent.socketSet() {
					return usageErrorf("give --all-nodes or --node/--socket, not both")
				}
				p := newFlowPrinter(w, out.format, output.PaletteFor(w), agent.env.loc, follow, true)
				return observeNodes(ctx, agent, req, notBefore, p, cmd.ErrOrStderr())
			}
			c, err := agent.connect(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			defer c.Close()
			streamCtx, cancel := context.WithCancel(ctx)
			if !follow {
				streamCtx, cancel = context.WithTimeout(ctx, c.Timeout)
			}
			defer cancel()
			stream, err := c.Client.Observe(streamCtx, req)
			if err != nil {
				return callError(c, "observe", err)
			}
			p := newFlowPrinter(w, out.format, output.PaletteFor(w), agent.env.loc, follow, false)
			for {
				f, err := stream.Recv()
				if errors.Is(err, io.EOF) {
					return p.done()
				}
				if err != nil {
					if ctx.Err() != nil {
						// Interrupted: what was shown is the answer.
						return p.done()
					}
					return callError(c, "observe", err)
				}
				if f.TimeUnixNano < notBefore {
					continue
				}
				if err := p.print(f); err != nil {
					return err
				}
			}
		},
	}
	addOutputFlag(cmd, &out)
	fs := cmd.Flags()
	fs.StringVar(&fromPod, "from-pod", "", "only flows from this pod (NAMESPACE/POD)")
	fs.StringVar(&toPod, "to-pod", "", "only flows to this pod (NAMESPACE/POD)")
	fs.StringVarP(&namespace, "namespace", "n", "", "only flows from or to a pod of this namespace")
	fs.StringArrayVar(&labels, "label", nil, "only flows where either side's identity has label KEY=VALUE; repeatable")
	fs.Uint32Var(&id, "identity", 0, "only flows where either side has this identity")
	fs.StringVar(&verdict, "verdict", "", "only flows with this verdict: ALLOWED, DENIED or AUDIT")
	fs.Uint16Var(&port, "port", 0, "only flows to this destination port")
	fs.StringVar(&protocol, "protocol", "", "only flows of this protocol: TCP, UDP, SCTP, ICMP")
	fs.BoolVarP(&follow, "follow", "f", false, "keep printing new flows until interrupted")
	fs.IntVar(&last, "last", defaultLast, "show the last N stored flows (0: all; with --follow, default: none)")
	fs.BoolVar(&allNodes, "all-nodes", false, "observe every node's agent (through the API server), merged by time")
	return cmd
}

// flowReport is one flow in -o json (one object per line) and -o yaml.
type flowReport struct {
	Time             time.Time      `json:"time"`
	Node             string         `json:"node"`
	Source           flowPeerReport `json:"source"`
	Destination      flowPeerReport `json:"destination"`
	Protocol         string         `json:"protocol"`
	Verdict          string         `json:"verdict"`
	DropReason       string         `json:"dropReason,omitempty"`
	Rule             string         `json:"rule,omitempty"`
	ObservationPoint string         `json:"observationPoint,omitempty"`
	Encrypted        bool           `json:"encrypted"`
	Bytes            uint32         `json:"bytes"`
	// Service the connection was load-balanced through, "ns/name:port".
	Service string `json:"service,omitempty"`
}

type flowPeerReport struct {
	Pod      string   `json:"pod,omitempty"`
	IP       string   `json:"ip"`
	Port     uint32   `json:"port"`
	Identity uint32   `json:"identity"`
	Labels   []string `json:"labels"`
}

func newFlowReport(f *agentv1.Flow) flowReport {
	peer := func(pod, ip string, port, id uint32, labels []string) flowPeerReport {
		if labels == nil {
			labels = []string{}
		}
		return flowPeerReport{Pod: pod, IP: ip, Port: port, Identity: id, Labels: labels}
	}
	return flowReport{
		Time: time.Unix(0, f.TimeUnixNano).UTC(), Node: f.Node,
		Source:      peer(f.SrcPod, f.SrcIp, f.SrcPort, f.SrcIdentity, f.SrcLabels),
		Destination: peer(f.DstPod, f.DstIp, f.DstPort, f.DstIdentity, f.DstLabels),
		Protocol:    f.Protocol, Verdict: f.Verdict, DropReason: f.DropReason, Rule: f.Rule,
		ObservationPoint: f.ObservationPoint, Encrypted: f.Encrypted, Bytes: f.Bytes,
		Service: f.Service,
	}
}

// flowPrinter writes flows. A table of a bounded list is aligned once every
// row is in; a followed table cannot wait for every row, so it starts with
// typical widths and a column widens when a wider cell comes.
type flowPrinter struct {
	w      io.Writer
	format string
	pal    output.Palette
	loc    *time.Location
	follow bool
	// nodes adds a NODE column: the flows come from many agents.
	nodes  bool
	widths []int
	// rows wait for done when not following.
	rows    [][]string
	printed int
}

func newFlowPrinter(w io.Writer, format string, pal output.Palette, loc *time.Location, follow, nodes bool) *flowPrinter {
	p := &flowPrinter{w: w, format: format, pal: pal, loc: loc, follow: follow, nodes: nodes}
	if follow {
		p.widths = []int{len(flowTimeLayout), 24, 1, 24, 5, 7, 0}
		if nodes {
			p.widths = slices.Insert(p.widths, 1, 8)
		}
	}
	return p
}

const flowTimeLayout = "Jan _2 15:04:05.000"

var flowHeader = []string{"TIME", "SOURCE", "", "DESTINATION", "PROTO", "VERDICT", "SUMMARY"}

// verdictColumn is the column painted by verdict, without a NODE column.
const verdictColumn = 5

// withNode inserts the NODE column after the time when the flows come
// from many nodes.
func (p *flowPrinter) withNode(cells []string, node string) []string {
	if !p.nodes {
		return cells
	}
	return slices.Insert(slices.Clone(cells), 1, node)
}

func (p *flowPrinter) header() []string { return p.withNode(flowHeader, "NODE") }

func (p *flowPrinter) verdictColumn() int {
	if p.nodes {
		return verdictColumn + 1
	}
	return verdictColumn
}

func (p *flowPrinter) print(f *agentv1.Flow) error {
	defer func() { p.printed++ }()
	switch p.format {
	case output.JSON:
		b, err := json.Marshal(newFlowReport(f))
		if err != nil {
			return fmt.Errorf("encode flow: %w", err)
		}
		if _, err := fmt.Fprintf(p.w, "%s\n", b); err != nil {
			return fmt.Errorf("write flow: %w", err)
		}
		return nil
	case output.YAML:
		b, err := yaml.Marshal(newFlowReport(f))
		if err != nil {
			return fmt.Errorf("encode flow: %w", err)
		}
		if _, err := fmt.Fprintf(p.w, "---\n%s", b); err != nil {
			return fmt.Errorf("write flow: %w", err)
		}
		return nil
	}
	cells := []string{
		time.Unix(0, f.TimeUnixNano).In(p.loc).Format(flowTimeLayout),
		flowPeer(f.SrcPod, f.SrcIp, f.SrcPort, f.SrcIdentity, f.Protocol),
		"→",
		flowPeer(f.DstPod, f.DstIp, f.DstPort, f.DstIdentity, f.Protocol) + viaService(f),
		f.Protocol,
		f.Verdict,
		flowSummary(f),
	}
	cells = p.withNode(cells, f.Node)
	if !p.follow {
		p.rows = append(p.rows, cells)
		return nil
	}
	if p.printed == 0 {
		if err := p.row(p.header(), false); err != nil {
			return err
		}
	}
	return p.row(cells, true)
}

func (p *flowPrinter) widen(cells []string) {
	for len(p.widths) < len(cells) {
		p.widths = append(p.widths, 0)
	}
	for i, c := range cells {
		p.widths[i] = max(p.widths[i], utf8.RuneCountInString(c))
	}
}

// row writes cells padded to the column widths. The verdict is coloured
// after padding, so that escapes do not count as width.
func (p *flowPrinter) row(cells []string, paint bool) error {
	p.widen(cells)
	var b strings.Builder
	for i, c := range cells {
		n := utf8.RuneCountInString(c)
		if i > 0 {
			b.WriteString("  ")
		}
		pad := ""
		if i < len(cells)-1 {
			pad = strings.Repeat(" ", p.widths[i]-n)
		}
		if paint && i == p.verdictColumn() {
			c = p.verdict(c)
		}
		b.WriteString(c + pad)
	}
	b.WriteString("\n")
	if _, err := io.WriteString(p.w, strings.TrimRight(b.String(), " \n")+"\n"); err != nil {
		return fmt.Errorf("write flow: %w", err)
	}
	return nil
}

func (p *flowPrinter) verdict(v string) string {
	switch v {
	case "ALLOWED":
		return p.pal.Green(v)
	case "DENIED":
		return p.pal.Red(v)
	case "AUDIT":
		return p.pal.Yellow(v)
	}
	return v
}

// done ends the output: it writes a table that waited for its rows, or
// says that no flow matched.
func (p *flowPrinter) done() error {
	if p.format != output.Table {
		return nil
	}
	if p.printed == 0 && len(p.rows) == 0 {
		if _, err := io.WriteString(p.w, "No flows matched.\n"); err != nil {
			return fmt.Errorf("write flows: %w", err)
		}
		return nil
	}
	p.widen(p.header())
	for _, r := range p.rows {
		p.widen(r)
	}
	if len(p.rows) > 0 {
		if err := p.row(p.header(), false); err != nil {
			return err
		}
	}
	for _, r := range p.rows {
		if err := p.row(r, true); err != nil {
			return err
		}
	}
	p.rows = nil
	return nil
}

// flowPeer renders one side of a flow: the pod (or the reserved identity
// of a non-pod address) and IP:port.
func flowPeer(pod, ip string, port, id uint32, proto string) string {
	// A packet that is not IP (an unsupported-l3 drop) has no addresses.
	if a, err := netip.ParseAddr(ip); pod == "" && (err != nil || a.IsUnspecified()) && port == 0 {
		return "-"
	}
	addr := ip
	if port != 0 && proto != "ICMP" && proto != "ICMPv6" {
		if a, err := netip.ParseAddr(ip); err == nil {
			addr = netip.AddrPortFrom(a, uint16(port)).String()
		} else {
			addr = ip + ":" + strconv.FormatUint(uint64(port), 10)
		}
	}
	switch {
	case pod != "":
		return pod + " " + addr
	case identity.ID(id).ReservedName() != "":
		return addr + " (" + identity.ID(id).ReservedName() + ")"
	}
	return addr
}

// viaService is " (via svc ns/name:port)" for a flow load-balanced
// through a Service.
func viaService(f *agentv1.Flow) string {
	if f.Service == "" {
		return ""
	}
	return " (via svc " + f.Service + ")"
}

// flowSummary says why the flow got its verdict.
func flowSummary(f *agentv1.Flow) string {
	var parts []string
	switch f.Verdict {
	case "DENIED":
		if f.DropReason != "" {
			parts = append(parts, f.DropReason)
		}
		if f.Rule != "" {
			parts = append(parts, "by "+f.Rule)
		}
	case "AUDIT":
		s := "an audit-mode policy would deny it"
		if f.Rule != "" {
			s = "would be denied by " + f.Rule
		}
		parts = append(parts, s)
	default:
		if f.Rule != "" {
			parts = append(parts, "by "+f.Rule)
		}
	}
	if f.Encrypted {
		parts = append(parts, "(encrypted)")
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, " ")
}
