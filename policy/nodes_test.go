package policy

import (
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/policy/identity"
)

// The compiler must name a peer address the way the datapath's ipcache
// does: every InternalIP and the address the node's agent publishes as its
// tunnel endpoint (its --node-ip) are the node; an ExternalIP is not in the
// ipcache, so the datapath sees it as world.
func TestTraceNodeAddressesMatchTheIPCache(t *testing.T) {
	c, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", Annotations: map[string]string{
			"wireguard.veil.dev/public-key": "YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=",
			"wireguard.veil.dev/endpoint":   "10.97.0.2:51871",
		}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: "10.99.0.2"},
			{Type: corev1.NodeInternalIP, Address: "10.98.0.2"},
			{Type: corev1.NodeExternalIP, Address: "203.0.113.2"},
		}},
	}
	c.UpsertNode(n)
	c.UpsertPod(&corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "a"},
		Spec:       corev1.PodSpec{NodeName: "n2"},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.244.2.5", PodIPs: []corev1.PodIP{{IP: "10.244.2.5"}}},
	})
	for _, tc := range []struct {
		ip   string
		want identity.ID
	}{
		{"10.99.0.2", identity.RemoteNode},
		{"10.98.0.2", identity.RemoteNode},
		{"10.97.0.2", identity.RemoteNode},
		{"203.0.113.2", identity.World},
	} {
		tr, err := c.Trace(IPPeer(netip.MustParseAddr(tc.ip)), PodPeer("x", "a"), 6, 80)
		if err != nil {
			t.Fatal(err)
		}
		if tr.From.Identity != tc.want {
			t.Errorf("trace from %s: identity %v; want %v", tc.ip, tr.From.Identity, tc.want)
		}
	}
}
