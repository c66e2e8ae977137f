package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/policy/policytypes"
)

// gen builds random but valid clusters and policies, IPv4 and IPv6. Pods
// of one app share their named ports, so pods that share an identity share
// ports: the documented limit of identity-keyed entries (one port name with
// different numbers on pods of one identity) is not what these tests
// probe.
type gen struct{ r *rand.Rand }

var (
	genApps   = []string{"web", "db", "api", "cache"}
	genNS     = []string{"n0", "n1", "n2"}
	genCIDRs  = []string{"10.0.0.0/8", "10.1.0.0/16", "10.0.1.0/24", "10.2.0.0/16", "0.0.0.0/0", "8.8.8.0/24", "192.168.0.0/24", "fd00::/16", "::/0"}
	genExcept = map[string][]string{
		"10.0.0.0/8":     {"10.1.0.0/16", "10.0.2.0/24", "10.2.1.0/24"},
		"10.1.0.0/16":    {"10.1.1.0/24", "10.1.3.0/24"},
		"0.0.0.0/0":      {"10.0.0.0/8", "192.168.0.0/24", "8.8.8.0/24"},
		"8.8.8.0/24":     {"8.8.8.8/32"},
		"192.168.0.0/24": {"192.168.0.2/32"},
		"fd00::/16":      {"fd00:1::/32", "fd00:2:1::/48"},
		"::/0":           {"fd00::/16", "fd00:1::/32"},
	}
	genExtraIPs = []string{"192.168.0.1", "192.168.0.2", "8.8.8.8", "8.8.4.4", "10.9.9.9", "2001:db8::1", "fd00:9::9"}
	genPorts    = []PortProto{{policytypes.ProtoTCP, 80}, {policytypes.ProtoTCP, 81}, {policytypes.ProtoUDP, 53}, {policytypes.ProtoTCP, 53}, {policytypes.ProtoUDP, 8080}, {policytypes.ProtoSCTP, 81}, {policytypes.ProtoICMP, 8 << 8}, {policytypes.ProtoICMP, 3<<8 | 1}, {policytypes.ProtoICMPv6, 128 << 8}}
)

func (g gen) pick(s []string) string { return s[g.r.IntN(len(s))] }
func (g gen) chance(p float64) bool  { return g.r.Float64() < p }

func appPorts(app string) []corev1.ContainerPort {
	switch app {
	case "web":
		return []corev1.ContainerPort{containerPort("http", 80, corev1.ProtocolTCP), containerPort("dns", 53, corev1.ProtocolUDP)}
	case "db":
		return []corev1.ContainerPort{containerPort("http", 81, corev1.ProtocolTCP), containerPort("dns", 53, corev1.ProtocolTCP)}
	case "api":
		return []corev1.ContainerPort{containerPort("http", 8080, corev1.ProtocolUDP), containerPort("sctp", 81, corev1.ProtocolSCTP)}
	}
	return nil
}

func (g gen) namespace(name string) *corev1.Namespace {
	kv := []string{}
	if g.chance(0.7) {
		kv = append(kv, "team", g.pick([]string{"a", "b"}))
	}
	if g.chance(0.5) {
		kv = append(kv, "env", g.pick([]string{"prod", "dev"}))
	}
	return testNamespace(name, kv...)
}

func (g gen) pod(name string, seq int) *corev1.Pod {
	ns := g.r.IntN(len(genNS))
	app := g.r.IntN(len(genApps))
	lbl := map[string]string{"app": genApps[app]}
	if g.chance(0.3) {
		lbl["tier"] = g.pick([]string{"front", "back"})
	}
	ip := fmt.Sprintf("10.%d.%d.%d", ns, app, seq+1)
	if g.chance(0.2) {
		ip = fmt.Sprintf("fd00:%d:%d::%d", ns, app, seq+1)
	}
	if g.chance(0.1) {
		ip = ""
	}
	p := testPod(genNS[ns], name, ip, lbl, appPorts(genApps[app])...)
	p.Spec.NodeName = g.pick([]string{"node-1", "node-2"})
	if g.chance(0.2) {
		p.Spec.ServiceAccountName = "sa1"
	}
	return p
}

