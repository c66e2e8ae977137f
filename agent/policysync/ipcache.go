package policysync

import (
	"cmp"
	"encoding/binary"
	"errors"
	"hash/maphash"
	"net/netip"
	"slices"
	"sync"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
)

// The ipcache holds an entry for every pod of the cluster, so what the
// syncer keeps of it is kept compact: IPv4 addresses as numbers, entries
// as three numbers (the node's address an index into a table of node
// addresses), and no slice per pod; the claims name pods by a hash (no
// pointer for the collector to follow), and no map by pod is kept: the
// compiler says which addresses a pod had when they change
// (Changes.PrevIPs). At 150,000 pods that is about 25 MiB, against about
// 90 MiB when every entry and claim was a netip.Prefix, a netip.Addr and
// a slice, and the map of what was written holds no pointers for the
// collector to scan.

// addr4 is an IPv4 address as a number.
func addr4(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

func fromAddr4(u uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], u)
	return netip.AddrFrom4(b)
}

// compactEntry is a datapath.IPCacheEntry whose node address is an index
// into an addrTable.
type compactEntry struct {
	id   identity.ID
	node uint32
	kind datapath.IPCacheKind
}

// addrTable numbers the node addresses entries forward to. It only grows:
// it holds every node address the agent has seen, a few bytes each.
type addrTable struct {
	mu    sync.Mutex
	addrs []netip.Addr
	index map[netip.Addr]uint32
}

func (t *addrTable) ref(a netip.Addr) uint32 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if i, ok := t.index[a]; ok {
		return i
	}
	if t.index == nil {
		t.index = map[netip.Addr]uint32{}
	}
	i := uint32(len(t.addrs))
	t.addrs = append(t.addrs, a)
	t.index[a] = i
	return i
}

func (t *addrTable) addr(i uint32) netip.Addr {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.addrs[i]
}

func (t *addrTable) compact(e datapath.IPCacheEntry) compactEntry {
	return compactEntry{id: e.Identity, node: t.ref(e.NodeIP), kind: e.Kind}
}

func (t *addrTable) expand(e compactEntry) datapath.IPCacheEntry {
	return datapath.IPCacheEntry{Identity: e.id, NodeIP: t.addr(e.node), Kind: e.kind}
}

// podClaim is a remote pod's claim on an ipcache address: 20 bytes, no
// pointer (with the pod's name, 48 and two).
type podClaim struct {
	e   compactEntry
	pod podRef
}

// podRef names a pod in a claim: 64 bits of a seeded hash of its namespace
// and name, as two numbers so that a claim needs no padding. Only the
// pods claiming one address (two, briefly: one terminating, one new) are
// told apart by it, so a collision (2^-64) is left unhandled. Claims whose identity,
// node address and kind are equal, the only ones it orders, make equal
// entries.
type podRef [2]uint32

// ref is pod's podRef in d.
func (d *ipcacheDerived) ref(pod policy.EndpointID) podRef {
	h := maphash.Comparable(d.seed, pod)
	return podRef{uint32(h >> 32), uint32(h)}
}

// ipcacheDerived is what a full build derives, kept to follow single pods:
// the nodes' own entries and addresses, and the pods' claims by address.
// Which addresses a changed pod claimed is not kept per pod: the
// compiler tells the ones it had when they change (Changes.PrevIPs), and
// a pod whose addresses did not change claims the ones it has.
type ipcacheDerived struct {
	// nodeEntries are the nodes' own prefixes; nodeAddr each node's
	// underlay address (as an addrTable index).
	nodeEntries map[netip.Prefix]compactEntry
	nodeAddr    map[string]uint32
	// claims holds one claim of each claimed address; more the further
	// claims of an address two pods hold (one terminating, one new).
	claims map[uint32]podClaim
	more   map[uint32][]podClaim
	// seed makes the claims' podRefs.
	seed maphash.Seed
}

// newDerived returns an empty derivation with room for pods claims (a
// map grown claim by claim to the cluster's size rehashes a dozen times).
func newDerived(pods int) ipcacheDerived {
	return ipcacheDerived{
		nodeEntries: map[netip.Prefix]compactEntry{}, nodeAddr: map[string]uint32{},
		claims: make(map[uint32]podClaim, pods), more: map[uint32][]podClaim{}, seed: maphash.MakeSeed(),
	}
}

// dirtyPod is a pod whose entries may have changed since the ipcache was
// last written: moved, when its addresses changed or it stopped being an
// endpoint, with the IPv4 addresses it had (prev) then.
type dirtyPod struct {
	moved bool
	prev  []uint32
}

