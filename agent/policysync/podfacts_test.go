package policysync

import (
	"net/netip"
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/veilmesh/veil/agent/endpoints"
	"github.com/veilmesh/veil/agent/k8s"
	"github.com/veilmesh/veil/policy"
)

// The compiler learns the same from a cached pod read directly
// (podFacts) as from the corev1.Pod it stands for, with the local address
// filled in (withLocalIP): identities, endpoints, addresses, named ports.
func TestPodFactsMatchTheCorePod(t *testing.T) {
	pods := []*k8s.PodInfo{
		k8s.NewPodInfo(k8s.PodFields{Namespace: "x", Name: "remote", NodeName: "n1", Labels: map[string]string{"app": "a"}, Phase: corev1.PodRunning, PodIP: "10.244.1.2",
			Ports: []k8s.NamedPort{{Container: "c", Name: "http", Port: 8080, Protocol: corev1.ProtocolTCP}, {Container: "d", Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}, {Container: "d", Name: "bad", Port: 70000}}}),
		k8s.NewPodInfo(k8s.PodFields{Namespace: "x", Name: "dual", NodeName: "n1", Labels: map[string]string{"app": "b"}, Phase: corev1.PodRunning, PodIP: "10.244.1.3", PodIPs: []string{"10.244.1.3", "fd00::3"}}),
		k8s.NewPodInfo(k8s.PodFields{Namespace: "x", Name: "local-new", NodeName: "self", Labels: map[string]string{"app": "a"}, Phase: corev1.PodPending}),
		k8s.NewPodInfo(k8s.PodFields{Namespace: "x", Name: "local-unknown", NodeName: "self", Labels: map[string]string{"app": "a"}, Phase: corev1.PodPending}),
		k8s.NewPodInfo(k8s.PodFields{Namespace: "x", Name: "local", NodeName: "self", Labels: map[string]string{"app": "c"}, Phase: corev1.PodRunning, PodIP: "10.244.0.9", ServiceAccount: "sa",
			Ports: []k8s.NamedPort{{Container: "c", Name: "sctp", Port: 9, Protocol: corev1.ProtocolSCTP}}}),
		k8s.NewPodInfo(k8s.PodFields{Namespace: "x", Name: "host", NodeName: "self", HostNetwork: true, Phase: corev1.PodRunning, PodIP: "10.99.0.1"}),
		k8s.NewPodInfo(k8s.PodFields{Namespace: "x", Name: "done", NodeName: "n1", Phase: corev1.PodSucceeded, PodIP: "10.244.1.4"}),
		k8s.NewPodInfo(k8s.PodFields{Namespace: "x", Name: "failed", NodeName: "n1", Phase: corev1.PodFailed, PodIP: "10.244.1.5"}),
	}
	for _, node := range []string{"", "self"} {
		d := testSyncer(t, "self", "10.99.0.1")
		d.cfg.Endpoints.Restore([]*endpoints.Endpoint{{
			Pod: policy.EndpointID{Namespace: "x", Name: "local-new"}, ContainerID: "c1", ID: 1, IP: netip.MustParseAddr("10.244.0.5"),
			HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:00:02",
		}})
		viaCore, err := policy.New(policy.Options{Node: node})
		if err != nil {
			t.Fatal(err)
		}
		viaFacts, err := policy.New(policy.Options{Node: node})
		if err != nil {
			t.Fatal(err)
		}
		// Named ports on both sides: the local pod's own (ingress) and its
		// peers' (egress).
		np := &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "named"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{},
				Ingress:     []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: ptr.To(intstr.FromString("sctp")), Protocol: ptr.To(corev1.ProtocolSCTP)}}}},
				Egress:      []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: ptr.To(intstr.FromString("http"))}}}},
			},
		}
		viaCore.UpsertNetworkPolicy(np)
		viaFacts.UpsertNetworkPolicy(np)
		for _, p := range pods {
			a := viaCore.UpsertPod(d.withLocalIP(p.Object()))
			b := viaFacts.UpsertPodFacts(d.podFacts(p))
			if !reflect.DeepEqual(a, b) {
				t.Errorf("node %q, pod %s: changes %+v from the corev1.Pod, %+v from the facts", node, p.Name(), a, b)
			}
		}
		if a, b := viaCore.Endpoints(), viaFacts.Endpoints(); !reflect.DeepEqual(a, b) {
			t.Errorf("node %q: endpoints\n%+v from corev1.Pods\n%+v from facts", node, a, b)
		}
		if a, b := viaCore.IPCache(), viaFacts.IPCache(); !reflect.DeepEqual(a, b) {
			t.Errorf("node %q: ipcache\n%+v from corev1.Pods\n%+v from facts", node, a, b)
		}
		if a, b := viaCore.Identities(), viaFacts.Identities(); !reflect.DeepEqual(a, b) {
			t.Errorf("node %q: identities\n%+v from corev1.Pods\n%+v from facts", node, a, b)
		}
		entries := 0
		for _, ep := range viaFacts.Endpoints() {
			entries += len(ep.Entries)
		}
		if entries == 0 {
			t.Errorf("node %q: no endpoint has entries: the named ports were not compiled", node)
		}
		if len(viaFacts.IPCache()) < 4 {
			t.Errorf("node %q: only %d ipcache entries: the pods were not compiled", node, len(viaFacts.IPCache()))
		}
	}
}
