// Package policy compiles Kubernetes NetworkPolicies, MeshPolicies and
// ClusterMeshPolicies into the datapath's per-endpoint policy map entries
// (the types of package policytypes), and answers "may A reach B on port P, and why?" from the
// same compiled entries, so that what meshctl explains is what the datapath
// enforces.
//
// The compiler is pure Go: it needs neither a kernel nor a cluster.
//
//	c, err := policy.Compile(policy.Input{Pods: pods, Namespaces: nss, NetworkPolicies: nps}, policy.Options{})
//	if err != nil { … }
//	for _, perr := range c.Invalid() { … } // policies that were skipped
//	tr, err := c.Trace(policy.PodPeer("x", "a"), policy.PodPeer("y", "b"), policytypes.ProtoTCP, 80)
//
// The agent instead starts from New and feeds informer events into the
// Upsert*/Delete* methods; each returns the endpoints whose entries changed,
// so only diffs are written to the datapath.
//
// A Compiler is safe for concurrent use: mutations take a write lock, queries
// a read lock. Objects passed in are not retained or modified.
//
// # Semantics worth knowing
//
//   - Identity: a pod's canonical label set is its labels ("pod:k=v"), its
//     namespace's labels ("ns:k=v", always including
//     kubernetes.io/metadata.name as the API server sets it), its namespace
//     and service account ("meta:namespace", "meta:serviceaccount"; empty
//     means "default"). Only endpoints (pods with an IP, not on the host
//     network, not finished) get identities. Host-network pods are their
//     node: host or remote-node.
//   - CIDR peers: every CIDR and except prefix that any policy names is a
//     region with a CIDR identity; the datapath finds an address's region by
//     longest prefix, so a rule picks exactly the regions inside its CIDR and
//     outside its excepts. Pod IPs are matched too, as upstream expects.
//   - Named ports resolve against the destination: for ingress the endpoint
//     itself, for egress the peer pod. Towards pod peers, entries are keyed
//     by the peer's identity, so if pods with one label set declare the same
//     port name with different numbers, the rule allows the union of those
//     numbers to each of them. Towards CIDR peers, the addresses of the pods
//     inside become host regions (/32, /128) of their own in the CIDR table
//     and the entries name exactly those. A named port towards a non-pod
//     peer matches nothing.
//   - An ICMP rule without a type also covers ICMPv6; typed ICMP rules match
//     IPv4 ICMP only (the type numbers differ).
//   - A pod's own node may always reach it (kubelet probes), as upstream
//     NetworkPolicy documents; only a deny rule stops it (RuleLocalHost).
//   - Invalid policies are skipped, never turned into allow-all or deny-all;
//     see PolicyError. Only the first problem of a policy is reported
//     (policy.ValidateNetworkPolicy and friends list them all).
package policy

