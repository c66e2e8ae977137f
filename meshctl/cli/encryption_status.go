package cli

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/veilmesh/veil/api/annotations"
	"github.com/veilmesh/veil/meshctl/audit"
	"github.com/veilmesh/veil/meshctl/output"
)

func newEncryptionStatusCommand(agent *agentOptions, kube *kubeOptions) *cobra.Command {
	var (
		out        outputFlag
		staleAfter time.Duration
		details    bool
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show every node's encryption state, and a one-line cluster summary",
		Long: `Show the encryption state of every node (or of --node) as its agent last
recorded it in the node's MeshNode: WireGuard mode (kernel or userspace),
interface, key fingerprint and age, listen port, strict mode, peers
(configured / expected, one per other node) with the age of the last
handshake with each, and leak counters. A one-line cluster summary comes
first. Nodes without a MeshNode (their agent never reported) and nodes
whose status is older than --stale-after (their agent is not running) are
called out. With --node, each peer is shown too.

Large clusters stay readable: the summary and the counts (nodes reported,
with tunnels up, with consistent keys; peers configured and handshaken)
come first; the node table lists every node up to 20 nodes, above that
only the nodes that need attention (at most 50, and how many more), and a
node's handshakes are summed up once it has more than 8 peers. --details
lists every node; -o json always has every node and peer.

Exit codes:
  0  every node shown is encrypted (WireGuard up with a key, reported recently)
  1  a node shown is not: no MeshNode, stale, disabled or without a key
  2  usage error, no kubeconfig, a node the cluster does not have
  3  the API server could not be reached or refused meshctl`,
		Example: `  meshctl encryption status
  meshctl encryption status --node node-2
  meshctl encryption status --details
  meshctl encryption status -o json --kubeconfig ~/.kube/lab`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.check(); err != nil {
				return err
			}
			if staleAfter <= 0 {
				return usageErrorf("--stale-after must be positive")
			}
			kc, err := kube.connect()
			if err != nil {
				return err
			}
			prog := newProgress(cmd.ErrOrStderr())
			prog.step("reading Nodes and MeshNodes")
			cs, err := readCluster(cmd.Context(), kc, withTimeout(agent.timeout))
			prog.done()
			if err != nil {
				return err
			}
			prog.step("summing up %s", output.Plural(len(cs.Nodes), "node"))
			r, err := newEncryptionStatusReport(cs, agent.env.now(), staleAfter, agent.node)
			prog.done()
			if err != nil {
				return err
			}
			r.details = details
			w := cmd.OutOrStdout()
			done, err := out.structured(w, r)
			if err != nil {
				return err
			}
			if !done {
				if err := writeEncryptionStatus(w, output.PaletteFor(w), r, agent.env.now()); err != nil {
					return err
				}
			}
			for _, n := range r.Nodes {
				if !n.Encrypted {
					return failed()
				}
			}
			return nil
		},
	}
	cmd.Flags().DurationVar(&staleAfter, "stale-after", audit.DefaultStaleAfter, "a MeshNode status older than this means its agent is not running")
	cmd.Flags().BoolVar(&details, "details", false, "list every node in the table, however many")
	addOutputFlag(cmd, &out)
	return cmd
}

// encryptionStatusReport is the -o json|yaml output of encryption status.
type encryptionStatusReport struct {
	Summary        string `json:"summary"`
	TotalNodes     int    `json:"totalNodes"`
	EncryptedNodes int    `json:"encryptedNodes"`
	// ReportedNodes have a MeshNode; KeysConsistent nodes' device keys are
	// the keys their Nodes publish.
	ReportedNodes  int `json:"reportedNodes"`
	KeysConsistent int `json:"keysConsistent"`
	// Peers sums every node's own peer view: the peers configured, the
	// peers expected (one per other node), and those never handshaken.
	PeersConfigured  int `json:"peersConfigured"`
	PeersExpected    int `json:"peersExpected"`
	PeersNoHandshake int `json:"peersNoHandshake"`
	// Strict is true when every node is encrypted and in strict mode.
	Strict bool               `json:"strict"`
	Nodes  []audit.NodeReport `json:"nodes"`
	// Problems are what needs attention, per node.
	Problems []nodeProblem `json:"problems"`
	// detail is the node whose peers the table lists (--node).
	detail string
	// details lists every node, however many (--details).
	details bool
}