func (g gen) selector() *metav1.LabelSelector {
	switch g.r.IntN(6) {
	case 0:
		return &metav1.LabelSelector{}
	case 1:
		return matchExpr("app", metav1.LabelSelectorOpIn, g.pick(genApps), g.pick(genApps))
	case 2:
		return matchExpr("app", metav1.LabelSelectorOpNotIn, g.pick(genApps))
	case 3:
		return matchExpr("tier", g.pickOp([]metav1.LabelSelectorOperator{metav1.LabelSelectorOpExists, metav1.LabelSelectorOpDoesNotExist}))
	}
	return matchLabels("app", g.pick(genApps))
}

func (g gen) pickOp(ops []metav1.LabelSelectorOperator) metav1.LabelSelectorOperator {
	return ops[g.r.IntN(len(ops))]
}

func (g gen) nsSelector() *metav1.LabelSelector {
	switch g.r.IntN(4) {
	case 0:
		return &metav1.LabelSelector{}
	case 1:
		return matchLabels("team", g.pick([]string{"a", "b"}))
	case 2:
		return matchExpr("env", metav1.LabelSelectorOpNotIn, "prod")
	}
	return matchLabels("kubernetes.io/metadata.name", g.pick(genNS))
}

func (g gen) cidr() (string, []string) {
	c := g.pick(genCIDRs)
	var except []string
	for _, e := range genExcept[c] {
		if g.chance(0.4) {
			except = append(except, e)
		}
	}
	return c, except
}

func (g gen) npPeers() []networkingv1.NetworkPolicyPeer {
	var peers []networkingv1.NetworkPolicyPeer
	for range g.r.IntN(3) {
		switch g.r.IntN(4) {
		case 0:
			peers = append(peers, networkingv1.NetworkPolicyPeer{PodSelector: g.selector()})
		case 1:
			peers = append(peers, networkingv1.NetworkPolicyPeer{NamespaceSelector: g.nsSelector()})
		case 2:
			peers = append(peers, networkingv1.NetworkPolicyPeer{PodSelector: g.selector(), NamespaceSelector: g.nsSelector()})
		default:
			c, e := g.cidr()
			peers = append(peers, ipBlock(c, e...))
		}
	}
	return peers
}

func (g gen) l4Port() (v1alpha1.Protocol, *intstr.IntOrString, *int32) {
	proto := v1alpha1.Protocol(g.pick([]string{"TCP", "TCP", "UDP", "SCTP"}))
	switch g.r.IntN(5) {
	case 0:
		return proto, nil, nil
	case 1:
		p := intstr.FromString(g.pick([]string{"http", "dns", "sctp", "nope"}))
		return proto, &p, nil
	case 2:
		p := intstr.FromInt32(int32(g.pick2([]int{52, 79, 80})))
		end := p.IntVal + int32(g.r.IntN(3000))
		return proto, &p, &end
	}
	p := intstr.FromInt32(int32(g.pick2([]int{53, 80, 81, 8080})))
	return proto, &p, nil
}

func (g gen) pick2(s []int) int { return s[g.r.IntN(len(s))] }

func (g gen) npPorts() []networkingv1.NetworkPolicyPort {
	var ports []networkingv1.NetworkPolicyPort
	for range g.r.IntN(3) {
		proto, port, end := g.l4Port()
		cp := corev1.Protocol(proto)
		ports = append(ports, networkingv1.NetworkPolicyPort{Protocol: &cp, Port: port, EndPort: end})
	}
	return ports
}

func (g gen) networkPolicy(name string) *networkingv1.NetworkPolicy {
	return np(g.pick(genNS), name, g.selector(), func(s *networkingv1.NetworkPolicySpec) {
		if g.chance(0.8) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{}
			for range g.r.IntN(3) {
				s.Ingress = append(s.Ingress, networkingv1.NetworkPolicyIngressRule{From: g.npPeers(), Ports: g.npPorts()})
			}
		}
		if g.chance(0.5) {
			for range g.r.IntN(3) {
				s.Egress = append(s.Egress, networkingv1.NetworkPolicyEgressRule{To: g.npPeers(), Ports: g.npPorts()})
			}
		}
		switch g.r.IntN(4) {
		case 0:
			s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
		case 1:
			s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
		case 2:
			s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
		}
	})
}

