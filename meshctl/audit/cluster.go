package audit

import (
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/api/annotations"
	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/meshctl/output"
)

// Cluster is what the encryption commands read from the API server.
type Cluster struct {
	// Server is the API server's URL.
	Server string
	// Nodes are sorted by name.
	Nodes []corev1.Node
	// MeshNodes by name; a node without one has never been reported by
	// its agent.
	MeshNodes map[string]*meshv1alpha1.MeshNode
}

// DefaultStaleAfter is how old a MeshNode status may be before its agent is
// taken for gone: agents rewrite it every few seconds.
const DefaultStaleAfter = 2 * time.Minute

// NodeReport is one node's encryption state: its MeshNode status as its
// agent wrote it, and the Node annotations its peers read.
type NodeReport struct {
	Node string `json:"node"`
	// Reported is true when the node has a MeshNode.
	Reported bool `json:"reported"`
	// Stale is true when the status is older than the stale threshold.
	Stale bool `json:"stale"`
	// Encrypted: reported recently, WireGuard up, with a key.
	Encrypted     bool                        `json:"encrypted"`
	Updated       *time.Time                  `json:"updated,omitempty"`
	AgentVersion  string                      `json:"agentVersion,omitempty"`
	NodeIP        string                      `json:"nodeIP,omitempty"`
	PodCIDRs      []string                    `json:"podCIDRs,omitempty"`
	Mode          meshv1alpha1.EncryptionMode `json:"mode,omitempty"`
	Interface     string                      `json:"interface,omitempty"`
	PublicKey     string                      `json:"publicKey,omitempty"`
	Fingerprint   string                      `json:"fingerprint,omitempty"`
	KeyCreated    *time.Time                  `json:"keyCreated,omitempty"`
	ListenPort    int32                       `json:"listenPort,omitempty"`
	StrictMode    bool                        `json:"strictMode"`
	ExpectedPeers int                         `json:"expectedPeers"`
	// PeerSummary counts the node's peers by health; with it, Peers are
	// only the unhealthy ones. Without it (an agent before 0.4) Peers
	// are every peer.
	PeerSummary *meshv1alpha1.PeerSummary `json:"peerSummary,omitempty"`
	// PeerCount is how many peers the node's device has.
	PeerCount          int                       `json:"peerCount"`
	Peers              []PeerReport              `json:"peers"`
	Leaks              int64                     `json:"leaks"`
	RecentLeaks        []meshv1alpha1.LeakRecord `json:"recentLeaks,omitempty"`
	UnencryptedPackets int64                     `json:"unencryptedPackets"`
	GuardedDevices     []string                  `json:"guardedDevices,omitempty"`
	UnguardedDevices   []string                  `json:"unguardedDevices,omitempty"`
	// Annotations are the node's published WireGuard annotations.
	Annotations map[string]string `json:"annotations,omitempty"`
}

// PeerReport is one WireGuard peer as a node reports it.
type PeerReport struct {
	Node          string     `json:"node"`
	PublicKey     string     `json:"publicKey"`
	Fingerprint   string     `json:"fingerprint,omitempty"`
	Endpoint      string     `json:"endpoint,omitempty"`
	AllowedIPs    []string   `json:"allowedIPs"`
	LastHandshake *time.Time `json:"lastHandshake,omitempty"`
	RxBytes       int64      `json:"rxBytes"`
	TxBytes       int64      `json:"txBytes"`
	// Problem is why the node lists the peer (see PeerSummary).
	Problem string `json:"problem,omitempty"`
}

// metaTime turns an API time into a UTC time, nil for "never".
func metaTime(t *metav1.Time) *time.Time {
	if t == nil || t.IsZero() {
		return nil
	}
	u := t.UTC()
	return &u
}

