package policy

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

func mp(ns, name string, sel *metav1.LabelSelector, rules v1alpha1.PolicyRules) *v1alpha1.MeshPolicy {
	p := &v1alpha1.MeshPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if sel != nil {
		p.Spec.PodSelector = *sel
	}
	p.Spec.PolicyRules = rules
	return p
}

func cmpol(name string, nsSel, sel *metav1.LabelSelector, rules v1alpha1.PolicyRules) *v1alpha1.ClusterMeshPolicy {
	p := &v1alpha1.ClusterMeshPolicy{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if sel != nil {
		p.Spec.PodSelector = *sel
	}
	p.Spec.NamespaceSelector = nsSel
	p.Spec.PolicyRules = rules
	return p
}

func entity(e v1alpha1.Entity) v1alpha1.Peer { return v1alpha1.Peer{Entity: &e} }

func cidrPeer(cidr string, except ...string) v1alpha1.Peer {
	return v1alpha1.Peer{CIDR: &v1alpha1.CIDRPeer{CIDR: cidr, Except: except}}
}

func podPeer(nsSel, podSel *metav1.LabelSelector) v1alpha1.Peer {
	return v1alpha1.Peer{NamespaceSelector: nsSel, PodSelector: podSel}
}

func meshPortOf(proto v1alpha1.Protocol, port any) v1alpha1.PortRule {
	p := v1alpha1.PortRule{Protocol: proto}
	switch v := port.(type) {
	case int:
		x := intstr.FromInt32(int32(v))
		p.Port = &x
	case string:
		x := intstr.FromString(v)
		p.Port = &x
	}
	return p
}

func icmpRule(typ int32, code ...int32) v1alpha1.PortRule {
	p := v1alpha1.PortRule{Protocol: v1alpha1.ProtocolICMP, ICMPType: &typ}
	if len(code) > 0 {
		p.ICMPCode = &code[0]
	}
	return p
}

func ptr[T any](v T) *T { return &v }

func TestMeshPolicyFeatures(t *testing.T) {
	podA := matchLabels("pod", "a")
	all := &metav1.LabelSelector{}
	type check struct {
		port PortProto
		want reach
		// audit, when set, is the expected audit reachability.
		audit reach
	}
	tests := []struct {
		name   string
		netpol []*networkingv1.NetworkPolicy
		mesh   []*v1alpha1.MeshPolicy
		clust  []*v1alpha1.ClusterMeshPolicy
		checks []check
	}{
		{
			name: "deny wins over a NetworkPolicy allow",
			netpol: []*networkingv1.NetworkPolicy{np("x", "from-y", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: matchLabels("ns", "y")}}}}
			})},
			mesh: []*v1alpha1.MeshPolicy{mp("x", "deny-yb", podA, v1alpha1.PolicyRules{
				IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(matchLabels("ns", "y"), matchLabels("pod", "b"))}}},
			})},
			checks: []check{{port: tcp80, want: newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true).set("y/b", "x/a", false)}},
		},
		{
			name: "deny on any port shadows a more specific allow for the same peer",
			mesh: []*v1alpha1.MeshPolicy{
				mp("x", "allow-yb-80", podA, v1alpha1.PolicyRules{
					Ingress: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(matchLabels("ns", "y"), nil)}, Ports: []v1alpha1.PortRule{meshPortOf("", 80)}}},
				}),
				mp("x", "deny-yb", podA, v1alpha1.PolicyRules{
					IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(matchLabels("ns", "y"), matchLabels("pod", "b"))}}},
				}),
			},
			checks: []check{{port: tcp80, want: newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true).set("y/b", "x/a", false)}},
		},
		{
			name: "deny of every peer on one port beats allows of specific peers",
			mesh: []*v1alpha1.MeshPolicy{mp("x", "mixed", podA, v1alpha1.PolicyRules{
				Ingress:     []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(matchLabels("ns", "y"), nil)}}},
				IngressDeny: []v1alpha1.IngressRule{{Ports: []v1alpha1.PortRule{meshPortOf(v1alpha1.ProtocolTCP, 81)}}},
			})},
			checks: []check{
				{port: tcp80, want: newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true)},
				{port: tcp81, want: newReach(true).set("*/*", "x/a", false)},
				{port: udp81, want: newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true)},
			},
		},
		{
			name: "deny-only policy does not turn on default deny",
			mesh: []*v1alpha1.MeshPolicy{mp("x", "deny-yb", podA, v1alpha1.PolicyRules{
				IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(matchLabels("ns", "y"), matchLabels("pod", "b"))}}},
			})},
			checks: []check{{port: tcp80, want: newReach(true).set("y/b", "x/a", false)}},
		},
		{
			name: "defaultDeny turns on isolation for a deny-only policy and off for an allow policy",
			mesh: []*v1alpha1.MeshPolicy{
				mp("x", "deny-only-isolating", podA, v1alpha1.PolicyRules{
					EgressDeny:  []v1alpha1.EgressRule{{To: []v1alpha1.Peer{podPeer(matchLabels("ns", "y"), nil)}}},
					DefaultDeny: &v1alpha1.DefaultDeny{Egress: ptr(true)},
				}),
				mp("x", "allow-not-isolating", matchLabels("pod", "b"), v1alpha1.PolicyRules{
					Ingress:     []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(matchLabels("ns", "y"), nil)}}},
					DefaultDeny: &v1alpha1.DefaultDeny{Ingress: ptr(false)},
				}),
			},
			checks: []check{{port: tcp80, want: newReach(true).set("x/a", "*/*", false)}},
		},
		{
			name:   "ingress: [] present turns on default deny",
			mesh:   []*v1alpha1.MeshPolicy{mp("x", "empty", podA, v1alpha1.PolicyRules{Ingress: []v1alpha1.IngressRule{}})},
			checks: []check{{port: tcp80, want: newReach(true).set("*/*", "x/a", false)}},
		},
		{
			name: "audit mode reports what it would deny and drops nothing",
			mesh: []*v1alpha1.MeshPolicy{mp("x", "audit", podA, v1alpha1.PolicyRules{
				Mode:    v1alpha1.ModeAudit,
				Ingress: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(nil, matchLabels("pod", "b"))}}},
			})},
			checks: []check{{port: tcp80, want: newReach(true), audit: newReach(true).set("*/*", "x/a", false).set("x/b", "x/a", true)}},
		},
		{
			name: "audit deny next to an enforced allow",
			netpol: []*networkingv1.NetworkPolicy{np("x", "from-y", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: matchLabels("ns", "y")}}}}
			})},
			mesh: []*v1alpha1.MeshPolicy{mp("x", "audit-deny", podA, v1alpha1.PolicyRules{
				Mode:        v1alpha1.ModeAudit,
				IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(matchLabels("ns", "y"), matchLabels("pod", "c"))}}},
			})},
			checks: []check{{
				port:  tcp80,
				want:  newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true),
				audit: newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true).set("y/c", "x/a", false),
			}},
		},
		{
			name: "ClusterMeshPolicy selects by namespace; a podSelector peer spans namespaces",
			clust: []*v1alpha1.ClusterMeshPolicy{cmpol("only-b", matchLabels("ns", "z"), all, v1alpha1.PolicyRules{
				Ingress: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(nil, matchLabels("pod", "b"))}}},
			})},
			checks: []check{{port: tcp80, want: newReach(true).set("*/*", "z/*", false).set("*/b", "z/*", true)}},
		},
		{
			name: "MeshPolicy podSelector peer stays in its namespace",
			mesh: []*v1alpha1.MeshPolicy{mp("z", "only-b", all, v1alpha1.PolicyRules{
				Ingress: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(nil, matchLabels("pod", "b"))}}},
			})},
			checks: []check{{port: tcp80, want: newReach(true).set("*/*", "z/*", false).set("z/b", "z/*", true)}},
		},
		{
			name: "entity cluster allows every pod",
			mesh: []*v1alpha1.MeshPolicy{mp("x", "cluster", podA, v1alpha1.PolicyRules{
				Ingress: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{entity(v1alpha1.EntityCluster)}}},
			})},
			checks: []check{{port: tcp80, want: newReach(true)}},
		},
		{
			name: "entity world does not cover pods",
			mesh: []*v1alpha1.MeshPolicy{mp("x", "world", podA, v1alpha1.PolicyRules{
				Egress: []v1alpha1.EgressRule{{To: []v1alpha1.Peer{entity(v1alpha1.EntityWorld)}}},
			})},
			checks: []check{{port: tcp80, want: newReach(true).set("x/a", "*/*", false)}},
		},
		{
			name: "CIDR with except",
			mesh: []*v1alpha1.MeshPolicy{mp("x", "cidr", podA, v1alpha1.PolicyRules{
				Egress: []v1alpha1.EgressRule{{To: []v1alpha1.Peer{cidrPeer("10.1.0.0/16", "10.1.1.0/24")}}},
			})},
			checks: []check{{port: tcp80, want: newReach(true).set("x/a", "y/*", false)}},
		},
		{
			name: "CIDR deny inside an allowed CIDR",
			mesh: []*v1alpha1.MeshPolicy{mp("x", "cidr", podA, v1alpha1.PolicyRules{
				Egress:     []v1alpha1.EgressRule{{To: []v1alpha1.Peer{cidrPeer("10.0.0.0/8")}}},
				EgressDeny: []v1alpha1.EgressRule{{To: []v1alpha1.Peer{cidrPeer("10.1.2.0/24")}, Ports: []v1alpha1.PortRule{meshPortOf(v1alpha1.ProtocolTCP, 80)}}},
			})},
			checks: []check{
				{port: tcp80, want: newReach(true).set("x/a", "z/*", false)},
				{port: tcp81, want: newReach(true)},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := e2eInput()
			in.NetworkPolicies, in.MeshPolicies, in.ClusterMeshPolicies = tt.netpol, tt.mesh, tt.clust
			c := mustCompile(t, in)
			for _, ch := range tt.checks {
				checkReach(t, c, ch.port, ch.want)
				audit := ch.audit
				if audit == nil {
					audit = ch.want
				}
				checkAuditReach(t, c, ch.port, audit)
			}
		})
	}
}

