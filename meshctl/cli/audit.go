package cli

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/api/annotations"
	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/meshctl/output"
)

func newAuditCommand(agent *agentOptions, kube *kubeOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Audit the mesh for compliance",
		Long: `Audit the whole mesh from the API server (--kubeconfig) and give a
PASS/FAIL verdict with a reason for every failure, fit for a compliance
record with -o json.

` + exitCodesHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	kube.addFlags(cmd)
	cmd.AddCommand(newAuditEncryptionCommand(agent, kube))
	return cmd
}

// auditOptions are the thresholds and switches of audit encryption.
type auditOptions struct {
	maxHandshakeAge time.Duration
	maxKeyAge       time.Duration
	staleAfter      time.Duration
	active          bool
	captureDuration time.Duration
	markerPort      uint32
}

func newAuditEncryptionCommand(agent *agentOptions, kube *kubeOptions) *cobra.Command {
	var (
		out  outputFlag
		opts auditOptions
	)
	cmd := &cobra.Command{
		Use:   "encryption",
		Short: "Prove that pod traffic between nodes is encrypted: PASS or FAIL, with reasons",
		Long: `Audit transparent encryption across the cluster from the MeshNodes the
agents write and the Nodes' WireGuard annotations. Every check is a row
with its scope (a node, or an ordered node pair A→B), result and reason:

  per node
    status-fresh         the node has a MeshNode written within --stale-after
    encryption-enabled   WireGuard is up (kernel or userspace), not disabled
    key-present          the node has a public key
    key-published        the key matches the Node's wireguard.veil.dev/public-key
    claims               no other node already holds a pod CIDR, address,
                         endpoint or key the node claims (the agents give it
                         to the established owner; both nodes are named)
    key-age              the key is younger than --max-key-age
    strict-mode          strict mode is on (fail closed)
    guard                in strict mode, every device that leads off the node
                         has the guard that drops pod plaintext (a NIC or VLAN
                         without it would be a way around the tunnel)
    leaks                strict mode dropped no pod packet headed out unencrypted
    unencrypted-packets  no pod packet was sent to another node unencrypted
  per ordered node pair A→B
    peer                 A peers with B: A's view of B's key and endpoint
                         equals what B publishes (its Node's annotations) and
                         what B reports about itself (its MeshNode); A's
                         allowed IPs for B cover B's spec.podCIDRs and hold
                         nothing else (but B's InternalIPs, with
                         node-to-node encryption or strict mode)
    handshake            A's last handshake with B is within --max-handshake-age
    active               (--active) a marker sent from a pod on A to a pod on
                         B arrives through the tunnel and is never seen in the
                         clear on either node's underlay

--active asks A's agent to send a fresh random marker (UDP, to --marker-port
or a UDP port the pod declares, else 9) to a pod on B while both agents capture their underlay and tunnel devices
for --capture-duration. It PASSes when neither underlay carries the marker
or plaintext pod frames, both carry WireGuard, and B's tunnel shows the
marker arrived. Pairs where a node runs no pod are listed as not tested.
Agents are reached through the lab's state file (VEIL_LAB_STATE); in a
cluster, reaching another node's agent goes through the API server, which
meshctl does not implement yet: such pairs FAIL and say so.

What the audit trusts, as the agents do: the API server; spec.podCIDRs
(the control plane sets them, not the node); a node's wireguard.veil.dev/*
annotations and its MeshNode status only because admission policies let
nobody but that node's own agent write them; and, for --active, the
agents' captures. What it does not trust: one source alone. Every pair's
view is cross-checked against what the other node publishes and reports,
so a forged status or annotation FAILs, naming both nodes. (On the wire,
likewise, a packet's source address is believed only when it comes out of
the tunnel of the node that holds it.)

-o json is the evidence: verdict, generation time, meshctl version, API
server, thresholds, every node's MeshNode status (with its update time and
agent version), every check and the failures, in a stable order.

Exit codes:
  0  PASS: every check passed
  1  FAIL: a check failed (each failure is listed with its reason)
  2  usage error, no kubeconfig
  3  the API server could not be reached or refused meshctl`,
		Example: `  meshctl audit encryption
  meshctl audit encryption -o json > encryption-audit.json
  meshctl audit encryption --max-handshake-age 3m --max-key-age 720h
  VEIL_LAB_STATE=/tmp/veil-lab/state.json meshctl audit encryption --active`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.check(); err != nil {
				return err
			}
			if err := opts.check(); err != nil {
				return err
			}
			kc, err := kube.connect()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			timeout := withTimeout(agent.timeout)
			cs, err := readCluster(ctx, kc, timeout)
			if err != nil {
				return err
			}
			now := agent.env.now()
			r := newAuditReport(cs, now, opts)
			if opts.active {
				pods := map[string][]corev1.Pod{}
				for _, n := range cs.nodes {
					if pods[n.Name], err = nodePods(ctx, kc, timeout, n.Name); err != nil {
						return err
					}
				}
				a := &activeAudit{agent: agent, opts: opts, conns: map[string]*agentclient.Conn{}, errs: map[string]error{}}
				defer a.close()
				a.run(ctx, &r, cs, pods)
			}
			r.finish()
			w := cmd.OutOrStdout()
			done, err := out.structured(w, r)
			if err != nil {
				return err
			}
			if !done {
				if err := writeAudit(w, output.PaletteFor(w), r); err != nil {
					return err
				}
			}
			if r.Verdict != verdictPass {
				return failed()
			}
			return nil
		},
	}
	fs := cmd.Flags()
	fs.DurationVar(&opts.maxHandshakeAge, "max-handshake-age", 5*time.Minute, "FAIL a node pair whose last WireGuard handshake is older")
	fs.DurationVar(&opts.maxKeyAge, "max-key-age", 2160*time.Hour, "FAIL a node whose key is older (rotate it with meshctl encryption rotate-key)")
	fs.DurationVar(&opts.staleAfter, "stale-after", defaultStaleAfter, "FAIL a node whose MeshNode status is older (its agent is not running)")
	fs.BoolVar(&opts.active, "active", false, "also send a marker between pods on every node pair and have the agents capture the wire")
	fs.DurationVar(&opts.captureDuration, "capture-duration", 2*time.Second, "how long each agent captures per node pair with --active")
	fs.Uint32Var(&opts.markerPort, "marker-port", 0, "the UDP port the --active marker is sent to (default: a UDP port the destination pod declares, else 9; the pod need not listen)")
	addOutputFlag(cmd, &out)
	return cmd
}

