package policy

import (
	"cmp"
	"iter"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// Compiler holds the objects it was given, the identities it allocated and
// the entries of every endpoint, and recompiles in place as the
// Upsert*/Delete* methods change them.
//
// Internally endpoints with the same identity and the same named container
// ports share one group, compiled once: the entries depend on nothing else
// of the pod.
type Compiler struct {
	mu sync.RWMutex

	// node is Options.Node: when set, only groups with an endpoint there
	// are compiled.
	node string

	ids, cidrIDs *identity.Allocator

	namespaces map[string]labels.Set
	nodes      map[string][]netip.Addr
	pods       podTable

	idents     map[identity.ID]*identState
	identByKey map[string]*identState
	identsByNS map[string]map[*identState]struct{}

	policies        map[PolicyRef]*policyState
	policiesByNS    map[string]map[*policyState]struct{}
	clusterPolicies map[*policyState]struct{}
	invalid         map[PolicyRef]*PolicyError

	rules     map[uint32]*Rule
	ruleByKey map[string]uint32
	nextRule  uint32

	regions map[netip.Prefix]*region
	sels    map[string]*selector
	// The selectors of sels again, by what they can pick: a new or
	// vanished identity is offered only to the label selectors of its
	// namespace and those spanning namespaces (at 500 namespaces, a
	// five-hundredth of the selectors), a region only to the CIDR ones.
	selsByNS  map[string]map[*selector]struct{}
	selsAnyNS map[*selector]struct{}
	cidrSels  map[*selector]struct{}

	groups     map[groupKey]*group
	groupsByNS map[string]map[*group]struct{}

	// Pending effects of the current mutation, turned into Changes by flush.
	dirty    map[*group]struct{}
	dirtyIDs map[*group]map[identity.ID]struct{}
	changed  map[EndpointID]struct{}
	removed  map[EndpointID]struct{}
	// prevIPs: Changes.PrevIPs of the mutation under way.
	prevIPs        map[EndpointID][]netip.Addr
	ipcacheChanged bool
	cidrChanged    bool
	// regionsDirty: the region set changed in this mutation.
	regionsDirty bool
	// keyBuf and keyScratch are attach's buffers for identity keys.
	keyBuf     []byte
	keyScratch identity.Labels
	// identMemo, during UpsertPodsFacts only, finds the identity of a
	// pod whose label set (shared, never written) was seen before in the
	// batch without building its key.
	identMemo map[identMemoKey]identMemoEntry
	// batch: an UpsertPodsFacts is under way.
	batch bool
	// namedCIDRs counts, per CIDR selector, the egress named-port rules
	// towards it. The IPs of the pods inside such a CIDR become host
	// regions (/32, /128) of their own, so those rules can name exactly
	// those addresses: keyed by pod identity they would also open the
	// pod's other-family address and its identity's pods outside the CIDR.
	namedCIDRs map[*selector]int
	// Groups whose entries depend on pods' named ports: egress named ports
	// towards pod peers, and towards CIDRs.
	egressNamedGroups, cidrNamedGroups map[*group]struct{}
}

// region is a CIDR named by some policy, with its CIDR identity.
type region struct {
	id   identity.ID
	refs int
}

// policyState is an installed (valid) policy.
type policyState struct {
	*parsedPolicy
	rules    []boundRule
	sels     []*selector
	prefixes []netip.Prefix
	// namedCIDRs lists the CIDR selectors of its egress named-port rules,
	// once per rule.
	namedCIDRs []*selector
}

// boundRule is a parsedRule with its RuleID and shared selector.
type boundRule struct {
	*parsedRule
	id  uint32
	sel *selector
	// podsForAny: an egress named port towards any peer can only reach
	// pods (only pods have named ports), so sel is the all-pods selector.
	podsForAny bool
}

// New returns an empty compiler.
func New(opts Options) (*Compiler, error) {
	ids, err := identity.NewAllocator(identity.MinPod, identity.MinCIDR-1, opts.Identities)
	if err != nil {
		return nil, err
	}
	cidrIDs, err := identity.NewAllocator(identity.MinCIDR, ^identity.ID(0), opts.CIDRIdentities)
	if err != nil {
		return nil, err
	}
	return &Compiler{
		node: opts.Node,
		ids:  ids, cidrIDs: cidrIDs,
		namespaces: map[string]labels.Set{}, nodes: map[string][]netip.Addr{},
		pods:   newPodTable(),
		idents: map[identity.ID]*identState{}, identByKey: map[string]*identState{},
		identsByNS: map[string]map[*identState]struct{}{},
		policies:   map[PolicyRef]*policyState{}, policiesByNS: map[string]map[*policyState]struct{}{},
		clusterPolicies: map[*policyState]struct{}{}, invalid: map[PolicyRef]*PolicyError{},
		rules: map[uint32]*Rule{}, ruleByKey: map[string]uint32{}, nextRule: 1,
		regions: map[netip.Prefix]*region{}, sels: map[string]*selector{},
		selsByNS: map[string]map[*selector]struct{}{}, selsAnyNS: map[*selector]struct{}{}, cidrSels: map[*selector]struct{}{},
		groups: map[groupKey]*group{}, groupsByNS: map[string]map[*group]struct{}{},
		egressNamedGroups: map[*group]struct{}{}, cidrNamedGroups: map[*group]struct{}{}, namedCIDRs: map[*selector]int{},
		dirty: map[*group]struct{}{}, dirtyIDs: map[*group]map[identity.ID]struct{}{}, changed: map[EndpointID]struct{}{}, removed: map[EndpointID]struct{}{},
	}, nil
}

// Compile compiles a full set of objects from scratch. Invalid policies do
// not fail the compilation: they are skipped and listed by Invalid. The
// error is only for unusable Options. The output is deterministic for a
// given input and Options: objects are applied in name order whatever the
// order of the slices.
func Compile(in Input, opts Options) (*Compiler, error) {
	c, err := New(opts)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, ns := range sortedBy(in.Namespaces, func(o *corev1.Namespace) string { return o.Name }) {
		c.upsertNamespace(ns)
	}
	for _, n := range sortedBy(in.Nodes, func(o *corev1.Node) string { return o.Name }) {
		c.upsertNode(n)
	}
	for _, p := range sortedBy(in.Pods, func(o *corev1.Pod) string { return o.Namespace + "/" + o.Name }) {
		c.upsertPod(p)
	}
	for _, np := range sortedBy(in.NetworkPolicies, func(o *networkingv1.NetworkPolicy) string { return o.Namespace + "/" + o.Name }) {
		c.installPolicy(PolicyRef{KindNetworkPolicy, np.Namespace, np.Name}, func() (*parsedPolicy, *PolicyError) { return parseNetworkPolicy(np) })
	}
	for _, mp := range sortedBy(in.MeshPolicies, func(o *v1alpha1.MeshPolicy) string { return o.Namespace + "/" + o.Name }) {
		c.installPolicy(PolicyRef{KindMeshPolicy, mp.Namespace, mp.Name}, func() (*parsedPolicy, *PolicyError) { return parseMeshPolicy(mp) })
	}
	for _, cmp := range sortedBy(in.ClusterMeshPolicies, func(o *v1alpha1.ClusterMeshPolicy) string { return o.Name }) {
		c.installPolicy(PolicyRef{KindClusterMeshPolicy, "", cmp.Name}, func() (*parsedPolicy, *PolicyError) { return parseClusterMeshPolicy(cmp) })
	}
	c.flush()
	return c, nil
}

// sortedBy returns the non-nil objects sorted by key.
func sortedBy[T any](objs []*T, key func(*T) string) []*T {
	out := make([]*T, 0, len(objs))
	for _, o := range objs {
		if o != nil {
			out = append(out, o)
		}
	}
	slices.SortStableFunc(out, func(a, b *T) int { return strings.Compare(key(a), key(b)) })
	return out
}

// UpsertNamespace adds or updates a namespace.
func (c *Compiler) UpsertNamespace(ns *corev1.Namespace) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ns != nil {
		c.upsertNamespace(ns)
	}
	return c.flush()
}

