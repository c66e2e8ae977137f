package policy

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// contrib is one fact a rule contributes to a group: for this direction and
// peer identity, on this protocol/port prefix, this verdict.
type contrib struct {
	policytypes.Key
	verdict policytypes.Verdict
	audit   bool
	rule    uint32
	// order is the position in policy order (policies sorted by kind,
	// namespace, name; rules as written): it breaks ties between rules
	// canonically, whatever order the rule IDs were handed out in.
	order  int
	packed uint64
}

// portKey is the protocol/port part of a Key.
type portKey struct {
	proto uint8
	port  uint16
	plen  uint8
}

// covers reports whether prefix a includes prefix k.
func (a portKey) covers(k portKey) bool {
	if a.proto == policytypes.ProtoAny {
		return true
	}
	if a.proto != k.proto || a.plen > k.plen {
		return false
	}
	mask := portMask(a.plen)
	return a.port&mask == k.port&mask
}

// matches reports whether prefix a includes a packet's proto and port.
func (a portKey) matches(proto uint8, port uint16) bool {
	return a.covers(portKey{proto, port, 16})
}

// rank orders prefixes by specificity: the LPM winner has the highest.
func (a portKey) rank() int {
	if a.proto == policytypes.ProtoAny {
		return 0
	}
	return 1 + int(a.plen)
}

func portMask(plen uint8) uint16 {
	if plen == 0 {
		return 0
	}
	return ^uint16(0) << (16 - plen)
}

func keyPort(k policytypes.Key) portKey { return portKey{k.Proto, k.Port, k.PortPrefixLen} }

// RangePrefixes returns the minimal list of port prefixes (port, prefix
// length) that covers lo..hi exactly, in ascending order.
func RangePrefixes(lo, hi uint16) []PortPrefix {
	var out []PortPrefix
	for l, h := uint32(lo), uint32(hi); l <= h; {
		size, plen := uint32(1), uint8(16)
		for plen > 0 && l%(size<<1) == 0 && l+(size<<1)-1 <= h {
			size <<= 1
			plen--
		}
		out = append(out, PortPrefix{Port: uint16(l), Len: plen})
		l += size
	}
	return out
}

// PortPrefix is a port and the number of its leading bits that count.
type PortPrefix struct {
	Port uint16
	Len  uint8
}

// compileGroup rebuilds a group from the policies selecting its identity:
// policies, defaults, selector registrations and every entry.
func (c *Compiler) compileGroup(g *group) {
	for _, s := range g.sels {
		delete(s.users, g)
	}
	c.evaluate(g)
	for _, s := range g.sels {
		s.users[g] = struct{}{}
	}
	g.computed = true
	setMember(c.egressNamedGroups, g, g.egressNamed)
	setMember(c.cidrNamedGroups, g, g.cidrNamed)
}

// evaluate computes g's policies, defaults, selectors and entries from the
// compiler's state, registering nothing: compileGroup registers them, and
// view evaluates groups a node-local compiler does not keep.
func (c *Compiler) evaluate(g *group) {
	g.sels = g.sels[:0]
	g.selectedBy = [2][]PolicyRef{}
	g.egressNamed, g.cidrNamed = false, false
	g.defaults = policytypes.Defaults{IngressEnforce: policytypes.Allow, IngressAudit: policytypes.Allow, EgressEnforce: policytypes.Allow, EgressAudit: policytypes.Allow}

	g.pols = g.pols[:0]
	for ps := range c.policiesByNS[g.ident.namespace] {
		if ps.selects(g.ident) {
			g.pols = append(g.pols, ps)
		}
	}
	for ps := range c.clusterPolicies {
		if ps.selects(g.ident) {
			g.pols = append(g.pols, ps)
		}
	}
	slices.SortFunc(g.pols, func(a, b *policyState) int { return compareRefs(a.ref, b.ref) })

	for _, ps := range g.pols {
		for dir := policytypes.Ingress; dir <= policytypes.Egress; dir++ {
			if !ps.defaultDeny[dir] {
				continue
			}
			g.selectedBy[dir] = append(g.selectedBy[dir], ps.ref)
			enf, aud := &g.defaults.IngressEnforce, &g.defaults.IngressAudit
			if dir == policytypes.Egress {
				enf, aud = &g.defaults.EgressEnforce, &g.defaults.EgressAudit
			}
			*aud = policytypes.Deny
			if !ps.audit {
				*enf = policytypes.Deny
			}
		}
		for i := range ps.rules {
			r := &ps.rules[i]
			if r.sel != nil && !slices.Contains(g.sels, r.sel) {
				g.sels = append(g.sels, r.sel)
			}
			if r.port.name != "" && r.dir == policytypes.Egress {
				if r.sel != nil && r.sel.kind == selCIDR {
					g.cidrNamed = true
				} else {
					g.egressNamed = true
				}
			}
		}
	}
	g.flat = mergeContribs(c.contribs(g, nil, nil))
	g.materialized = nil
	clear(g.overlay)
}

