package policy

import (
	"encoding/json"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/policy/policytypes"
)

// fuzzInput is the JSON shape the compiler fuzz target decodes.
type fuzzInput struct {
	Namespaces          []*corev1.Namespace           `json:"namespaces"`
	Nodes               []*corev1.Node                `json:"nodes"`
	Pods                []*corev1.Pod                 `json:"pods"`
	NetworkPolicies     []*networkingv1.NetworkPolicy `json:"networkPolicies"`
	MeshPolicies        []*v1alpha1.MeshPolicy        `json:"meshPolicies"`
	ClusterMeshPolicies []*v1alpha1.ClusterMeshPolicy `json:"clusterMeshPolicies"`
}

// FuzzCompile feeds arbitrary objects to the compiler, from scratch and
// incrementally, and traces between them: nothing may panic or hang, and
// incremental removal of everything must leave no entries behind.
func FuzzCompile(f *testing.F) {
	f.Add([]byte(`{"pods":[{"metadata":{"namespace":"x","name":"a"},"status":{"podIP":"10.0.0.1"}}],"networkPolicies":[{"metadata":{"namespace":"x","name":"p"},"spec":{"podSelector":{},"ingress":[{}]}}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 1<<16 {
			return
		}
		var fi fuzzInput
		if err := json.Unmarshal(data, &fi); err != nil {
			return
		}
		in := Input{Namespaces: fi.Namespaces, Nodes: fi.Nodes, Pods: fi.Pods, NetworkPolicies: fi.NetworkPolicies,
			MeshPolicies: fi.MeshPolicies, ClusterMeshPolicies: fi.ClusterMeshPolicies}
		c, err := Compile(in, Options{})
		if err != nil {
			t.Fatal(err)
		}
		eps := c.Endpoints()
		if len(eps) > 12 {
			eps = eps[:12]
		}
		peers := []Peer{IPPeer(netip.MustParseAddr("8.8.8.8")), IPPeer(netip.MustParseAddr("2001:db8::1"))}
		for _, ep := range eps {
			peers = append(peers, PodPeer(ep.Namespace, ep.Name))
		}
		for _, from := range peers {
			for _, to := range peers {
				for _, pp := range []PortProto{{policytypes.ProtoTCP, 80}, {policytypes.ProtoUDP, 53}, {policytypes.ProtoICMP, 8 << 8}, {policytypes.ProtoSCTP, 0}} {
					c.Trace(from, to, pp.Proto, pp.Port)
				}
			}
		}
		// The same objects applied one at a time in the opposite order must
		// reach the same state.
		inc, err := New(Options{})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range lastByKey(in.ClusterMeshPolicies, func(o *v1alpha1.ClusterMeshPolicy) string { return o.Name }) {
			inc.UpsertClusterMeshPolicy(p)
		}
		for _, p := range lastByKey(in.MeshPolicies, func(o *v1alpha1.MeshPolicy) string { return o.Namespace + "/" + o.Name }) {
			inc.UpsertMeshPolicy(p)
		}
		for _, p := range lastByKey(in.NetworkPolicies, func(o *networkingv1.NetworkPolicy) string { return o.Namespace + "/" + o.Name }) {
			inc.UpsertNetworkPolicy(p)
		}
		for _, p := range lastByKey(in.Pods, func(o *corev1.Pod) string { return o.Namespace + "/" + o.Name }) {
			inc.UpsertPod(p)
		}
		for _, n := range lastByKey(in.Namespaces, func(o *corev1.Namespace) string { return o.Name }) {
			inc.UpsertNamespace(n)
		}
		if got, want := canonical(inc), canonical(c); !slices.Equal(got, want) {
			t.Fatalf("incremental differs from scratch:\n%s", diffLines(got, want))
		}
		// Take everything away one object at a time.
		for _, p := range in.NetworkPolicies {
			if p != nil {
				c.DeleteNetworkPolicy(p.Namespace, p.Name)
			}
		}
		for _, p := range in.MeshPolicies {
			if p != nil {
				c.DeleteMeshPolicy(p.Namespace, p.Name)
			}
		}
		for _, p := range in.ClusterMeshPolicies {
			if p != nil {
				c.DeleteClusterMeshPolicy(p.Name)
			}
		}
		for _, ep := range c.Endpoints() {
			if len(ep.Entries) != 0 || ep.Defaults != (policytypes.Defaults{IngressEnforce: policytypes.Allow, IngressAudit: policytypes.Allow, EgressEnforce: policytypes.Allow, EgressAudit: policytypes.Allow}) {
				t.Fatalf("%s keeps policy after every policy was deleted: %+v", ep.EndpointID, ep)
			}
		}
		if len(c.CIDRTable()) != 0 || len(c.Rules()) != 0 {
			t.Fatalf("CIDR table or rules left: %v %v", c.CIDRTable(), c.Rules())
		}
		for _, ns := range in.Namespaces {
			if ns != nil {
				c.DeleteNamespace(ns.Name)
			}
		}
		for _, p := range in.Pods {
			if p != nil {
				c.DeletePod(p.Namespace, p.Name)
			}
		}
		if len(c.Endpoints()) != 0 || len(c.Identities()) != 0 || len(c.IPCache()) != 0 {
			t.Fatalf("state left after deleting every pod: %v %v", c.Endpoints(), c.Identities())
		}
	})
}

// FuzzTraceMatchesReference explores generated clusters beyond the fixed
// seeds of TestTraceMatchesReference.
func FuzzTraceMatchesReference(f *testing.F) {
	f.Add(uint64(1), uint64(2))
	f.Fuzz(func(t *testing.T, s1, s2 uint64) {
		g := gen{rand.New(rand.NewPCG(s1, s2))}
		in := g.input()
		c, err := Compile(in, Options{})
		if err != nil {
			t.Fatal(err)
		}
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
		for _, src := range peers {
			for _, dst := range peers {
				if src.pod == nil && dst.pod == nil || src.ip == dst.ip {
					continue
				}
				from, to := IPPeer(src.ip), IPPeer(dst.ip)
				for _, pp := range genPorts {
					tr, err := c.Trace(from, to, pp.Proto, pp.Port)
					if err != nil {
						t.Fatal(err)
					}
					allowed, audit, _, _ := ref.decide(src, dst, pp.Proto, pp.Port)
					if tr.Allowed != allowed || tr.AuditAllowed != audit {
						t.Fatalf("%s -> %s %s: trace %v/%v; reference %v/%v", src.ip, dst.ip, pp, tr.Allowed, tr.AuditAllowed, allowed, audit)
					}
				}
			}
		}
	})
}

// lastByKey returns the non-nil objects, the last one of each key, in
// reverse order of appearance.
func lastByKey[T any](objs []*T, key func(*T) string) []*T {
	seen := map[string]bool{}
	var out []*T
	for i := len(objs) - 1; i >= 0; i-- {
		if o := objs[i]; o != nil && !seen[key(o)] {
			seen[key(o)] = true
			out = append(out, o)
		}
	}
	return out
}