import (
	"fmt"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// Input is a full set of objects to compile from scratch.
type Input struct {
	Namespaces          []*corev1.Namespace
	Pods                []*corev1.Pod
	Nodes               []*corev1.Node
	NetworkPolicies     []*networkingv1.NetworkPolicy
	MeshPolicies        []*v1alpha1.MeshPolicy
	ClusterMeshPolicies []*v1alpha1.ClusterMeshPolicy
}

// Options configure a compiler.
type Options struct {
	// Identities is the pod identity allocator state saved by a previous run
	// (Compiler.IdentityState), so numbers survive agent restarts. Nil starts
	// afresh.
	Identities map[string]identity.ID
	// CIDRIdentities is the same for CIDR identities (Compiler.CIDRIdentityState).
	CIDRIdentities map[string]identity.ID
	// Node, when set, compiles node-locally: only the endpoints on that node
	// get their entries kept up to date, and a mutation costs work only for
	// them. Every pod still gets its identity (the ipcache needs them all);
	// Endpoint and Trace compute another node's endpoint on demand.
	// Empty compiles every endpoint (offline trace and matrix).
	Node string
}

// PolicyKind names the kind of policy object a rule comes from.
type PolicyKind string

const (
	KindNetworkPolicy     PolicyKind = "NetworkPolicy"
	KindMeshPolicy        PolicyKind = "MeshPolicy"
	KindClusterMeshPolicy PolicyKind = "ClusterMeshPolicy"
)

// PolicyRef names one policy object. Namespace is empty for
// ClusterMeshPolicy.
type PolicyRef struct {
	Kind      PolicyKind `json:"kind"`
	Namespace string     `json:"namespace,omitempty"`
	Name      string     `json:"name"`
}

func (r PolicyRef) String() string {
	if r.Namespace == "" {
		return fmt.Sprintf("%s %s", r.Kind, r.Name)
	}
	return fmt.Sprintf("%s %s/%s", r.Kind, r.Namespace, r.Name)
}

// Rule describes one compiled rule; Entry.RuleID and trace reasons refer to
// it. A rule is the smallest addressable part of a policy: one peer of one
// rule on one port, e.g. Section "ingress[0].from[1].ports[0]" (the from/to
// and ports parts are left out when the rule has none).
type Rule struct {
	ID        uint32                `json:"id"`
	Policy    PolicyRef             `json:"policy"`
	Section   string                `json:"section"`
	Direction policytypes.Direction `json:"direction"`
	// Verdict is Allow for ingress/egress rules and Deny for
	// ingressDeny/egressDeny rules.
	Verdict policytypes.Verdict `json:"verdict"`
	// Audit is true for rules of an audit-mode policy.
	Audit bool `json:"audit"`
	// Peer and Port say in words what the rule matches
	// ("podSelector app=a", "port 80/TCP").
	Peer string `json:"peer"`
	Port string `json:"port"`
}

// PolicyError reports a policy that could not be compiled. Such a policy is
// skipped entirely: it neither allows anything nor turns on default deny,
// exactly as if the API server had rejected it (it would have). Turning it
// into allow-all or deny-all would silently change traffic in a way its
// author did not write; the error surfaces through Invalid, the agent's
// status conditions and meshctl.
type PolicyError struct {
	Policy PolicyRef
	// Field is the JSON path of the offending field, e.g.
	// "spec.ingress[0].from[1].ipBlock.cidr".
	Field string
	Err   error
}

func (e *PolicyError) Error() string {
	return fmt.Sprintf("%s: %s: %v", e.Policy, e.Field, e.Err)
}

func (e *PolicyError) Unwrap() error { return e.Err }

// EndpointID names an endpoint: a pod that has an IP and is not on the host
// network.
type EndpointID struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
}

func (e EndpointID) String() string { return e.Namespace + "/" + e.Name }

// Endpoint is one endpoint's compiled policy.
type Endpoint struct {
	EndpointID
	Node     string       `json:"node,omitempty"`
	IPs      []netip.Addr `json:"ips"`
	Identity identity.ID  `json:"identity"`
	// Entries are sorted by Key (direction, identity, proto, port, prefix
	// length). The slice is shared: callers must not modify it.
	Entries  []policytypes.Entry  `json:"entries"`
	Defaults policytypes.Defaults `json:"defaults"`
	// NotCompiled: a node-local compiler (Options.Node) listed an endpoint
	// of another node, whose Entries and Defaults it does not keep; ask
	// Endpoint for them.
	NotCompiled bool `json:"notCompiled,omitempty"`
}

// IdentityInfo is one allocated pod identity and its canonical label set.
type IdentityInfo struct {
	ID     identity.ID     `json:"id"`
	Labels identity.Labels `json:"labels"`
}

// CIDREntry is one entry of the datapath's CIDR LPM map: addresses in Prefix
// (and in no longer listed prefix) carry the CIDR identity ID.
type CIDREntry struct {
	Prefix netip.Prefix `json:"prefix"`
	ID     identity.ID  `json:"id"`
}

// IPCacheEntry maps one pod IP to its label identity.
type IPCacheEntry struct {
	IP       netip.Addr  `json:"ip"`
	Identity identity.ID `json:"identity"`
	Node     string      `json:"node,omitempty"`
	// Pod holds the address.
	Pod EndpointID `json:"pod"`
}

// Changes lists what one mutation changed, so the datapath writes only
// diffs.
type Changes struct {
	// Endpoints whose entries, defaults or identity changed, or that
	// appeared; sorted.
	Endpoints []EndpointID
	// Removed endpoints (pod deleted, lost its IP or moved to host network).
	Removed []EndpointID
	// IPCache is true when the IP → identity mapping changed.
	IPCache bool
	// CIDRTable is true when the CIDR prefix → identity table changed.
	CIDRTable bool
	// PrevIPs holds, for each endpoint among Endpoints and Removed whose
	// addresses changed or that stopped being an endpoint, the addresses
	// it had before (what the ipcache may still map to it). Read only.
	PrevIPs map[EndpointID][]netip.Addr
}

