package nodeinfo

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
)

// Options of Resolve.
type Options struct {
	// Self is the node whose claims win over every other node's: an agent
	// knows its own key and address first hand. Empty for an observer
	// (meshctl), which applies the ownership rule alone.
	Self string
	// ClusterCIDRs hold every pod CIDR of the cluster; a pod CIDR is cut
	// to them, one outside them all is refused, and no node address may
	// lie inside them. Empty means not known (an observer without the
	// agents' configuration): then only node against node is checked.
	ClusterCIDRs []netip.Prefix
}

// Cluster is what each node may be trusted with.
type Cluster struct {
	// Nodes, sorted by name, keep only the claims they were granted: a
	// refused pod CIDR or address is dropped, a refused key or endpoint
	// leaves the node without a tunnel (PublicKey and Endpoint zero).
	Nodes []Node
	// Conflicts are the refused claims, in ownership order.
	Conflicts []Conflict
	// Errors are *NodeError for Nodes with malformed fields.
	Errors []error
}

// Node returns the named node and whether it is there.
func (c Cluster) Node(name string) (Node, bool) {
	i, ok := slices.BinarySearchFunc(c.Nodes, name, func(n Node, name string) int { return cmp.Compare(n.Name, name) })
	if !ok {
		return Node{}, false
	}
	return c.Nodes[i], true
}

// A Conflict is a claim refused to Node: Owner already holds it, or (Owner
// empty) it does not fit the cluster's pod address space: a pod CIDR
// outside the cluster CIDRs, a node address or endpoint inside them.
type Conflict struct {
	Node  string
	Owner string
	// Kind is what was claimed: one of the Kind constants.
	Kind string
	// Claim is the value as Node published it (a key by fingerprint).
	Claim string
}

// What a Conflict is about.
const (
	KindPodCIDR   = "pod CIDR"
	KindAddress   = "address"
	KindEndpoint  = "endpoint"
	KindPublicKey = "public key"
)

func (c Conflict) Error() string {
	switch {
	case c.Owner == "" && c.Kind == KindPodCIDR:
		return fmt.Sprintf("node %s claims %s %s outside the cluster CIDR", c.Node, c.Kind, c.Claim)
	case c.Owner == "":
		return fmt.Sprintf("node %s claims %s %s inside the cluster CIDR, where only pods live", c.Node, c.Kind, c.Claim)
	}
	return fmt.Sprintf("node %s claims %s %s, held by node %s", c.Node, c.Kind, c.Claim, c.Owner)
}

