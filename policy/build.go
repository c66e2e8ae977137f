package policy

import (
	"cmp"
	"slices"

	"github.com/veilmesh/veil/policy/identity"
)

// contrib is one fact a rule contributes to a group: for this direction and
// peer identity, on this protocol/port prefix, this verdict.
type contrib struct {
	Key
	verdict Verdict
	audit   bool
	rule    uint32
	// order is the position in policy order (policies sorted by kind,
	// namespace, name; rules as written): it breaks ties between rules
	// canonically, whatever order the rule IDs were handed out in.
	order int
}

// portKey is the protocol/port part of a Key.
type portKey struct {
	proto uint8
	port  uint16
	plen  uint8
}

// covers reports whether prefix a includes prefix k.
func (a portKey) covers(k portKey) bool {
	if a.proto == ProtoAny {
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
	if a.proto == ProtoAny {
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

func keyPort(k Key) portKey { return portKey{k.Proto, k.Port, k.PortPrefixLen} }

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

// compileGroup rebuilds a group's entries, defaults and explanations from
// the policies selecting its identity.
func (c *Compiled) compileGroup(g *group) {
	for _, s := range g.sels {
		delete(s.users, g)
	}
	g.sels = g.sels[:0]
	g.contribs = g.contribs[:0]
	g.selectedBy = [2][]PolicyRef{}
	g.egressNamed, g.cidrNamed = false, false
	g.defaults = Defaults{IngressEnforce: Allow, IngressAudit: Allow, EgressEnforce: Allow, EgressAudit: Allow}
	g.computed = true

	var pols []*policyState
	for ps := range c.policiesByNS[g.ident.namespace] {
		if ps.selects(g.ident) {
			pols = append(pols, ps)
		}
	}
	for ps := range c.clusterPolicies {
		if ps.selects(g.ident) {
			pols = append(pols, ps)
		}
	}
	slices.SortFunc(pols, func(a, b *policyState) int { return compareRefs(a.ref, b.ref) })

	var scratch []uint16
	for _, ps := range pols {
		for dir := Ingress; dir <= Egress; dir++ {
			if !ps.defaultDeny[dir] {
				continue
			}
			g.selectedBy[dir] = append(g.selectedBy[dir], ps.ref)
			enf, aud := &g.defaults.IngressEnforce, &g.defaults.IngressAudit
			if dir == Egress {
				enf, aud = &g.defaults.EgressEnforce, &g.defaults.EgressAudit
			}
			*aud = Deny
			if !ps.audit {
				*enf = Deny
			}
		}
		for i := range ps.rules {
			r := &ps.rules[i]
			if r.sel != nil {
				if _, used := r.sel.users[g]; !used {
					r.sel.users[g] = struct{}{}
					g.sels = append(g.sels, r.sel)
				}
			}
			add := func(id identity.ID, pk portKey) {
				g.contribs = append(g.contribs, contrib{
					Key:     Key{Direction: r.dir, Identity: id, Proto: pk.proto, Port: pk.port, PortPrefixLen: pk.plen},
					verdict: r.verdict, audit: ps.audit, rule: r.id, order: len(g.contribs),
				})
			}
			var peers []identity.ID
			if r.peer.any && !r.podsForAny {
				peers = append(peers, identity.Any)
			}
			peers = append(peers, r.peer.static...)
			if r.sel != nil {
				peers = append(peers, r.sel.identities()...)
			}
			pt := r.port
			switch {
			case pt.any:
				for _, id := range peers {
					add(id, portKey{})
				}
			case pt.icmp:
				for _, id := range peers {
					add(id, portKey{ProtoICMP, pt.lo, pt.icmpLen})
				}
			case pt.name != "" && r.dir == Ingress:
				// The destination of ingress is the endpoint itself.
				scratch = resolvePort(g.ports, pt.name, pt.proto, scratch[:0])
				for _, id := range peers {
					for _, n := range scratch {
						add(id, portKey{pt.proto, n, 16})
					}
				}
			case pt.name != "" && r.sel != nil && r.sel.kind == selCIDR:
				// Only pods have named ports, so the entries go to the
				// identities of the pods inside the CIDR, each resolved
				// against its own pod rather than a whole region's pods.
				g.cidrNamed = true
				for _, pi := range c.namedInCIDR(r.sel, pt.name, pt.proto) {
					add(pi.id, portKey{pt.proto, pi.port, 16})
				}
			case pt.name != "":
				// The destination of egress is the peer: a pod identity
				// resolves against its pods; other peers have no named
				// ports.
				g.egressNamed = true
				for _, id := range peers {
					ident := c.idents[id]
					if ident == nil {
						continue
					}
					for _, n := range resolvePort(ident.ports, pt.name, pt.proto, scratch[:0]) {
						add(id, portKey{pt.proto, n, 16})
					}
				}
			default:
				for _, pp := range RangePrefixes(pt.lo, pt.hi) {
					for _, id := range peers {
						add(id, portKey{pt.proto, pp.Port, pp.Len})
					}
				}
			}
		}
	}
	g.entries = mergeContribs(g.contribs)
}

type identPort struct {
	id   identity.ID
	port uint16
}

// namedInCIDR resolves a named port against every pod whose IP a CIDR
// selector picks.
func (c *Compiled) namedInCIDR(s *selector, name string, proto uint8) []identPort {
	var out []identPort
	var scratch []uint16
	for _, p := range c.pods {
		if !p.active {
			continue
		}
		for _, ip := range p.ips {
			if _, rid, ok := c.regionOf(ip); ok {
				if _, in := s.ids[rid]; in {
					for _, n := range resolvePort(p.ports, name, proto, scratch[:0]) {
						out = append(out, identPort{p.ident.id, n})
					}
					break
				}
			}
		}
	}
	return out
}

func compareKeys(a, b Key) int {
	return cmp.Or(cmp.Compare(a.Direction, b.Direction), cmp.Compare(a.Identity, b.Identity),
		cmp.Compare(a.Proto, b.Proto), cmp.Compare(a.Port, b.Port), cmp.Compare(a.PortPrefixLen, b.PortPrefixLen))
}

// mergeContribs turns contributions into LPM entries: one entry per distinct
// key, carrying the merged verdict of every contribution of the same
// direction and identity whose prefix covers it, because in the datapath
// the longest prefix shadows the shorter ones (see entry.go).
func mergeContribs(cs []contrib) []Entry {
	slices.SortFunc(cs, func(a, b contrib) int {
		return cmp.Or(compareKeys(a.Key, b.Key), cmp.Compare(a.order, b.order))
	})
	var out []Entry
	for start := 0; start < len(cs); {
		end := start
		for end < len(cs) && cs[end].Direction == cs[start].Direction && cs[end].Identity == cs[start].Identity {
			end++
		}
		block := cs[start:end]
		for i := range block {
			if i > 0 && block[i].Key == block[i-1].Key {
				continue
			}
			out = append(out, mergeOne(block, block[i].Key))
		}
		start = end
	}
	return out
}

func mergeOne(block []contrib, k Key) Entry {
	kp := keyPort(k)
	e := Entry{Key: k}
	for _, c := range block {
		if !keyPort(c.Key).covers(kp) {
			continue
		}
		e.Audit = max(e.Audit, c.verdict)
		if !c.audit {
			e.Enforce = max(e.Enforce, c.verdict)
		}
	}
	// The deciding rule: the most specific contribution with the verdict
	// that counts (enforce, else audit), the first in policy order among
	// equals (block is sorted by key, then order).
	bestRank := -1
	for _, c := range block {
		cp := keyPort(c.Key)
		if !cp.covers(kp) {
			continue
		}
		ok := (e.Enforce != None && !c.audit && c.verdict == e.Enforce) || (e.Enforce == None && c.verdict == e.Audit)
		if ok && cp.rank() > bestRank {
			bestRank, e.RuleID = cp.rank(), c.rule
		}
	}
	return e
}