// forgetGroup stops keeping the entries of a group that has no endpoint
// on a node-local compiler's node.
func (c *Compiler) forgetGroup(g *group) {
	for _, s := range g.sels {
		delete(s.users, g)
	}
	g.sels, g.pols, g.flat, g.overlay, g.materialized = nil, nil, nil, nil, nil
	g.selectedBy = [2][]PolicyRef{}
	g.defaults = policytypes.Defaults{}
	g.computed = false
	delete(c.egressNamedGroups, g)
	delete(c.cidrNamedGroups, g)
	delete(c.dirtyIDs, g)
}

// view returns g when its entries are kept, else a copy evaluated now
// (another node's endpoint on a node-local compiler). It changes nothing,
// so readers may call it.
func (c *Compiler) view(g *group) *group {
	if g.computed {
		return g
	}
	v := &group{key: g.key, ident: g.ident, ports: g.ports, endpoints: g.endpoints}
	c.evaluate(v)
	v.computed = true
	return v
}

func setMember[K comparable](m map[K]struct{}, k K, in bool) {
	if in {
		m[k] = struct{}{}
	} else {
		delete(m, k)
	}
}

// patchGroup recompiles only the entries of the given peer identities:
// entries are keyed by peer identity, so when a selector gains or loses an
// identity, or a pod identity's named ports change, nothing else of the
// group can change. The new blocks go to the overlay; it reports whether
// any entry changed.
func (c *Compiler) patchGroup(g *group, ids map[identity.ID]struct{}) bool {
	fresh := mergeContribs(c.contribs(g, ids, nil))
	changed := false
	for id := range ids {
		var blk []policytypes.Entry
		for _, e := range fresh {
			if e.Identity == id {
				blk = append(blk, e)
			}
		}
		if slices.Equal(blk, g.block(id)) {
			continue
		}
		if g.overlay == nil {
			g.overlay = map[identity.ID][]policytypes.Entry{}
		}
		g.overlay[id] = blk
		g.materialized = nil
		changed = true
	}
	return changed
}

// block returns the current entries of one peer identity, both directions.
func (g *group) block(id identity.ID) []policytypes.Entry {
	if blk, ok := g.overlay[id]; ok {
		return blk
	}
	var out []policytypes.Entry
	for dir := policytypes.Ingress; dir <= policytypes.Egress; dir++ {
		i, _ := slices.BinarySearchFunc(g.flat, policytypes.Key{Direction: dir, Identity: id}, func(e policytypes.Entry, k policytypes.Key) int { return compareKeys(e.Key, k) })
		for ; i < len(g.flat) && g.flat[i].Direction == dir && g.flat[i].Identity == id; i++ {
			out = append(out, g.flat[i])
		}
	}
	return out
}

