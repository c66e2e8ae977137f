package policysync

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubefake "k8s.io/client-go/kubernetes/fake"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/veilmesh/veil/agent/config"
	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/encryption"
	"github.com/veilmesh/veil/agent/endpoints"
	"github.com/veilmesh/veil/agent/wireguard"
	"github.com/veilmesh/veil/api/annotations"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
)

// agentNode is a Node as kubelet and the node's agent leave it.
func agentNode(t *testing.T, name string, created int64, podCIDR, endpoint string, internalIPs ...string) *corev1.Node {
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

func testSyncer(t *testing.T, self string, selfIP string) *Syncer {
	t.Helper()
	c, err := policy.New(policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	d := New(Config{
		NodeName: self, NodeIP: netip.MustParseAddr(selfIP), ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix(config.Default().ClusterCIDR)},
		Compiler: c, Endpoints: endpoints.New(endpoints.Config{StateDir: t.TempDir()}),
		Events: record.NewFakeRecorder(16), Degraded: &fakeDegraded{},
	})
	d.cfg.Encryption = testEncryption(t, d, false)
	return d
}

type fakeDegraded map[string]string

func (f *fakeDegraded) Set(component, reason string) {
	if *f == nil {
		*f = map[string]string{}
	}
	(*f)[component] = reason
}
func (f *fakeDegraded) Clear(component string) { delete(*f, component) }

// A node whose agent runs with --node-ip on its second InternalIP: the
// ipcache must flag its pods as behind the tunnel the peer list built, and
// forward toward the address the tunnel uses.
func TestTunnelFlagWithSeveralInternalIPsAndExplicitEndpoint(t *testing.T) {
	d := testSyncer(t, "self", "10.99.0.1")
	nodes := []*corev1.Node{
		agentNode(t, "self", 1, "10.244.0.0/24", "10.99.0.1:51871", "10.99.0.1"),
		agentNode(t, "n1", 2, "10.244.1.0/24", "10.98.0.2:51871", "10.99.0.2", "10.98.0.2"),
	}
	for _, n := range nodes {
		d.cfg.Compiler.UpsertNode(n)
	}
	d.cfg.Compiler.UpsertPod(&corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "a"},
		Spec:       corev1.PodSpec{NodeName: "n1"},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.244.1.5", PodIPs: []corev1.PodIP{{IP: "10.244.1.5"}}},
	})
	if err := d.cfg.Encryption.SyncPeers(t.Context(), d.resolveNodes(nodes)); err != nil {
		t.Fatal(err)
	}
	if !d.cfg.Encryption.Tunnelled("n1") {
		t.Fatal("n1 is not a peer")
	}
	want := d.wantIPCache(d.resolveNodes(nodes))

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

// nodeLister serves nodes the way the informer's lister does.
func nodeLister(t *testing.T, nodes ...*corev1.Node) corelisters.NodeLister {
	t.Helper()
	idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	for _, n := range nodes {
		if err := idx.Add(n); err != nil {
			t.Fatal(err)
		}
	}
	return corelisters.NewNodeLister(idx)
}

// A node that claims another node's pod CIDR, this node's address, a range
// outside the cluster CIDR or another node's key is reported three ways: a
// Warning Event on the claiming Node that names the owner, the
// veil_node_claim_conflicts metric, and (once per conflict) a log line.
func TestClaimConflictsAreReported(t *testing.T) {
	d := testSyncer(t, "self", "10.99.0.1")
	self := agentNode(t, "self", 1, "10.244.0.0/24", "10.99.0.1:51871", "10.99.0.1")
	victim := agentNode(t, "victim", 2, "10.244.1.0/24", "10.99.0.2:51871", "10.99.0.2")
	mallory := agentNode(t, "mallory", 3, "10.244.1.0/24", "10.99.0.3:51871", "10.99.0.3", "10.99.0.1")
	mallory.Spec.PodCIDRs = append(mallory.Spec.PodCIDRs, "192.168.7.0/24")
	mallory.Annotations[annotations.WireGuardPublicKey] = victim.Annotations[annotations.WireGuardPublicKey]
	d.cfg.Listers.Nodes = nodeLister(t, self, victim, mallory)
	rec := record.NewFakeRecorder(16)
	d.cfg.Events = rec
	d.cfg.Kube = kubefake.NewClientset(self, victim, mallory)

	for range 2 { // the second sync reports nothing new
		if err := d.syncNodes(t.Context(), victim.Name, victim); err != nil {
			t.Fatal(err)
		}
	}
	var events []string
	for len(rec.Events) > 0 {
		events = append(events, <-rec.Events)
	}
	for _, want := range []string{
		"Warning VeilClaimRefused node mallory claims pod CIDR 10.244.1.0/24, held by node victim",
		"Warning VeilClaimRefused node mallory claims pod CIDR 192.168.7.0/24 outside the cluster CIDR",
		"Warning VeilClaimRefused node mallory claims address 10.99.0.1, held by node self",
		"Warning VeilClaimRefused node mallory claims public key " + nodeinfo.KeyFingerprint(victim.Annotations[annotations.WireGuardPublicKey]) + ", held by node victim",
	} {
		if !slices.Contains(events, want) {
			t.Errorf("no event %q in %q", want, events)
		}
	}
	if len(events) != 4 {
		t.Errorf("%d events, want 4 (each conflict once): %q", len(events), events)
	}

	var got []string
	for _, c := range d.Conflicts() {
		got = append(got, c.Node+" "+c.Kind+" "+c.Owner)
	}
	slices.Sort(got)
	want := []string{"mallory address self", "mallory pod CIDR ", "mallory pod CIDR victim", "mallory public key victim"}
	if !slices.Equal(got, want) {
		t.Errorf("veil_node_claim_conflicts series %q; want %q", got, want)
	}

	// A kubelet heartbeat changes nothing Veil reads: no new resolution.
	beat := victim.DeepCopy()
	beat.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
	if !d.claimsUnchanged(beat.Name, beat) {
		t.Error("a status condition change counts as a change of claims")
	}
	moved := victim.DeepCopy()
	moved.Status.Addresses = append(moved.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: "10.98.0.2"})
	if d.claimsUnchanged(moved.Name, moved) {
		t.Error("a new InternalIP does not count as a change of claims")
	}

	// The claims are gone with their node: so are the series.
	d.cfg.Listers.Nodes = nodeLister(t, self, victim)
	if err := d.syncNodes(t.Context(), mallory.Name, nil); err != nil {
		t.Fatal(err)
	}
	if n := len(d.Conflicts()); n != 0 {
		t.Errorf("%d conflicts after the conflicts ended", n)
	}
}

