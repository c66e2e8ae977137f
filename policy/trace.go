package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// Trace decides a flow of protocol proto to destination port port (for ICMP:
// type<<8|code) from one peer to another, by looking up the compiled entries
// exactly as the datapath does. The error reports an unknown pod or a peer
// pod that is not an endpoint (no IP, host network, finished).
func (c *Compiler) Trace(from, to Peer, proto uint8, port uint16) (TraceResult, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.trace(from, to, proto, port)
}

// resolvedPeer is a trace peer looked up in the compiler's state.
type resolvedPeer struct {
	name string
	pod  *podState
	ip   netip.Addr
	// byName: the pod was named, so its address may be picked to match
	// the other end's family.
	byName bool
}

func (c *Compiler) resolve(p Peer) (resolvedPeer, error) {
	if p.Name != "" {
		pod := c.pods.get(EndpointID{p.Namespace, p.Name})
		if pod == nil {
			return resolvedPeer{}, fmt.Errorf("trace: pod %s/%s not found", p.Namespace, p.Name)
		}
		if !pod.active {
			return resolvedPeer{}, fmt.Errorf("trace: pod %s/%s is not an endpoint (no IP, host network or finished)", p.Namespace, p.Name)
		}
		ip := pod.ips.at(0)
		if p.IP.IsValid() && pod.ips.contains(p.IP) {
			ip = p.IP
		}
		return resolvedPeer{name: p.String(), pod: pod, ip: ip, byName: true}, nil
	}
	if !p.IP.IsValid() {
		return resolvedPeer{}, fmt.Errorf("trace: empty peer")
	}
	ip := p.IP.Unmap()
	var owner *podState
	for pod := range c.pods.all() {
		// Of pods sharing an IP (one terminating), pick one by name so the
		// answer does not depend on map order.
		if pod.active && pod.ips.contains(ip) && (owner == nil || compareEndpointIDs(pod.id, owner.id) < 0) {
			owner = pod
		}
	}
	return resolvedPeer{name: ip.String(), pod: owner, ip: ip}, nil
}

// sameFamily picks q's IP of p's family when q is a dual-stack pod.
func sameFamily(p resolvedPeer, q *resolvedPeer) {
	if q.pod == nil || !q.byName || q.ip.Is4() == p.ip.Is4() {
		return
	}
	for ip := range q.pod.ips.all() {
		if ip.Is4() == p.ip.Is4() {
			q.ip = ip
			return
		}
	}
}

// labelIdentity is the identity the datapath of an endpoint on node sees
// for peer: the pod's identity, host for the endpoint's own node,
// remote-node for other nodes, world for everything else.
func (c *Compiler) labelIdentity(peer resolvedPeer, node string) identity.ID {
	if peer.pod != nil {
		return peer.pod.ident.id
	}
	for name, ips := range c.nodes {
		if slices.Contains(ips, peer.ip) {
			if name == node && node != "" {
				return identity.Host
			}
			return identity.RemoteNode
		}
	}
	return identity.World
}

func (c *Compiler) tracePeer(peer resolvedPeer, node string) TracePeer {
	tp := TracePeer{Peer: peer.name, IP: peer.ip, Identity: c.labelIdentity(peer, node)}
	if peer.pod != nil {
		id := peer.pod.id
		tp.Pod = &id
		tp.Labels = peer.pod.ident.labels()
	} else {
		tp.Labels = identity.ReservedLabels(tp.Identity)
	}
	if pfx, id, ok := c.regionOf(peer.ip); ok {
		tp.CIDR, tp.CIDRIdentity = pfx, id
	}
	return tp
}

func (c *Compiler) trace(from, to Peer, proto uint8, port uint16) (TraceResult, error) {
	src, err := c.resolve(from)
	if err != nil {
		return TraceResult{}, err
	}
	dst, err := c.resolve(to)
	if err != nil {
		return TraceResult{}, err
	}
	sameFamily(src, &dst)
	res := TraceResult{Proto: proto, Port: port}
	// Each side's peer identity is what that side's node sees.
	var srcNode, dstNode string
	if src.pod != nil {
		srcNode = src.pod.node
	}
	if dst.pod != nil {
		dstNode = dst.pod.node
	}
	res.From = c.tracePeer(src, dstNode)
	res.To = c.tracePeer(dst, srcNode)
	res.Egress = DirectionTrace{Allowed: true, AuditAllowed: true}
	res.Ingress = DirectionTrace{Allowed: true, AuditAllowed: true}
	if src.pod != nil {
		res.Egress = c.decide(c.view(c.groupOf(src.pod)), policytypes.Egress, res.To, proto, port)
	}
	if dst.pod != nil {
		res.Ingress = c.decide(c.view(c.groupOf(dst.pod)), policytypes.Ingress, res.From, proto, port)
	}
	res.Allowed = res.Egress.Allowed && res.Ingress.Allowed
	res.AuditAllowed = res.Egress.AuditAllowed && res.Ingress.AuditAllowed
	return res, nil
}

// lookup is the datapath's LPM lookup of one identity in an endpoint's
// entries.
func lookup(entries []policytypes.Entry, dir policytypes.Direction, id identity.ID, proto uint8, port uint16) (policytypes.Entry, bool) {
	i, _ := slices.BinarySearchFunc(entries, policytypes.Key{Direction: dir, Identity: id}, func(e policytypes.Entry, k policytypes.Key) int { return compareKeys(e.Key, k) })
	var best policytypes.Entry
	bestRank := -1
	for ; i < len(entries) && entries[i].Direction == dir && entries[i].Identity == id; i++ {
		kp := keyPort(entries[i].Key)
		if kp.matches(proto, port) && kp.rank() > bestRank {
			best, bestRank = entries[i], kp.rank()
		}
	}
	return best, bestRank >= 0
}