// Empty reports whether nothing changed.
func (c Changes) Empty() bool {
	return len(c.Endpoints) == 0 && len(c.Removed) == 0 && !c.IPCache && !c.CIDRTable
}

// Peer is one end of a traced flow: a pod by namespace/name, or a bare IP.
// A bare IP that belongs to a known pod is treated as that pod.
type Peer struct {
	Namespace, Name string
	IP              netip.Addr
}

// PodPeer returns the Peer for pod namespace/name.
func PodPeer(namespace, name string) Peer { return Peer{Namespace: namespace, Name: name} }

// IPPeer returns the Peer for a bare IP.
func IPPeer(ip netip.Addr) Peer { return Peer{IP: ip} }

// ParsePeer parses "namespace/name" or an IP address.
func ParsePeer(s string) (Peer, error) {
	if ip, err := netip.ParseAddr(s); err == nil {
		return IPPeer(ip), nil
	}
	ns, name, ok := strings.Cut(s, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return Peer{}, fmt.Errorf("parse peer %q: want NAMESPACE/POD or an IP address", s)
	}
	return PodPeer(ns, name), nil
}

func (p Peer) String() string {
	if p.Name != "" {
		return p.Namespace + "/" + p.Name
	}
	return p.IP.String()
}

// TraceResult is the decision for one flow and why.
type TraceResult struct {
	From, To TracePeer
	Proto    uint8
	Port     uint16
	// Allowed is the enforced outcome: egress and ingress both allow.
	Allowed bool
	// AuditAllowed is the outcome if audit-mode policies were enforced too.
	AuditAllowed bool
	Egress       DirectionTrace
	Ingress      DirectionTrace
}

// TracePeer is a resolved trace peer.
type TracePeer struct {
	Peer string `json:"peer"`
	// Pod is set when the peer is a pod (an endpoint).
	Pod *EndpointID `json:"pod,omitempty"`
	IP  netip.Addr  `json:"ip"`
	// Identity is the peer's label identity (a pod identity or a reserved
	// one: world, host, remote-node); CIDRIdentity is the CIDR identity of
	// its IP, or identity.Any when no policy names a CIDR holding it.
	Identity     identity.ID     `json:"identity"`
	Labels       identity.Labels `json:"labels,omitempty"`
	CIDRIdentity identity.ID     `json:"cidrIdentity,omitempty"`
	CIDR         netip.Prefix    `json:"cidr,omitzero"`
}

// DirectionTrace is the decision of one endpoint's policy for one direction:
// the source pod's egress or the destination pod's ingress.
type DirectionTrace struct {
	// Applicable is false when that side is not a pod, so no policy of ours
	// applies (the flow is allowed on that side).
	Applicable bool `json:"applicable"`
	// Selected is true when some enforce-mode policy selects the endpoint
	// for this direction, so it is default-deny; AuditSelected counts
	// audit-mode policies too.
	Selected      bool `json:"selected"`
	AuditSelected bool `json:"auditSelected"`
	Allowed       bool `json:"allowed"`
	AuditAllowed  bool `json:"auditAllowed"`
	// Reasons lists every rule that matched the flow, denies first, then
	// the default when no rule decided.
	Reasons []Reason `json:"reasons"`
}

// Reason is one rule (or a default) that took part in a decision.
type Reason struct {
	// Rule is nil for a default verdict and for the built-in allow of the
	// local node (RuleLocalHost).
	Rule    *Rule               `json:"rule,omitempty"`
	Verdict policytypes.Verdict `json:"verdict"`
	Message string              `json:"message"`
}

// PortProto is one port of a reachability matrix.
type PortProto struct {
	Proto uint8
	Port  uint16
}

// ParsePortProto parses "80", "80/TCP", "53/udp", "8/ICMP" (ICMP type).
func ParsePortProto(s string) (PortProto, error) {
	return parsePortProto(s)
}

func (p PortProto) String() string { return fmt.Sprintf("%d/%s", p.Port, ProtoName(p.Proto)) }

// Matrix is the reachability among all endpoints for a list of ports.
type Matrix struct {
	Ports []PortProto
	Pods  []EndpointID
	// Cells has one entry per ordered pair of distinct pods per port,
	// ordered by port, then from, then to.
	Cells []MatrixCell
}

// MatrixCell is one (from, to, port) verdict.
type MatrixCell struct {
	From, To EndpointID
	Port     PortProto
	Allowed  bool
	Egress   bool
	Ingress  bool
}