// DeleteNamespace removes a namespace. Its pods stay until deleted, with
// only the kubernetes.io/metadata.name label that every namespace has.
func (c *Compiler) DeleteNamespace(name string) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deleteNamespace(name)
	return c.flush()
}

func (c *Compiler) deleteNamespace(name string) {
	if _, ok := c.namespaces[name]; ok {
		delete(c.namespaces, name)
		c.relabelNamespace(name)
	}
}

// UpsertPod adds or updates a pod.
func (c *Compiler) UpsertPod(pod *corev1.Pod) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	if pod != nil {
		c.upsertPod(pod)
	}
	return c.flush()
}

// UpsertPodFacts is UpsertPod for a pod read from elsewhere than a
// corev1.Pod.
func (c *Compiler) UpsertPodFacts(f PodFacts) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.upsertPodFacts(&f)
	return c.flush()
}

// UpsertPodsFacts upserts every pod pods yields, under one lock and with
// one recompilation at the end: it leaves what as many UpsertPodFacts
// would, at a fraction of the cost when the pods are many (the agent's
// first convergence: every pod of the cluster), since a group is compiled
// once rather than as each pod joins, and the identity of a label set
// that several pods share (LabelsShared) is looked up once. pods must not
// call the compiler.
//
// Its Changes name only the endpoints on Options.Node (all of them
// without one) in Endpoints, Removed and PrevIPs; IPCache says whether
// any pod's ipcache entries changed, and a caller that follows them pod
// by pod must then read them all (EachIPCache).
func (c *Compiler) UpsertPodsFacts(pods iter.Seq[PodFacts]) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.identMemo, c.batch = map[identMemoKey]identMemoEntry{}, true
	defer func() { c.identMemo, c.batch = nil, false }()
	for f := range pods {
		c.upsertPodFacts(&f)
	}
	return c.flush()
}

// DeletePod removes a pod.
func (c *Compiler) DeletePod(namespace, name string) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deletePod(EndpointID{namespace, name})
	return c.flush()
}

// UpsertNode adds or updates a node (its addresses tell host and
// remote-node peers apart in Trace).
func (c *Compiler) UpsertNode(node *corev1.Node) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	if node != nil {
		c.upsertNode(node)
	}
	return c.flush()
}

// DeleteNode removes a node.
func (c *Compiler) DeleteNode(name string) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.nodes, name)
	return c.flush()
}

// UpsertNetworkPolicy adds or updates a NetworkPolicy. An invalid policy is
// skipped (see PolicyError) and its previous version, if any, removed.
func (c *Compiler) UpsertNetworkPolicy(np *networkingv1.NetworkPolicy) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	if np != nil {
		c.installPolicy(PolicyRef{KindNetworkPolicy, np.Namespace, np.Name}, func() (*parsedPolicy, *PolicyError) { return parseNetworkPolicy(np) })
	}
	return c.flush()
}