// markPodDirty follows pod at the next write, with the addresses prevIPs
// says it had when they changed; the first change since the last write
// tells what it claims. Call with mu held.
func (s *Syncer) markPodDirty(pod policy.EndpointID, prevIPs map[policy.EndpointID][]netip.Addr) {
	d := s.podsDirty[pod]
	if prev, ok := prevIPs[pod]; ok && !d.moved {
		d.moved = true
		for _, ip := range prev {
			if ip.Is4() {
				d.prev = append(d.prev, addr4(ip))
			}
		}
	}
	s.podsDirty[pod] = d
}

// ipcacheState is what the syncer wrote to the ipcache and what it was
// built from. Guarded by Syncer.mu (the addrTable has its own lock).
type ipcacheState struct {
	table *addrTable
	// built: a full build has run (derived is valid).
	built   bool
	derived ipcacheDerived
	// written is what the datapath holds: IPv4 host prefixes by address,
	// wider prefixes (pod CIDRs) by prefix.
	written map[uint32]compactEntry
	wider   map[netip.Prefix]compactEntry
}

func newIPCacheState() ipcacheState {
	return ipcacheState{table: &addrTable{}, written: map[uint32]compactEntry{}, wider: map[netip.Prefix]compactEntry{}}
}

func (st *ipcacheState) size() int { return len(st.written) + len(st.wider) }

// host reports whether p is kept by address.
func host(p netip.Prefix) bool { return p.Addr().Is4() && p.Bits() == 32 }

func (st *ipcacheState) lookup(p netip.Prefix) (compactEntry, bool) {
	if host(p) {
		e, ok := st.written[addr4(p.Addr())]
		return e, ok
	}
	e, ok := st.wider[p]
	return e, ok
}

func (st *ipcacheState) record(p netip.Prefix, e compactEntry, present bool) {
	switch {
	case host(p) && present:
		st.written[addr4(p.Addr())] = e
	case host(p):
		delete(st.written, addr4(p.Addr()))
	case present:
		st.wider[p] = e
	default:
		delete(st.wider, p)
	}
}

// writtenIPCache is what the syncer recorded as written, whole.
func (s *Syncer) writtenIPCache() map[netip.Prefix]datapath.IPCacheEntry {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[netip.Prefix]datapath.IPCacheEntry, s.ipc.size())
	for a, e := range s.ipc.written {
		out[netip.PrefixFrom(fromAddr4(a), 32)] = s.ipc.table.expand(e)
	}
	for p, e := range s.ipc.wider {
		out[p] = s.ipc.table.expand(e)
	}
	return out
}

// beats reports whether claim a wins over b for an address both hold: the
// higher identity, then node address, then kind, then pod, so the result
// is the same whatever the order the claims arrived in.
func (t *addrTable) beats(a, b podClaim) bool {
	return cmp.Or(cmp.Compare(a.e.id, b.e.id), t.addr(a.e.node).Compare(t.addr(b.e.node)), cmp.Compare(a.e.kind, b.e.kind),
		cmp.Compare(a.pod[0], b.pod[0]), cmp.Compare(a.pod[1], b.pod[1])) > 0
}

func (d *ipcacheDerived) addClaim(a uint32, c podClaim) {
	if _, ok := d.claims[a]; ok {
		d.more[a] = append(d.more[a], c)
	} else {
		d.claims[a] = c
	}
}

// dropClaims removes the claims of pod on addrs (which hold every address
// it claims, perhaps more) and returns the addresses it held.
func (d *ipcacheDerived) dropClaims(id policy.EndpointID, addrs []uint32, out []uint32) []uint32 {
	pod := d.ref(id)
	for _, a := range addrs {
		c, ok := d.claims[a]
		if !ok {
			continue
		}
		others := d.more[a]
		if c.pod == pod {
			out = append(out, a)
			if len(others) == 0 {
				delete(d.claims, a)
				continue
			}
			d.claims[a] = others[len(others)-1]
			others = others[:len(others)-1]
		} else {
			n := len(others)
			others = slices.DeleteFunc(others, func(c podClaim) bool { return c.pod == pod })
			if len(others) == n {
				continue
			}
			out = append(out, a)
		}
		if len(others) == 0 {
			delete(d.more, a)
		} else {
			d.more[a] = others
		}
	}
	return out
}