type nodeProblem struct {
	Node    string `json:"node"`
	Problem string `json:"problem"`
}

func newEncryptionStatusReport(cs *audit.Cluster, now time.Time, staleAfter time.Duration, only string) (encryptionStatusReport, error) {
	nodes, orphans := audit.Snapshots(cs, now, staleAfter)
	r := encryptionStatusReport{TotalNodes: len(nodes), Nodes: []audit.NodeReport{}, Problems: []nodeProblem{}, detail: only}
	var names []string
	modes := map[string]bool{}
	var reasons []string
	for _, n := range nodes {
		names = append(names, n.Node)
		if n.Reported {
			r.ReportedNodes++
			r.PeersConfigured += n.PeerCount
			r.PeersExpected += n.ExpectedPeers
			r.PeersNoHandshake += n.NoHandshake()
			if n.PublicKey != "" && n.Annotations[annotations.WireGuardPublicKey] == n.PublicKey {
				r.KeysConsistent++
			}
		}
		if n.Encrypted {
			r.EncryptedNodes++
			modes[string(n.Mode)] = true
		}
		if why := n.Why(); why != "" {
			reasons = append(reasons, why)
		}
	}
	r.Strict = len(nodes) > 0 && len(reasons) == 0
	r.Summary = summary(r.TotalNodes, r.EncryptedNodes, modes, reasons)
	set := audit.NewNodeSet(names)
	if only != "" && !set.Has(only) {
		return r, usageErrorf("node %q is not in the cluster (nodes: %s)", only, audit.Names(names))
	}
	for _, n := range nodes {
		if only != "" && n.Node != only {
			continue
		}
		r.Nodes = append(r.Nodes, n)
		for _, p := range n.Problems(now, staleAfter, set) {
			r.Problems = append(r.Problems, nodeProblem{Node: n.Node, Problem: p})
		}
	}
	if only == "" {
		for _, o := range orphans {
			r.Problems = append(r.Problems, nodeProblem{Node: o.Node, Problem: "a MeshNode without a Node: left over from a deleted node (kubectl delete meshnode " + o.Node + ")"})
		}
	}
	return r, nil
}

// summary is the one-line cluster summary, such as "Encryption: WireGuard
// (userspace), 3/3 nodes, strict".
func summary(total, encrypted int, modes map[string]bool, reasons []string) string {
	if total == 0 {
		return "Encryption: no nodes"
	}
	kind := "off"
	if len(modes) > 0 {
		var ms []string
		for m := range modes {
			ms = append(ms, m)
		}
		slices.Sort(ms)
		kind = "WireGuard (" + strings.Join(ms, ", ") + ")"
	}
	s := fmt.Sprintf("Encryption: %s, %d/%d nodes", kind, encrypted, total)
	if encrypted < total {
		s += " encrypted"
	}
	if len(reasons) == 0 {
		return s + ", strict"
	}
	return s + ", not strict: " + audit.Names(reasons)
}