func checkAuditReach(t *testing.T, c *Compiler, pp PortProto, want reach) {
	t.Helper()
	for key, w := range want {
		if key[0] == key[1] {
			continue
		}
		fns, fp, _ := strings.Cut(key[0], "/")
		tns, tp, _ := strings.Cut(key[1], "/")
		tr, err := c.Trace(PodPeer(fns, fp), PodPeer(tns, tp), pp.Proto, pp.Port)
		if err != nil {
			t.Fatal(err)
		}
		if tr.AuditAllowed != w {
			t.Errorf("%s -> %s %s: got audit allowed=%v; want %v", key[0], key[1], pp, tr.AuditAllowed, w)
		}
	}
}

// Flows with a non-pod end: only the pod side's policy applies, and the
// peer's identity comes from what the pod's node sees.
func TestNonPodPeersAndEntities(t *testing.T) {
	in := e2eInput()
	in.Nodes = []*corev1.Node{
		{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.0.1"}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "node-2"}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.0.2"}}}},
	}
	in.MeshPolicies = []*v1alpha1.MeshPolicy{
		mp("x", "a", matchLabels("pod", "a"), v1alpha1.PolicyRules{
			Ingress: []v1alpha1.IngressRule{
				{From: []v1alpha1.Peer{entity(v1alpha1.EntityHost)}},
				{From: []v1alpha1.Peer{entity(v1alpha1.EntityWorld)}, Ports: []v1alpha1.PortRule{meshPortOf(v1alpha1.ProtocolTCP, 443)}},
			},
			Egress: []v1alpha1.EgressRule{{To: []v1alpha1.Peer{entity(v1alpha1.EntityRemoteNode)}}},
		}),
		mp("x", "b", matchLabels("pod", "b"), v1alpha1.PolicyRules{
			Ingress:     []v1alpha1.IngressRule{{From: []v1alpha1.Peer{entity(v1alpha1.EntityAll)}}},
			IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{cidrPeer("203.0.113.0/24")}}},
		}),
	}
	in.NetworkPolicies = []*networkingv1.NetworkPolicy{np("y", "ext", matchLabels("pod", "a"), func(s *networkingv1.NetworkPolicySpec) {
		s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{ipBlock("198.51.100.0/24", "198.51.100.128/25")}}}
	})}
	c := mustCompile(t, in)
	xa, xb, ya, yb := PodPeer("x", "a"), PodPeer("x", "b"), PodPeer("y", "a"), PodPeer("y", "b")
	ip := func(s string) Peer { return IPPeer(addr(s)) }
	tests := []struct {
		name     string
		from, to Peer
		port     PortProto
		want     bool
		fromID   identity.ID
	}{
		{"local host to x/a", ip("192.168.0.1"), xa, tcp80, true, identity.Host},
		{"local host to NetworkPolicy-isolated y/a", ip("192.168.0.1"), ya, tcp80, true, identity.Host},
		{"remote node to NetworkPolicy-isolated y/a", ip("192.168.0.2"), ya, tcp80, false, identity.RemoteNode},
		{"local host to x/b, allowed by entity all", ip("192.168.0.1"), xb, tcp80, true, identity.Host},
		{"remote node to x/a", ip("192.168.0.2"), xa, tcp80, false, identity.RemoteNode},
		{"world to x/a on 443", ip("8.8.8.8"), xa, PortProto{policytypes.ProtoTCP, 443}, true, identity.World},
		{"world to x/a on 80", ip("8.8.8.8"), xa, tcp80, false, identity.World},
		{"x/a to remote node", xa, ip("192.168.0.2"), tcp80, true, 0},
		{"x/a to local host", xa, ip("192.168.0.1"), tcp80, false, 0},
		{"x/a to world", xa, ip("8.8.8.8"), tcp80, false, 0},
		{"world to x/b (entity all)", ip("8.8.8.8"), xb, udp80, true, identity.World},
		{"denied CIDR to x/b", ip("203.0.113.7"), xb, udp80, false, identity.World},
		{"ipBlock to y/a", ip("198.51.100.7"), ya, tcp80, true, identity.World},
		{"ipBlock except to y/a", ip("198.51.100.200"), ya, tcp80, false, identity.World},
		{"outside ipBlock to y/a", ip("198.51.99.1"), ya, tcp80, false, identity.World},
		{"unisolated pod to world", yb, ip("8.8.8.8"), tcp80, true, 0},
		{"world to unisolated pod", ip("8.8.8.8"), yb, tcp80, true, identity.World},
		{"bare pod IP is the pod", ip(e2eIP("x", "b")), xa, tcp80, false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr, err := c.Trace(tt.from, tt.to, tt.port.Proto, tt.port.Port)
			if err != nil {
				t.Fatal(err)
			}
			if tr.Allowed != tt.want {
				t.Errorf("got allowed=%v; want %v\n%+v", tr.Allowed, tt.want, tr)
			}
			if tt.fromID != 0 && tr.From.Identity != tt.fromID {
				t.Errorf("from identity %v; want %v", tr.From.Identity, tt.fromID)
			}
			if tt.fromID != 0 && tt.fromID.Reserved() && (len(tr.From.Labels) != 1 || tr.From.Labels[0].Key != tt.fromID.ReservedName()) {
				t.Errorf("from labels %v; want reserved:%s", tr.From.Labels, tt.fromID.ReservedName())
			}
			if tt.from.Name == "" && tt.from.IP != addr(e2eIP("x", "b")) && tr.Egress.Applicable {
				t.Errorf("egress of a non-pod source applied")
			}
		})
	}
}