// DeleteNetworkPolicy removes a NetworkPolicy.
func (c *Compiler) DeleteNetworkPolicy(namespace, name string) Changes {
	return c.deletePolicy(PolicyRef{KindNetworkPolicy, namespace, name})
}

// UpsertMeshPolicy adds or updates a MeshPolicy.
func (c *Compiler) UpsertMeshPolicy(mp *v1alpha1.MeshPolicy) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	if mp != nil {
		c.installPolicy(PolicyRef{KindMeshPolicy, mp.Namespace, mp.Name}, func() (*parsedPolicy, *PolicyError) { return parseMeshPolicy(mp) })
	}
	return c.flush()
}

// DeleteMeshPolicy removes a MeshPolicy.
func (c *Compiler) DeleteMeshPolicy(namespace, name string) Changes {
	return c.deletePolicy(PolicyRef{KindMeshPolicy, namespace, name})
}

// UpsertClusterMeshPolicy adds or updates a ClusterMeshPolicy.
func (c *Compiler) UpsertClusterMeshPolicy(cmp *v1alpha1.ClusterMeshPolicy) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cmp != nil {
		c.installPolicy(PolicyRef{KindClusterMeshPolicy, "", cmp.Name}, func() (*parsedPolicy, *PolicyError) { return parseClusterMeshPolicy(cmp) })
	}
	return c.flush()
}

// DeleteClusterMeshPolicy removes a ClusterMeshPolicy.
func (c *Compiler) DeleteClusterMeshPolicy(name string) Changes {
	return c.deletePolicy(PolicyRef{KindClusterMeshPolicy, "", name})
}

func (c *Compiler) deletePolicy(ref PolicyRef) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.removePolicy(ref)
	return c.flush()
}

func (c *Compiler) removePolicy(ref PolicyRef) {
	delete(c.invalid, ref)
	if old := c.policies[ref]; old != nil {
		c.uninstall(old, nil)
	}
}

// Invalid lists the policies that were skipped, sorted by policy.
func (c *Compiler) Invalid() []*PolicyError {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := slices.Collect(maps.Values(c.invalid))
	slices.SortFunc(out, func(a, b *PolicyError) int { return compareRefs(a.Policy, b.Policy) })
	return out
}

// PolicyError returns the error of one policy, or nil when it compiled (or
// is unknown).
func (c *Compiler) PolicyError(ref PolicyRef) *PolicyError {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.invalid[ref]
}

func compareRefs(a, b PolicyRef) int {
	return cmp.Or(strings.Compare(string(a.Kind), string(b.Kind)), strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
}

// Endpoints lists every endpoint, sorted by namespace/name.
func (c *Compiler) Endpoints() []Endpoint {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]Endpoint, 0, c.pods.len())
	for p := range c.pods.all() {
		if !p.active {
			continue
		}
		if p.group == nil || !p.group.computed {
			out = append(out, Endpoint{EndpointID: p.id, Node: p.node, IPs: p.ips.slice(), Identity: p.ident.id, NotCompiled: true})
			continue
		}
		out = append(out, p.endpoint(p.group))
	}
	slices.SortFunc(out, func(a, b Endpoint) int { return compareEndpointIDs(a.EndpointID, b.EndpointID) })
	return out
}

func compareEndpointIDs(a, b EndpointID) int {
	return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
}

// PodCount is the number of pods held, endpoints or not.
func (c *Compiler) PodCount() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.pods.len()
}

// Endpoint returns one endpoint.
func (c *Compiler) Endpoint(id EndpointID) (Endpoint, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	p := c.pods.get(id)
	if p == nil || !p.active {
		return Endpoint{}, false
	}
	return p.endpoint(c.view(c.groupOf(p))), true
}

// groupOf is p's group; for a pod on another node, which a node-local
// compiler keeps in no group, one of its own, not compiled.
func (c *Compiler) groupOf(p *podState) *group {
	if p.group != nil {
		return p.group
	}
	return &group{
		key: groupKey{id: p.ident.id, ports: portsSignature(p.namedPorts())}, ident: p.ident, ports: p.namedPorts(), podPorts: p.ports,
		endpoints: map[*podState]struct{}{p: {}},
	}
}

// endpoint describes p with the entries of g (its group, or a view of it).
func (p *podState) endpoint(g *group) Endpoint {
	return Endpoint{
		EndpointID: p.id, Node: p.node, IPs: p.ips.slice(), Identity: p.ident.id,
		Entries: g.entries(), Defaults: g.defaults,
	}
}

// Identities lists the allocated pod identities, sorted by number.
func (c *Compiler) Identities() []IdentityInfo {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]IdentityInfo, 0, len(c.idents))
	for _, id := range c.idents {
		out = append(out, IdentityInfo{ID: id.id, Labels: id.labels()})
	}
	slices.SortFunc(out, func(a, b IdentityInfo) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// IPCache lists pod IP → identity, sorted by IP.
func (c *Compiler) IPCache() []IPCacheEntry {
	c.mu.RLock()
	defer c.mu.RUnlock()
	var out []IPCacheEntry
	for p := range c.pods.all() {
		if !p.active {
			continue
		}
		for ip := range p.ips.all() {
			out = append(out, IPCacheEntry{IP: ip, Identity: p.ident.id, Node: p.node, Pod: p.id})
		}
	}
	// Two pods may briefly share an IP (one terminating); the order of
	// such entries must not depend on map iteration.
	slices.SortFunc(out, func(a, b IPCacheEntry) int {
		return cmp.Or(a.IP.Compare(b.IP), cmp.Compare(a.Identity, b.Identity), strings.Compare(a.Node, b.Node), compareEndpointIDs(a.Pod, b.Pod))
	})
	return out
}

// EachIPCache calls fn with every pod's ipcache entries, in no particular
// order, without building the list IPCache returns (the agent's full
// ipcache build at 150,000 pods). fn must not call the compiler.
func (c *Compiler) EachIPCache(fn func(IPCacheEntry)) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	for p := range c.pods.all() {
		if !p.active {
			continue
		}
		for ip := range p.ips.all() {
			fn(IPCacheEntry{IP: ip, Identity: p.ident.id, Node: p.node, Pod: p.id})
		}
	}
}