// Issue 10, item 7: every address of this node is the host, so a kubelet
// probe from a second address is not judged as the world.
func TestOwnAddressesAreHost(t *testing.T) {
	d := testSyncer(t, "self", "10.99.0.1")
	nodes := []*corev1.Node{agentNode(t, "self", 1, "10.244.0.0/24", "10.99.0.1:51871", "10.99.0.1", "172.16.0.1")}
	want := d.wantIPCache(d.resolveNodes(nodes))
	for _, ip := range []string{"10.99.0.1/32", "172.16.0.1/32"} {
		if e := want[netip.MustParsePrefix(ip)]; e.Identity != identity.Host {
			t.Errorf("ipcache %s = %+v, want host", ip, e)
		}
	}
}

// Issue 11 and 14: a pod's traffic to another node's address goes through
// the tunnel, and so does the node's own traffic to another node's pods
// (kube-proxy's forwarded leg), which the peer accepts only when the node's
// address is among its allowed IPs: a peer's own addresses are among its
// allowed IPs and marked tunnelled in the ipcache, in strict and in
// permissive mode alike.
func TestPeerNodeAddressesAreTunnelled(t *testing.T) {
	for _, strict := range []bool{false, true} {
		d := testSyncer(t, "self", "10.99.0.1")
		d.cfg.Encryption = testEncryption(t, d, strict)
		nodes := []*corev1.Node{
			agentNode(t, "self", 1, "10.244.0.0/24", "10.99.0.1:51871", "10.99.0.1"),
			agentNode(t, "n1", 2, "10.244.1.0/24", "10.99.0.2:51871", "10.99.0.2"),
		}
		c := d.resolveNodes(nodes)
		peers, errs := wireguard.PeersFromNodes(c, "self", true)
		if len(errs) != 0 || len(peers) != 1 {
			t.Fatalf("peers %v, errors %v", peers, errs)
		}
		if err := d.cfg.Encryption.SyncPeers(t.Context(), c); err != nil {
			t.Fatal(err)
		}
		hasNode := slices.Contains(peers[0].AllowedIPs, netip.MustParsePrefix("10.99.0.2/32"))
		tunnelled := d.wantIPCache(c)[netip.MustParsePrefix("10.99.0.2/32")].Kind&datapath.Tunnel != 0
		if !hasNode || !tunnelled {
			t.Errorf("strict=%v: node address in allowed IPs %v, tunnelled in the ipcache %v; want both true", strict, hasNode, tunnelled)
		}
	}
}

// testEncryption is encryption over a device that only remembers its
// peers, for d's node.
func testEncryption(t *testing.T, d *Syncer, strict bool) *encryption.Manager {
	t.Helper()
	k, err := wireguard.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return encryption.New(encryption.Config{
		NodeName: d.cfg.NodeName, NodeIP: d.cfg.NodeIP, Port: 51871, StrictMode: strict, Device: &fakeDevice{key: k},
		Kube: d.cfg.Kube, Events: d.cfg.Events, Cluster: d.ResolvedCluster,
		// Never the host's routing tables from a unit test.
		HostRoutes: func(string, map[netip.Prefix]bool) error { return nil },
	})
}

type fakeDevice struct{ key wireguard.Key }

func (f *fakeDevice) Interface() string                                { return "veil-wg-test" }
func (f *fakeDevice) Key() wireguard.Key                               { return f.key }
func (f *fakeDevice) SetPeers(context.Context, []wireguard.Peer) error { return nil }
func (f *fakeDevice) RotateKey(context.Context) (wireguard.Key, error) {
	return f.key, errors.ErrUnsupported
}
func (f *fakeDevice) Status(context.Context) (wireguard.Status, error) {
	return wireguard.Status{}, errors.ErrUnsupported
}