// nodeSnapshot is one node's report; node is nil for a MeshNode whose Node
// is gone.
func nodeSnapshot(name string, node *corev1.Node, mn *meshv1alpha1.MeshNode, nodes int, now time.Time, staleAfter time.Duration) NodeReport {
	r := NodeReport{Node: name, Peers: []PeerReport{}, ExpectedPeers: max(nodes-1, 0)}
	if node != nil {
		for _, k := range []string{annotations.WireGuardPublicKey, annotations.WireGuardEndpoint, annotations.WireGuardPodCIDRs} {
			if v, ok := node.Annotations[k]; ok {
				if r.Annotations == nil {
					r.Annotations = map[string]string{}
				}
				r.Annotations[k] = v
			}
		}
	}
	if mn == nil {
		return r
	}
	st := mn.Status
	e := st.Encryption
	r.Reported = true
	r.Updated = metaTime(&st.Updated)
	r.Stale = r.Updated == nil || now.Sub(*r.Updated) > staleAfter
	r.AgentVersion, r.NodeIP, r.PodCIDRs = st.AgentVersion, st.NodeIP, st.PodCIDRs
	r.Mode, r.Interface, r.PublicKey, r.Fingerprint = e.Mode, e.Interface, e.PublicKey, e.Fingerprint
	if r.Fingerprint == "" {
		r.Fingerprint = nodeinfo.KeyFingerprint(e.PublicKey)
	}
	r.KeyCreated = metaTime(&e.KeyCreated)
	r.ListenPort, r.StrictMode = e.ListenPort, e.StrictMode
	r.Leaks, r.RecentLeaks, r.UnencryptedPackets = e.Leaks, e.RecentLeaks, e.UnencryptedPackets
	r.GuardedDevices, r.UnguardedDevices = e.GuardedDevices, e.UnguardedDevices
	for _, p := range e.Peers {
		r.Peers = append(r.Peers, PeerReport{
			Node: p.Node, PublicKey: p.PublicKey, Fingerprint: nodeinfo.KeyFingerprint(p.PublicKey), Endpoint: p.Endpoint,
			AllowedIPs: append([]string{}, p.AllowedIPs...), LastHandshake: metaTime(p.LastHandshake),
			RxBytes: p.RxBytes, TxBytes: p.TxBytes, Problem: p.Problem,
		})
	}
	r.PeerCount = len(r.Peers)
	if e.PeerSummary != nil {
		r.PeerSummary = e.PeerSummary.DeepCopy()
		r.PeerCount = int(e.PeerCount)
	}
	slices.SortFunc(r.Peers, func(a, b PeerReport) int { return strings.Compare(a.Node, b.Node) })
	r.Encrypted = !r.Stale && (r.Mode == meshv1alpha1.EncryptionModeKernel || r.Mode == meshv1alpha1.EncryptionModeUserspace) && r.PublicKey != ""
	return r
}

// Snapshots reports every Node, then every MeshNode whose Node is gone, in
// name order.
func Snapshots(cs *Cluster, now time.Time, staleAfter time.Duration) (nodes, orphans []NodeReport) {
	known := map[string]bool{}
	for i := range cs.Nodes {
		n := &cs.Nodes[i]
		known[n.Name] = true
		nodes = append(nodes, nodeSnapshot(n.Name, n, cs.MeshNodes[n.Name], len(cs.Nodes), now, staleAfter))
	}
	for name, mn := range cs.MeshNodes {
		if !known[name] {
			orphans = append(orphans, nodeSnapshot(name, nil, mn, len(cs.Nodes), now, staleAfter))
		}
	}
	slices.SortFunc(orphans, func(a, b NodeReport) int { return strings.Compare(a.Node, b.Node) })
	return nodes, orphans
}

// Why says in a few words why a node is not encrypted or not strict, for
// the summary; "" when it is both.
func (n NodeReport) Why() string {
	switch {
	case !n.Reported:
		return n.Node + " has no MeshNode"
	case n.Stale:
		return n.Node + " is stale"
	case n.Mode == meshv1alpha1.EncryptionModeDisabled || n.Mode == "":
		return n.Node + " has encryption disabled"
	case n.Mode != meshv1alpha1.EncryptionModeKernel && n.Mode != meshv1alpha1.EncryptionModeUserspace:
		return fmt.Sprintf("%s has unknown mode %q", n.Node, n.Mode)
	case n.PublicKey == "":
		return n.Node + " has no key"
	case !n.StrictMode:
		return n.Node + " has strict mode off"
	}
	return ""
}

// ListedNames is how many node names a problem lists before it counts the
// rest.
const ListedNames = 5

