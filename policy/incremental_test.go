package policy

import (
	"maps"
	"slices"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/policy/identity"
)

func changed(ch Changes) []string {
	var out []string
	for _, id := range ch.Endpoints {
		out = append(out, id.String())
	}
	return out
}

func TestIncrementalChangesAreMinimal(t *testing.T) {
	in := e2eInput()
	// y/* admit only pod=b from x; z/* are untouched by any policy.
	in.NetworkPolicies = []*networkingv1.NetworkPolicy{np("y", "from-xb", &metav1.LabelSelector{}, func(s *networkingv1.NetworkPolicySpec) {
		s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: matchLabels("ns", "x"), PodSelector: matchLabels("pod", "b")}}}}
	})}
	c := mustCompile(t, in)

	// x/a takes the labels of x/b: an existing identity, so only x/a itself
	// (its identity) and the ipcache change; y's entries name the identity,
	// which already was there.
	xa := in.Pods[0].DeepCopy()
	xa.Labels = map[string]string{"pod": "b"}
	ch := c.UpsertPod(xa)
	if got := changed(ch); !slices.Equal(got, []string{"x/a"}) || !ch.IPCache || ch.CIDRTable {
		t.Fatalf("relabel to an existing identity: changes %+v", ch)
	}
	checkReach(t, c, tcp80, newReach(true).set("*/*", "y/*", false).set("x/b", "y/*", true).set("x/a", "y/*", true))

	// x/c takes a new label set that y's selector picks: a new identity
	// appears in y's entries.
	xc := in.Pods[2].DeepCopy()
	xc.Labels = map[string]string{"pod": "b", "extra": "1"}
	ch = c.UpsertPod(xc)
	if got := changed(ch); !slices.Equal(got, []string{"x/c", "y/a", "y/b", "y/c"}) {
		t.Fatalf("relabel to a new selected identity: changed %v", got)
	}
	// A new identity no selector picks touches only the pod.
	zc := in.Pods[8].DeepCopy()
	zc.Labels = map[string]string{"pod": "c", "v": "2"}
	if got := changed(c.UpsertPod(zc)); !slices.Equal(got, []string{"z/c"}) {
		t.Fatalf("relabel to an unselected identity: changed %v", got)
	}
	// Resync with no change reports nothing.
	if ch := c.UpsertPod(zc.DeepCopy()); !ch.Empty() {
		t.Fatalf("resync: %+v", ch)
	}
	// A policy change touches the pods it selects, before or after.
	p := np("z", "iso", matchLabels("pod", "a"), nil)
	if got := changed(c.UpsertNetworkPolicy(p)); !slices.Equal(got, []string{"z/a"}) {
		t.Fatalf("new policy: changed %v", got)
	}
	p2 := np("z", "iso", matchLabels("pod", "b"), nil)
	if got := changed(c.UpsertNetworkPolicy(p2)); !slices.Equal(got, []string{"z/a", "z/b"}) {
		t.Fatalf("moved policy: changed %v", got)
	}
	// Same policy again: nothing.
	if ch := c.UpsertNetworkPolicy(p2.DeepCopy()); !ch.Empty() {
		t.Fatalf("unchanged policy: %+v", ch)
	}
	// Deleting a pod reports it removed.
	if ch := c.DeletePod("z", "b"); !slices.Equal(ch.Removed, []EndpointID{{"z", "b"}}) || !ch.IPCache {
		t.Fatalf("delete: %+v", ch)
	}
}