func writeEncryptionStatus(w io.Writer, pal output.Palette, r encryptionStatusReport, now time.Time) error {
	var b strings.Builder
	line := pal.Green(r.Summary)
	if !r.Strict {
		line = pal.Red(r.Summary)
	}
	fmt.Fprintf(&b, "%s\n", pal.Bold(line))
	if r.detail == "" {
		fmt.Fprintf(&b, "Nodes: %d, %d reported, %d with tunnels up, %d with consistent keys; peers: %d/%d configured, %d never handshaken\n",
			r.TotalNodes, r.ReportedNodes, r.EncryptedNodes, r.KeysConsistent, r.PeersConfigured, r.PeersExpected, r.PeersNoHandshake)
	}
	b.WriteString("\n")
	// Every node up to fullTableNodes (or with --details), else only the
	// nodes that need attention, at most maxTableNodes of them.
	rows := r.Nodes
	hidden := 0
	if !r.details && len(r.Nodes) > fullTableNodes {
		attention := map[string]bool{}
		for _, p := range r.Problems {
			attention[p.Node] = true
		}
		rows = nil
		for _, n := range r.Nodes {
			if attention[n.Node] || !n.Encrypted || n.PeerCount < n.ExpectedPeers {
				rows = append(rows, n)
			}
		}
		hidden = len(r.Nodes) - min(len(rows), maxTableNodes)
		rows = rows[:min(len(rows), maxTableNodes)]
	}
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	// Painted columns have painted headers, to stay aligned in colour.
	fmt.Fprintf(tw, "NODE\t%s\tINTERFACE\t%s\tKEY AGE\tPORT\t%s\t%s\tHANDSHAKES\t%s\t%s\n",
		pal.Plain("MODE"), pal.Plain("KEY"), pal.Plain("STRICT"), pal.Plain("PEERS"), pal.Plain("LEAKS"), pal.Plain("UPDATED"))
	for _, n := range rows {
		if !n.Reported {
			none := pal.Plain("-")
			fmt.Fprintf(tw, "%s\t%s\t-\t%s\t-\t-\t%s\t%s\t-\t%s\t%s\n", n.Node, pal.Red("no MeshNode"), none, none, none, none, pal.Red("never"))
			continue
		}
		mode := pal.Green(output.Dash(string(n.Mode)))
		if !n.Encrypted {
			mode = pal.Red(output.Dash(string(n.Mode)))
		}
		key, keyAge := pal.Red("none"), "-"
		if n.PublicKey != "" {
			key = pal.Plain(output.Dash(n.Fingerprint))
			if n.KeyCreated != nil {
				keyAge = output.Age(now, *n.KeyCreated)
			}
		}
		port := "-"
		if n.ListenPort != 0 {
			port = fmt.Sprint(n.ListenPort)
		}
		strict := pal.Green("on")
		if !n.StrictMode {
			strict = pal.Red("off")
		}
		peers := fmt.Sprintf("%d/%d", n.PeerCount, n.ExpectedPeers)
		if n.PeerCount < n.ExpectedPeers {
			peers = pal.Red(peers)
		} else {
			peers = pal.Plain(peers)
		}
		hs := handshakes(n, now)
		leaks := fmt.Sprint(n.Leaks)
		if n.UnencryptedPackets > 0 {
			leaks += fmt.Sprintf(" (%d unencrypted)", n.UnencryptedPackets)
		}
		if n.Leaks > 0 || n.UnencryptedPackets > 0 {
			leaks = pal.Red(leaks)
		} else {
			leaks = pal.Plain(leaks)
		}
		updated := "never"
		if n.Updated != nil {
			updated = output.Age(now, *n.Updated) + " ago"
		}
		if n.Stale {
			updated = pal.Red(updated)
		} else {
			updated = pal.Plain(updated)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.Node, mode, output.Dash(n.Interface), key, keyAge, port,
			strict, peers, output.Dash(strings.Join(hs, ", ")), leaks, updated)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write encryption status: %w", err)
	}
	if hidden > 0 {
		fmt.Fprintf(&b, "… and %s not shown (--details lists every node, --node NAME one node's peers)\n", output.Plural(hidden, "more node"))
	}
	if r.detail != "" && len(r.Nodes) == 1 && r.Nodes[0].Reported {
		n := r.Nodes[0]
		fmt.Fprintf(&b, "\nPeers of %s:\n", n.Node)
		if s := n.PeerSummary; s != nil {
			fmt.Fprintf(&b, "  %s (handshake within %s) not listed", output.Plural(int(s.Healthy), "healthy peer"), s.HealthyHandshakeAge.Duration)
			if s.OldestHealthyHandshake != nil {
				fmt.Fprintf(&b, "; the oldest handshake %s ago", output.Age(now, s.OldestHealthyHandshake.Time))
			}
			b.WriteString("\n")
			if s.Unlisted > 0 {
				fmt.Fprintf(&b, "  %d more unhealthy peers than listed below\n", s.Unlisted)
			}
		}
		if len(n.Peers) == 0 {
			b.WriteString("  none\n")
		} else {
			tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "  PEER\tKEY\tENDPOINT\tALLOWED IPS\tLAST HANDSHAKE\tRX\tTX\tPROBLEM")
			for _, p := range n.Peers {
				hs := "never"
				if p.LastHandshake != nil {
					hs = output.Age(now, *p.LastHandshake) + " ago"
				}
				fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Node, output.Dash(p.Fingerprint), output.Dash(p.Endpoint),
					output.Dash(strings.Join(p.AllowedIPs, ",")), hs, bytesString(uint64(max(p.RxBytes, 0))), bytesString(uint64(max(p.TxBytes, 0))), output.Dash(p.Problem))
			}
			if err := tw.Flush(); err != nil {
				return fmt.Errorf("write encryption status: %w", err)
			}
		}
	}
	if len(r.Problems) > 0 {
		fmt.Fprintf(&b, "\n%s\n", pal.Bold(pal.Red("Attention:")))
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		shown := r.Problems
		if !r.details {
			shown = shown[:min(len(shown), audit.DefaultMaxFailures)]
		}
		for _, p := range shown {
			fmt.Fprintf(tw, "  %s\t%s\n", p.Node, p.Problem)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write encryption status: %w", err)
		}
		if rest := len(r.Problems) - len(shown); rest > 0 {
			fmt.Fprintf(&b, "  … and %d more (--details or -o json lists them all)\n", rest)
		}
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write encryption status: %w", err)
	}
	return nil
}