// Names joins names with ", ", listing at most ListedNames of them and
// counting the rest: "a, b, c, d, e and 3 more".
func Names(names []string) string {
	if len(names) <= ListedNames {
		return strings.Join(names, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(names[:ListedNames], ", "), len(names)-ListedNames)
}

// Problems lists what needs attention on a node, most serious first;
// nodes are the cluster's node names in order (see NodeSet), looked up,
// not searched, so that all nodes' problems take O(n·peers).
func (n NodeReport) Problems(now time.Time, staleAfter time.Duration, nodes NodeSet) []string {
	if !n.Reported {
		return []string{"no MeshNode: its agent has never reported (is veil-agent running on the node?)"}
	}
	var out []string
	if n.Stale {
		if n.Updated == nil {
			out = append(out, "stale: its agent never wrote the status")
		} else {
			out = append(out, fmt.Sprintf("stale: last updated %s ago (more than %s): is veil-agent running on the node?", output.Age(now, *n.Updated), staleAfter))
		}
	}
	switch {
	case n.Mode == meshv1alpha1.EncryptionModeDisabled || n.Mode == "":
		out = append(out, "encryption is disabled: pod traffic to other nodes is not encrypted")
	case n.Mode != meshv1alpha1.EncryptionModeKernel && n.Mode != meshv1alpha1.EncryptionModeUserspace:
		out = append(out, fmt.Sprintf("unknown encryption mode %q", n.Mode))
	}
	if n.PublicKey == "" {
		out = append(out, "no key: peers cannot encrypt to this node")
	}
	if !n.StrictMode {
		out = append(out, "strict mode is off: pod traffic may leave unencrypted when a tunnel is down")
	}
	if n.Leaks > 0 {
		out = append(out, fmt.Sprintf("strict mode dropped %s bound for other nodes unencrypted", output.Plural(int(n.Leaks), "packet")))
	}
	if n.UnencryptedPackets > 0 {
		out = append(out, fmt.Sprintf("%s sent to other nodes unencrypted", output.Plural(int(n.UnencryptedPackets), "pod packet")))
	}
	if s := n.PeerSummary; s != nil {
		// Only the unhealthy peers are listed: name them by problem.
		byProblem := map[string][]string{}
		var stale, unknown []string
		for _, p := range n.Peers {
			switch {
			case p.Problem == meshv1alpha1.ProblemNotConfigured, p.Problem == meshv1alpha1.ProblemNoHandshake:
				byProblem[p.Problem] = append(byProblem[p.Problem], p.Node)
			case p.Problem == meshv1alpha1.ProblemUnknownKey:
				unknown = append(unknown, p.Node)
			default:
				stale = append(stale, p.Node)
			}
		}
		more := func(names []string, total int32) string {
			if rest := int(total) - len(names); rest > 0 {
				return fmt.Sprintf("%s and %d more unlisted", Names(names), rest)
			}
			return Names(names)
		}
		if s.Missing > 0 {
			out = append(out, "not peered with "+more(byProblem[meshv1alpha1.ProblemNotConfigured], s.Missing))
		}
		if s.Handshaking > 0 {
			out = append(out, "no handshake yet with "+more(byProblem[meshv1alpha1.ProblemNoHandshake], s.Handshaking))
		}
		if s.Stale > 0 {
			out = append(out, fmt.Sprintf("no handshake in %s with %s", s.HealthyHandshakeAge.Duration, more(stale, s.Stale)))
		}
		if s.Unknown > 0 {
			out = append(out, "peered with keys of no node, at "+more(unknown, s.Unknown))
		}
		return out
	}
	if missing := nodes.missing(n); len(missing) > 0 {
		out = append(out, "not peered with "+Names(missing))
	}
	var never []string
	for _, p := range n.Peers {
		if p.LastHandshake == nil {
			never = append(never, p.Node)
		}
	}
	if len(never) > 0 {
		out = append(out, "no handshake yet with "+Names(never))
	}
	return out
}

// NoHandshake is how many of the node's peers never completed a
// handshake.
func (n NodeReport) NoHandshake() int {
	if n.PeerSummary != nil {
		return int(n.PeerSummary.Handshaking)
	}
	never := 0
	for _, p := range n.Peers {
		if p.LastHandshake == nil {
			never++
		}
	}
	return never
}

// NodeSet is the cluster's node names, in order, and their positions.
type NodeSet struct {
	names []string
	index map[string]int
}

// NewNodeSet indexes names (sorted, as Snapshots reports them).
func NewNodeSet(names []string) NodeSet {
	s := NodeSet{names: names, index: make(map[string]int, len(names))}
	for i, n := range names {
		s.index[n] = i
	}
	return s
}

// Has is true when name is a node of the set.
func (s NodeSet) Has(name string) bool {
	_, ok := s.index[name]
	return ok
}

// missing are the nodes of s other than n that n does not list as peers,
// in order; the set's nodes are only walked when some are missing.
func (s NodeSet) missing(n NodeReport) []string {
	listed := make(map[int]bool, len(n.Peers))
	for _, p := range n.Peers {
		if i, ok := s.index[p.Node]; ok && p.Node != n.Node {
			listed[i] = true
		}
	}
	self := 0
	if s.Has(n.Node) {
		self = 1
	}
	if len(listed) >= len(s.names)-self {
		return nil
	}
	var out []string
	for i, name := range s.names {
		if name != n.Node && !listed[i] {
			out = append(out, name)
		}
	}
	return out
}