func TestICMP(t *testing.T) {
	in := e2eInput()
	in.MeshPolicies = []*v1alpha1.MeshPolicy{mp("x", "icmp", matchLabels("pod", "a"), v1alpha1.PolicyRules{
		Ingress: []v1alpha1.IngressRule{
			{Ports: []v1alpha1.PortRule{icmpRule(8)}},
			{From: []v1alpha1.Peer{podPeer(matchLabels("ns", "y"), nil)}, Ports: []v1alpha1.PortRule{icmpRule(3, 4)}},
		},
		IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(matchLabels("ns", "z"), nil)}, Ports: []v1alpha1.PortRule{icmpRule(8, 1)}}},
	})}
	c := mustCompile(t, in)
	icmp := func(typ, code uint16) PortProto { return PortProto{policytypes.ProtoICMP, typ<<8 | code} }
	checkReach(t, c, icmp(8, 0), newReach(true))
	checkReach(t, c, icmp(8, 1), newReach(true).set("z/*", "x/a", false))
	checkReach(t, c, icmp(0, 0), newReach(true).set("*/*", "x/a", false))
	checkReach(t, c, icmp(3, 4), newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true))
	checkReach(t, c, icmp(3, 3), newReach(true).set("*/*", "x/a", false))
	checkReach(t, c, PortProto{policytypes.ProtoTCP, 8 << 8}, newReach(true).set("*/*", "x/a", false))
	checkReach(t, c, PortProto{policytypes.ProtoICMPv6, 128 << 8}, newReach(true).set("*/*", "x/a", false))

	// An untyped ICMP rule covers ICMPv6 as well.
	in.MeshPolicies = append(in.MeshPolicies, mp("x", "any-icmp", matchLabels("pod", "a"), v1alpha1.PolicyRules{
		Ingress: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(matchLabels("ns", "y"), nil)}, Ports: []v1alpha1.PortRule{{Protocol: v1alpha1.ProtocolICMP}}}},
	}))
	c = mustCompile(t, in)
	checkReach(t, c, PortProto{policytypes.ProtoICMPv6, 128 << 8}, newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true))
	checkReach(t, c, icmp(0, 0), newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true))
}

