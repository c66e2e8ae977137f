package policy

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// -policy.node runs the tests that compile through mustCompile with a
// node-local compiler for that node (go test ./policy -args
// -policy.node=node-1): Trace and Matrix must answer the same.
var testNode = flag.String("policy.node", "", "compile node-locally for this node in mustCompile")

// localCanonical is canonical restricted to the endpoints on node.
func localCanonical(c *Compiler, node string) []string {
	var out []string
	for _, ep := range c.Endpoints() {
		if ep.Node != node {
			continue
		}
		if ep.NotCompiled {
			out = append(out, fmt.Sprintf("ep %s NOT COMPILED", ep.EndpointID))
			continue
		}
		full, _ := c.Endpoint(ep.EndpointID)
		if !sameEndpoint(full, ep) {
			out = append(out, fmt.Sprintf("ep %s: Endpoint and Endpoints disagree", ep.EndpointID))
		}
	}
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
	for _, ep := range c.Endpoints() {
		if ep.Node != node || ep.NotCompiled {
			continue
		}
		out = append(out, fmt.Sprintf("ep %s %v id=%s %+v", ep.EndpointID, ep.IPs, name(uint32(ep.Identity)), ep.Defaults))
		var es []string
		for _, e := range ep.Entries {
			es = append(es, fmt.Sprintf("  %s %s %s %d/%d enf=%d aud=%d rule=%s", e.Direction, name(uint32(e.Identity)), ProtoName(e.Proto), e.Port, e.PortPrefixLen, e.Enforce, e.Audit, rules[e.RuleID]))
		}
		slices.Sort(es)
		out = append(out, es...)
	}
	for _, ic := range c.IPCache() {
		out = append(out, fmt.Sprintf("ipcache %s %s %s", ic.IP, name(uint32(ic.Identity)), ic.Node))
	}
	slices.Sort(out)
	return out
}