func (o auditOptions) check() error {
	for _, f := range []struct {
		name string
		d    time.Duration
	}{{"--max-handshake-age", o.maxHandshakeAge}, {"--max-key-age", o.maxKeyAge}, {"--stale-after", o.staleAfter}, {"--capture-duration", o.captureDuration}} {
		if f.d <= 0 {
			return usageErrorf("%s must be positive", f.name)
		}
	}
	// The agent refuses captures longer than 10s.
	if o.captureDuration > 10*time.Second {
		return usageErrorf("--capture-duration must be at most 10s")
	}
	if o.markerPort > 65535 {
		return usageErrorf("--marker-port must be 1..65535")
	}
	return nil
}

// Results and verdicts of the audit.
const (
	resultPass  = "PASS"
	resultFail  = "FAIL"
	verdictPass = resultPass
	verdictFail = resultFail
)

// auditReport is the audit's evidence, and its -o json|yaml output.
type auditReport struct {
	Verdict        string          `json:"verdict"`
	GeneratedAt    string          `json:"generatedAt"`
	MeshctlVersion string          `json:"meshctlVersion"`
	Cluster        auditCluster    `json:"cluster"`
	Thresholds     auditThresholds `json:"thresholds"`
	// Nodes are the MeshNode status snapshots the checks judged.
	Nodes    []nodeEncryptionReport `json:"nodes"`
	Checks   []auditCheck           `json:"checks"`
	Failures []auditCheck           `json:"failures"`
	// NotTested are the active checks that had nothing to test.
	NotTested []auditCheck `json:"notTested,omitempty"`
	// Active is the evidence of each active check.
	Active []activeEvidence `json:"active,omitempty"`
}

type auditCluster struct {
	Server string `json:"server"`
}

type auditThresholds struct {
	MaxHandshakeAge string `json:"maxHandshakeAge"`
	MaxKeyAge       string `json:"maxKeyAge"`
	StaleAfter      string `json:"staleAfter"`
	Active          bool   `json:"active"`
	CaptureDuration string `json:"captureDuration,omitempty"`
	MarkerPort      uint32 `json:"markerPort,omitempty"`
}

// auditCheck is one row of the audit.
type auditCheck struct {
	// Scope is a node, or an ordered node pair "A→B".
	Scope  string `json:"scope"`
	Check  string `json:"check"`
	Result string `json:"result"`
	Reason string `json:"reason"`
}

func pass(scope, check, format string, args ...any) auditCheck {
	return auditCheck{Scope: scope, Check: check, Result: resultPass, Reason: fmt.Sprintf(format, args...)}
}

func fail(scope, check, format string, args ...any) auditCheck {
	return auditCheck{Scope: scope, Check: check, Result: resultFail, Reason: fmt.Sprintf(format, args...)}
}

func pairScope(a, b string) string { return a + "→" + b }

// The node checks, in report order.
var nodeChecks = []string{"status-fresh", "encryption-enabled", "key-present", "key-published", "claims", "key-age", "strict-mode", "guard", "leaks", "unencrypted-packets"}