// Resolve decides which node holds what when Nodes claim the same thing.
// The established owner keeps it: the node's own agent (Options.Self) first,
// then the node created first (older creationTimestamp; equal times by
// name). So a node that joins, or an agent whose credentials are abused,
// cannot take another node's pod CIDR, address or key away: the newcomer's
// claim is refused and reported, and the owner keeps working.
//
// What is claimed: pod CIDRs (spec.podCIDRs cut to the cluster CIDRs), node
// addresses (InternalIPs and the endpoint's address, which must lie outside
// the cluster CIDRs), the public key and the endpoint.
func Resolve(nodes []*corev1.Node, opts Options) Cluster {
	var c Cluster
	for _, n := range nodes {
		if n == nil {
			continue
		}
		p, err := Parse(n)
		if err != nil {
			c.Errors = append(c.Errors, err)
		}
		c.Nodes = append(c.Nodes, p)
	}
	slices.SortFunc(c.Nodes, func(a, b Node) int {
		return cmp.Or(
			-cmp.Compare(boolInt(a.Name == opts.Self), boolInt(b.Name == opts.Self)),
			a.Created.Compare(b.Created),
			cmp.Compare(a.Name, b.Name))
	})

	granted := newSpace() // pod CIDRs and node addresses granted so far
	holder := granted.holder
	keys := map[[32]byte]string{}
	for i := range c.Nodes {
		n := &c.Nodes[i]
		refuse := func(owner, kind, claim string) {
			c.Conflicts = append(c.Conflicts, Conflict{Node: n.Name, Owner: owner, Kind: kind, Claim: claim})
		}
		var cidrs []netip.Prefix
		for _, p := range n.PodCIDRs {
			in, ok := intersect(p, opts.ClusterCIDRs)
			if !ok {
				refuse("", KindPodCIDR, p.String())
				continue
			}
			if owner := holder(in); owner != "" {
				refuse(owner, KindPodCIDR, p.String())
				continue
			}
			cidrs = append(cidrs, in)
		}
		n.PodCIDRs = cidrs
		if n.Endpoint.IsValid() {
			a := netip.PrefixFrom(n.Endpoint.Addr(), n.Endpoint.Addr().BitLen())
			if owner := holder(a); owner != "" {
				refuse(owner, KindEndpoint, n.Endpoint.String())
				n.Endpoint, n.PublicKey = netip.AddrPort{}, [32]byte{}
			} else if inAny(a, opts.ClusterCIDRs) {
				refuse("", KindEndpoint, n.Endpoint.String())
				n.Endpoint, n.PublicKey = netip.AddrPort{}, [32]byte{}
			}
		}
		var ips []netip.Addr
		for _, ip := range n.InternalIPs {
			a := netip.PrefixFrom(ip, ip.BitLen())
			if owner := holder(a); owner != "" {
				refuse(owner, KindAddress, ip.String())
				continue
			}
			if inAny(a, opts.ClusterCIDRs) {
				refuse("", KindAddress, ip.String())
				continue
			}
			ips = append(ips, ip)
		}
		n.InternalIPs = ips
		if n.PublicKey != ([32]byte{}) {
			if owner, taken := keys[n.PublicKey]; taken {
				refuse(owner, KindPublicKey, Fingerprint(n.PublicKey))
				n.Endpoint, n.PublicKey = netip.AddrPort{}, [32]byte{}
			} else {
				keys[n.PublicKey] = n.Name
			}
		}
		for _, p := range n.PodCIDRs {
			granted.grant(p, n.Name)
		}
		for _, a := range n.Addrs() {
			granted.grant(netip.PrefixFrom(a, a.BitLen()), n.Name)
		}
	}
	slices.SortFunc(c.Nodes, func(a, b Node) int { return cmp.Compare(a.Name, b.Name) })
	return c
}

// space is the address space granted to nodes so far, with each grant's
// owner. Grants never overlap, so whether a prefix overlaps one is a
// question about its ancestors and descendants: a lookup costs the prefix
// length in map reads, not the number of nodes, and an agent resolves a
// cluster of thousands of nodes on every Node event.
type space struct {
	held      map[netip.Prefix]string // granted prefix → owner
	ancestors map[netip.Prefix]string // every prefix that holds a grant (the grant too) → an owner inside
}

func newSpace() *space {
	return &space{held: map[netip.Prefix]string{}, ancestors: map[netip.Prefix]string{}}
}

// holder is the owner of a grant that overlaps p, "" when none does.
func (s *space) holder(p netip.Prefix) string {
	p = p.Masked()
	for b := p.Bits(); b >= 0; b-- {
		if o, ok := s.held[netip.PrefixFrom(p.Addr(), b).Masked()]; ok {
			return o
		}
	}
	return s.ancestors[p]
}

func (s *space) grant(p netip.Prefix, owner string) {
	p = p.Masked()
	s.held[p] = owner
	for b := p.Bits(); b >= 0; b-- {
		a := netip.PrefixFrom(p.Addr(), b).Masked()
		if _, ok := s.ancestors[a]; !ok {
			s.ancestors[a] = owner
		}
	}
}

// intersect cuts p to the cluster CIDR that overlaps it (prefixes either
// contain each other or are disjoint, so that is the longer of the two).
func intersect(p netip.Prefix, cluster []netip.Prefix) (netip.Prefix, bool) {
	if len(cluster) == 0 {
		return p, true
	}
	for _, c := range cluster {
		if !c.Overlaps(p) {
			continue
		}
		if c.Bits() > p.Bits() {
			return c, true
		}
		return p, true
	}
	return netip.Prefix{}, false
}

func inAny(p netip.Prefix, cluster []netip.Prefix) bool {
	for _, c := range cluster {
		if c.Overlaps(p) {
			return true
		}
	}
	return false
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