func (g gen) meshPeers(cluster bool) []v1alpha1.Peer {
	var peers []v1alpha1.Peer
	for range g.r.IntN(3) {
		switch g.r.IntN(5) {
		case 0:
			peers = append(peers, podPeer(nil, g.selector()))
		case 1:
			peers = append(peers, podPeer(g.nsSelector(), nil))
		case 2:
			peers = append(peers, podPeer(g.nsSelector(), g.selector()))
		case 3:
			c, e := g.cidr()
			peers = append(peers, cidrPeer(c, e...))
		default:
			peers = append(peers, entity(v1alpha1.Entity(g.pick([]string{"world", "host", "remote-node", "cluster", "all"}))))
		}
	}
	return peers
}

func (g gen) meshPorts() []v1alpha1.PortRule {
	var ports []v1alpha1.PortRule
	for range g.r.IntN(3) {
		if g.chance(0.2) {
			pr := v1alpha1.PortRule{Protocol: v1alpha1.ProtocolICMP}
			if g.chance(0.7) {
				pr.ICMPType = ptr(int32(g.pick2([]int{3, 8})))
				if g.chance(0.5) {
					pr.ICMPCode = ptr(int32(g.pick2([]int{0, 1})))
				}
			}
			ports = append(ports, pr)
			continue
		}
		proto, port, end := g.l4Port()
		ports = append(ports, v1alpha1.PortRule{Protocol: proto, Port: port, EndPort: end})
	}
	return ports
}

func (g gen) rules(cluster bool) v1alpha1.PolicyRules {
	var r v1alpha1.PolicyRules
	if g.chance(0.3) {
		r.Mode = v1alpha1.ModeAudit
	}
	if g.chance(0.6) {
		r.Ingress = []v1alpha1.IngressRule{}
		for range g.r.IntN(3) {
			r.Ingress = append(r.Ingress, v1alpha1.IngressRule{From: g.meshPeers(cluster), Ports: g.meshPorts()})
		}
	}
	for range g.r.IntN(2) {
		r.IngressDeny = append(r.IngressDeny, v1alpha1.IngressRule{From: g.meshPeers(cluster), Ports: g.meshPorts()})
	}
	if g.chance(0.4) {
		r.Egress = []v1alpha1.EgressRule{}
		for range g.r.IntN(3) {
			r.Egress = append(r.Egress, v1alpha1.EgressRule{To: g.meshPeers(cluster), Ports: g.meshPorts()})
		}
	}
	for range g.r.IntN(2) {
		r.EgressDeny = append(r.EgressDeny, v1alpha1.EgressRule{To: g.meshPeers(cluster), Ports: g.meshPorts()})
	}
	if g.chance(0.2) {
		r.DefaultDeny = &v1alpha1.DefaultDeny{Ingress: ptr(g.chance(0.5)), Egress: ptr(g.chance(0.5))}
	}
	return r
}

func (g gen) input() Input {
	var in Input
	for _, ns := range genNS {
		if g.chance(0.9) {
			in.Namespaces = append(in.Namespaces, g.namespace(ns))
		}
	}
	in.Nodes = []*corev1.Node{
		{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.0.1"}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "node-2"}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.0.2"}}}},
	}
	for i := range 3 + g.r.IntN(8) {
		in.Pods = append(in.Pods, g.pod(fmt.Sprintf("p%d", i), i))
	}
	for i := range g.r.IntN(5) {
		in.NetworkPolicies = append(in.NetworkPolicies, g.networkPolicy(fmt.Sprintf("np%d", i)))
	}
	for i := range g.r.IntN(3) {
		in.MeshPolicies = append(in.MeshPolicies, mp(g.pick(genNS), fmt.Sprintf("mp%d", i), g.selector(), g.rules(false)))
	}
	for i := range g.r.IntN(2) {
		var nsSel *metav1.LabelSelector
		if g.chance(0.5) {
			nsSel = g.nsSelector()
		}
		in.ClusterMeshPolicies = append(in.ClusterMeshPolicies, cmpol(fmt.Sprintf("cmp%d", i), nsSel, g.selector(), g.rules(true)))
	}
	return in
}