func newAuditReport(cs *clusterState, now time.Time, o auditOptions) auditReport {
	nodes, _ := snapshots(cs, now, o.staleAfter)
	r := auditReport{
		GeneratedAt:    now.UTC().Format(time.RFC3339),
		MeshctlVersion: buildVersion().Version,
		Cluster:        auditCluster{Server: cs.server},
		Thresholds: auditThresholds{
			MaxHandshakeAge: o.maxHandshakeAge.String(), MaxKeyAge: o.maxKeyAge.String(),
			StaleAfter: o.staleAfter.String(), Active: o.active,
		},
		Nodes:    append([]nodeEncryptionReport{}, nodes...),
		Checks:   []auditCheck{},
		Failures: []auditCheck{},
	}
	if o.active {
		r.Thresholds.CaptureDuration = o.captureDuration.String()
		r.Thresholds.MarkerPort = o.markerPort
	}
	claims := map[string]nodeClaims{}
	for i, n := range nodes {
		claims[n.Node] = claimsOf(&cs.nodes[i])
	}
	if len(nodes) == 0 {
		r.Checks = append(r.Checks, fail("cluster", "nodes", "the cluster has no Node to audit"))
	}
	for _, n := range nodes {
		r.Checks = append(r.Checks, auditNode(n, now, o)...)
	}
	r.Checks = append(r.Checks, auditClaims(cs)...)
	for _, a := range nodes {
		for _, b := range nodes {
			if a.Node != b.Node {
				r.Checks = append(r.Checks, auditPair(a, b, claims[b.Node], now, o)...)
			}
		}
	}
	return r
}

// finish orders the checks and sets the verdict.
func (r *auditReport) finish() {
	order := map[string]int{}
	for i, c := range append(nodeChecks, "peer", "handshake", "active") {
		order[c] = i
	}
	// Node rows first, then pairs; within each, by scope, then check order.
	key := func(c auditCheck) (bool, string, int) {
		return strings.Contains(c.Scope, "→"), c.Scope, order[c.Check]
	}
	slices.SortStableFunc(r.Checks, func(x, y auditCheck) int {
		px, sx, ox := key(x)
		py, sy, oy := key(y)
		switch {
		case px != py:
			if px {
				return 1
			}
			return -1
		case sx != sy:
			return strings.Compare(sx, sy)
		}
		return ox - oy
	})
	r.Failures = []auditCheck{}
	for _, c := range r.Checks {
		if c.Result != resultPass {
			r.Failures = append(r.Failures, c)
		}
	}
	r.Verdict = verdictPass
	if len(r.Failures) > 0 {
		r.Verdict = verdictFail
	}
}

// nodeClaims are what a Node says the node holds, from the sources Veil
// trusts: its pod CIDRs from spec.podCIDRs (set by the control plane), its
// InternalIPs (which peers route to it with node-to-node encryption).
type nodeClaims struct {
	podCIDRs []netip.Prefix
	addrs    []netip.Addr
}

func claimsOf(node *corev1.Node) nodeClaims {
	info, _ := nodeinfo.Parse(node) // malformed fields are left out, and fail the peer checks
	return nodeClaims{podCIDRs: info.PodCIDRs, addrs: info.InternalIPs}
}

// auditClaims FAILs a node whose claim (pod CIDR, address, endpoint, key)
// collides with one another node already holds, naming both: agents refuse
// it (see nodeinfo.Resolve), so the node is not reachable as it says.
func auditClaims(cs *clusterState) []auditCheck {
	nodes := make([]*corev1.Node, len(cs.nodes))
	for i := range cs.nodes {
		nodes[i] = &cs.nodes[i]
	}
	byNode := map[string][]string{}
	for _, c := range nodeinfo.Resolve(nodes, nodeinfo.Options{}).Conflicts {
		byNode[c.Node] = append(byNode[c.Node], c.Error())
	}
	var out []auditCheck
	for _, n := range cs.nodes {
		if cs := byNode[n.Name]; len(cs) > 0 {
			out = append(out, fail(n.Name, "claims", "%s; the owners keep them, and peers do not route them to %s", strings.Join(cs, "; "), n.Name))
		} else {
			out = append(out, pass(n.Name, "claims", "no other node holds its pod CIDRs, addresses or key"))
		}
	}
	return out
}

