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
//	r.Finish(maxFailures)
//	err := audit.Write(w, output.PaletteFor(w), r, view)
package audit

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
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
	Nodes []NodeReport `json:"nodes"`
	// Checks are every check, in report order: only with --details
	// (WriteStructured streams them; see EachCheck).
	Checks []Check `json:"checks,omitempty"`
	// Failures are the first failed checks, in report order (see Finish),
	// and FailuresNotListed counts the rest.
	Failures          []Check `json:"failures"`
	FailuresNotListed int     `json:"failuresNotListed,omitempty"`
	// NotTested are the active checks that had nothing to test.
	NotTested []Check `json:"notTested,omitempty"`
	// Active is the evidence of each active check.
	Active []ActiveEvidence `json:"active,omitempty"`

	// nodeRows are the node checks in report order; pairs judges the
	// pairs (and holds the active checks' rows).
	nodeRows []Check
	pairs    *pairJudge
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
	// Checks is every check made, Failed those that failed.
	Checks int `json:"checks"`
	Failed int `json:"failed"`
	// ByCheck counts each check's results, in report order.
	ByCheck []CheckCount `json:"byCheck"`
}

// CheckCount is how often one check passed and failed.
type CheckCount struct {
	Check  string `json:"check"`
	Passed int    `json:"passed"`
	Failed int    `json:"failed"`
}

// summarize counts r's nodes and checks without making a row per pair.
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
	add := func(c Check, times int) bool {
		cc := count(c.Check)
		s.Checks += times
		if c.Result == Pass {
			cc.Passed += times
			if c.Check == "key-published" {
				s.KeysConsistent += times
			}
			return false
		}
		cc.Failed += times
		s.Failed += times
		return true
	}
	for _, c := range r.nodeRows {
		add(c, 1)
	}
	j := r.pairs
	if j == nil {
		return s
	}
	failed := func(rows []Check) bool {
		return slices.ContainsFunc(rows, func(c Check) bool { return c.Result != Pass })
	}
	for _, v := range j.views {
		for _, rows := range v.rows {
			for _, c := range rows {
				add(c, 1)
			}
			if failed(rows) {
				s.PairsFailed++
			}
		}
		if members := len(j.nodes) - 1 - len(v.rows); members > 0 && v.group != nil {
			for _, c := range v.group {
				add(c, members)
			}
			if failed(v.group) {
				s.PairsFailed += members
			}
		}
	}
	for scope, rows := range j.active {
		for _, c := range rows {
			add(c, 1)
		}
		if !failed(rows) {
			continue
		}
		a, b, _ := strings.Cut(scope, "→")
		ai, aok := j.index[a]
		bi, bok := j.index[b]
		if !aok || !bok {
			s.PairsFailed++
			continue
		}
		v := &j.views[ai]
		rows, ok := v.rows[bi]
		if !ok {
			rows = v.group
		}
		if !failed(rows) {
			s.PairsFailed++ // failed only by the active check
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
//
// Node rows are held (about a dozen per node); pair rows are not: a pair
// is judged from the first node's own peer view, and a node that reports
// counts and a digest (PeerSummary) instead of every peer has one verdict
// for all the peers it does not list. So memory grows with the nodes and
// the unhealthy pairs, not with the n·(n-1) pairs; EachCheck produces
// every row on demand.
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
		Failures: []Check{},
	}
	if o.Active {
		r.Thresholds.CaptureDuration = o.CaptureDuration.String()
		r.Thresholds.MarkerPort = o.MarkerPort
	}
	if len(nodes) == 0 {
		r.nodeRows = append(r.nodeRows, fail("cluster", "nodes", "the cluster has no Node to audit"))
	}
	claimRows := auditClaims(cs)
	for i, n := range nodes {
		rows := append(auditNode(n, now, o), claimRows[i])
		slices.SortStableFunc(rows, func(x, y Check) int { return checkOrder(x.Check) - checkOrder(y.Check) })
		r.nodeRows = append(r.nodeRows, rows...)
	}
	r.pairs = judgePairs(cs, nodes, now, o)
	return r
}

// pairJudge holds the pair verdicts of a report: each node's pairs judged
// one by one (those it lists, and those it cannot peer with), and one
// verdict for all the others.
type pairJudge struct {
	nodes []NodeReport
	index map[string]int
	views []peerView
	// active are the active checks' rows by pair scope.
	active map[string][]Check
}

// peerView is node A's pairs.
type peerView struct {
	// rows are the pairs A→B judged one by one, by B's index.
	rows map[int][]Check
	// group are the rows (without scope) of every other pair A→B; nil
	// when A judges every pair one by one.
	group []Check
}