// peerIdentities are the (up to three) identities the datapath looks up.
func peerIdentities(peer TracePeer) []identity.ID {
	ids := []identity.ID{peer.Identity}
	if peer.CIDRIdentity != identity.Any {
		ids = append(ids, peer.CIDRIdentity)
	}
	return append(ids, identity.Any)
}

// decide simulates the datapath for one direction of one endpoint: deny
// wins among the hits, then allow, then the default.
func (c *Compiler) decide(g *group, dir policytypes.Direction, peer TracePeer, proto uint8, port uint16) DirectionTrace {
	dt := DirectionTrace{Applicable: true}
	enfDefault, audDefault := g.defaults.IngressEnforce, g.defaults.IngressAudit
	if dir == policytypes.Egress {
		enfDefault, audDefault = g.defaults.EgressEnforce, g.defaults.EgressAudit
	}
	dt.Selected, dt.AuditSelected = enfDefault == policytypes.Deny, audDefault == policytypes.Deny
	var enf, aud policytypes.Verdict
	ids := peerIdentities(peer)
	for _, id := range ids {
		if e, ok := lookup(g.entries(), dir, id, proto, port); ok {
			enf, aud = max(enf, e.Enforce), max(aud, e.Audit)
		}
	}
	if enf == policytypes.None {
		enf = enfDefault
	}
	if aud == policytypes.None {
		aud = audDefault
	}
	dt.Allowed, dt.AuditAllowed = enf == policytypes.Allow, aud == policytypes.Allow

	// Explanations: every rule that covers the flow for one of the looked-up
	// identities.
	seen := map[uint32]bool{}
	only := map[identity.ID]struct{}{}
	for _, id := range ids {
		only[id] = struct{}{}
	}
	for _, ct := range c.contribs(g, only, nil) {
		if ct.Direction != dir || seen[ct.rule] || !slices.Contains(ids, ct.Identity) || !keyPort(ct.Key).matches(proto, port) {
			continue
		}
		seen[ct.rule] = true
		if ct.rule == policytypes.RuleLocalHost {
			dt.Reasons = append(dt.Reasons, Reason{Verdict: policytypes.Allow, Message: "allowed: a pod's own node may always reach it (kubelet probes); only a deny rule stops it"})
			continue
		}
		r := c.rules[ct.rule]
		if r == nil {
			continue
		}
		dt.Reasons = append(dt.Reasons, Reason{Rule: r, Verdict: ct.verdict, Message: ruleMessage(r)})
	}
	slices.SortFunc(dt.Reasons, func(a, b Reason) int {
		if a.Verdict != b.Verdict {
			return int(b.Verdict) - int(a.Verdict)
		}
		return int(ruleIDOf(a)) - int(ruleIDOf(b))
	})
	if len(dt.Reasons) == 0 || (enf != policytypes.Deny && !hasEnforcing(dt.Reasons)) {
		dt.Reasons = append(dt.Reasons, defaultReason(dir, g.selectedBy[dir], enfDefault, audDefault))
	}
	return dt
}

func ruleIDOf(r Reason) uint32 {
	if r.Rule == nil {
		return policytypes.RuleLocalHost
	}
	return r.Rule.ID
}

func hasEnforcing(rs []Reason) bool {
	for _, r := range rs {
		if r.Rule == nil || !r.Rule.Audit {
			return true
		}
	}
	return false
}

func ruleMessage(r *Rule) string {
	verb := "allowed"
	if r.Verdict == policytypes.Deny {
		verb = "denied"
	}
	if r.Audit {
		verb = "would be " + verb + " (audit)"
	}
	peer := "from "
	if r.Direction == policytypes.Egress {
		peer = "to "
	}
	return fmt.Sprintf("%s by %s %s: %s%s, %s", verb, r.Policy, r.Section, peer, r.Peer, r.Port)
}

func defaultReason(dir policytypes.Direction, selectedBy []PolicyRef, enf, aud policytypes.Verdict) Reason {
	if len(selectedBy) == 0 {
		return Reason{Verdict: policytypes.Allow, Message: fmt.Sprintf("no policy selects the pod for %s: allowed by default", dir)}
	}
	names := make([]string, len(selectedBy))
	for i, r := range selectedBy {
		names[i] = r.String()
	}
	if enf == policytypes.Allow && aud == policytypes.Deny {
		return Reason{Verdict: policytypes.Allow, Message: fmt.Sprintf("no rule matched; only audit-mode policies select the pod for %s (%s): would be denied by default, allowed", dir, strings.Join(names, ", "))}
	}
	return Reason{Verdict: policytypes.Deny, Message: fmt.Sprintf("no rule matched: denied by default, the pod is selected for %s by %s", dir, strings.Join(names, ", "))}
}

// Matrix traces every ordered pair of distinct endpoints on every port.
func (c *Compiler) Matrix(ports []PortProto) Matrix {
	c.mu.RLock()
	defer c.mu.RUnlock()
	m := Matrix{Ports: slices.Clone(ports)}
	for p := range c.pods.all() {
		if p.active {
			m.Pods = append(m.Pods, p.id)
		}
	}
	slices.SortFunc(m.Pods, compareEndpointIDs)
	for _, pp := range ports {
		for _, f := range m.Pods {
			for _, t := range m.Pods {
				if f == t {
					continue
				}
				tr, err := c.trace(PodPeer(f.Namespace, f.Name), PodPeer(t.Namespace, t.Name), pp.Proto, pp.Port)
				if err != nil {
					continue
				}
				m.Cells = append(m.Cells, MatrixCell{From: f, To: t, Port: pp, Allowed: tr.Allowed, Egress: tr.Egress.Allowed, Ingress: tr.Ingress.Allowed})
			}
		}
	}
	return m
}