// A named port resolves per protocol: "dns" is 53 on UDP and 5353 on TCP.
func TestNamedPortsPerProtocol(t *testing.T) {
	in := Input{Namespaces: []*corev1.Namespace{testNamespace("x")}}
	dnsPorts := []corev1.ContainerPort{containerPort("dns", 53, corev1.ProtocolUDP), containerPort("dns", 5353, corev1.ProtocolTCP)}
	in.Pods = []*corev1.Pod{
		testPod("x", "client", "10.0.0.1", map[string]string{"app": "client"}),
		testPod("x", "server", "10.0.0.2", map[string]string{"app": "server"}, dnsPorts...),
		// Same labels as server, other numbers: a different group and,
		// for ingress, its own resolution.
		testPod("x", "server-alt", "10.0.0.3", map[string]string{"app": "server-alt"}, containerPort("dns", 1053, corev1.ProtocolUDP)),
	}
	in.MeshPolicies = []*v1alpha1.MeshPolicy{
		mp("x", "server-udp-dns", matchLabels("app", "server"), v1alpha1.PolicyRules{
			Ingress: []v1alpha1.IngressRule{{Ports: []v1alpha1.PortRule{meshPortOf(v1alpha1.ProtocolUDP, "dns")}}},
		}),
		mp("x", "alt-udp-dns", matchLabels("app", "server-alt"), v1alpha1.PolicyRules{
			Ingress: []v1alpha1.IngressRule{{Ports: []v1alpha1.PortRule{meshPortOf(v1alpha1.ProtocolUDP, "dns")}}},
		}),
		mp("x", "client-tcp-dns", matchLabels("app", "client"), v1alpha1.PolicyRules{
			Egress: []v1alpha1.EgressRule{{Ports: []v1alpha1.PortRule{meshPortOf(v1alpha1.ProtocolTCP, "dns")}}},
		}),
	}
	c := mustCompile(t, in)
	client, server, alt := PodPeer("x", "client"), PodPeer("x", "server"), PodPeer("x", "server-alt")
	tests := []struct {
		from, to Peer
		proto    uint8
		port     uint16
		want     bool
	}{
		{server, server, policytypes.ProtoUDP, 53, true},
		{alt, server, policytypes.ProtoUDP, 53, true},
		{alt, server, policytypes.ProtoUDP, 5353, false},
		{alt, server, policytypes.ProtoTCP, 53, false},
		{alt, server, policytypes.ProtoTCP, 5353, false},
		{server, alt, policytypes.ProtoUDP, 1053, true},
		{server, alt, policytypes.ProtoUDP, 53, false},
	}
	for _, tt := range tests {
		tr, err := c.Trace(tt.from, tt.to, tt.proto, tt.port)
		if err != nil {
			t.Fatal(err)
		}
		if tr.Allowed != tt.want {
			t.Errorf("%s -> %s %d/%s: got %v; want %v", tt.from, tt.to, tt.port, ProtoName(tt.proto), tr.Allowed, tt.want)
		}
	}
	// The client's egress: "dns" on TCP resolves against each destination.
	egressTests := []struct {
		to    Peer
		proto uint8
		port  uint16
		want  bool
	}{
		{server, policytypes.ProtoTCP, 5353, true},
		{server, policytypes.ProtoTCP, 53, false},
		{server, policytypes.ProtoUDP, 53, false},
		{alt, policytypes.ProtoTCP, 1053, false},
		{alt, policytypes.ProtoUDP, 1053, false},
		{IPPeer(addr("8.8.8.8")), policytypes.ProtoTCP, 5353, false},
	}
	for _, tt := range egressTests {
		tr, err := c.Trace(client, tt.to, tt.proto, tt.port)
		if err != nil {
			t.Fatal(err)
		}
		if tr.Egress.Allowed != tt.want {
			t.Errorf("client -> %s %d/%s: got egress %v; want %v", tt.to, tt.port, ProtoName(tt.proto), tr.Egress.Allowed, tt.want)
		}
	}
}

