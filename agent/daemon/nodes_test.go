package daemon

import (
	"log/slog"
	"net/netip"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/agent/config"
	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/wireguard"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
)

// testNode is a Node as kubelet and the node's agent leave it.
func testNode(t *testing.T, name string, created int64, podCIDR, endpoint string, internalIPs ...string) *corev1.Node {
	t.Helper()
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, CreationTimestamp: metav1.Unix(created, 0)},
		Spec:       corev1.NodeSpec{PodCIDR: podCIDR, PodCIDRs: []string{podCIDR}},
	}
	for _, ip := range internalIPs {
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip})
	}
	if endpoint != "" {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		n.Annotations = wireguard.Annotations(k.PublicKey(), netip.MustParseAddrPort(endpoint), []netip.Prefix{netip.MustParsePrefix(podCIDR)})
	}
	return n
}

func testDaemon(t *testing.T, self string, selfIP string) *Daemon {
	t.Helper()
	c, err := policy.New(policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.NodeName = self
	return &Daemon{cfg: cfg, log: slog.New(slog.DiscardHandler), compiler: c, nodeIP: netip.MustParseAddr(selfIP),
		ipcache: map[netip.Prefix]datapath.IPCacheEntry{}, clusterCIDRs: []netip.Prefix{netip.MustParsePrefix(cfg.ClusterCIDR)}}
}

// A node whose agent runs with --node-ip on its second InternalIP: the
// ipcache must flag its pods as behind the tunnel the peer list built, and
// forward toward the address the tunnel uses.
func TestTunnelFlagWithSeveralInternalIPsAndExplicitEndpoint(t *testing.T) {
	d := testDaemon(t, "self", "10.99.0.1")
	nodes := []*corev1.Node{
		testNode(t, "self", 1, "10.244.0.0/24", "10.99.0.1:51871", "10.99.0.1"),
		testNode(t, "n1", 2, "10.244.1.0/24", "10.98.0.2:51871", "10.99.0.2", "10.98.0.2"),
	}
	for _, n := range nodes {
		d.compiler.UpsertNode(n)
	}
	d.compiler.UpsertPod(&corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "a"},
		Spec:       corev1.PodSpec{NodeName: "n1"},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.244.1.5", PodIPs: []corev1.PodIP{{IP: "10.244.1.5"}}},
	})
	peers, errs := wireguard.PeersFromNodes(d.resolveNodes(nodes), "self", false)
	if len(errs) != 0 || len(peers) != 1 {
		t.Fatalf("peers %v, errors %v", peers, errs)
	}
	d.recordTunnels(peers)
	want := d.wantIPCache(nodes)

	endpoint := netip.MustParseAddr("10.98.0.2")
	for _, p := range []string{"10.244.1.0/24", "10.244.1.5/32"} {
		e, ok := want[netip.MustParsePrefix(p)]
		if !ok {
			t.Errorf("ipcache has no entry for %s: %v", p, want)
			continue
		}
		if e.Kind&datapath.Tunnel == 0 {
			t.Errorf("ipcache %s = %+v: not flagged as tunnelled, though n1 is a peer", p, e)
		}
		if e.NodeIP != endpoint {
			t.Errorf("ipcache %s forwards to %s, want the tunnel endpoint %s", p, e.NodeIP, endpoint)
		}
	}
	for _, ip := range []string{"10.99.0.2/32", "10.98.0.2/32"} {
		if e := want[netip.MustParsePrefix(ip)]; e.Identity != identity.RemoteNode {
			t.Errorf("ipcache %s = %+v, want remote-node", ip, e)
		}
	}
}