func auditNode(n nodeEncryptionReport, now time.Time, o auditOptions) []auditCheck {
	s := n.Node
	if !n.Reported {
		out := []auditCheck{fail(s, "status-fresh", "no MeshNode: the node's agent has never reported its encryption state (is veil-agent running on it?)")}
		for _, c := range nodeChecks[1:] {
			if c != "claims" { // from the Nodes, not the MeshNode
				out = append(out, fail(s, c, "not checked: no MeshNode"))
			}
		}
		return out
	}
	var out []auditCheck
	switch {
	case n.Updated == nil:
		out = append(out, fail(s, "status-fresh", "the MeshNode has no status update time: its agent never wrote it"))
	case n.Stale:
		out = append(out, fail(s, "status-fresh", "MeshNode status is stale: last updated %s ago at %s, more than --stale-after %s (is veil-agent running on the node?)",
			output.Age(now, *n.Updated), n.Updated.Format(time.RFC3339), o.staleAfter))
	default:
		out = append(out, pass(s, "status-fresh", "updated %s ago by agent %s", output.Age(now, *n.Updated), output.OrUnknown(n.AgentVersion)))
	}
	switch n.Mode {
	case meshv1alpha1.EncryptionModeKernel, meshv1alpha1.EncryptionModeUserspace:
		out = append(out, pass(s, "encryption-enabled", "WireGuard (%s) on %s", n.Mode, output.Dash(n.Interface)))
	case meshv1alpha1.EncryptionModeDisabled, "":
		out = append(out, fail(s, "encryption-enabled", "encryption is disabled: pod traffic to other nodes is not encrypted"))
	default:
		out = append(out, fail(s, "encryption-enabled", "unknown encryption mode %q", n.Mode))
	}
	fp := nodeinfo.KeyFingerprint(n.PublicKey)
	switch {
	case n.PublicKey == "":
		out = append(out, fail(s, "key-present", "no public key: the node has no WireGuard key, so no peer can encrypt to it"))
	case fp == "":
		out = append(out, fail(s, "key-present", "public key %q is not a base64 WireGuard key", n.PublicKey))
	default:
		out = append(out, pass(s, "key-present", "key %s", fp))
	}
	ann, annOK := n.Annotations[annotations.WireGuardPublicKey]
	switch {
	case n.PublicKey == "":
		out = append(out, fail(s, "key-published", "not checked: no public key"))
	case !annOK || ann == "":
		out = append(out, fail(s, "key-published", "the Node has no %s annotation: peers cannot find the node's key", annotations.WireGuardPublicKey))
	case ann != n.PublicKey:
		out = append(out, fail(s, "key-published", "the Node's %s annotation is key %s, the node's device has key %s: peers encrypt to a key the node does not hold",
			annotations.WireGuardPublicKey, output.Dash(nodeinfo.KeyFingerprint(ann)), output.Dash(fp)))
	default:
		out = append(out, pass(s, "key-published", "the Node's %s annotation matches", annotations.WireGuardPublicKey))
	}
	switch {
	case n.PublicKey == "":
		out = append(out, fail(s, "key-age", "not checked: no public key"))
	case n.KeyCreated == nil:
		out = append(out, fail(s, "key-age", "the key's creation time is not recorded"))
	case now.Sub(*n.KeyCreated) > o.maxKeyAge:
		out = append(out, fail(s, "key-age", "key %s is %s old, more than --max-key-age %s: rotate it (meshctl encryption rotate-key --node %s)",
			output.Dash(fp), output.Age(now, *n.KeyCreated), o.maxKeyAge, s))
	default:
		out = append(out, pass(s, "key-age", "created %s ago, at %s", output.Age(now, *n.KeyCreated), n.KeyCreated.Format(time.RFC3339)))
	}
	if n.StrictMode {
		out = append(out, pass(s, "strict-mode", "on"))
		switch {
		case len(n.UnguardedDevices) > 0:
			out = append(out, fail(s, "guard", "%s lead%s off the node without the strict-mode guard: pod packets routed that way would not be stopped",
				strings.Join(n.UnguardedDevices, ", "), map[bool]string{true: "s", false: ""}[len(n.UnguardedDevices) == 1]))
		case len(n.GuardedDevices) == 0:
			out = append(out, fail(s, "guard", "the agent reports no guarded device (an agent older than the guard, or none attached)"))
		default:
			out = append(out, pass(s, "guard", "on %s", strings.Join(n.GuardedDevices, ", ")))
		}
	} else {
		out = append(out, fail(s, "strict-mode", "strict mode is off: pod traffic to a node without a working tunnel would leave unencrypted"))
	}
	if n.Leaks == 0 {
		out = append(out, pass(s, "leaks", "0"))
	} else {
		reason := fmt.Sprintf("strict mode dropped %s headed to other nodes unencrypted", output.Plural(int(n.Leaks), "pod packet"))
		if l, ok := latestLeak(n); ok {
			reason += fmt.Sprintf("; latest: %s → %s %s", l.Source, l.Destination, l.Protocol)
			if l.Endpoint != "" {
				reason += " via " + l.Endpoint
			}
			reason += " (" + l.Reason + ")"
			if !l.Last.IsZero() {
				reason += " at " + l.Last.UTC().Format(time.RFC3339)
			}
		}
		out = append(out, fail(s, "leaks", "%s", reason))
	}
	if n.UnencryptedPackets == 0 {
		out = append(out, pass(s, "unencrypted-packets", "0"))
	} else {
		out = append(out, fail(s, "unencrypted-packets", "%s sent to other nodes unencrypted", output.Plural(int(n.UnencryptedPackets), "pod packet")))
	}
	return out
}

// latestLeak is the most recent of a node's recorded leaks.
func latestLeak(n nodeEncryptionReport) (meshv1alpha1.LeakRecord, bool) {
	var (
		l  meshv1alpha1.LeakRecord
		ok bool
	)
	for _, r := range n.RecentLeaks {
		if !ok || r.Last.After(l.Last.Time) {
			l, ok = r, true
		}
	}
	return l, ok
}