func TestTraceExplains(t *testing.T) {
	in := e2eInput()
	in.NetworkPolicies = []*networkingv1.NetworkPolicy{np("x", "allow-a", matchLabels("pod", "a"), func(s *networkingv1.NetworkPolicySpec) {
		s.Ingress = []networkingv1.NetworkPolicyIngressRule{{
			From:  []networkingv1.NetworkPolicyPeer{{PodSelector: matchLabels("pod", "b")}},
			Ports: []networkingv1.NetworkPolicyPort{npPortOf(corev1.ProtocolTCP, 80)},
		}}
	})}
	c := mustCompile(t, in)
	tr, err := c.Trace(PodPeer("x", "b"), PodPeer("x", "a"), policytypes.ProtoTCP, 80)
	if err != nil {
		t.Fatal(err)
	}
	if !tr.Allowed || !tr.Ingress.Selected || tr.Egress.Selected || len(tr.Ingress.Reasons) != 1 {
		t.Fatalf("got %+v", tr)
	}
	want := "allowed by NetworkPolicy x/allow-a ingress[0].from[0].ports[0]: from podSelector pod=b in namespace x, port 80/TCP"
	if got := tr.Ingress.Reasons[0].Message; got != want {
		t.Errorf("reason %q; want %q", got, want)
	}
	tr, _ = c.Trace(PodPeer("x", "c"), PodPeer("x", "a"), policytypes.ProtoTCP, 80)
	if tr.Allowed || len(tr.Ingress.Reasons) != 1 || !strings.Contains(tr.Ingress.Reasons[0].Message, "denied by default") {
		t.Errorf("got %+v", tr.Ingress)
	}
	if len(tr.From.Labels) == 0 || tr.From.Identity < identity.MinPod {
		t.Errorf("from peer without identity: %+v", tr.From)
	}
	// Entries name the rule for counters.
	ep, _ := c.Endpoint(EndpointID{"x", "a"})
	var found bool
	for _, e := range ep.Entries {
		if r, ok := c.Rule(e.RuleID); ok && r.Section == "ingress[0].from[0].ports[0]" {
			found = true
		}
	}
	if !found {
		t.Errorf("no entry names the rule: %+v", ep.Entries)
	}
}