// winner is the claim an address gets in the ipcache.
func (st *ipcacheState) winner(d *ipcacheDerived, a uint32) (compactEntry, bool) {
	best, ok := d.claims[a]
	if !ok {
		return compactEntry{}, false
	}
	for _, c := range d.more[a] {
		if st.table.beats(c, best) {
			best = c
		}
	}
	return best.e, true
}

// want is what address a should hold: a pod's claim, else the nodes'
// entry for it.
func (st *ipcacheState) want(d *ipcacheDerived, a uint32) (compactEntry, bool) {
	if e, ok := st.winner(d, a); ok {
		return e, true
	}
	e, ok := d.nodeEntries[netip.PrefixFrom(fromAddr4(a), 32)]
	return e, ok
}

// nodeIPCache is what the ipcache holds for the resolved nodes themselves:
// their addresses and pod CIDRs, and this node's own address. The
// WireGuard peers come from the same resolution, so a node's prefixes
// carry the tunnel flag exactly when it is a peer, and are forwarded
// toward the address its tunnel uses. It also returns each node's address.
func (s *Syncer) nodeIPCache(c nodeinfo.Cluster) (map[netip.Prefix]datapath.IPCacheEntry, map[string]netip.Addr) {
	want := map[netip.Prefix]datapath.IPCacheEntry{}
	nodeIPs := map[string]netip.Addr{}
	self := netip.PrefixFrom(s.cfg.NodeIP, 32)
	for _, n := range c.Nodes {
		if n.Name == s.cfg.NodeName {
			nodeIPs[n.Name] = s.cfg.NodeIP
			for _, a := range n.Addrs() {
				if a.Is4() {
					want[netip.PrefixFrom(a, 32)] = datapath.IPCacheEntry{Identity: identity.Host, NodeIP: s.cfg.NodeIP, Kind: datapath.NodeAddr}
				}
			}
			continue
		}
		ip := n.IP()
		if !ip.IsValid() {
			continue
		}
		nodeIPs[n.Name] = ip
		// A peer's own addresses are in its allowed IPs: pods reach them
		// through the tunnel.
		nodeTunnel := s.tunnelKind(n.Name)
		for _, a := range n.Addrs() {
			if a.Is4() && netip.PrefixFrom(a, 32) != self {
				kind := datapath.NodeAddr
				if slices.Contains(n.InternalIPs, a) {
					kind |= nodeTunnel
				}
				want[netip.PrefixFrom(a, 32)] = datapath.IPCacheEntry{Identity: identity.RemoteNode, NodeIP: ip, Kind: kind}
			}
		}
		for _, cidr := range n.PodCIDRs {
			if cidr.Addr().Is4() {
				want[cidr] = datapath.IPCacheEntry{Identity: identity.World, NodeIP: ip, Kind: datapath.PodCIDR | s.tunnelKind(n.Name)}
			}
		}
	}
	want[self] = datapath.IPCacheEntry{Identity: identity.Host, NodeIP: s.cfg.NodeIP, Kind: datapath.NodeAddr}
	return want, nodeIPs
}

// podClaim converts a compiler entry into an ipcache claim: IPv4 addresses
// of pods on other nodes whose node's address is known.
func (s *Syncer) podClaim(d *ipcacheDerived, e policy.IPCacheEntry) (uint32, podClaim, bool) {
	if !e.IP.Is4() || e.Node == s.cfg.NodeName {
		return 0, podClaim{}, false
	}
	nip, ok := d.nodeAddr[e.Node]
	if !ok {
		return 0, podClaim{}, false
	}
	return addr4(e.IP), podClaim{pod: d.ref(e.Pod), e: compactEntry{id: e.Identity, node: nip, kind: datapath.RemotePod | s.tunnelKind(e.Node)}}, true
}

// buildIPCache derives, from the resolved nodes and the compiler's pods,
// what the ipcache should hold.
func (s *Syncer) buildIPCache(c nodeinfo.Cluster, t *addrTable) ipcacheDerived {
	d := newDerived(s.cfg.Compiler.PodCount())
	nodes, nodeIPs := s.nodeIPCache(c)
	for p, e := range nodes {
		d.nodeEntries[p] = t.compact(e)
	}
	for n, ip := range nodeIPs {
		d.nodeAddr[n] = t.ref(ip)
	}
	s.cfg.Compiler.EachIPCache(func(e policy.IPCacheEntry) {
		if a, pc, ok := s.podClaim(&d, e); ok {
			d.addClaim(a, pc)
		}
	})
	return d
}