func auditPair(a, b nodeEncryptionReport, bClaims nodeClaims, now time.Time, o auditOptions) []auditCheck {
	s := pairScope(a.Node, b.Node)
	if !a.Reported {
		return []auditCheck{
			fail(s, "peer", "not checked: %s has no MeshNode", a.Node),
			fail(s, "handshake", "not checked: %s has no MeshNode", a.Node),
		}
	}
	i := slices.IndexFunc(a.Peers, func(p peerEncryptionReport) bool { return p.Node == b.Node })
	if i < 0 {
		return []auditCheck{
			fail(s, "peer", "%s is not a peer of %s", b.Node, a.Node),
			fail(s, "handshake", "not checked: %s is not a peer of %s", b.Node, a.Node),
		}
	}
	p := a.Peers[i]
	var out []auditCheck
	// A's view of B must equal what B publishes (its Node's annotations,
	// which only B's agent may write) and what B reports about itself
	// (its MeshNode, which only B's agent may write): a view that matches
	// one but not the other is a forgery or a split brain.
	var reportedEP string
	if ip, err := netip.ParseAddr(b.NodeIP); err == nil && b.ListenPort > 0 {
		reportedEP = netip.AddrPortFrom(ip, uint16(b.ListenPort)).String()
	}
	var problems []string
	if b.PublicKey == "" && b.Annotations[annotations.WireGuardPublicKey] == "" {
		problems = append(problems, fmt.Sprintf("%s has no public key to peer with", b.Node))
	}
	problems = append(problems, viewProblems(a.Node, b.Node, "with", p.PublicKey,
		b.Annotations[annotations.WireGuardPublicKey], b.PublicKey, func(k string) string { return "key " + output.Dash(nodeinfo.KeyFingerprint(k)) })...)
	if p.Endpoint == "" {
		problems = append(problems, fmt.Sprintf("no endpoint for %s", b.Node))
	} else {
		problems = append(problems, viewProblems(a.Node, b.Node, "at", p.Endpoint,
			b.Annotations[annotations.WireGuardEndpoint], reportedEP, func(e string) string { return "endpoint " + e })...)
	}
	var allowed []netip.Prefix
	for _, s := range p.AllowedIPs {
		if pr, err := netip.ParsePrefix(strings.TrimSpace(s)); err == nil {
			allowed = append(allowed, pr.Masked())
		}
	}
	if len(bClaims.podCIDRs) == 0 {
		problems = append(problems, fmt.Sprintf("%s's pod CIDRs are unknown (its Node has no spec.podCIDRs)", b.Node))
	}
	var uncovered, foreign []string
	for _, c := range bClaims.podCIDRs {
		if !slices.ContainsFunc(allowed, func(a netip.Prefix) bool { return a.Bits() <= c.Bits() && a.Contains(c.Addr()) }) {
			uncovered = append(uncovered, c.String())
		}
	}
	// Allowed IPs are the addresses A believes come from B: anything
	// beyond B's pod CIDRs and (node-to-node) B's own addresses lets B
	// send as someone else.
	for _, a := range allowed {
		ours := slices.ContainsFunc(bClaims.podCIDRs, func(c netip.Prefix) bool { return c.Bits() <= a.Bits() && c.Contains(a.Addr()) }) ||
			(a.IsSingleIP() && slices.Contains(bClaims.addrs, a.Addr()))
		if !ours {
			foreign = append(foreign, a.String())
		}
	}
	if len(uncovered) > 0 {
		problems = append(problems, fmt.Sprintf("allowed IPs %s do not cover %s's pod CIDRs %s", output.Dash(strings.Join(p.AllowedIPs, ",")), b.Node, strings.Join(uncovered, ",")))
	}
	if len(foreign) > 0 {
		problems = append(problems, fmt.Sprintf("%s lets %s send from %s, which is not %s's", a.Node, b.Node, strings.Join(foreign, ","), b.Node))
	}
	if len(problems) > 0 {
		out = append(out, fail(s, "peer", "%s", strings.Join(problems, "; ")))
	} else {
		out = append(out, pass(s, "peer", "key %s, endpoint %s, allowed IPs %s", output.Dash(nodeinfo.KeyFingerprint(p.PublicKey)), p.Endpoint, strings.Join(p.AllowedIPs, ",")))
	}
	switch {
	case p.LastHandshake == nil:
		out = append(out, fail(s, "handshake", "%s has never completed a handshake with %s", a.Node, b.Node))
	case now.Sub(*p.LastHandshake) > o.maxHandshakeAge:
		out = append(out, fail(s, "handshake", "last handshake %s ago at %s, more than --max-handshake-age %s",
			output.Age(now, *p.LastHandshake), p.LastHandshake.Format(time.RFC3339), o.maxHandshakeAge))
	default:
		out = append(out, pass(s, "handshake", "last handshake %s ago", output.Age(now, *p.LastHandshake)))
	}
	return out
}