// TestTraceMatchesReference cross-checks Trace (the simulated datapath over
// compiled entries) against the naive reference evaluator on random
// clusters, for every pair of peers and every port.
func TestTraceMatchesReference(t *testing.T) {
	seeds := 300
	if testing.Short() {
		seeds = 50
	}
	for seed := range seeds {
		g := gen{rand.New(rand.NewPCG(uint64(seed), 7))}
		in := g.input()
		c := mustCompile(t, in)
		ref := newRefEval(in)
		var peers []refPeer
		for _, p := range in.Pods {
			if p.Status.PodIP != "" {
				peers = append(peers, refPeer{pod: p, ip: netip.MustParseAddr(p.Status.PodIP)})
			}
		}
		for _, ip := range genExtraIPs {
			peers = append(peers, refPeer{ip: netip.MustParseAddr(ip)})
		}
		peerOf := func(p refPeer) Peer {
			if p.pod != nil {
				return PodPeer(p.pod.Namespace, p.pod.Name)
			}
			return IPPeer(p.ip)
		}
		fails := 0
		for _, src := range peers {
			for _, dst := range peers {
				if src.pod == nil && dst.pod == nil || src.ip == dst.ip {
					continue
				}
				for _, pp := range genPorts {
					tr, err := c.Trace(peerOf(src), peerOf(dst), pp.Proto, pp.Port)
					if err != nil {
						t.Fatalf("seed %d: %v", seed, err)
					}
					allowed, audit, egress, ingress := ref.decide(src, dst, pp.Proto, pp.Port)
					if tr.Allowed != allowed || tr.AuditAllowed != audit || tr.Egress.Allowed != egress || tr.Ingress.Allowed != ingress {
						fails++
						if fails <= 5 {
							t.Errorf("seed %d: %s -> %s %s: trace allowed=%v audit=%v egress=%v ingress=%v; reference %v %v %v %v\negress reasons: %+v\ningress reasons: %+v",
								seed, peerOf(src), peerOf(dst), pp, tr.Allowed, tr.AuditAllowed, tr.Egress.Allowed, tr.Ingress.Allowed,
								allowed, audit, egress, ingress, reasonsText(tr.Egress.Reasons), reasonsText(tr.Ingress.Reasons))
						}
					}
				}
			}
		}
		if fails > 0 {
			t.Fatalf("seed %d: %d mismatches", seed, fails)
		}
	}
}

func reasonsText(rs []Reason) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.Message)
	}
	return out
}

// canonical renders a compiled state without its arbitrary numbers
// (identities by label set, CIDR identities by prefix, rules by policy and
// section), so that states reached by different paths can be compared.
func canonical(c *Compiler) []string {
	idName := map[uint32]string{}
	for _, id := range c.Identities() {
		idName[uint32(id.ID)] = id.Labels.Key()
	}
	for _, ce := range c.CIDRTable() {
		idName[uint32(ce.ID)] = "cidr:" + ce.Prefix.String()
	}
	name := func(id uint32) string {
		if n, ok := idName[id]; ok {
			return n
		}
		return fmt.Sprint(id)
	}
	rules := map[uint32]string{}
	for _, r := range c.Rules() {
		rules[r.ID] = r.Policy.String() + " " + r.Section
	}
	var out []string
	for _, ep := range c.Endpoints() {
		out = append(out, fmt.Sprintf("ep %s %v id=%s %+v", ep.EndpointID, ep.IPs, name(uint32(ep.Identity)), ep.Defaults))
		for _, e := range ep.Entries {
			out = append(out, fmt.Sprintf("  %s %s %s %d/%d enf=%d aud=%d rule=%s", e.Direction, name(uint32(e.Identity)), ProtoName(e.Proto), e.Port, e.PortPrefixLen, e.Enforce, e.Audit, rules[e.RuleID]))
		}
		slices.Sort(out[len(out)-len(ep.Entries):])
	}
	for _, ce := range c.CIDRTable() {
		out = append(out, "cidr "+ce.Prefix.String())
	}
	var ipcache []string
	for _, ic := range c.IPCache() {
		ipcache = append(ipcache, fmt.Sprintf("ipcache %s %s", ic.IP, name(uint32(ic.Identity))))
	}
	// Entries for a shared IP are ordered by identity number, which
	// differs between histories.
	slices.Sort(ipcache)
	out = append(out, ipcache...)
	for _, e := range c.Invalid() {
		out = append(out, "invalid "+e.Error())
	}
	return out
}