// Identity numbers survive a restart through the saved allocator state.
func TestIdentitiesStableAcrossRestart(t *testing.T) {
	in := e2eInput()
	c1 := mustCompile(t, in)
	saved, savedCIDR := c1.IdentityState(), c1.CIDRIdentityState()
	// The restarted agent sees the pods in another order and one more pod.
	in2 := e2eInput()
	slices.Reverse(in2.Pods)
	in2.Pods = append(in2.Pods, testPod("x", "new", "10.1.9.9", map[string]string{"pod": "new"}))
	c2, err := Compile(in2, Options{Identities: saved, CIDRIdentities: savedCIDR})
	if err != nil {
		t.Fatal(err)
	}
	before := map[string]identity.ID{}
	for _, id := range c1.Identities() {
		before[id.Labels.Key()] = id.ID
	}
	for _, id := range c2.Identities() {
		if want, ok := before[id.Labels.Key()]; ok && want != id.ID {
			t.Errorf("%s: %d after restart; was %d", id.Labels.Key(), id.ID, want)
		}
		if _, ok := before[id.Labels.Key()]; !ok && id.ID < identity.MinPod {
			t.Errorf("new identity %d below MinPod", id.ID)
		}
	}
	if len(c2.Identities()) != len(c1.Identities())+1 {
		t.Errorf("got %d identities; want %d", len(c2.Identities()), len(c1.Identities())+1)
	}
	// Equal label sets share an identity: 9 pods, 9 label sets.
	if n := len(c1.Identities()); n != 9 {
		t.Errorf("got %d identities for 9 distinct pods", n)
	}
	if !maps.Equal(saved, c1.IdentityState()) {
		t.Errorf("IdentityState changed by reading it")
	}
}

func TestCompileIsDeterministic(t *testing.T) {
	in := e2eInput()
	in.NetworkPolicies = []*networkingv1.NetworkPolicy{
		np("x", "b", matchLabels("pod", "a"), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{ipBlock("10.1.0.0/16", "10.1.1.0/24")}}}
		}),
		np("x", "a", &metav1.LabelSelector{}, func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{}}}}}
		}),
	}
	c1 := mustCompile(t, in)
	slices.Reverse(in.Pods)
	slices.Reverse(in.NetworkPolicies)
	slices.Reverse(in.Namespaces)
	c2 := mustCompile(t, in)
	e1, e2 := c1.Endpoints(), c2.Endpoints()
	if len(e1) != len(e2) {
		t.Fatal("endpoint count differs")
	}
	for i := range e1 {
		if !sameEndpoint(e1[i], e2[i]) {
			t.Errorf("%s differs:\n%+v\n%+v", e1[i].EndpointID, e1[i], e2[i])
		}
	}
	if !slices.Equal(c1.CIDRTable(), c2.CIDRTable()) || !slices.Equal(c1.Rules(), c2.Rules()) {
		t.Errorf("CIDR table or rules differ")
	}
}

func TestRangePrefixes(t *testing.T) {
	tests := []struct {
		lo, hi uint16
		want   []PortPrefix
	}{
		{80, 80, []PortPrefix{{80, 16}}},
		{0, 65535, []PortPrefix{{0, 0}}},
		{80, 81, []PortPrefix{{80, 15}}},
		{79, 81, []PortPrefix{{79, 16}, {80, 15}}},
		{1024, 65535, []PortPrefix{{1024, 6}, {2048, 5}, {4096, 4}, {8192, 3}, {16384, 2}, {32768, 1}}},
		{65535, 65535, []PortPrefix{{65535, 16}}},
	}
	for _, tt := range tests {
		if got := RangePrefixes(tt.lo, tt.hi); !slices.Equal(got, tt.want) {
			t.Errorf("RangePrefixes(%d, %d) = %v; want %v", tt.lo, tt.hi, got, tt.want)
		}
	}
	// Exhaustive cover check on a sample of ranges.
	for _, r := range [][2]uint16{{1, 65535}, {3, 1000}, {8000, 8080}, {32767, 32769}} {
		covered := 0
		for _, p := range RangePrefixes(r[0], r[1]) {
			lo := int(p.Port)
			n := 1 << (16 - p.Len)
			if lo < int(r[0]) || lo+n-1 > int(r[1]) || lo%n != 0 {
				t.Errorf("%v: prefix %v outside or unaligned", r, p)
			}
			covered += n
		}
		if covered != int(r[1])-int(r[0])+1 {
			t.Errorf("%v: covered %d ports", r, covered)
		}
	}
}