// entries returns the group's sorted entries, folding the overlay into the
// flat list first. Folding is deferred to reads because a read is rare and
// per endpoint, while an identity change may patch hundreds of groups.
func (g *group) entries() []policytypes.Entry {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.materialized != nil {
		return g.materialized
	}
	if len(g.overlay) == 0 {
		g.materialized = g.flat
		return g.flat
	}
	// Only the patched blocks are sorted; the rest of flat is in order
	// already, and the two never share a key (they hold other identities).
	var patch []policytypes.Entry
	for _, blk := range g.overlay {
		patch = append(patch, blk...)
	}
	slices.SortFunc(patch, func(a, b policytypes.Entry) int { return compareKeys(a.Key, b.Key) })
	out := make([]policytypes.Entry, 0, len(g.flat)+len(patch))
	i := 0
	for _, e := range g.flat {
		if _, patched := g.overlay[e.Identity]; patched {
			continue
		}
		for i < len(patch) && compareKeys(patch[i].Key, e.Key) < 0 {
			out = append(out, patch[i])
			i++
		}
		out = append(out, e)
	}
	out = append(out, patch[i:]...)
	g.flat, g.materialized = out, out
	clear(g.overlay)
	return out
}

// contribs lists what g's policies contribute, restricted to the peer
// identities in only (nil = all).
//
// A rule's (peer, port) pairs each have a RuleID, but generating every pair
// would cost peers × ports × identities; instead each identity is credited
// to the first peer that picks it, which is also the pair the entry would
// name (the first in policy order), and the product never materialises.
func (c *Compiler) contribs(g *group, only map[identity.ID]struct{}, out []contrib) []contrib {
	var scratch []uint16
	base := 0
	for _, ps := range g.pols {
		for gi := 0; gi < len(ps.rules); {
			nq := ps.rules[gi].nPorts
			block := ps.rules[gi : gi+ps.rules[gi].nPeers*nq]
			dir := block[0].dir
			var plain, named firstPeers
			for k := range nq {
				pt := block[k].port
				idx := &plain
				if pt.name != "" && dir == policytypes.Egress {
					// Towards any peer, a named port can only reach pods, so
					// these pairs are bound to the all-pods selector.
					idx = &named
				}
				if !idx.done {
					idx.fill(block, nq, k, only)
				}
				add := func(n int, pk portKey) {
					j := idx.first[n]
					r := &block[j*nq+k]
					out = append(out, contrib{
						Key:     policytypes.Key{Direction: dir, Identity: idx.ids[n], Proto: pk.proto, Port: pk.port, PortPrefixLen: pk.plen},
						verdict: r.verdict, audit: ps.audit, rule: r.id, order: base + gi + j*nq + k,
					})
				}
				switch {
				case pt.any:
					for n := range idx.ids {
						add(n, portKey{})
					}
				case pt.icmp:
					for n := range idx.ids {
						add(n, portKey{policytypes.ProtoICMP, pt.lo, pt.icmpLen})
						// Every ICMP type includes ICMPv6, so "allow ICMP"
						// holds on IPv6 too; type numbers differ between the
						// two, so a typed rule stays IPv4 only.
						if pt.icmpLen == 0 {
							add(n, portKey{policytypes.ProtoICMPv6, 0, 0})
						}
					}
				case pt.name != "" && dir == policytypes.Ingress:
					// The destination of ingress is the endpoint itself.
					scratch = resolvePort(g.ports, pt.name, pt.proto, scratch[:0])
					for n := range idx.ids {
						for _, port := range scratch {
							add(n, portKey{pt.proto, port, 16})
						}
					}
				case pt.name != "":
					// The destination of egress is the peer: a pod identity
					// resolves against its pods; other peers have no named
					// ports.
					for n, id := range idx.ids {
						ident := c.idents[id]
						if ident == nil {
							continue
						}
						for _, port := range resolvePort(ident.ports, pt.name, pt.proto, scratch[:0]) {
							add(n, portKey{pt.proto, port, 16})
						}
					}
					out = c.namedTowardsCIDRs(block, nq, k, only, ps.audit, base+gi, out)
				default:
					for _, pp := range RangePrefixes(pt.lo, pt.hi) {
						for n := range idx.ids {
							add(n, portKey{pt.proto, pp.Port, pp.Len})
						}
					}
				}
			}
			gi += len(block)
		}
		base += len(ps.rules)
	}
	if _, ok := only[identity.Host]; (ok || only == nil) && g.defaults.IngressAudit == policytypes.Deny {
		out = append(out, contrib{
			Key:     policytypes.Key{Direction: policytypes.Ingress, Identity: identity.Host, Proto: policytypes.ProtoAny},
			verdict: policytypes.Allow, rule: policytypes.RuleLocalHost, order: base,
		})
	}
	return out
}