// The local node reaches its pods despite default deny, but an explicit
// deny of the host entity stops it.
func TestLocalHostIngress(t *testing.T) {
	in := e2eInput()
	in.Nodes = []*corev1.Node{{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.0.1"}}}}}
	in.NetworkPolicies = []*networkingv1.NetworkPolicy{np("x", "deny", &metav1.LabelSelector{}, nil)}
	in.MeshPolicies = []*v1alpha1.MeshPolicy{mp("x", "no-host", matchLabels("pod", "b"), v1alpha1.PolicyRules{
		IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{entity(v1alpha1.EntityHost)}}},
	})}
	c := mustCompile(t, in)
	host := IPPeer(addr("192.168.0.1"))
	for pod, want := range map[string]bool{"a": true, "b": false} {
		tr, err := c.Trace(host, PodPeer("x", pod), policytypes.ProtoTCP, 8080)
		if err != nil {
			t.Fatal(err)
		}
		if tr.Allowed != want {
			t.Errorf("host -> x/%s: got %v; want %v (%+v)", pod, tr.Allowed, want, tr.Ingress.Reasons)
		}
	}
	tr, _ := c.Trace(host, PodPeer("x", "a"), policytypes.ProtoTCP, 8080)
	if len(tr.Ingress.Reasons) != 1 || !strings.Contains(tr.Ingress.Reasons[0].Message, "own node") {
		t.Errorf("reasons %+v", tr.Ingress.Reasons)
	}
}