// viewProblems compares A's view of a value of B (what) with what B
// publishes and what B reports, either of which may be unknown (""); show
// formats a value for the reason.
func viewProblems(a, b, what, view, published, reported string, show func(string) string) []string {
	badPub := published != "" && view != published
	badRep := reported != "" && view != reported
	switch {
	case badPub && badRep && published == reported:
		return []string{fmt.Sprintf("%s has %s %s %s, %s publishes and reports %s", a, b, what, show(view), b, show(published))}
	case badPub && badRep:
		return []string{
			fmt.Sprintf("%s has %s %s %s, %s publishes %s", a, b, what, show(view), b, show(published)),
			fmt.Sprintf("%s has %s %s %s, %s reports %s", a, b, what, show(view), b, show(reported)),
		}
	case badPub:
		return []string{fmt.Sprintf("%s has %s %s %s, %s publishes %s", a, b, what, show(view), b, show(published))}
	case badRep:
		return []string{fmt.Sprintf("%s has %s %s %s, %s reports %s", a, b, what, show(view), b, show(reported))}
	}
	return nil
}

// activeEvidence is what one active check saw.
type activeEvidence struct {
	Scope          string `json:"scope"`
	Marker         string `json:"marker"`
	SourcePod      string `json:"sourcePod,omitempty"`
	SourceIP       string `json:"sourceIP,omitempty"`
	DestinationPod string `json:"destinationPod"`
	DestinationIP  string `json:"destinationIP"`
	// DestinationPort is the UDP port the marker was sent to.
	DestinationPort uint32           `json:"destinationPort"`
	Sent            uint32           `json:"sent"`
	Source          *captureEvidence `json:"sourceCapture,omitempty"`
	Destination     *captureEvidence `json:"destinationCapture,omitempty"`
	Error           string           `json:"error,omitempty"`
}

type captureEvidence struct {
	Node                 string    `json:"node"`
	Started              time.Time `json:"started"`
	UnderlayInterface    string    `json:"underlayInterface"`
	TunnelInterface      string    `json:"tunnelInterface"`
	UnderlayFrames       uint64    `json:"underlayFrames"`
	WireGuardFrames      uint64    `json:"wireguardFrames"`
	UnderlayMarkerFrames uint64    `json:"underlayMarkerFrames"`
	TunnelMarkerFrames   uint64    `json:"tunnelMarkerFrames"`
	PlaintextPodFrames   uint64    `json:"plaintextPodFrames"`
}

func newCaptureEvidence(node string, c *agentv1.CaptureResponse) *captureEvidence {
	return &captureEvidence{
		Node: node, Started: time.Unix(0, c.StartedUnixNano).UTC(),
		UnderlayInterface: c.UnderlayInterface, TunnelInterface: c.TunnelInterface,
		UnderlayFrames: c.UnderlayFrames, WireGuardFrames: c.WireguardFrames,
		UnderlayMarkerFrames: c.UnderlayMarkerFrames, TunnelMarkerFrames: c.TunnelMarkerFrames,
		PlaintextPodFrames: c.PlaintextPodFrames,
	}
}

// markerSends is how many markers each active check sends.
const markerSends = 3

// defaultMarkerPort is discard, for a pod that declares no UDP port.
const defaultMarkerPort = 9

// markerPort is the port to send a marker to pod on: the --marker-port
// flag, else the first UDP port the pod declares, so that the marker is
// delivered rather than answered with an ICMP port unreachable.
func markerPort(flag uint32, pod corev1.Pod) uint32 {
	if flag != 0 {
		return flag
	}
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			if p.Protocol == corev1.ProtocolUDP && p.ContainerPort > 0 {
				return uint32(p.ContainerPort)
			}
		}
	}
	return defaultMarkerPort
}

// activeAudit runs the active checks, one node pair at a time so that one
// pair's traffic is not counted in another's capture.
type activeAudit struct {
	agent *agentOptions
	opts  auditOptions
	// conns and errs cache one connection (or why there is none) per node.
	conns map[string]*agentclient.Conn
	errs  map[string]error
}

func (a *activeAudit) close() {
	for _, c := range a.conns {
		c.Close()
	}
}

// conn connects to a node's agent through the --node resolver.
func (a *activeAudit) conn(ctx context.Context, node string) (*agentclient.Conn, error) {
	if c, ok := a.conns[node]; ok {
		return c, nil
	}
	if err, ok := a.errs[node]; ok {
		return nil, err
	}
	o := *a.agent
	o.node = node
	o.socketSet = func() bool { return false }
	c, err := o.connect(ctx)
	if err != nil {
		a.errs[node] = err
		return nil, err
	}
	a.conns[node] = c
	return c, nil
}