func judgePairs(cs *Cluster, nodes []NodeReport, now time.Time, o Options) *pairJudge {
	j := &pairJudge{nodes: nodes, index: make(map[string]int, len(nodes)), views: make([]peerView, len(nodes)), active: map[string][]Check{}}
	for i, n := range nodes {
		j.index[n.Node] = i
	}
	claims := make([]nodeClaims, len(nodes))
	for i := range nodes {
		claims[i] = claimsOf(&cs.Nodes[i])
	}
	// What each node publishes, as a peer of it must see it: the digests
	// a node's healthy peers should sum to, with and without the nodes'
	// own addresses among the allowed IPs (node-to-node encryption and
	// strict mode add them).
	ptrs := make([]*corev1.Node, len(cs.Nodes))
	for i := range cs.Nodes {
		ptrs[i] = &cs.Nodes[i]
	}
	resolved := nodeinfo.Resolve(ptrs, nodeinfo.Options{})
	tunnel := make([]bool, len(nodes))
	plain := make([]meshv1alpha1.PeerDigest, len(nodes))
	withAddrs := make([]meshv1alpha1.PeerDigest, len(nodes))
	var allPlain, allWithAddrs meshv1alpha1.PeerDigest
	for i, n := range nodes {
		rn, ok := resolved.Node(n.Node)
		if !ok || !rn.Tunnel() || len(rn.PodCIDRs) == 0 {
			continue
		}
		tunnel[i] = true
		key, ep := wgtypes.Key(rn.PublicKey).String(), rn.Endpoint.String()
		var ips []string
		for _, p := range rn.PodCIDRs {
			ips = append(ips, p.String())
		}
		plain[i].AddPeer(n.Node, key, ep, ips)
		for _, a := range rn.InternalIPs {
			ips = append(ips, netip.PrefixFrom(a, a.BitLen()).String())
		}
		withAddrs[i].AddPeer(n.Node, key, ep, ips)
		allPlain.Add(plain[i])
		allWithAddrs.Add(withAddrs[i])
	}
	for ai, a := range nodes {
		v := peerView{rows: map[int][]Check{}}
		switch {
		case !a.Reported:
			v.group = auditPair(a, NodeReport{}, nil, nodeClaims{}, now, o)
		case a.PeerSummary == nil:
			// Every peer listed: a node it does not list is not a peer.
			for pi := range a.Peers {
				p := &a.Peers[pi]
				if bi, ok := j.index[p.Node]; ok && bi != ai && v.rows[bi] == nil {
					v.rows[bi] = auditPair(a, nodes[bi], p, claims[bi], now, o)
				}
			}
			for bi, b := range nodes {
				if bi != ai && v.rows[bi] == nil {
					v.rows[bi] = auditPair(a, b, nil, claims[bi], now, o)
				}
			}
		default:
			wantPlain, wantAddrs := allPlain, allWithAddrs
			if tunnel[ai] {
				wantPlain.Sub(plain[ai])
				wantAddrs.Sub(withAddrs[ai])
			}
			for pi := range a.Peers {
				p := &a.Peers[pi]
				bi, ok := j.index[p.Node]
				if !ok || bi == ai || v.rows[bi] != nil {
					continue // a key of no node (counted in the summary), itself, or listed twice
				}
				if p.PublicKey == "" {
					p = nil // listed as not configured
				}
				v.rows[bi] = auditPair(a, nodes[bi], p, claims[bi], now, o)
				if tunnel[bi] {
					wantPlain.Sub(plain[bi])
					wantAddrs.Sub(withAddrs[bi])
				}
			}
			// A node that cannot be peered with is not in the digest:
			// its pair fails as it always did.
			for bi, b := range nodes {
				if bi != ai && !tunnel[bi] && v.rows[bi] == nil {
					v.rows[bi] = auditPair(a, b, nil, claims[bi], now, o)
				}
			}
			v.group = unlistedPairs(a, wantPlain, wantAddrs, now, o)
		}
		j.views[ai] = v
	}
	return j
}

// unlistedPairs judges A's pairs with the nodes it does not list, all at
// once: their views must sum to what those nodes publish (want, with or
// without their addresses), and A's oldest healthy handshake must be
// within the threshold.
func unlistedPairs(a NodeReport, wantPlain, wantAddrs meshv1alpha1.PeerDigest, now time.Time, o Options) []Check {
	s := a.PeerSummary
	var out []Check
	switch {
	case s.Unlisted > 0:
		out = append(out, fail("", "peer", "not confirmed: %s has %d more unhealthy peers than it lists (at most %d), so its unlisted peers cannot be told apart; its pairs that are listed are judged one by one",
			a.Node, s.Unlisted, meshv1alpha1.MaxListedPeers))
	case s.Digest == wantPlain.String() || s.Digest == wantAddrs.String():
		out = append(out, pass("", "peer", "one of %s healthy peers, whose keys, endpoints and allowed IPs match what they publish (digest)", output.Plural(int(s.Healthy), a.Node+"'s")))
	default:
		out = append(out, fail("", "peer", "not confirmed: the view %s has of its %d healthy peers (digest %s) is not what those nodes publish; a key, endpoint or allowed IPs differ, or a node is missing (meshctl encryption status --node %s)",
			a.Node, s.Healthy, s.Digest, a.Node))
	}
	switch {
	case s.Healthy == 0:
		out = append(out, fail("", "handshake", "not confirmed: %s reports no healthy peer", a.Node))
	case s.OldestHealthyHandshake == nil:
		out = append(out, fail("", "handshake", "not confirmed: %s does not report its oldest handshake", a.Node))
	case now.Sub(s.OldestHealthyHandshake.Time) > o.MaxHandshakeAge:
		out = append(out, fail("", "handshake", "not confirmed: the oldest handshake of %s's unlisted peers was %s ago, more than --max-handshake-age %s",
			a.Node, output.Age(now, s.OldestHealthyHandshake.Time), o.MaxHandshakeAge))
	default:
		out = append(out, pass("", "handshake", "within %s (%s's oldest handshake with an unlisted peer was %s ago)",
			o.MaxHandshakeAge, a.Node, output.Age(now, s.OldestHealthyHandshake.Time)))
	}
	return out
}