// TestIncrementalMatchesScratch applies random mutations one by one and
// checks after each that the state equals a from-scratch compilation of the
// same objects, and that every endpoint whose datapath view changed was
// reported in Changes.
func TestIncrementalMatchesScratch(t *testing.T) {
	seeds := 100
	if testing.Short() {
		seeds = 20
	}
	for seed := range seeds {
		g := gen{rand.New(rand.NewPCG(uint64(seed), 11))}
		world := g.input()
		c := mustCompile(t, world)
		for step := range 30 {
			before := map[EndpointID]Endpoint{}
			for _, ep := range c.Endpoints() {
				before[ep.EndpointID] = ep
			}
			what, ch := mutate(g, &world, c)
			after := map[EndpointID]Endpoint{}
			for _, ep := range c.Endpoints() {
				after[ep.EndpointID] = ep
			}
			reported := map[EndpointID]bool{}
			for _, id := range ch.Endpoints {
				reported[id] = true
			}
			for _, id := range ch.Removed {
				reported[id] = true
			}
			for id, a := range after {
				b, ok := before[id]
				if a.NotCompiled || b.NotCompiled {
					// Another node's endpoint on a node-local compiler
					// (-policy.node): its entries are not kept.
					continue
				}
				if !ok || !sameEndpoint(a, b) {
					if !reported[id] {
						t.Fatalf("seed %d step %d (%s): endpoint %s changed but was not reported", seed, step, what, id)
					}
				}
			}
			for id := range before {
				if _, ok := after[id]; !ok && !reported[id] {
					t.Fatalf("seed %d step %d (%s): endpoint %s removed but not reported", seed, step, what, id)
				}
			}
			scratch, err := Compile(world, Options{Node: *testNode})
			if err != nil {
				t.Fatal(err)
			}
			got, want := canonical(c), canonical(scratch)
			if !slices.Equal(got, want) {
				t.Fatalf("seed %d step %d (%s): incremental state differs from scratch:\n%s", seed, step, what, diffLines(got, want))
			}
		}
	}
}

func sameEndpoint(a, b Endpoint) bool {
	return a.Identity == b.Identity && a.Defaults == b.Defaults && slices.Equal(a.IPs, b.IPs) && slices.Equal(a.Entries, b.Entries) && a.Node == b.Node
}

func diffLines(got, want []string) string {
	var out []string
	gs, ws := map[string]bool{}, map[string]bool{}
	for _, l := range got {
		gs[l] = true
	}
	for _, l := range want {
		ws[l] = true
	}
	for _, l := range got {
		if !ws[l] {
			out = append(out, "+ "+l)
		}
	}
	for _, l := range want {
		if !gs[l] {
			out = append(out, "- "+l)
		}
	}
	if len(out) == 0 {
		for i := range min(len(got), len(want)) {
			if got[i] != want[i] {
				out = append(out, fmt.Sprintf("line %d: got %q; want %q", i, got[i], want[i]))
				break
			}
		}
		out = append(out, fmt.Sprintf("%d lines; want %d", len(got), len(want)))
	}
	if len(out) > 40 {
		out = out[:40]
	}
	return fmt.Sprint(out)
}

// mutate applies one random change to world and to c.
func mutate(g gen, world *Input, c *Compiler) (string, Changes) {
	what, ch := mutateOnce(g, world, c)
	// Two pods with one IP is a transient state whose ipcache owner is
	// arbitrary; keep the generated worlds free of it.
	seen := map[string]bool{}
	for i := 0; i < len(world.Pods); i++ {
		p := world.Pods[i]
		if ip := p.Status.PodIP; ip != "" && seen[ip] {
			world.Pods = slices.Delete(world.Pods, i, i+1)
			i--
			more := c.DeletePod(p.Namespace, p.Name)
			ch.Endpoints = append(ch.Endpoints, more.Endpoints...)
			ch.Removed = append(ch.Removed, more.Removed...)
			what += ", delete duplicate " + p.Name
			continue
		}
		seen[p.Status.PodIP] = true
	}
	return what, ch
}

