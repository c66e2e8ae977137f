package encryption

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/veilmesh/veil/agent/wireguard"
	"github.com/veilmesh/veil/api/client/clientset/versioned"
	"github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/tests/testenv"
)

// TestPrivilegedMeshNodeStatusAt5000Nodes: through a real API server (the
// CRD as deploy/ installs it), the agent of one node of a 5,000-node mesh
// writes a MeshNode of a few KB when its peers are healthy, and of at most
// 48 KiB (the API server's managedFields included) with 151 peers not yet
// handshaken: the counts, the digest and 100 of the unhealthy peers. Every
// peer listed was about 1 MB. The API server refuses a status that lists
// more than 100 peers.
func TestPrivilegedMeshNodeStatusAt5000Nodes(t *testing.T) {
	testenv.RequirePrivileged(t)
	cp := controlplane.StartForTest(t, controlplane.Options{})
	veil, err := versioned.NewForConfig(cp.Config)
	if err != nil {
		t.Fatal(err)
	}
	const nodes = 5000
	now := time.Now()
	var (
		cluster []nodeinfo.Node
		peers   []wireguard.PeerStatus
	)
	for i := range nodes {
		var k [32]byte
		k[0], k[1], k[2] = byte(i>>8), byte(i), 1
		n := nodeinfo.Node{
			Name: fmt.Sprintf("node-%04d", i), PublicKey: k,
			Endpoint: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 99, byte(i >> 8), byte(i)}), 51871),
			PodCIDRs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(128 + i>>8), byte(i), 0}), 24)},
		}
		cluster = append(cluster, n)
		if i == 0 {
			continue
		}
		hs := now.Add(-time.Duration(i%100) * time.Second)
		if i%33 == 0 {
			hs = time.Time{} // 151 never handshaken
		}
		peers = append(peers, wireguard.PeerStatus{PublicKey: wgtypes.Key(n.PublicKey).String(), Endpoint: n.Endpoint, AllowedIPs: n.PodCIDRs,
			LastHandshake: hs, RxBytes: 1 << 30, TxBytes: 1 << 30})
	}
	healthy := make([]wireguard.PeerStatus, len(peers))
	for i, p := range peers {
		p.LastHandshake = now.Add(-time.Minute)
		healthy[i] = p
	}
	dev := &statusDevice{fakeDevice: newFakeDevice(t), status: wireguard.Status{Mode: wireguard.ModeUserspace, Interface: "veil-wg", Peers: healthy}}
	m := New(Config{NodeName: "node-0000", NodeIP: netip.MustParseAddr("10.99.0.0"), Device: dev, Datapath: quietDatapath{}, Veil: veil,
		Cluster: func() nodeinfo.Cluster { return nodeinfo.Cluster{Nodes: cluster} }})
	write := func(limit int) *v1alpha1.MeshNode {
		t.Helper()
		if err := m.writeMeshNode(t.Context()); err != nil {
			t.Fatal(err)
		}
		mn, err := veil.MeshV1alpha1().MeshNodes().Get(t.Context(), "node-0000", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		raw, err := json.Marshal(mn)
		if err != nil {
			t.Fatal(err)
		}
		if len(raw) > limit {
			t.Errorf("the MeshNode is %d bytes; want at most %d", len(raw), limit)
		}
		t.Logf("MeshNode of a %d-node mesh, %d peers healthy: %d bytes", nodes, mn.Status.Encryption.PeerSummary.Healthy, len(raw))
		return mn
	}
	if mn := write(4 << 10); len(mn.Status.Encryption.Peers) != 0 || mn.Status.Encryption.PeerSummary.Healthy != nodes-1 {
		t.Errorf("all healthy: %d listed, summary %+v", len(mn.Status.Encryption.Peers), mn.Status.Encryption.PeerSummary)
	}
	dev.status.Peers = peers
	mn := write(48 << 10)
	e := mn.Status.Encryption
	s := e.PeerSummary
	if s == nil || e.PeerCount != nodes-1 || s.Expected != nodes-1 || s.Handshaking != 151 || s.Healthy != nodes-1-151 ||
		len(e.Peers) != v1alpha1.MaxListedPeers || s.Unlisted != 151-v1alpha1.MaxListedPeers {
		t.Fatalf("peer count %d, %d listed, summary %+v", e.PeerCount, len(e.Peers), s)
	}

	mn.Status.Encryption.Peers = append(mn.Status.Encryption.Peers, v1alpha1.PeerStatus{Node: "one-too-many", PublicKey: "x"})
	_, err = veil.MeshV1alpha1().MeshNodes().UpdateStatus(t.Context(), mn, metav1.UpdateOptions{})
	if err == nil || !strings.Contains(err.Error(), "100") {
		t.Errorf("a status listing 101 peers: %v; want refused at 100 items", err)
	}
}
