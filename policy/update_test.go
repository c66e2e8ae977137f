package policy

import (
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// The upstream e2e scenarios that change objects under a policy, applied
// through the incremental API.
func TestNetworkPolicyE2EUpdates(t *testing.T) {
	fromNS := func(kv ...string) *networkingv1.NetworkPolicy {
		return np("x", "p", matchLabels("pod", "a"), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: matchLabels(kv...)}}}}
		})
	}
	t.Run("should enforce updated policy", func(t *testing.T) {
		in := e2eInput()
		in.NetworkPolicies = []*networkingv1.NetworkPolicy{np("x", "p", &metav1.LabelSelector{}, func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{npPortOf(corev1.ProtocolTCP, 81)}}}
		})}
		c := mustCompile(t, in)
		checkReach(t, c, tcp81, newReach(true))
		checkReach(t, c, tcp80, newReach(true).set("*/*", "x/*", false))
		c.UpsertNetworkPolicy(np("x", "p", &metav1.LabelSelector{}, func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{npPortOf(corev1.ProtocolTCP, 80)}}}
		}))
		checkReach(t, c, tcp80, newReach(true))
		checkReach(t, c, tcp81, newReach(true).set("*/*", "x/*", false))
	})
	t.Run("should allow ingress access from updated namespace", func(t *testing.T) {
		in := e2eInput()
		in.NetworkPolicies = []*networkingv1.NetworkPolicy{fromNS("ns2", "updated")}
		c := mustCompile(t, in)
		checkReach(t, c, tcp80, newReach(true).set("*/*", "x/a", false))
		c.UpsertNamespace(testNamespace("y", "ns", "y", "ns2", "updated"))
		checkReach(t, c, tcp80, newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true))
		c.UpsertNamespace(testNamespace("y", "ns", "y"))
		checkReach(t, c, tcp80, newReach(true).set("*/*", "x/a", false))
	})
	t.Run("should allow ingress access from updated pod", func(t *testing.T) {
		in := e2eInput()
		in.NetworkPolicies = []*networkingv1.NetworkPolicy{np("x", "p", matchLabels("pod", "a"), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: matchLabels("pod", "b", "pod2", "updated")}}}}
		})}
		c := mustCompile(t, in)
		checkReach(t, c, tcp80, newReach(true).set("*/*", "x/a", false))
		xb := in.Pods[1].DeepCopy()
		xb.Labels = map[string]string{"pod": "b", "pod2": "updated"}
		c.UpsertPod(xb)
		checkReach(t, c, tcp80, newReach(true).set("*/*", "x/a", false).set("x/b", "x/a", true))
	})
	t.Run("should deny ingress access to updated pod", func(t *testing.T) {
		in := e2eInput()
		in.NetworkPolicies = []*networkingv1.NetworkPolicy{np("x", "p", matchLabels("target", "isolated"), nil)}
		c := mustCompile(t, in)
		checkReach(t, c, tcp80, newReach(true))
		xa := in.Pods[0].DeepCopy()
		xa.Labels = map[string]string{"pod": "a", "target": "isolated"}
		c.UpsertPod(xa)
		checkReach(t, c, tcp80, newReach(true).set("*/*", "x/a", false))
	})
	t.Run("should stop enforcing policies after they are deleted", func(t *testing.T) {
		in := e2eInput()
		in.NetworkPolicies = []*networkingv1.NetworkPolicy{np("x", "deny-all", &metav1.LabelSelector{}, func(s *networkingv1.NetworkPolicySpec) {
			s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
		})}
		c := mustCompile(t, in)
		checkReach(t, c, tcp80, newReach(true).set("*/*", "x/*", false).set("x/*", "*/*", false))
		c.DeleteNetworkPolicy("x", "deny-all")
		checkReach(t, c, tcp80, newReach(true))
	})
	t.Run("a deleted peer pod disappears from entries", func(t *testing.T) {
		in := e2eInput()
		in.NetworkPolicies = []*networkingv1.NetworkPolicy{np("x", "p", matchLabels("pod", "a"), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{}, PodSelector: matchLabels("pod", "c")}}}}
		})}
		c := mustCompile(t, in)
		podEntries := func() int {
			ep, _ := c.Endpoint(EndpointID{"x", "a"})
			n := 0
			for _, e := range ep.Entries {
				if e.Identity >= identity.MinPod {
					n++
				}
			}
			return n
		}
		if n := podEntries(); n != 3 {
			t.Fatalf("%d pod entries; want one per pod=c identity", n)
		}
		c.DeletePod("y", "c")
		if n := podEntries(); n != 2 {
			t.Fatalf("%d pod entries after deleting y/c; want 2", n)
		}
	})
}

// Readers (Trace, Endpoints) may run while informer events are applied;
// run with -race.
func TestConcurrentReadsAndUpdates(t *testing.T) {
	in := e2eInput()
	in.NetworkPolicies = []*networkingv1.NetworkPolicy{np("x", "p", &metav1.LabelSelector{}, func(s *networkingv1.NetworkPolicySpec) {
		s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: matchLabels("ns", "y")}}}}
	})}
	c := mustCompile(t, in)
	var wg sync.WaitGroup
	for r := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				c.Trace(PodPeer("y", e2ePods[(i+r)%3]), PodPeer("x", e2ePods[i%3]), policytypes.ProtoTCP, 80)
				c.Endpoints()
				c.IPCache()
			}
		}()
	}
	for i := range 200 {
		p := in.Pods[3].DeepCopy()
		p.Labels = map[string]string{"pod": "a", "v": e2ePods[i%3]}
		c.UpsertPod(p)
	}
	wg.Wait()
}
