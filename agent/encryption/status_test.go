package encryption

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/wireguard"
	veilfake "github.com/veilmesh/veil/api/client/clientset/versioned/fake"
	"github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/api/nodeinfo"
)

// statusDevice is a WireGuard device with a fixed status.
type statusDevice struct {
	*fakeDevice
	status wireguard.Status
}

func (d *statusDevice) Status(context.Context) (wireguard.Status, error) { return d.status, nil }

// quietDatapath reports no guard, leak or counter.
type quietDatapath struct{}

func (quietDatapath) GuardedDevices() ([]string, error)    { return []string{"eth0"}, nil }
func (quietDatapath) UnguardedDevices() ([]string, error)  { return nil, nil }
func (quietDatapath) Leaks() ([]datapath.Leak, error)      { return nil, nil }
func (quietDatapath) Counters() (datapath.Counters, error) { return datapath.Counters{}, nil }

// The MeshNode lists only the unhealthy peers (no handshake, a stale one,
// a key of no node, a node not configured), counts the healthy ones and
// digests their view as the nodes publish it.
func TestMeshNodeStatusListsOnlyUnhealthyPeers(t *testing.T) {
	var nodes []nodeinfo.Node
	for i := 1; i <= 5; i++ {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, nodeinfo.Node{
			Name: fmt.Sprintf("n%d", i), PublicKey: k.PublicKey(),
			Endpoint: netip.MustParseAddrPort(fmt.Sprintf("10.99.0.%d:51871", i)),
			PodCIDRs: []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i))},
		})
	}
	c := nodeinfo.Cluster{Nodes: nodes}
	now := time.Now()
	peer := func(i int, hs time.Time) wireguard.PeerStatus {
		n := nodes[i-1]
		return wireguard.PeerStatus{PublicKey: wgtypes.Key(n.PublicKey).String(), Endpoint: n.Endpoint, AllowedIPs: n.PodCIDRs, LastHandshake: hs}
	}
	stranger, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	dev := &statusDevice{fakeDevice: newFakeDevice(t), status: wireguard.Status{Mode: wireguard.ModeUserspace, Peers: []wireguard.PeerStatus{
		peer(2, now.Add(-10*time.Second)), peer(3, time.Time{}), peer(4, now.Add(-10*time.Minute)),
		{PublicKey: stranger.PublicKey().String(), Endpoint: netip.MustParseAddrPort("10.99.9.9:51871"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.244.9.0/24")}},
	}}}
	veil := veilfake.NewSimpleClientset()
	m := New(Config{NodeName: "n1", NodeIP: netip.MustParseAddr("10.99.0.1"), Device: dev, Datapath: quietDatapath{}, Veil: veil,
		Cluster: func() nodeinfo.Cluster { return c }})
	if err := m.writeMeshNode(t.Context()); err != nil {
		t.Fatal(err)
	}
	mn, err := veil.MeshV1alpha1().MeshNodes().Get(t.Context(), "n1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := mn.Status.Encryption
	want := map[string]string{"n3": v1alpha1.ProblemNoHandshake, "n4": "last handshake 10m0s ago", "n5": v1alpha1.ProblemNotConfigured, "10.99.9.9": v1alpha1.ProblemUnknownKey}
	got := map[string]string{}
	for _, p := range e.Peers {
		got[p.Node] = p.Problem
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("listed peers %v; want %v", got, want)
	}
	s := e.PeerSummary
	if s == nil || e.PeerCount != 4 || s.Expected != 4 || s.Healthy != 1 || s.Handshaking != 1 || s.Stale != 1 || s.Unknown != 1 || s.Missing != 1 {
		t.Fatalf("peer count %d, summary %+v", e.PeerCount, s)
	}
	var d v1alpha1.PeerDigest
	d.AddPeer("n2", wgtypes.Key(nodes[1].PublicKey).String(), nodes[1].Endpoint.String(), []string{nodes[1].PodCIDRs[0].String()})
	if s.Digest != d.String() {
		t.Errorf("digest %s; want n2's view as n2 publishes it, %s", s.Digest, d)
	}
}