// TestNodeLocalMatchesWholeCluster: on random clusters, through random
// mutations, a node-local compiler's endpoints on its node (entries,
// defaults, identities) and its ipcache equal a whole-cluster compile of
// the same objects restricted to them; every change of a local endpoint
// is reported; and Trace answers exactly as the whole-cluster compiler,
// for every pair of peers, including endpoints of other nodes.
func TestNodeLocalMatchesWholeCluster(t *testing.T) {
	seeds := 40
	if testing.Short() {
		seeds = 10
	}
	for seed := range seeds {
		g := gen{rand.New(rand.NewPCG(uint64(seed), 23))}
		world := g.input()
		node := []string{"node-1", "node-2"}[seed%2]
		c, err := Compile(world, Options{Node: node})
		if err != nil {
			t.Fatal(err)
		}
		for step := range 25 {
			before := map[EndpointID]Endpoint{}
			for _, ep := range c.Endpoints() {
				if ep.Node == node {
					before[ep.EndpointID], _ = c.Endpoint(ep.EndpointID)
				}
			}
			what, ch := mutate(g, &world, c)
			reported := map[EndpointID]bool{}
			for _, id := range append(slices.Clone(ch.Endpoints), ch.Removed...) {
				reported[id] = true
			}
			for _, ep := range c.Endpoints() {
				if ep.Node != node {
					continue
				}
				now, _ := c.Endpoint(ep.EndpointID)
				if b, ok := before[ep.EndpointID]; (!ok || !sameEndpoint(now, b)) && !reported[ep.EndpointID] {
					t.Fatalf("seed %d step %d (%s): local endpoint %s changed but was not reported", seed, step, what, ep.EndpointID)
				}
			}
			whole, err := Compile(world, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if got, want := localCanonical(c, node), localCanonical(whole, node); !slices.Equal(got, want) {
				t.Fatalf("seed %d step %d (%s): node-local state of %s differs from the whole cluster's:\n%s", seed, step, what, node, diffLines(got, want))
			}
			if step%8 != 4 {
				continue
			}
			var peers []Peer
			for _, p := range world.Pods {
				if p.Status.PodIP != "" {
					peers = append(peers, PodPeer(p.Namespace, p.Name))
				}
			}
			for _, ip := range genExtraIPs {
				peers = append(peers, IPPeer(netip.MustParseAddr(ip)))
			}
			for _, src := range peers {
				for _, dst := range peers {
					for _, pp := range genPorts {
						got, gerr := c.Trace(src, dst, pp.Proto, pp.Port)
						want, werr := whole.Trace(src, dst, pp.Proto, pp.Port)
						if (gerr == nil) != (werr == nil) || got.Allowed != want.Allowed || got.AuditAllowed != want.AuditAllowed ||
							got.Egress.Allowed != want.Egress.Allowed || got.Ingress.Allowed != want.Ingress.Allowed ||
							!slices.Equal(sortedReasons(got.Egress.Reasons), sortedReasons(want.Egress.Reasons)) ||
							!slices.Equal(sortedReasons(got.Ingress.Reasons), sortedReasons(want.Ingress.Reasons)) {
							t.Fatalf("seed %d step %d: trace %s -> %s %s on the node-local compiler: %+v (%v); whole cluster: %+v (%v)", seed, step, src, dst, pp, got, gerr, want, werr)
						}
					}
				}
			}
		}
	}
}

// sortedReasons: reasons of equal verdict are ordered by rule number, which
// differs between histories.
func sortedReasons(rs []Reason) []string {
	out := reasonsText(rs)
	slices.Sort(out)
	return out
}

// A node-local compiler keeps no entries for other nodes' endpoints, and
// drops a group's entries when its last local endpoint leaves.
func TestNodeLocalKeepsOnlyLocalGroups(t *testing.T) {
	a := testPod("x", "a", "10.0.1.1", kvMap("app", "a"))
	a.Spec.NodeName = "node-1"
	b := testPod("x", "b", "10.0.2.1", kvMap("app", "b"))
	b.Spec.NodeName = "node-2"
	pol := np("x", "allow-a", &metav1.LabelSelector{}, func(s *networkingv1.NetworkPolicySpec) {
		s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: matchLabels("app", "a")}}}}
	})
	c, err := Compile(Input{Pods: []*corev1.Pod{a, b}, Namespaces: []*corev1.Namespace{testNamespace("x")}, NetworkPolicies: []*networkingv1.NetworkPolicy{pol}}, Options{Node: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	kept := func() (n int) {
		for _, g := range c.groups {
			if g.computed {
				n++
			}
		}
		return n
	}
	users := func() (n int) {
		for _, s := range c.sels {
			n += len(s.users)
		}
		return n
	}
	eps := c.Endpoints()
	if len(eps) != 2 || eps[0].NotCompiled || !eps[1].NotCompiled || len(eps[0].Entries) == 0 {
		t.Fatalf("Endpoints = %+v, want a compiled and b (node-2) not", eps)
	}
	if kept() != 1 || users() != 1 {
		t.Fatalf("%d groups kept, %d selector users; want 1 and 1 (a's only)", kept(), users())
	}
	// b's entries are computed on demand, as the whole cluster would.
	whole := mustCompile(t, Input{Pods: []*corev1.Pod{a, b}, Namespaces: []*corev1.Namespace{testNamespace("x")}, NetworkPolicies: []*networkingv1.NetworkPolicy{pol}})
	got, _ := c.Endpoint(EndpointID{"x", "b"})
	want, _ := whole.Endpoint(EndpointID{"x", "b"})
	if !sameEndpoint(got, want) || got.NotCompiled {
		t.Errorf("Endpoint(b) = %+v, want %+v", got, want)
	}

	// a moves to node-2: nothing is kept any more.
	moved := a.DeepCopy()
	moved.Spec.NodeName = "node-2"
	c.UpsertPod(moved)
	if kept() != 0 || users() != 0 {
		t.Errorf("after a left node-1: %d groups kept, %d selector users; want none", kept(), users())
	}
	// And back: compiled again, and reported.
	ch := c.UpsertPod(a)
	if kept() != 1 || !slices.Contains(ch.Endpoints, EndpointID{"x", "a"}) {
		t.Errorf("after a came back: %d groups kept, changes %+v; want a's group kept and reported", kept(), ch)
	}
	if ep, _ := c.Endpoint(EndpointID{"x", "a"}); len(ep.Entries) == 0 || ep.NotCompiled {
		t.Errorf("a has no entries after coming back: %+v", ep)
	}
}