// pair appends the rows of A→B to out: judged one by one, or A's verdict
// for all its unlisted peers, then the active check's.
func (j *pairJudge) pair(out []Check, ai, bi int) []Check {
	v := &j.views[ai]
	scope := pairScope(j.nodes[ai].Node, j.nodes[bi].Node)
	if rows, ok := v.rows[bi]; ok {
		out = append(out, rows...)
	} else {
		for _, c := range v.group {
			c.Scope = scope
			out = append(out, c)
		}
	}
	return append(out, j.active[scope]...)
}

// each calls yield with the rows of every pair in report order (A, then
// B, by name), or only the pairs with node on either side; it stops when
// yield returns false.
func (j *pairJudge) each(node string, yield func(Check) bool) bool {
	var rows []Check
	emit := func(ai, bi int) bool {
		rows = j.pair(rows[:0], ai, bi)
		for _, c := range rows {
			if !yield(c) {
				return false
			}
		}
		return true
	}
	only, filtered := j.index[node]
	for ai := range j.nodes {
		if node != "" && ai != only {
			if filtered && !emit(ai, only) {
				return false
			}
			continue
		}
		for bi := range j.nodes {
			if bi != ai && !emit(ai, bi) {
				return false
			}
		}
	}
	return true
}

// EachCheck calls yield with every check in report order: the node rows,
// then every pair's; with node, only the checks of that node and the pairs
// it is on either side of. The pair rows are made as they are yielded.
func (r *Report) EachCheck(node string, yield func(Check) bool) {
	for _, c := range r.nodeRows {
		if (node == "" || c.Scope == node) && !yield(c) {
			return
		}
	}
	if r.pairs != nil {
		r.pairs.each(node, yield)
	}
}

// AllChecks are every check in report order: n·(n-1)·2 rows and more, for
// small clusters and tests; EachCheck streams them.
func (r *Report) AllChecks() []Check {
	var out []Check
	r.EachCheck("", func(c Check) bool { out = append(out, c); return true })
	return out
}

// addActive records an active check's row.
func (r *Report) addActive(c Check) {
	if r.pairs == nil {
		r.pairs = &pairJudge{index: map[string]int{}, active: map[string][]Check{}}
	}
	r.pairs.active[c.Scope] = append(r.pairs.active[c.Scope], c)
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

// DefaultReportFailures is how many failures Finish keeps in
// Report.Failures when it is given no bound.
const DefaultReportFailures = DefaultMaxFailures

// Finish counts the checks (Summary), keeps the first maxFailures failures
// in report order (0: DefaultReportFailures; the rest are counted in
// FailuresNotListed) and sets the verdict; call it after the active
// checks, if any. It takes O(nodes + listed pairs) unless failures are
// asked for from a verdict shared by many pairs.
func (r *Report) Finish(maxFailures int) {
	if maxFailures <= 0 {
		maxFailures = DefaultReportFailures
	}
	r.Summary = summarize(r)
	r.Failures = []Check{}
	r.FailuresNotListed = 0
	r.EachFailure("", func(c Check) bool {
		r.Failures = append(r.Failures, c)
		return len(r.Failures) < maxFailures
	})
	r.FailuresNotListed = r.Summary.Failed - len(r.Failures)
	r.Verdict = Pass
	if r.Summary.Failed > 0 {
		r.Verdict = Fail
	}
}

// EachFailure calls yield with every failed check in report order (of
// node, or all), skipping the pairs whose shared verdict passed.
func (r *Report) EachFailure(node string, yield func(Check) bool) {
	for _, c := range r.nodeRows {
		if c.Result != Pass && (node == "" || c.Scope == node) && !yield(c) {
			return
		}
	}
	j := r.pairs
	if j == nil {
		return
	}
	if len(j.active) > 0 || node != "" {
		j.each(node, func(c Check) bool { return c.Result == Pass || yield(c) })
		return
	}
	var rows []Check
	for ai, v := range j.views {
		keys := slices.Sorted(maps.Keys(v.rows))
		if slices.ContainsFunc(v.group, func(c Check) bool { return c.Result != Pass }) {
			keys = keys[:0]
			for bi := range j.nodes {
				if bi != ai {
					keys = append(keys, bi)
				}
			}
		}
		for _, bi := range keys {
			rows = j.pair(rows[:0], ai, bi)
			for _, c := range rows {
				if c.Result != Pass && !yield(c) {
					return
				}
			}
		}
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