// The node table lists every node up to fullTableNodes, else at most
// maxTableNodes that need attention; a node's handshakes are listed one by
// one up to listedHandshakes peers, else summed up.
const (
	fullTableNodes   = 20
	maxTableNodes    = 50
	listedHandshakes = 8
)

// handshakes is the HANDSHAKES cell: each peer's last handshake, or with
// many peers how many never handshook and the oldest of the others.
func handshakes(n audit.NodeReport, now time.Time) []string {
	var hs []string
	if s := n.PeerSummary; s != nil {
		if s.Handshaking > 0 {
			hs = append(hs, fmt.Sprintf("%d never", s.Handshaking))
		}
		if s.Stale > 0 {
			hs = append(hs, fmt.Sprintf("%d older than %s", s.Stale, s.HealthyHandshakeAge.Duration))
		}
		if s.OldestHealthyHandshake != nil {
			hs = append(hs, "oldest "+output.Age(now, s.OldestHealthyHandshake.Time))
		}
		return hs
	}
	peers := n.Peers
	if len(peers) <= listedHandshakes {
		for _, p := range peers {
			if p.LastHandshake == nil {
				hs = append(hs, p.Node+" never")
			} else {
				hs = append(hs, p.Node+" "+output.Age(now, *p.LastHandshake))
			}
		}
		return hs
	}
	never := 0
	var oldest *time.Time
	for _, p := range peers {
		switch {
		case p.LastHandshake == nil:
			never++
		case oldest == nil || p.LastHandshake.Before(*oldest):
			oldest = p.LastHandshake
		}
	}
	if never > 0 {
		hs = append(hs, fmt.Sprintf("%d never", never))
	}
	if oldest != nil {
		hs = append(hs, "oldest "+output.Age(now, *oldest))
	}
	return hs
}

// progress says on stderr which slow step runs (reading thousands of
// MeshNodes, judging millions of pairs), only when stderr is a terminal,
// and clears the line when done.
type progress struct {
	w  io.Writer
	on bool
}

func newProgress(w io.Writer) progress {
	f, ok := w.(*os.File)
	return progress{w: w, on: ok && term.IsTerminal(int(f.Fd()))}
}

func (p progress) step(format string, args ...any) {
	if p.on {
		fmt.Fprintf(p.w, "\r\x1b[K"+format+"…", args...)
	}
}

func (p progress) done() {
	if p.on {
		fmt.Fprint(p.w, "\r\x1b[K")
	}
}
