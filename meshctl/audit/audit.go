// Package audit is meshctl's encryption audit engine: from the cluster
// state read from the API server (Cluster: Nodes and MeshNodes) it builds
// each node's encryption snapshot (Snapshots), judges every node and
// ordered node pair against the thresholds (New), optionally runs the
// active marker probe through the agents (Active), and renders the report
// (Write). It knows nothing of cobra; meshctl's audit and encryption
// commands only read flags, the API server and the agents, and call it.
//
//	r := audit.New(cluster, now, opts, version)
//	if opts.Active {
//		a := audit.NewActive(opts, dial)
//		defer a.Close()
//		a.Run(ctx, &r, cluster, podsByNode)
//	}
//	r.Finish()
//	err := audit.Write(w, output.PaletteFor(w), r)
package audit

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/veilmesh/veil/api/annotations"
	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/meshctl/output"
)

// Options are the thresholds and switches of audit encryption.
type Options struct {
	// MaxHandshakeAge FAILs a node pair whose last handshake is older.
	MaxHandshakeAge time.Duration
	// MaxKeyAge FAILs a node whose key is older.
	MaxKeyAge time.Duration
	// StaleAfter FAILs a node whose MeshNode status is older.
	StaleAfter time.Duration
	// Active also runs the active checks (see Active).
	Active bool
	// CaptureDuration is how long each agent captures per node pair.
	CaptureDuration time.Duration
	// MarkerPort is the UDP port markers go to; 0 picks one per pod.
	MarkerPort uint32
}

// Results of a check, and verdicts of the audit.
const (
	Pass = "PASS"
	Fail = "FAIL"
)

// Report is the audit's evidence, and its -o json|yaml output.
type Report struct {
	Verdict        string      `json:"verdict"`
	GeneratedAt    string      `json:"generatedAt"`
	MeshctlVersion string      `json:"meshctlVersion"`
	Cluster        ClusterInfo `json:"cluster"`
	Thresholds     Thresholds  `json:"thresholds"`
	// Summary counts nodes, pairs and each check's results.
	Summary Summary `json:"summary"`
	// Nodes are the MeshNode status snapshots the checks judged.
	Nodes    []NodeReport `json:"nodes"`
	Checks   []Check      `json:"checks"`
	Failures []Check      `json:"failures"`
	// NotTested are the active checks that had nothing to test.
	NotTested []Check `json:"notTested,omitempty"`
	// Active is the evidence of each active check.
	Active []ActiveEvidence `json:"active,omitempty"`
}

// Summary counts what the audit found: the first thing it prints.
type Summary struct {
	Nodes int `json:"nodes"`
	// Reported nodes have a MeshNode; TunnelsUp of them are encrypted
	// (reported recently, WireGuard up, with a key); KeysConsistent
	// passed key-published (the device's key is the one peers read).
	Reported       int `json:"reported"`
	TunnelsUp      int `json:"tunnelsUp"`
	KeysConsistent int `json:"keysConsistent"`
	// Pairs are the ordered node pairs, each judged from the first node's
	// own peer view; PairsFailed of them failed a check.
	Pairs       int `json:"pairs"`
	PairsFailed int `json:"pairsFailed"`
	// ByCheck counts each check's results, in report order.
	ByCheck []CheckCount `json:"byCheck"`
}

// CheckCount is how often one check passed and failed.
type CheckCount struct {
	Check  string `json:"check"`
	Passed int    `json:"passed"`
	Failed int    `json:"failed"`
}

// summarize counts r's nodes and checks; r's checks are in report order.
func summarize(r *Report) Summary {
	s := Summary{Nodes: len(r.Nodes), Pairs: max(len(r.Nodes)*(len(r.Nodes)-1), 0), ByCheck: []CheckCount{}}
	for _, n := range r.Nodes {
		if n.Reported {
			s.Reported++
		}
		if n.Encrypted {
			s.TunnelsUp++
		}
	}
	at := map[string]int{}
	count := func(name string) *CheckCount {
		i, ok := at[name]
		if !ok {
			i = len(s.ByCheck)
			at[name] = i
			s.ByCheck = append(s.ByCheck, CheckCount{Check: name})
		}
		return &s.ByCheck[i]
	}
	for _, name := range append(slices.Clone(nodeChecks), "peer", "handshake") {
		count(name)
	}
	if r.Thresholds.Active {
		count("active")
	}
	lastFailedPair := ""
	for _, c := range r.Checks {
		cc := count(c.Check)
		if c.Result == Pass {
			cc.Passed++
			if c.Check == "key-published" {
				s.KeysConsistent++
			}
			continue
		}
		cc.Failed++
		// Rows of one pair are adjacent once sorted.
		if strings.Contains(c.Scope, "→") && c.Scope != lastFailedPair {
			s.PairsFailed++
			lastFailedPair = c.Scope
		}
	}
	return s
}

