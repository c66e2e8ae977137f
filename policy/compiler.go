package policy

import (
	"sync"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"

	"github.com/veilmesh/veil/policy/api/v1alpha1"
	"github.com/veilmesh/veil/policy/identity"
)

// Compiled is the compiler's state: the objects it was given, the
// identities it allocated and the entries of every endpoint. It is updated
// in place by the Upsert*/Delete* methods.
type Compiled struct {
	mu sync.RWMutex
}

// New returns an empty compiler.
func New(opts Options) (*Compiled, error) { return &Compiled{}, nil }

// Compile compiles a full set of objects from scratch. Invalid policies do
// not fail the compilation: they are skipped and listed by Invalid. The
// error is only for unusable Options. The output is deterministic for a
// given input and Options.
func Compile(in Input, opts Options) (*Compiled, error) { return New(opts) }

// UpsertNamespace adds or updates a namespace.
func (c *Compiled) UpsertNamespace(ns *corev1.Namespace) Changes { return Changes{} }

// DeleteNamespace removes a namespace (its pods stay until deleted, with
// no namespace labels).
func (c *Compiled) DeleteNamespace(name string) Changes { return Changes{} }

// UpsertPod adds or updates a pod.
func (c *Compiled) UpsertPod(pod *corev1.Pod) Changes { return Changes{} }

// DeletePod removes a pod.
func (c *Compiled) DeletePod(namespace, name string) Changes { return Changes{} }

// UpsertNode adds or updates a node (its addresses tell host and
// remote-node peers apart in Trace).
func (c *Compiled) UpsertNode(node *corev1.Node) Changes { return Changes{} }

// DeleteNode removes a node.
func (c *Compiled) DeleteNode(name string) Changes { return Changes{} }

// UpsertNetworkPolicy adds or updates a NetworkPolicy. An invalid policy is
// skipped (see PolicyError) and its previous version, if any, removed.
func (c *Compiled) UpsertNetworkPolicy(np *networkingv1.NetworkPolicy) Changes { return Changes{} }

// DeleteNetworkPolicy removes a NetworkPolicy.
func (c *Compiled) DeleteNetworkPolicy(namespace, name string) Changes { return Changes{} }

// UpsertMeshPolicy adds or updates a MeshPolicy.
func (c *Compiled) UpsertMeshPolicy(mp *v1alpha1.MeshPolicy) Changes { return Changes{} }

// DeleteMeshPolicy removes a MeshPolicy.
func (c *Compiled) DeleteMeshPolicy(namespace, name string) Changes { return Changes{} }

// UpsertClusterMeshPolicy adds or updates a ClusterMeshPolicy.
func (c *Compiled) UpsertClusterMeshPolicy(cmp *v1alpha1.ClusterMeshPolicy) Changes {
	return Changes{}
}

// DeleteClusterMeshPolicy removes a ClusterMeshPolicy.
func (c *Compiled) DeleteClusterMeshPolicy(name string) Changes { return Changes{} }

// Invalid lists the policies that were skipped, sorted by policy.
func (c *Compiled) Invalid() []*PolicyError { return nil }

// PolicyError returns the error of one policy, or nil when it compiled.
func (c *Compiled) PolicyError(ref PolicyRef) *PolicyError { return nil }

// Endpoints lists every endpoint, sorted by namespace/name.
func (c *Compiled) Endpoints() []Endpoint { return nil }

// Endpoint returns one endpoint.
func (c *Compiled) Endpoint(id EndpointID) (Endpoint, bool) { return Endpoint{}, false }

// Identities lists the allocated pod identities, sorted by number.
func (c *Compiled) Identities() []IdentityInfo { return nil }

// IPCache lists pod IP → identity, sorted by IP.
func (c *Compiled) IPCache() []IPCacheEntry { return nil }

// CIDRTable lists CIDR prefix → CIDR identity (the datapath's CIDR LPM map),
// sorted by prefix.
func (c *Compiled) CIDRTable() []CIDREntry { return nil }

// Rules lists every rule, sorted by ID.
func (c *Compiled) Rules() []Rule { return nil }

// Rule returns the rule with the given ID (Entry.RuleID).
func (c *Compiled) Rule(id uint32) (Rule, bool) { return Rule{}, false }

// IdentityState returns the pod identity allocator state to persist and pass
// back as Options.Identities.
func (c *Compiled) IdentityState() map[string]identity.ID { return nil }

// CIDRIdentityState is IdentityState for CIDR identities.
func (c *Compiled) CIDRIdentityState() map[string]identity.ID { return nil }

// Trace decides a flow of protocol proto to destination port port (for ICMP:
// type<<8|code) from one peer to another, by looking up the compiled entries
// exactly as the datapath does. The error reports an unknown pod or a peer
// pod without an IP.
func (c *Compiled) Trace(from, to Peer, proto uint8, port uint16) (TraceResult, error) {
	return TraceResult{}, nil
}

// Matrix traces every ordered pair of distinct endpoints on every port.
func (c *Compiled) Matrix(ports []PortProto) Matrix { return Matrix{} }