// PodIPCache lists the ipcache entries of one pod: none unless it is an
// endpoint. IPCache lists every pod's; this is for following one change.
func (c *Compiler) PodIPCache(id EndpointID) []IPCacheEntry {
	c.mu.RLock()
	defer c.mu.RUnlock()
	p := c.pods.get(id)
	if p == nil || !p.active {
		return nil
	}
	out := make([]IPCacheEntry, 0, p.ips.len())
	for ip := range p.ips.all() {
		out = append(out, IPCacheEntry{IP: ip, Identity: p.ident.id, Node: p.node, Pod: p.id})
	}
	return out
}

// CIDRTable lists CIDR prefix → CIDR identity (the datapath's CIDR LPM map),
// sorted by prefix.
func (c *Compiler) CIDRTable() []CIDREntry {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]CIDREntry, 0, len(c.regions))
	for p, r := range c.regions {
		out = append(out, CIDREntry{Prefix: p, ID: r.id})
	}
	slices.SortFunc(out, func(a, b CIDREntry) int {
		return cmp.Or(a.Prefix.Addr().Compare(b.Prefix.Addr()), cmp.Compare(a.Prefix.Bits(), b.Prefix.Bits()))
	})
	return out
}

// Rules lists every rule, sorted by ID.
func (c *Compiler) Rules() []Rule {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]Rule, 0, len(c.rules))
	for _, r := range c.rules {
		out = append(out, *r)
	}
	slices.SortFunc(out, func(a, b Rule) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// Rule returns the rule with the given ID (Entry.RuleID).
func (c *Compiler) Rule(id uint32) (Rule, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	r, ok := c.rules[id]
	if !ok {
		return Rule{}, false
	}
	return *r, true
}

// IdentityState returns the pod identity allocator state to persist and pass
// back as Options.Identities.
func (c *Compiler) IdentityState() map[string]identity.ID { return c.ids.State() }

// CIDRIdentityState is IdentityState for CIDR identities.
func (c *Compiler) CIDRIdentityState() map[string]identity.ID { return c.cidrIDs.State() }

// --- namespaces and nodes ---

func (c *Compiler) upsertNamespace(ns *corev1.Namespace) {
	ls := labels.Set{}
	maps.Copy(ls, ns.Labels)
	// The API server sets this label on every namespace; selectors rely on it.
	ls[corev1.LabelMetadataName] = ns.Name
	if old, ok := c.namespaces[ns.Name]; ok && maps.Equal(old, ls) {
		return
	}
	c.namespaces[ns.Name] = ls
	c.relabelNamespace(ns.Name)
}

func (c *Compiler) namespaceLabels(ns string) labels.Set {
	if ls, ok := c.namespaces[ns]; ok {
		return ls
	}
	return labels.Set{corev1.LabelMetadataName: ns}
}

// relabelNamespace gives every pod of ns the identity of its new label set.
func (c *Compiler) relabelNamespace(ns string) {
	// Only active pods carry an identity, which is all the namespace's
	// labels change: found through the namespace's identities rather
	// than an index of every pod by namespace.
	var pods []*podState
	for id := range c.identsByNS[ns] {
		pods = append(pods, id.pods...)
	}
	slices.SortFunc(pods, func(a, b *podState) int { return strings.Compare(a.id.Name, b.id.Name) })
	for _, old := range pods {
		np := *old
		np.ident, np.group = nil, nil
		c.replacePod(old, &np, podLabels{labels: old.ident.podLabels, shared: true, serviceAccount: old.ident.serviceAccount})
	}
}

// upsertNode records the node's addresses as the agent's ipcache has them,
// so Trace names a node address host or remote-node exactly where the
// datapath does; malformed fields are the agent's to report.
func (c *Compiler) upsertNode(n *corev1.Node) {
	info, _ := nodeinfo.Parse(n)
	c.nodes[n.Name] = info.Addrs()
}

// --- pods and identities ---

func (c *Compiler) upsertPod(pod *corev1.Pod) {
	f := podFacts(pod)
	c.upsertPodFacts(&f)
}

// podLabels are what an identity is made of besides the namespace: the
// labels of a pod joining one, and its service account.
type podLabels struct {
	labels map[string]string
	// shared: labels are never written (PodFacts.LabelsShared, or an
	// identity's own), so an identity may keep them.
	shared         bool
	serviceAccount string
}

func (c *Compiler) upsertPodFacts(f *PodFacts) {
	np := newPodState(f)
	old := c.pods.get(np.id)
	// An inactive pod has no identity: its labels matter only once it is
	// active, when its next update brings them.
	if old != nil && old.active == np.active && old.node == np.node &&
		(!np.active || (old.serviceAccount() == f.ServiceAccount && maps.Equal(old.labels(), f.Labels))) &&
		old.ips == np.ips && slices.Equal(old.namedPorts(), np.namedPorts()) {
		return
	}
	c.replacePod(old, np, podLabels{labels: f.Labels, shared: f.LabelsShared, serviceAccount: f.ServiceAccount})
}

func (c *Compiler) deletePod(id EndpointID) {
	if old := c.pods.get(id); old != nil {
		c.replacePod(old, nil, podLabels{})
	}
}

// replacePod swaps old for np (either may be nil). The new pod joins its
// identity and group before the old one leaves, so an identity or group
// that both share is never torn down and rebuilt (which would renumber it).
func (c *Compiler) replacePod(old, np *podState, pl podLabels) {
	if np != nil {
		c.pods.set(np)
		c.attach(np, pl)
	}
	if old != nil {
		if np == nil {
			c.pods.del(old.id)
		}
		c.detach(old)
	}
	// In a batch (UpsertPodsFacts) only the node's own endpoints are
	// reported one by one.
	report := !c.batch || (np != nil && c.isLocal(np)) || (old != nil && c.isLocal(old))
	if report && old != nil && old.active && (np == nil || !np.active || old.ips != np.ips) {
		if _, ok := c.prevIPs[old.id]; !ok {
			if c.prevIPs == nil {
				c.prevIPs = map[EndpointID][]netip.Addr{}
			}
			// Never written: newPodState made it.
			c.prevIPs[old.id] = old.ips.slice()
		}
	}
	switch {
	case !report:
	case np != nil && np.active:
		if old == nil || !old.active || old.group != np.group || old.ident != np.ident || old.node != np.node || old.ips != np.ips {
			c.changed[np.id] = struct{}{}
		}
		delete(c.removed, np.id)
	case old != nil && old.active:
		c.removed[old.id] = struct{}{}
		delete(c.changed, old.id)
	}
	if (old != nil && old.active) || (np != nil && np.active) {
		if old == nil || np == nil || old.active != np.active || old.ident != np.ident || old.ips != np.ips {
			c.ipcacheChanged = true
		}
		// Egress named ports towards CIDR peers resolve against the pods
		// inside the CIDR, so any pod change may touch them.
		for g := range c.cidrNamedGroups {
			c.dirty[g] = struct{}{}
		}
	}
}

func (c *Compiler) attach(p *podState, pl podLabels) {
	if !p.active {
		return
	}
	nsLabels := c.namespaceLabels(p.id.Namespace)
	ident, memoKey, memo := c.memoIdentity(p.id.Namespace, pl, nsLabels)
	if ident == nil {
		c.keyBuf, c.keyScratch = identity.AppendPodKey(c.keyBuf[:0], c.keyScratch, p.id.Namespace, pl.labels, nsLabels, pl.serviceAccount)
		ident = c.identByKey[string(c.keyBuf)]
	}
	if ident == nil {
		key := string(c.keyBuf)
		num, err := c.ids.Allocate(key)
		if err != nil {
			// The identity range (16M numbers) is exhausted: the pod cannot
			// be represented, so it stays out of the datapath.
			p.active = false
			return
		}
		// Pods of one identity have equal labels: it keeps one set, the
		// caller's own when nobody writes it.
		podLabels := labels.Set(pl.labels)
		if !pl.shared {
			podLabels = maps.Clone(podLabels)
		}
		ident = &identState{
			id: num, key: key, namespace: p.id.Namespace, serviceAccount: pl.serviceAccount,
			podLabels: podLabels, nsLabels: nsLabels,
		}
		if ident.podLabels == nil {
			ident.podLabels = labels.Set{}
		}
		c.addIdentity(ident)
	}
	if memo {
		c.identMemo[memoKey] = identMemoEntry{ident: ident, labels: pl.labels, nsLabels: nsLabels}
	}
	// Pods of one identity mostly have equal named ports: keep one copy.
	if len(ident.pods) > 0 && slices.Equal(ident.pods[0].namedPorts(), p.namedPorts()) {
		p.ports = ident.pods[0].ports
	}
	ident.add(p)
	p.ident = ident
	if ident.addPorts(p.namedPorts()) {
		c.dirtyPortsOf(ident.id)
	}
	for s := range c.namedCIDRs {
		c.hostRegions(p, s, 1)
	}
	if !c.isLocal(p) {
		// A node-local compiler compiles only its own node's endpoints:
		// pods elsewhere are peers (an identity, addresses, named ports)
		// and join no group.
		return
	}
	gk := groupKey{id: ident.id, ports: portsSignature(p.namedPorts())}
	g := c.groups[gk]
	if g == nil {
		g = &group{key: gk, ident: ident, ports: p.namedPorts(), podPorts: p.ports, endpoints: map[*podState]struct{}{}}
		c.groups[gk] = g
		if c.groupsByNS[ident.namespace] == nil {
			c.groupsByNS[ident.namespace] = map[*group]struct{}{}
		}
		c.groupsByNS[ident.namespace][g] = struct{}{}
		c.dirty[g] = struct{}{}
	}
	g.endpoints[p] = struct{}{}
	p.group = g
	// Equal by the group's key: keep one copy.
	p.ports = g.podPorts
	if c.isLocal(p) {
		g.local++
		if !g.computed {
			c.dirty[g] = struct{}{}
		}
	}
}

// identMemoKey names a pod's identity by the label sets it is made of, as
// maps rather than their contents: a cached pod's labels are interned, so
// the pods of one identity mostly share one map.
type identMemoKey struct {
	namespace, serviceAccount string
	labels, nsLabels          uintptr
}

// identMemoEntry holds the maps its key names, so that their addresses
// cannot be reused by other maps while it is kept.
type identMemoEntry struct {
	ident            *identState
	labels, nsLabels map[string]string
}

// memoIdentity returns the identity the memo (UpsertPodsFacts) holds for
// a pod of namespace ns with labels pl, if it holds one that still
// exists, and the memo key under which to record it; memo is false when
// there is no memo or the labels may be written.
func (c *Compiler) memoIdentity(ns string, pl podLabels, nsLabels labels.Set) (*identState, identMemoKey, bool) {
	if c.identMemo == nil || !pl.shared {
		return nil, identMemoKey{}, false
	}
	k := identMemoKey{
		namespace: ns, serviceAccount: pl.serviceAccount,
		labels: reflect.ValueOf(pl.labels).Pointer(), nsLabels: reflect.ValueOf(map[string]string(nsLabels)).Pointer(),
	}
	if e, ok := c.identMemo[k]; ok && c.idents[e.ident.id] == e.ident {
		return e.ident, k, false
	}
	return nil, k, true
}

// isLocal reports whether p is an endpoint on the compiler's node; every
// endpoint is when the compiler is not node-local.
func (c *Compiler) isLocal(p *podState) bool { return c.node == "" || p.node == c.node }

// wanted reports whether g's entries are kept: it has an endpoint on the
// compiler's node, or the compiler is not node-local.
func (c *Compiler) wanted(g *group) bool { return c.node == "" || g.local > 0 }

func (c *Compiler) detach(p *podState) {
	if !p.active || p.ident == nil {
		return
	}
	if g := p.group; g != nil {
		delete(g.endpoints, p)
		if c.isLocal(p) {
			g.local--
			if !c.wanted(g) && g.computed {
				// Its last local endpoint left: stop keeping it.
				c.dirty[g] = struct{}{}
			}
		}
		if len(g.endpoints) == 0 {
			for _, s := range g.sels {
				delete(s.users, g)
			}
			delete(c.groups, g.key)
			delete(c.groupsByNS[g.ident.namespace], g)
			if len(c.groupsByNS[g.ident.namespace]) == 0 {
				delete(c.groupsByNS, g.ident.namespace)
			}
			delete(c.dirty, g)
			delete(c.dirtyIDs, g)
			delete(c.egressNamedGroups, g)
			delete(c.cidrNamedGroups, g)
		}
	}
	for s := range c.namedCIDRs {
		c.hostRegions(p, s, -1)
	}
	ident := p.ident
	ident.remove(p)
	if len(ident.pods) == 0 {
		c.removeIdentity(ident)
		return
	}
	if ident.recomputePorts() {
		c.dirtyPortsOf(ident.id)
	}
}

func (c *Compiler) addIdentity(id *identState) {
	c.idents[id.id] = id
	c.identByKey[id.key] = id
	if c.identsByNS[id.namespace] == nil {
		c.identsByNS[id.namespace] = map[*identState]struct{}{}
	}
	c.identsByNS[id.namespace][id] = struct{}{}
	for s := range c.identitySelectors(id.namespace) {
		if s.matchesIdentity(id) && s.set(id.id, true) {
			c.dirtyUsers(s, id.id)
		}
	}
}

// identitySelectors yields the selectors that may pick an identity of
// namespace ns: its own namespace's label selectors and those spanning
// namespaces (never a CIDR selector).
func (c *Compiler) identitySelectors(ns string) iter.Seq[*selector] {
	return func(yield func(*selector) bool) {
		for s := range c.selsByNS[ns] {
			if !yield(s) {
				return
			}
		}
		for s := range c.selsAnyNS {
			if !yield(s) {
				return
			}
		}
	}
}

// indexSelector adds s to (add false: removes it from) the index that
// identitySelectors and the regions read.
func (c *Compiler) indexSelector(s *selector, add bool) {
	var m map[*selector]struct{}
	switch {
	case s.kind == selCIDR:
		m = c.cidrSels
	case s.kind == selLabels && s.namespace != "":
		m = c.selsByNS[s.namespace]
		if m == nil {
			m = map[*selector]struct{}{}
			c.selsByNS[s.namespace] = m
		}
	default:
		m = c.selsAnyNS
	}
	if add {
		m[s] = struct{}{}
		return
	}
	delete(m, s)
	if s.kind == selLabels && s.namespace != "" && len(m) == 0 {
		delete(c.selsByNS, s.namespace)
	}
}

func (c *Compiler) removeIdentity(id *identState) {
	delete(c.idents, id.id)
	delete(c.identByKey, id.key)
	delete(c.identsByNS[id.namespace], id)
	if len(c.identsByNS[id.namespace]) == 0 {
		delete(c.identsByNS, id.namespace)
	}
	for s := range c.identitySelectors(id.namespace) {
		if s.set(id.id, false) {
			c.dirtyUsers(s, id.id)
		}
	}
	c.ids.Release(id.key)
}

// dirtyUsers marks the entries of peer identity id stale in the groups
// using selector s.
func (c *Compiler) dirtyUsers(s *selector, id identity.ID) {
	for g := range s.users {
		c.dirtyID(g, id)
	}
}

func (c *Compiler) dirtyID(g *group, id identity.ID) {
	m := c.dirtyIDs[g]
	if m == nil {
		m = map[identity.ID]struct{}{}
		c.dirtyIDs[g] = m
	}
	m[id] = struct{}{}
}

// dirtyPortsOf marks stale the entries of a pod identity whose named ports
// changed, in the groups whose egress named ports resolve against peers.
func (c *Compiler) dirtyPortsOf(id identity.ID) {
	for g := range c.egressNamedGroups {
		c.dirtyID(g, id)
	}
}

// --- policies ---

func (c *Compiler) installPolicy(ref PolicyRef, parse func() (*parsedPolicy, *PolicyError)) {
	old := c.policies[ref]
	pp, perr := parse()
	if perr != nil {
		c.invalid[ref] = perr
		if old != nil {
			c.uninstall(old, nil)
		}
		return
	}
	delete(c.invalid, ref)
	ps := &policyState{parsedPolicy: pp}
	keep := map[uint32]bool{}
	seen := map[*selector]bool{}
	for i := range pp.rules {
		r := &pp.rules[i]
		br := boundRule{parsedRule: r, id: c.ruleID(pp, r)}
		keep[br.id] = true
		spec := r.peer.sel
		if r.peer.any && r.port.name != "" && r.dir == policytypes.Egress {
			spec, br.podsForAny = &selSpec{kind: selAllPods}, true
		}
		if spec != nil {
			br.sel = c.bindSelector(spec)
			if !seen[br.sel] {
				seen[br.sel] = true
				ps.sels = append(ps.sels, br.sel)
			}
			if spec.kind == selCIDR {
				ps.prefixes = append(ps.prefixes, spec.cidr)
				ps.prefixes = append(ps.prefixes, spec.except...)
				if r.port.name != "" && r.dir == policytypes.Egress {
					ps.namedCIDRs = append(ps.namedCIDRs, br.sel)
				}
			}
		}
		ps.rules = append(ps.rules, br)
	}
	for _, p := range ps.prefixes {
		c.refRegion(p)
	}
	for _, sel := range ps.namedCIDRs {
		c.useNamedCIDR(sel, 1)
	}
	c.policies[ref] = ps
	if ref.Kind == KindClusterMeshPolicy {
		c.clusterPolicies[ps] = struct{}{}
	} else {
		if c.policiesByNS[ref.Namespace] == nil {
			c.policiesByNS[ref.Namespace] = map[*policyState]struct{}{}
		}
		c.policiesByNS[ref.Namespace][ps] = struct{}{}
	}
	if old != nil {
		c.uninstall(old, keep)
	}
	c.dirtySubjects(ps)
}

// uninstall removes an installed policy; rule IDs in keep were taken over
// by its new version.
func (c *Compiler) uninstall(ps *policyState, keep map[uint32]bool) {
	if c.policies[ps.ref] == ps {
		delete(c.policies, ps.ref)
	}
	delete(c.clusterPolicies, ps)
	if m := c.policiesByNS[ps.namespace]; m != nil {
		delete(m, ps)
		if len(m) == 0 {
			delete(c.policiesByNS, ps.namespace)
		}
	}
	for _, r := range ps.rules {
		if !keep[r.id] {
			delete(c.rules, r.id)
			delete(c.ruleByKey, ruleKey(ps.ref, r.section))
		}
	}
	for _, sel := range ps.namedCIDRs {
		c.useNamedCIDR(sel, -1)
	}
	for _, s := range ps.sels {
		s.refs--
		if s.refs == 0 {
			delete(c.sels, s.key)
			c.indexSelector(s, false)
		}
	}
	for _, p := range ps.prefixes {
		c.unrefRegion(p)
	}
	c.dirtySubjects(ps)
}

// useNamedCIDR counts one more (delta 1) or one less (-1) egress named-port
// rule towards CIDR selector s; the first and the last one add or remove
// the host regions of the pods inside it.
func (c *Compiler) useNamedCIDR(s *selector, delta int) {
	n := c.namedCIDRs[s]
	c.namedCIDRs[s] = n + delta
	if n+delta == 0 {
		delete(c.namedCIDRs, s)
	}
	if (n == 0) == (delta > 0) {
		for p := range c.pods.all() {
			if p.active && p.ident != nil {
				c.hostRegions(p, s, delta)
			}
		}
	}
}

// hostRegions adds (delta 1) or removes (-1) the host regions of pod p's
// IPs inside the CIDR of s.
func (c *Compiler) hostRegions(p *podState, s *selector, delta int) {
	for ip := range p.ips.all() {
		if !s.cidr.Contains(ip) {
			continue
		}
		if h := netip.PrefixFrom(ip, ip.BitLen()); delta > 0 {
			c.refRegion(h)
		} else {
			c.unrefRegion(h)
		}
	}
}

func ruleKey(ref PolicyRef, section string) string { return ref.String() + "|" + section }

// ruleID returns the RuleID of a rule, keeping the ID of the same section of
// an earlier version of the policy so that unchanged rules keep their
// counters.
func (c *Compiler) ruleID(pp *parsedPolicy, r *parsedRule) uint32 {
	key := ruleKey(pp.ref, r.section)
	id, ok := c.ruleByKey[key]
	if !ok {
		id = c.nextRule
		c.nextRule++
		c.ruleByKey[key] = id
	}
	c.rules[id] = &Rule{
		ID: id, Policy: pp.ref, Section: r.section, Direction: r.dir, Verdict: r.verdict,
		Audit: pp.audit, Peer: r.peerText, Port: r.portText,
	}
	return id
}

// dirtySubjects marks the groups a policy selects.
func (c *Compiler) dirtySubjects(ps *policyState) {
	if ps.ref.Kind == KindClusterMeshPolicy {
		for _, g := range c.groups {
			if ps.selects(g.ident) {
				c.dirty[g] = struct{}{}
			}
		}
		return
	}
	for g := range c.groupsByNS[ps.namespace] {
		if ps.selects(g.ident) {
			c.dirty[g] = struct{}{}
		}
	}
}

func (p *parsedPolicy) selects(id *identState) bool {
	if p.ref.Kind != KindClusterMeshPolicy {
		return id.namespace == p.namespace && p.subjectPod.Matches(id.podLabels)
	}
	if p.subjectNS != nil && !p.subjectNS.Matches(id.nsLabels) {
		return false
	}
	return p.subjectPod.Matches(id.podLabels)
}

func (c *Compiler) bindSelector(spec *selSpec) *selector {
	key := spec.key()
	if s := c.sels[key]; s != nil {
		s.refs++
		return s
	}
	s := &selector{
		key: key, kind: spec.kind, namespace: spec.namespace, nsSel: spec.nsSel, podSel: spec.podSel,
		cidr: spec.cidr, except: spec.except, refs: 1,
		ids: map[identity.ID]struct{}{}, users: map[*group]struct{}{},
	}
	switch s.kind {
	case selCIDR:
		for p, r := range c.regions {
			if s.matchesRegion(p) {
				s.ids[r.id] = struct{}{}
			}
		}
	case selLabels:
		if s.namespace != "" {
			for id := range c.identsByNS[s.namespace] {
				if s.matchesIdentity(id) {
					s.ids[id.id] = struct{}{}
				}
			}
			break
		}
		fallthrough
	default:
		for _, id := range c.idents {
			if s.matchesIdentity(id) {
				s.ids[id.id] = struct{}{}
			}
		}
	}
	c.sels[key] = s
	c.indexSelector(s, true)
	return s
}

func (c *Compiler) refRegion(p netip.Prefix) {
	if r := c.regions[p]; r != nil {
		r.refs++
		return
	}
	id, err := c.cidrIDs.Allocate(p.String())
	if err != nil {
		// 4 billion CIDR identities in use cannot happen with real input;
		// without a number the prefix simply stays out of the table.
		return
	}
	c.regions[p] = &region{id: id, refs: 1}
	c.cidrChanged, c.regionsDirty = true, true
	// Whether a CIDR selector picks a region depends on that region alone,
	// so a new region is simply offered to every CIDR selector.
	for s := range c.cidrSels {
		if s.matchesRegion(p) && s.set(id, true) {
			c.dirtyUsers(s, id)
		}
	}
}

func (c *Compiler) unrefRegion(p netip.Prefix) {
	r := c.regions[p]
	if r == nil {
		return
	}
	r.refs--
	if r.refs == 0 {
		delete(c.regions, p)
		c.cidrIDs.Release(p.String())
		c.cidrChanged, c.regionsDirty = true, true
		for s := range c.cidrSels {
			if s.set(r.id, false) {
				c.dirtyUsers(s, r.id)
			}
		}
	}
}

// regionsChanged dirties, once per flush, the groups whose entries depend
// on which region each pod IP falls in: egress named ports towards CIDRs.
func (c *Compiler) regionsChanged() {
	if !c.regionsDirty {
		return
	}
	c.regionsDirty = false
	for g := range c.cidrNamedGroups {
		c.dirty[g] = struct{}{}
	}
}

// regionOf returns the longest named prefix holding ip.
func (c *Compiler) regionOf(ip netip.Addr) (netip.Prefix, identity.ID, bool) {
	var best netip.Prefix
	var bestID identity.ID
	found := false
	for p, r := range c.regions {
		if p.Contains(ip) && (!found || p.Bits() > best.Bits()) {
			best, bestID, found = p, r.id, true
		}
	}
	return best, bestID, found
}

func (c *Compiler) groupChanged(g *group) {
	for p := range g.endpoints {
		c.changed[p.id] = struct{}{}
	}
}

// flush recompiles the dirty groups and reports what changed.
func (c *Compiler) flush() Changes {
	c.regionsChanged()
	for g := range c.dirty {
		if !c.wanted(g) {
			c.forgetGroup(g)
			continue
		}
		was := g.computed
		var before []policytypes.Entry
		if was {
			before = g.entries()
		}
		beforeDefaults := g.defaults
		c.compileGroup(g)
		if !was || !slices.Equal(before, g.flat) || beforeDefaults != g.defaults {
			c.groupChanged(g)
		}
	}
	for g, ids := range c.dirtyIDs {
		if _, full := c.dirty[g]; full || c.groups[g.key] != g || !g.computed {
			continue
		}
		if c.patchGroup(g, ids) {
			c.groupChanged(g)
		}
	}
	ch := Changes{IPCache: c.ipcacheChanged, CIDRTable: c.cidrChanged, PrevIPs: c.prevIPs}
	c.prevIPs = nil
	for id := range c.changed {
		if p := c.pods.get(id); p != nil && p.active {
			ch.Endpoints = append(ch.Endpoints, id)
		}
	}
	for id := range c.removed {
		if p := c.pods.get(id); p == nil || !p.active {
			ch.Removed = append(ch.Removed, id)
		}
	}
	slices.SortFunc(ch.Endpoints, compareEndpointIDs)
	slices.SortFunc(ch.Removed, compareEndpointIDs)
	clear(c.dirty)
	clear(c.dirtyIDs)
	clear(c.changed)
	clear(c.removed)
	c.ipcacheChanged, c.cidrChanged = false, false
	return ch
}