func mutateOnce(g gen, world *Input, c *Compiler) (string, Changes) {
	switch g.r.IntN(9) {
	case 0, 1: // relabel or move a pod
		if len(world.Pods) == 0 {
			break
		}
		i := g.r.IntN(len(world.Pods))
		seq := 20 + g.r.IntN(200)
		p := g.pod(world.Pods[i].Name, seq)
		for p.Namespace != world.Pods[i].Namespace {
			p = g.pod(world.Pods[i].Name, seq)
		}
		world.Pods[i] = p
		return "upsert pod " + p.Name, c.UpsertPod(p)
	case 2: // add a pod
		p := g.pod(fmt.Sprintf("q%d", g.r.IntN(100)), 20+g.r.IntN(200))
		for i, o := range world.Pods {
			if o.Namespace == p.Namespace && o.Name == p.Name {
				world.Pods = slices.Delete(world.Pods, i, i+1)
				break
			}
		}
		world.Pods = append(world.Pods, p)
		return "add pod " + p.Name, c.UpsertPod(p)
	case 3: // delete a pod
		if len(world.Pods) == 0 {
			break
		}
		i := g.r.IntN(len(world.Pods))
		p := world.Pods[i]
		world.Pods = slices.Delete(world.Pods, i, i+1)
		return "delete pod " + p.Name, c.DeletePod(p.Namespace, p.Name)
	case 4: // relabel a namespace, or delete it
		name := g.pick(genNS)
		for i, ns := range world.Namespaces {
			if ns.Name == name {
				world.Namespaces = slices.Delete(world.Namespaces, i, i+1)
				break
			}
		}
		if g.chance(0.2) {
			return "delete namespace " + name, c.DeleteNamespace(name)
		}
		ns := g.namespace(name)
		world.Namespaces = append(world.Namespaces, ns)
		return "upsert namespace " + name, c.UpsertNamespace(ns)
	case 5: // upsert a NetworkPolicy
		p := g.networkPolicy(fmt.Sprintf("np%d", g.r.IntN(6)))
		world.NetworkPolicies = slices.DeleteFunc(world.NetworkPolicies, func(o *networkingv1.NetworkPolicy) bool {
			return o.Namespace == p.Namespace && o.Name == p.Name
		})
		world.NetworkPolicies = append(world.NetworkPolicies, p)
		return "upsert networkpolicy " + p.Name, c.UpsertNetworkPolicy(p)
	case 6: // delete a NetworkPolicy
		if len(world.NetworkPolicies) == 0 {
			break
		}
		i := g.r.IntN(len(world.NetworkPolicies))
		p := world.NetworkPolicies[i]
		world.NetworkPolicies = slices.Delete(world.NetworkPolicies, i, i+1)
		return "delete networkpolicy " + p.Name, c.DeleteNetworkPolicy(p.Namespace, p.Name)
	case 7: // upsert or delete a MeshPolicy
		name := fmt.Sprintf("mp%d", g.r.IntN(3))
		ns := g.pick(genNS)
		world.MeshPolicies = slices.DeleteFunc(world.MeshPolicies, func(o *v1alpha1.MeshPolicy) bool { return o.Namespace == ns && o.Name == name })
		if g.chance(0.3) {
			return "delete meshpolicy " + name, c.DeleteMeshPolicy(ns, name)
		}
		p := mp(ns, name, g.selector(), g.rules(false))
		world.MeshPolicies = append(world.MeshPolicies, p)
		return "upsert meshpolicy " + name, c.UpsertMeshPolicy(p)
	case 8: // upsert or delete a ClusterMeshPolicy
		name := fmt.Sprintf("cmp%d", g.r.IntN(2))
		world.ClusterMeshPolicies = slices.DeleteFunc(world.ClusterMeshPolicies, func(o *v1alpha1.ClusterMeshPolicy) bool { return o.Name == name })
		if g.chance(0.3) {
			return "delete clustermeshpolicy " + name, c.DeleteClusterMeshPolicy(name)
		}
		p := cmpol(name, g.nsSelector(), g.selector(), g.rules(true))
		world.ClusterMeshPolicies = append(world.ClusterMeshPolicies, p)
		return "upsert clustermeshpolicy " + name, c.UpsertClusterMeshPolicy(p)
	}
	return "nothing", Changes{}
}