// firstPeers lists the identities the peers of one rule pick, each with
// the first peer (index j) that picks it.
type firstPeers struct {
	done  bool
	ids   []identity.ID
	first []int
}

// fill computes the identities of the pairs (j, k) for every peer j.
func (f *firstPeers) fill(block []boundRule, nq, k int, only map[identity.ID]struct{}) {
	f.done = true
	np := len(block) / nq
	if np == 1 {
		f.ids = block[k].peers(only, nil)
		f.first = make([]int, len(f.ids))
		return
	}
	// A patch asks about a handful of identities: a linear search beats
	// allocating a set.
	small := only != nil && len(only) <= 8
	var seen map[identity.ID]struct{}
	if !small {
		seen = map[identity.ID]struct{}{}
	}
	var buf []identity.ID
	for j := range np {
		buf = block[j*nq+k].peers(only, buf[:0])
		for _, id := range buf {
			if small {
				if slices.Contains(f.ids, id) {
					continue
				}
			} else if _, dup := seen[id]; dup {
				continue
			} else {
				seen[id] = struct{}{}
			}
			f.ids = append(f.ids, id)
			f.first = append(f.first, j)
		}
	}
}

// namedTowardsCIDRs adds the contributions of an egress named port k
// towards the CIDR peers of a rule. Only pods have named ports: the entries
// go to the host regions of the pod addresses the CIDR picks, each port
// resolved against its own pod.
func (c *Compiler) namedTowardsCIDRs(block []boundRule, nq, k int, only map[identity.ID]struct{}, audit bool, base int, out []contrib) []contrib {
	for j := range len(block) / nq {
		r := &block[j*nq+k]
		if r.sel == nil || r.sel.kind != selCIDR {
			continue
		}
		for _, pi := range c.namedInCIDR(r.sel, r.port.name, r.port.proto) {
			if _, ok := only[pi.id]; ok || only == nil {
				out = append(out, contrib{
					Key:     policytypes.Key{Direction: policytypes.Egress, Identity: pi.id, Proto: r.port.proto, Port: pi.port, PortPrefixLen: 16},
					verdict: r.verdict, audit: audit, rule: r.id, order: base + j*nq + k,
				})
			}
		}
	}
	return out
}

// peers lists the identities a rule's peer picks, restricted to only (nil =
// all).
func (r *boundRule) peers(only map[identity.ID]struct{}, out []identity.ID) []identity.ID {
	if only == nil {
		if r.peer.any && !r.podsForAny {
			out = append(out, identity.Any)
		}
		out = append(out, r.peer.static...)
		if r.sel != nil {
			out = append(out, r.sel.identities()...)
		}
		return out
	}
	for id := range only {
		in := (id == identity.Any && r.peer.any && !r.podsForAny) || slices.Contains(r.peer.static, id)
		if !in && r.sel != nil {
			_, in = r.sel.ids[id]
		}
		if in {
			out = append(out, id)
		}
	}
	return out
}

type identPort struct {
	id   identity.ID
	port uint16
}

// namedInCIDR resolves a named port against every pod address a CIDR
// selector picks, keyed by the address's host region.
func (c *Compiler) namedInCIDR(s *selector, name string, proto uint8) []identPort {
	var out []identPort
	var scratch []uint16
	for p := range c.pods.all() {
		if !p.active {
			continue
		}
		for ip := range p.ips.all() {
			r := c.regions[netip.PrefixFrom(ip, ip.BitLen())]
			if r == nil {
				continue
			}
			if _, in := s.ids[r.id]; in {
				for _, n := range resolvePort(p.namedPorts(), name, proto, scratch[:0]) {
					out = append(out, identPort{r.id, n})
				}
			}
		}
	}
	return out
}

func compareKeys(a, b policytypes.Key) int { return cmp.Compare(packKey(a), packKey(b)) }