// podsOn are the pods of a node that have a pod address: not host
// network, an IPv4 address inside the node's pod CIDRs when those are known.
func podsOn(pods []corev1.Pod, cidrs []netip.Prefix) []corev1.Pod {
	var out []corev1.Pod
	for _, p := range pods {
		ip, err := netip.ParseAddr(p.Status.PodIP)
		if p.Spec.HostNetwork || err != nil || !ip.Is4() || p.DeletionTimestamp != nil {
			continue
		}
		if len(cidrs) > 0 && !slices.ContainsFunc(cidrs, func(c netip.Prefix) bool { return c.Contains(ip) }) {
			continue
		}
		out = append(out, p)
	}
	return out
}

func (a *activeAudit) run(ctx context.Context, r *auditReport, cs *clusterState, pods map[string][]corev1.Pod) {
	withPods := map[string][]corev1.Pod{}
	for i, n := range r.Nodes {
		withPods[n.Node] = podsOn(pods[n.Node], claimsOf(&cs.nodes[i]).podCIDRs)
	}
	for _, src := range r.Nodes {
		for _, dst := range r.Nodes {
			if src.Node == dst.Node {
				continue
			}
			s := pairScope(src.Node, dst.Node)
			switch {
			case len(withPods[src.Node]) == 0:
				r.NotTested = append(r.NotTested, auditCheck{Scope: s, Check: "active", Reason: src.Node + " runs no pod to send the marker from"})
				continue
			case len(withPods[dst.Node]) == 0:
				r.NotTested = append(r.NotTested, auditCheck{Scope: s, Check: "active", Reason: dst.Node + " runs no pod to send the marker to"})
				continue
			}
			c, ev := a.pair(ctx, src.Node, dst.Node, withPods[dst.Node][0])
			r.Checks = append(r.Checks, c)
			r.Active = append(r.Active, ev)
		}
	}
}

// pair sends a marker from a pod on src to dst's pod while both agents
// capture, and judges what they saw.
func (a *activeAudit) pair(ctx context.Context, src, dst string, to corev1.Pod) (auditCheck, activeEvidence) {
	s := pairScope(src, dst)
	ev := activeEvidence{Scope: s, Marker: "veil-audit-" + rand.Text(), DestinationPod: to.Namespace + "/" + to.Name, DestinationIP: to.Status.PodIP,
		DestinationPort: markerPort(a.opts.markerPort, to)}
	failWith := func(format string, args ...any) (auditCheck, activeEvidence) {
		c := fail(s, "active", format, args...)
		ev.Error = c.Reason
		return c, ev
	}
	sc, err := a.conn(ctx, src)
	if err != nil {
		return failWith("cannot reach the agent of %s: %s", src, oneLine(err))
	}
	dc, err := a.conn(ctx, dst)
	if err != nil {
		return failWith("cannot reach the agent of %s: %s", dst, oneLine(err))
	}
	req := &agentv1.CaptureRequest{Marker: ev.Marker, DurationMs: uint32(a.opts.captureDuration / time.Millisecond)}
	type captured struct {
		resp *agentv1.CaptureResponse
		err  error
	}
	var (
		wg           sync.WaitGroup
		srcCap, dCap captured
	)
	capture := func(c *agentclient.Conn, node string, out *captured) {
		defer wg.Done()
		cctx, cancel := context.WithTimeout(ctx, a.opts.captureDuration+c.Timeout)
		defer cancel()
		resp, err := c.Client.CaptureUnderlay(cctx, req)
		if err != nil {
			err = callError(c, "capture the underlay of "+node, err)
		}
		*out = captured{resp, err}
	}
	wg.Add(2)
	go capture(sc, src, &srcCap)
	go capture(dc, dst, &dCap)
	// Give both captures a head start before the marker goes out.
	lead := min(a.opts.captureDuration/4, 500*time.Millisecond)
	select {
	case <-time.After(lead):
	case <-ctx.Done():
	}
	// One marker per call: the agent sends from a connected UDP socket,
	// which an ICMP port unreachable from a pod that does not listen
	// closes for the datagrams after the first.
	var sendErr error
	gap := min(a.opts.captureDuration/10, 100*time.Millisecond)
	for i := 0; i < markerSends && sendErr == nil; i++ {
		if i > 0 {
			time.Sleep(gap)
		}
		var sent *agentv1.SendMarkerResponse
		sent, sendErr = unary(ctx, sc, "send marker from "+src, func(ctx context.Context) (*agentv1.SendMarkerResponse, error) {
			return sc.Client.SendMarker(ctx, &agentv1.SendMarkerRequest{Destination: to.Status.PodIP, Port: ev.DestinationPort, Marker: ev.Marker, Count: 1})
		})
		if sendErr == nil {
			ev.SourcePod, ev.SourceIP, ev.Sent = sent.SourcePod, sent.SourceIp, ev.Sent+sent.Sent
		}
	}
	wg.Wait()
	if sendErr != nil {
		return failWith("%s", oneLine(sendErr))
	}
	if srcCap.err != nil {
		return failWith("%s", oneLine(srcCap.err))
	}
	if dCap.err != nil {
		return failWith("%s", oneLine(dCap.err))
	}
	ev.Source, ev.Destination = newCaptureEvidence(src, srcCap.resp), newCaptureEvidence(dst, dCap.resp)
	var problems []string
	if ev.Sent == 0 {
		problems = append(problems, src+" sent no marker")
	}
	for _, c := range []*captureEvidence{ev.Source, ev.Destination} {
		if c.UnderlayMarkerFrames > 0 {
			problems = append(problems, fmt.Sprintf("the marker was seen in the clear on %s's underlay (%s): %s", c.Node, output.Dash(c.UnderlayInterface), output.Plural(int(c.UnderlayMarkerFrames), "frame")))
		}
		if c.PlaintextPodFrames > 0 {
			problems = append(problems, fmt.Sprintf("%s on %s's underlay (%s)", output.Plural(int(c.PlaintextPodFrames), "plaintext pod frame"), c.Node, output.Dash(c.UnderlayInterface)))
		}
		if c.WireGuardFrames == 0 {
			problems = append(problems, fmt.Sprintf("no WireGuard frames on %s's underlay (%s)", c.Node, output.Dash(c.UnderlayInterface)))
		}
	}
	if ev.Destination.TunnelMarkerFrames == 0 {
		problems = append(problems, fmt.Sprintf("the marker never arrived: %s's tunnel (%s) did not see it", dst, output.Dash(ev.Destination.TunnelInterface)))
	}
	if len(problems) > 0 {
		return failWith("%s", strings.Join(problems, "; "))
	}
	return pass(s, "active", "marker sent %d× from %s (%s) to %s (%s) arrived through %s's tunnel %d×; never in the clear on %s (%s) or %s (%s), WireGuard frames %d and %d",
		ev.Sent, output.Dash(ev.SourcePod), output.Dash(ev.SourceIP), ev.DestinationPod, ev.DestinationIP, dst, ev.Destination.TunnelMarkerFrames,
		src, output.Dash(ev.Source.UnderlayInterface), dst, output.Dash(ev.Destination.UnderlayInterface),
		ev.Source.WireGuardFrames, ev.Destination.WireGuardFrames), ev
}

