package encryption

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kubefake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/record"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/veilmesh/veil/agent/wireguard"
	"github.com/veilmesh/veil/api/annotations"
	veilfake "github.com/veilmesh/veil/api/client/clientset/versioned/fake"
	"github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/api/nodeinfo"
)

// The MeshNode status is written shortly after start, retried when a write
// fails, and written again shortly after a change is announced, not on the
// next 15 s tick.
func TestMeshNodeStatusFollowsChanges(t *testing.T) {
	veil := veilfake.NewSimpleClientset()
	var updates, failures atomic.Int32
	veil.PrependReactor("update", "meshnodes", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetSubresource() != "status" {
			return false, nil, nil
		}
		if failures.Add(1) == 1 {
			return true, nil, errors.New("API server away")
		}
		updates.Add(1)
		return false, nil, nil
	})
	m := New(Config{NodeName: "self", NodeIP: netip.MustParseAddr("10.99.0.1"), Veil: veil})
	ctx := t.Context()
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	// t.Context is cancelled before cleanups run.
	t.Cleanup(func() { <-done })

	waitFor := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitFor("the status after a failed write", func() bool { return updates.Load() == 1 })
	mn, err := veil.MeshV1alpha1().MeshNodes().Get(ctx, "self", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if mn.Status.NodeIP != "10.99.0.1" || mn.Status.Encryption.Mode != v1alpha1.EncryptionModeDisabled {
		t.Fatalf("status = %+v", mn.Status)
	}
	m.statusChangedNow()
	waitFor("the status after a change", func() bool { return updates.Load() == 2 })
}

// fakeDevice is a WireGuard device that only remembers its peers.
type fakeDevice struct {
	key   wireguard.Key
	peers []wireguard.Peer
}

func newFakeDevice(t *testing.T) *fakeDevice {
	t.Helper()
	k, err := wireguard.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return &fakeDevice{key: k}
}

func (f *fakeDevice) Interface() string  { return "veil-wg-test" }
func (f *fakeDevice) Key() wireguard.Key { return f.key }
func (f *fakeDevice) SetPeers(_ context.Context, peers []wireguard.Peer) error {
	f.peers = peers
	return nil
}
func (f *fakeDevice) RotateKey(context.Context) (wireguard.Key, error) {
	return f.key, errors.New("no rotation in this fake")
}
func (f *fakeDevice) Status(context.Context) (wireguard.Status, error) {
	return wireguard.Status{}, errors.New("no status in this fake")
}

// The agent puts its annotations back when anyone changes them.
func TestOwnAnnotationsAreReasserted(t *testing.T) {
	dev := newFakeDevice(t)
	self := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "self"}}
	kube := kubefake.NewClientset(self)
	events := record.NewFakeRecorder(4)
	m := New(Config{
		NodeName: "self", NodeIP: netip.MustParseAddr("10.99.0.1"), PodCIDR: netip.MustParsePrefix("10.244.0.0/24"),
		Port: 51871, Device: dev, Kube: kube, Events: events,
	})
	self.Annotations = m.Annotations()
	if self.Annotations[annotations.WireGuardPublicKey] != dev.key.PublicKey().String() {
		t.Fatalf("annotations %v do not publish the device's key", self.Annotations)
	}
	if err := m.Reassert(t.Context(), self); err != nil {
		t.Fatal(err)
	}
	if n := len(kube.Actions()); n != 0 {
		t.Fatalf("annotations as published: %d API calls, want none", n)
	}

	forged := self.DeepCopy()
	other, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	forged.Annotations[annotations.WireGuardPublicKey] = other.PublicKey().String()
	delete(forged.Annotations, annotations.WireGuardEndpoint)
	if _, err := kube.CoreV1().Nodes().Update(t.Context(), forged, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := m.Reassert(t.Context(), forged); err != nil {
		t.Fatal(err)
	}
	got, err := kube.CoreV1().Nodes().Get(t.Context(), "self", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range m.Annotations() {
		if got.Annotations[k] != v {
			t.Errorf("after re-assertion %s = %q; want %q", k, got.Annotations[k], v)
		}
	}
	if ev := <-events.Events; !strings.Contains(ev, ReasonAnnotationsReasserted) {
		t.Errorf("event %q; want %s", ev, ReasonAnnotationsReasserted)
	}
}

// With encryption off nothing is published and every peer question has
// the same answer: no tunnel.
func TestOffPublishesNothing(t *testing.T) {
	m := New(Config{NodeName: "self", NodeIP: netip.MustParseAddr("10.99.0.1")})
	if a := m.Annotations(); a != nil {
		t.Errorf("annotations %v with encryption off", a)
	}
	if err := m.SyncPeers(t.Context(), nodeinfo.Cluster{}); err != nil {
		t.Errorf("SyncPeers: %v", err)
	}
	if m.TunnelInterface() != "" || m.Tunnelled("n1") {
		t.Error("a tunnel with encryption off")
	}
	if _, _, err := m.RotateKey(t.Context()); err == nil {
		t.Error("rotated a key with encryption off")
	}
}

func TestHostTunnelPrefixes(t *testing.T) {
	pods2 := netip.MustParsePrefix("10.244.2.0/24")
	node2 := netip.MustParsePrefix("10.99.0.12/32")
	c := nodeinfo.Cluster{Nodes: []nodeinfo.Node{
		{Name: "node-1", PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}},
		{Name: "node-2", PodCIDRs: []netip.Prefix{pods2}, InternalIPs: []netip.Addr{node2.Addr()}},
	}}
	peers := []wireguard.Peer{{Node: "node-2", AllowedIPs: []netip.Prefix{pods2, node2}}}
	for _, tc := range []struct {
		name       string
		nodeToNode bool
		want       []netip.Prefix
	}{
		{"strict or permissive: the peers' pod CIDRs", false, []netip.Prefix{pods2}},
		{"node-to-node: everything the peers hold", true, []netip.Prefix{pods2, node2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := hostTunnelPrefixes(peers, c, tc.nodeToNode)
			if len(got) != len(tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			for _, p := range tc.want {
				if !got[p] {
					t.Errorf("got %v, want %v in it", got, p)
				}
			}
		})
	}
}