// packKey maps a Key to an integer with the same order as comparing
// (direction, identity, proto, port, prefix length) in turn, so that sorts
// compare one number instead of five fields.
func packKey(k policytypes.Key) uint64 {
	return uint64(k.Direction&1)<<63 | uint64(k.Identity)<<31 | uint64(k.Proto)<<23 | uint64(k.Port)<<7 | uint64(k.PortPrefixLen&0x1f)
}

// mergeContribs turns contributions into LPM entries: one entry per distinct
// key, carrying the merged verdict of every contribution of the same
// direction and identity whose prefix covers it, because in the datapath
// the longest prefix shadows the shorter ones (see package policytypes).
//
// Sorted by key, a prefix comes before every prefix it covers, and the
// prefixes covering a key form a chain; so one sweep with a stack of the
// open prefixes sees each key's covering chain without any lookups.
func mergeContribs(cs []contrib) []policytypes.Entry {
	for i := range cs {
		cs[i].packed = packKey(cs[i].Key)
	}
	slices.SortFunc(cs, func(a, b contrib) int {
		return cmp.Or(cmp.Compare(a.packed, b.packed), cmp.Compare(a.order, b.order))
	})
	var out []policytypes.Entry
	var stack []openKey
	for i := 0; i < len(cs); {
		k := cs[i].Key
		if i == 0 || k.Direction != cs[i-1].Direction || k.Identity != cs[i-1].Identity {
			stack = stack[:0]
		}
		var f keyFacts
		for ; i < len(cs) && cs[i].Key == k; i++ {
			f.add(&cs[i])
		}
		kp := keyPort(k)
		for len(stack) > 0 && !stack[len(stack)-1].pk.covers(kp) {
			stack = stack[:len(stack)-1]
		}
		ok := openKey{pk: kp, facts: f, enf: f.enf, aud: f.aud}
		if len(stack) > 0 {
			top := stack[len(stack)-1]
			ok.enf, ok.aud = max(ok.enf, top.enf), max(ok.aud, top.aud)
		}
		stack = append(stack, ok)
		out = append(out, entryFor(k, stack))
	}
	return out
}

// openKey is a prefix on the sweep's stack with the verdicts merged over
// it and every prefix covering it.
type openKey struct {
	pk       portKey
	facts    keyFacts
	enf, aud policytypes.Verdict
}

// keyFacts aggregates the contributions of one exact key: the strongest
// verdicts, and per verdict the first rule (in policy order) giving it.
type keyFacts struct {
	enf, aud policytypes.Verdict
	// firstEnf[v] is the first enforce-mode rule with verdict v;
	// firstAny[v] the first rule of any mode.
	firstEnf, firstAny [3]uint32
	hasEnf, hasAny     [3]bool
}

func (f *keyFacts) add(c *contrib) {
	f.aud = max(f.aud, c.verdict)
	if !f.hasAny[c.verdict] {
		f.hasAny[c.verdict], f.firstAny[c.verdict] = true, c.rule
	}
	if !c.audit {
		f.enf = max(f.enf, c.verdict)
		if !f.hasEnf[c.verdict] {
			f.hasEnf[c.verdict], f.firstEnf[c.verdict] = true, c.rule
		}
	}
}

// entryFor builds the entry of the key on top of chain (the key and the
// prefixes covering it, outermost first). The deciding rule is the most
// specific contribution with the verdict that counts (enforce, else
// audit), the first in policy order among equals.
func entryFor(k policytypes.Key, chain []openKey) policytypes.Entry {
	top := chain[len(chain)-1]
	e := policytypes.Entry{Key: k, Enforce: top.enf, Audit: top.aud}
	for i := len(chain) - 1; i >= 0; i-- {
		f := &chain[i].facts
		if e.Enforce != policytypes.None && f.hasEnf[e.Enforce] {
			e.RuleID = f.firstEnf[e.Enforce]
			break
		}
		if e.Enforce == policytypes.None && f.hasAny[e.Audit] {
			e.RuleID = f.firstAny[e.Audit]
			break
		}
	}
	return e
}