// ClusterInfo names the audited cluster.
type ClusterInfo struct {
	Server string `json:"server"`
}

// Thresholds are the Options as the report records them.
type Thresholds struct {
	MaxHandshakeAge string `json:"maxHandshakeAge"`
	MaxKeyAge       string `json:"maxKeyAge"`
	StaleAfter      string `json:"staleAfter"`
	Active          bool   `json:"active"`
	CaptureDuration string `json:"captureDuration,omitempty"`
	MarkerPort      uint32 `json:"markerPort,omitempty"`
}

// Check is one row of the audit.
type Check struct {
	// Scope is a node, or an ordered node pair "A→B".
	Scope  string `json:"scope"`
	Check  string `json:"check"`
	Result string `json:"result"`
	Reason string `json:"reason"`
}

func pass(scope, check, format string, args ...any) Check {
	return Check{Scope: scope, Check: check, Result: Pass, Reason: fmt.Sprintf(format, args...)}
}

func fail(scope, check, format string, args ...any) Check {
	return Check{Scope: scope, Check: check, Result: Fail, Reason: fmt.Sprintf(format, args...)}
}

func pairScope(a, b string) string { return a + "→" + b }

// The node checks, in report order.
var nodeChecks = []string{"status-fresh", "encryption-enabled", "key-present", "key-published", "claims", "key-age", "strict-mode", "guard", "leaks", "unencrypted-packets"}

// NodeChecks are the names of the checks the audit runs on every node, in
// report order.
func NodeChecks() []string { return slices.Clone(nodeChecks) }

// New judges every node and ordered node pair of cs at now against o; the
// report names meshctlVersion as its author.
func New(cs *Cluster, now time.Time, o Options, meshctlVersion string) Report {
	nodes, _ := Snapshots(cs, now, o.StaleAfter)
	r := Report{
		GeneratedAt:    now.UTC().Format(time.RFC3339),
		MeshctlVersion: meshctlVersion,
		Cluster:        ClusterInfo{Server: cs.Server},
		Thresholds: Thresholds{
			MaxHandshakeAge: o.MaxHandshakeAge.String(), MaxKeyAge: o.MaxKeyAge.String(),
			StaleAfter: o.StaleAfter.String(), Active: o.Active,
		},
		Nodes:    append([]NodeReport{}, nodes...),
		Checks:   []Check{},
		Failures: []Check{},
	}
	if o.Active {
		r.Thresholds.CaptureDuration = o.CaptureDuration.String()
		r.Thresholds.MarkerPort = o.MarkerPort
	}
	if len(nodes) == 0 {
		r.Checks = append(r.Checks, fail("cluster", "nodes", "the cluster has no Node to audit"))
	}
	// Each node's rows in report order (its claims check among them), and
	// below the pairs in order too, so that Finish need not sort millions
	// of rows of a healthy cluster.
	claimRows := auditClaims(cs)
	for i, n := range nodes {
		rows := append(auditNode(n, now, o), claimRows[i])
		slices.SortStableFunc(rows, func(x, y Check) int { return checkOrder(x.Check) - checkOrder(y.Check) })
		r.Checks = append(r.Checks, rows...)
	}
	// Every pair A→B is judged from A's own peer view: A's peers are
	// looked up by name (O(peers) per node), and only a node that lists
	// fewer known peers than it should is searched for the missing ones.
	index := make(map[string]int, len(nodes))
	for i, n := range nodes {
		index[n.Node] = i
	}
	claims := make([]nodeClaims, len(nodes))
	for i := range nodes {
		claims[i] = claimsOf(&cs.Nodes[i])
	}
	seen := make([]bool, len(nodes))
	for ai, a := range nodes {
		if !a.Reported {
			for bi, b := range nodes {
				if bi != ai {
					r.Checks = append(r.Checks, auditPair(a, b, nil, claims[bi], now, o)...)
				}
			}
			continue
		}
		known := 0
		for pi := range a.Peers {
			p := &a.Peers[pi]
			bi, ok := index[p.Node]
			if !ok || bi == ai || seen[bi] {
				continue // not a node, itself, or listed twice: judged once
			}
			seen[bi] = true
			known++
			r.Checks = append(r.Checks, auditPair(a, nodes[bi], p, claims[bi], now, o)...)
		}
		if known < len(nodes)-1 {
			for bi, b := range nodes {
				if bi != ai && !seen[bi] {
					r.Checks = append(r.Checks, auditPair(a, b, nil, claims[bi], now, o)...)
				}
			}
		}
		for pi := range a.Peers {
			if bi, ok := index[a.Peers[pi].Node]; ok {
				seen[bi] = false
			}
		}
	}
	return r
}

// checkOrder is a check's place in the report: node checks, then peer,
// handshake and active.
func checkOrder(check string) int {
	if i := slices.Index(nodeChecks, check); i >= 0 {
		return i
	}
	if i := slices.Index([]string{"peer", "handshake", "active"}, check); i >= 0 {
		return len(nodeChecks) + i
	}
	return 0
}