// An egress named port towards an ipBlock opens exactly the pod addresses
// inside the block: not the other family of a dual-stack pod, nor a pod of
// the same identity outside it.
func TestNamedPortTowardsCIDRIsExact(t *testing.T) {
	in := Input{Namespaces: []*corev1.Namespace{testNamespace("x")}}
	web := []corev1.ContainerPort{containerPort("http", 8080, corev1.ProtocolTCP)}
	dual := testPod("x", "dual", "10.0.0.2", map[string]string{"app": "web"}, web...)
	dual.Status.PodIPs = []corev1.PodIP{{IP: "10.0.0.2"}, {IP: "fd00::2"}}
	in.Pods = []*corev1.Pod{
		testPod("x", "client", "10.0.0.1", map[string]string{"app": "client"}),
		dual,
		testPod("x", "outside", "10.9.0.3", map[string]string{"app": "web"}, web...),
	}
	in.NetworkPolicies = []*networkingv1.NetworkPolicy{np("x", "egress", matchLabels("app", "client"), func(s *networkingv1.NetworkPolicySpec) {
		s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
		s.Egress = []networkingv1.NetworkPolicyEgressRule{{
			To:    []networkingv1.NetworkPolicyPeer{ipBlock("10.0.0.0/16")},
			Ports: []networkingv1.NetworkPolicyPort{npPortOf(corev1.ProtocolTCP, "http")},
		}}
	})}
	c := mustCompile(t, in)
	client := PodPeer("x", "client")
	for to, want := range map[string]bool{"10.0.0.2": true, "fd00::2": false, "10.9.0.3": false} {
		tr, err := c.Trace(client, IPPeer(addr(to)), policytypes.ProtoTCP, 8080)
		if err != nil {
			t.Fatal(err)
		}
		if tr.Allowed != want {
			t.Errorf("client -> %s:8080: got %v; want %v", to, tr.Allowed, want)
		}
	}
	// The pod's address became a region of its own in the CIDR table.
	var host bool
	for _, ce := range c.CIDRTable() {
		host = host || ce.Prefix.String() == "10.0.0.2/32"
	}
	if !host {
		t.Errorf("no host region for the pod inside the block: %v", c.CIDRTable())
	}
	// When the rule goes, so do the host regions.
	c.DeleteNetworkPolicy("x", "egress")
	if n := len(c.CIDRTable()); n != 0 {
		t.Errorf("CIDR table keeps %d entries", n)
	}
}
