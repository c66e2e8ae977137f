package policysync

import (
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/policytypes"
)

// A frontend whose namespace denies all ingress talks to a backend that
// admits it on port 80: the connection is allowed, though its replies,
// judged as a flow of their own, would not be.
func TestRevocationCheckJudgesTheOpenerOnlyWhenTouched(t *testing.T) {
	c, err := policy.New(policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{"front", "back"} {
		c.UpsertNamespace(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"name": ns}}})
	}
	pod := func(ns, name, ip string) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": name}},
			Spec:       corev1.PodSpec{NodeName: "n1"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}},
		}
	}
	c.UpsertPod(pod("front", "web", "10.244.1.2"))
	c.UpsertPod(pod("back", "api", "10.244.1.3"))
	tcp, p80 := corev1.ProtocolTCP, intstr.FromInt32(80)
	c.UpsertNetworkPolicy(&networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "front", Name: "deny-ingress"},
		Spec:       networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}},
	})
	c.UpsertNetworkPolicy(&networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "back", Name: "from-web"},
		Spec: networkingv1.NetworkPolicySpec{
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"name": "front"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &p80}},
			}},
		},
	})

	web, api := netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("10.244.1.3")
	opened := datapath.FlowKey{Src: web, Dst: api, Proto: policytypes.ProtoTCP, DstPort: 80}
	reply := datapath.FlowKey{Src: api, Dst: web, Proto: policytypes.ProtoTCP, DstPort: 40000}
	other := datapath.FlowKey{Src: web, Dst: api, Proto: policytypes.ProtoTCP, DstPort: 81}
	unrelated := []netip.Prefix{netip.MustParsePrefix("10.244.2.9/32"), netip.MustParsePrefix("10.244.3.0/24")}
	for _, tc := range []struct {
		name    string
		changed []netip.Prefix
		all     bool
		key     datapath.FlowKey
		want    bool
	}{
		{"allowed connection, full check", nil, true, opened, false},
		{"allowed connection, its client changed", []netip.Prefix{netip.PrefixFrom(web, 32)}, false, opened, false},
		// What the old check also asked, and why it evicted the pair.
		{"reply direction as a flow of its own", nil, true, reply, true},
		{"denied connection, its server changed", []netip.Prefix{netip.PrefixFrom(api, 32)}, false, other, true},
		{"denied connection, its node's range changed", []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}, false, other, true},
		{"denied connection, only other pods changed", unrelated, false, other, false},
		{"nothing changed", nil, false, other, false},
	} {
		if got := revocationCheck(c, tc.changed, tc.all)(tc.key); got != tc.want {
			t.Errorf("%s: revoked(%+v) = %v; want %v", tc.name, tc.key, got, tc.want)
		}
	}
}