// Finish orders the checks, counts them (Summary) and sets the verdict;
// call it after the active checks, if any.
func (r *Report) Finish() {
	order := map[string]int{}
	for i, c := range append(slices.Clone(nodeChecks), "peer", "handshake", "active") {
		order[c] = i
	}
	// Node rows first, then pairs; within each, by scope, then check
	// order. The keys are computed once: the pair rows are n·(n-1)·2.
	type sortKey struct {
		pair  bool
		scope string
		order int
		i     int
	}
	keys := make([]sortKey, len(r.Checks))
	for i, c := range r.Checks {
		keys[i] = sortKey{strings.Contains(c.Scope, "→"), c.Scope, order[c.Check], i}
	}
	cmp := func(x, y sortKey) int {
		switch {
		case x.pair != y.pair:
			if x.pair {
				return 1
			}
			return -1
		case x.scope != y.scope:
			return strings.Compare(x.scope, y.scope)
		case x.order != y.order:
			return x.order - y.order
		}
		return x.i - y.i
	}
	if !slices.IsSortedFunc(keys, cmp) {
		slices.SortFunc(keys, cmp)
		sorted := make([]Check, len(r.Checks))
		for i, k := range keys {
			sorted[i] = r.Checks[k.i]
		}
		r.Checks = sorted
	}
	r.Failures = []Check{}
	for _, c := range r.Checks {
		if c.Result != Pass {
			r.Failures = append(r.Failures, c)
		}
	}
	r.Summary = summarize(r)
	r.Verdict = Pass
	if len(r.Failures) > 0 {
		r.Verdict = Fail
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
func auditClaims(cs *Cluster) []Check {
	nodes := make([]*corev1.Node, len(cs.Nodes))
	for i := range cs.Nodes {
		nodes[i] = &cs.Nodes[i]
	}
	byNode := map[string][]string{}
	for _, c := range nodeinfo.Resolve(nodes, nodeinfo.Options{}).Conflicts {
		byNode[c.Node] = append(byNode[c.Node], c.Error())
	}
	var out []Check
	for _, n := range cs.Nodes {
		if cs := byNode[n.Name]; len(cs) > 0 {
			out = append(out, fail(n.Name, "claims", "%s; the owners keep them, and peers do not route them to %s", strings.Join(cs, "; "), n.Name))
		} else {
			out = append(out, pass(n.Name, "claims", "no other node holds its pod CIDRs, addresses or key"))
		}
	}
	return out
}

func auditNode(n NodeReport, now time.Time, o Options) []Check {
	s := n.Node
	if !n.Reported {
		out := []Check{fail(s, "status-fresh", "no MeshNode: the node's agent has never reported its encryption state (is veil-agent running on it?)")}
		for _, c := range nodeChecks[1:] {
			if c != "claims" { // from the Nodes, not the MeshNode
				out = append(out, fail(s, c, "not checked: no MeshNode"))
			}
		}
		return out
	}
	var out []Check
	switch {
	case n.Updated == nil:
		out = append(out, fail(s, "status-fresh", "the MeshNode has no status update time: its agent never wrote it"))
	case n.Stale:
		out = append(out, fail(s, "status-fresh", "MeshNode status is stale: last updated %s ago at %s, more than --stale-after %s (is veil-agent running on the node?)",
			output.Age(now, *n.Updated), n.Updated.Format(time.RFC3339), o.StaleAfter))
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
	case now.Sub(*n.KeyCreated) > o.MaxKeyAge:
		out = append(out, fail(s, "key-age", "key %s is %s old, more than --max-key-age %s: rotate it (meshctl encryption rotate-key --node %s)",
			output.Dash(fp), output.Age(now, *n.KeyCreated), o.MaxKeyAge, s))
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
func latestLeak(n NodeReport) (meshv1alpha1.LeakRecord, bool) {
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

// auditPair judges A→B from A's view of B, p (nil when A does not list B).
func auditPair(a, b NodeReport, p *PeerReport, bClaims nodeClaims, now time.Time, o Options) []Check {
	s := pairScope(a.Node, b.Node)
	if !a.Reported {
		return []Check{
			fail(s, "peer", "not checked: %s has no MeshNode", a.Node),
			fail(s, "handshake", "not checked: %s has no MeshNode", a.Node),
		}
	}
	if p == nil {
		return []Check{
			fail(s, "peer", "%s is not a peer of %s", b.Node, a.Node),
			fail(s, "handshake", "not checked: %s is not a peer of %s", b.Node, a.Node),
		}
	}
	var out []Check
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
	case now.Sub(*p.LastHandshake) > o.MaxHandshakeAge:
		out = append(out, fail(s, "handshake", "last handshake %s ago at %s, more than --max-handshake-age %s",
			output.Age(now, *p.LastHandshake), p.LastHandshake.Format(time.RFC3339), o.MaxHandshakeAge))
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