// oneLine puts an error's message, which may carry hints on further
// lines, on one line for a report row.
func oneLine(err error) string { return strings.Join(strings.Fields(err.Error()), " ") }

func writeAudit(w io.Writer, pal output.Palette, r auditReport) error {
	var b strings.Builder
	verdict := pal.Green(r.Verdict)
	if r.Verdict != verdictPass {
		verdict = pal.Red(r.Verdict)
	}
	pairs := max(len(r.Nodes)*(len(r.Nodes)-1), 0)
	fmt.Fprintf(&b, "%s %s  %s, %s, %d/%d checks passed\n", pal.Bold("Encryption audit:"), pal.Bold(verdict),
		output.Plural(len(r.Nodes), "node"), output.Plural(pairs, "node pair"), len(r.Checks)-len(r.Failures), len(r.Checks))
	active := "off"
	if r.Thresholds.Active {
		port := "a UDP port the pod declares, else 9"
		if r.Thresholds.MarkerPort != 0 {
			port = fmt.Sprintf("UDP port %d", r.Thresholds.MarkerPort)
		}
		active = fmt.Sprintf("on (capture %s, markers to %s)", r.Thresholds.CaptureDuration, port)
	}
	fmt.Fprintf(&b, "Generated %s by meshctl %s against %s\n", r.GeneratedAt, r.MeshctlVersion, output.Dash(r.Cluster.Server))
	fmt.Fprintf(&b, "Thresholds: handshake ≤ %s, key age ≤ %s, status age ≤ %s; active %s\n\n",
		r.Thresholds.MaxHandshakeAge, r.Thresholds.MaxKeyAge, r.Thresholds.StaleAfter, active)
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "SCOPE\tCHECK\t%s\tREASON\n", pal.Plain("RESULT"))
	for _, c := range r.Checks {
		res := pal.Green(c.Result)
		if c.Result != resultPass {
			res = pal.Red(c.Result)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Scope, c.Check, res, c.Reason)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write audit: %w", err)
	}
	if len(r.NotTested) > 0 {
		b.WriteString("\nNot tested (active):\n")
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		for _, c := range r.NotTested {
			fmt.Fprintf(tw, "  %s\t%s\n", c.Scope, c.Reason)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write audit: %w", err)
		}
	}
	if len(r.Failures) > 0 {
		fmt.Fprintf(&b, "\n%s\n", pal.Bold(pal.Red(fmt.Sprintf("FAIL: %s", output.Plural(len(r.Failures), "check")+" failed:"))))
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		for _, c := range r.Failures {
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", c.Scope, c.Check, c.Reason)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write audit: %w", err)
		}
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write audit: %w", err)
	}
	return nil
}