// syncIPCache makes the ipcache match the cluster: remote pods, other nodes'
// addresses and pod CIDRs, and this node's own address. It returns the
// prefixes it wrote or removed.
func (s *Syncer) syncIPCache() ([]netip.Prefix, error) {
	c := s.ResolvedCluster()
	s.mu.Lock()
	// Every pod is rebuilt below: pods marked until now need nothing more.
	s.resetPodsDirty()
	t := s.ipc.table
	s.mu.Unlock()
	d := s.buildIPCache(c, t)

	s.mu.Lock()
	defer s.mu.Unlock()
	st := &s.ipc
	st.derived, st.built = d, true
	if len(st.written) == 0 {
		// The first build writes every pod's entry: room for them all.
		st.written = make(map[uint32]compactEntry, len(d.claims)+len(d.nodeEntries))
	}
	var (
		errs    []error
		changed []netip.Prefix
	)
	write := func(p netip.Prefix, e compactEntry, present bool) {
		old, had := st.lookup(p)
		if err := s.writeIPCache(p, e, present); err != nil {
			errs = append(errs, err)
		} else if had != present || old != e {
			changed = append(changed, p)
		}
	}
	for a := range d.claims {
		e, _ := st.winner(&d, a)
		write(netip.PrefixFrom(fromAddr4(a), 32), e, true)
	}
	for p, e := range d.nodeEntries {
		if host(p) {
			if _, claimed := d.claims[addr4(p.Addr())]; claimed {
				continue
			}
		}
		write(p, e, true)
	}
	var stale []netip.Prefix
	for a := range st.written {
		if _, ok := st.want(&d, a); !ok {
			stale = append(stale, netip.PrefixFrom(fromAddr4(a), 32))
		}
	}
	for p := range st.wider {
		if _, ok := d.nodeEntries[p]; !ok {
			stale = append(stale, p)
		}
	}
	for _, p := range stale {
		write(p, compactEntry{}, false)
	}
	return changed, errors.Join(errs...)
}

// writeIPCache makes one prefix hold e (or nothing), writing only what
// differs from what was written. Call with mu held.
func (s *Syncer) writeIPCache(p netip.Prefix, e compactEntry, present bool) error {
	st := &s.ipc
	old, had := st.lookup(p)
	switch {
	case present && had && old == e, !present && !had:
		return nil
	case present:
		if err := s.cfg.Datapath.UpsertIPCache(p, st.table.expand(e)); err != nil {
			return err
		}
	default:
		if err := s.cfg.Datapath.DeleteIPCache(p); err != nil {
			return err
		}
	}
	st.record(p, e, present)
	return nil
}

// syncPodIPCache brings the entries of the pods marked since the last
// write in line with the compiler, leaving the rest alone.
func (s *Syncer) syncPodIPCache() ([]netip.Prefix, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.podsDirty) == 0 {
		return nil, nil
	}
	st := &s.ipc
	d := &st.derived
	var touched, addrs []uint32
	for id, dp := range s.podsDirty {
		now := s.cfg.Compiler.PodIPCache(id)
		// What it claims: the addresses it had when they changed, else
		// the ones it has.
		addrs = append(addrs[:0], dp.prev...)
		if !dp.moved {
			for _, e := range now {
				if e.IP.Is4() {
					addrs = append(addrs, addr4(e.IP))
				}
			}
		}
		touched = d.dropClaims(id, addrs, touched)
		for _, e := range now {
			if a, pc, ok := s.podClaim(d, e); ok {
				d.addClaim(a, pc)
				touched = append(touched, a)
			}
		}
	}
	s.resetPodsDirty()
	slices.Sort(touched)
	touched = slices.Compact(touched)
	var (
		errs    []error
		changed []netip.Prefix
	)
	for _, a := range touched {
		p := netip.PrefixFrom(fromAddr4(a), 32)
		e, present := st.want(d, a)
		old, had := st.lookup(p)
		if err := s.writeIPCache(p, e, present); err != nil {
			errs = append(errs, err)
			// Retried by the next full build.
			s.ipcacheDirty.Store(true)
		} else if had != present || old != e {
			changed = append(changed, p)
		}
	}
	return changed, errors.Join(errs...)
}

// resetPodsDirty empties the set of pods to follow. A Go map keeps the
// room it once needed, and the first convergence marks every pod of the
// cluster: a large set is dropped rather than cleared. Call with mu held.
func (s *Syncer) resetPodsDirty() {
	if len(s.podsDirty) > 1024 {
		s.podsDirty = map[policy.EndpointID]dirtyPod{}
		return
	}
	clear(s.podsDirty)
}
