package policysync

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/wait"
	kubeinformers "k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/wireguard"
	"github.com/veilmesh/veil/api/annotations"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/tests/testenv"
)

// TestPrivilegedForgedNodeClaims runs the agent's Node handling against a
// real API server: Nodes that join after the victim and claim its pod CIDR,
// its key, this node's address, or ranges outside the cluster CIDR change
// nothing for the victim's peer or the ipcache, and each is reported as a
// Warning Event on the claiming Node that names the owner. The agent
// publishes its own annotations and puts them back when someone edits them.
func TestPrivilegedForgedNodeClaims(t *testing.T) {
	testenv.RequirePrivileged(t)
	cp := controlplane.StartForTest(t, controlplane.Options{SkipCRDs: true})
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()

	kube, err := kubernetes.NewForConfig(cp.Config)
	if err != nil {
		t.Fatal(err)
	}
	// Events reach the API server as the agent's do.
	broadcaster := record.NewBroadcaster()
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: kube.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	d := testSyncer(t, "self", "10.99.0.1")
	d.cfg.Kube = kube
	d.cfg.Events = broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "veil-agent", Host: "self"})
	keys := map[string]wgtypes.Key{}
	for _, n := range []string{"self", "victim", "mallory"} {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		keys[n] = k.PublicKey()
	}
	mk := func(name, podCIDR string, ann map[string]string, ips ...string) {
		t.Helper()
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann}, Spec: corev1.NodeSpec{PodCIDR: podCIDR, PodCIDRs: []string{podCIDR}}}
		n, err := d.cfg.Kube.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create node %s: %v", name, err)
		}
		for _, ip := range ips {
			n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip})
		}
		if _, err := d.cfg.Kube.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
			t.Fatalf("node %s status: %v", name, err)
		}
	}
	publish := func(node, ep string) map[string]string {
		return wireguard.Annotations(keys[node], netip.MustParseAddrPort(ep), nil)
	}
	mk("self", "10.244.0.0/24", nil, "10.99.0.1")
	mk("victim", "10.244.1.0/24", publish("victim", "10.99.0.2:51871"), "10.99.0.2")
	// Ownership goes by creation time, which the API server keeps in seconds.
	time.Sleep(1100 * time.Millisecond)
	mk("mallory-cidr", "10.244.1.0/24", publish("mallory", "10.99.0.3:51871"), "10.99.0.3")
	mk("mallory-outside", "192.168.7.0/24", wireguard.Annotations(keys["mallory"], netip.MustParseAddrPort("10.99.0.4:51871"), nil), "10.99.0.4")
	mk("mallory-self-ip", "10.99.0.1/32", publish("victim", "10.99.0.5:51871"), "10.99.0.5", "10.99.0.1")

	factory := kubeinformers.NewSharedInformerFactory(d.cfg.Kube, 0)
	d.cfg.Listers.Nodes = factory.Core().V1().Nodes().Lister()
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	enc := testEncryption(t, d, false)
	d.cfg.Encryption = enc
	if keys["self"], err = wgtypes.ParseKey(enc.Annotations()[annotations.WireGuardPublicKey]); err != nil {
		t.Fatal(err)
	}
	self, err := d.cfg.Kube.CoreV1().Nodes().Get(ctx, "self", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.syncNodes(ctx, self.Name, self); err != nil {
		t.Fatal(err)
	}

	nodes, err := d.cfg.Listers.Nodes.List(labels.Everything())
	if err != nil {
		t.Fatal(err)
	}
	peers, _ := wireguard.PeersFromNodes(d.resolveNodes(nodes), "self", false)
	if err := enc.SyncPeers(ctx, d.resolveNodes(nodes)); err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(peers, func(p wireguard.Peer) bool { return p.Node == "victim" })
	if i < 0 || peers[i].PublicKey != keys["victim"] || !slices.Equal(peers[i].AllowedIPs, []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}) {
		t.Fatalf("victim's peer changed: %+v", peers)
	}
	for _, p := range peers {
		if p.Node != "victim" && p.PublicKey == keys["victim"] {
			t.Errorf("%s peered with the victim's key", p.Node)
		}
		for _, a := range p.AllowedIPs {
			if p.Node != "victim" && (a.Overlaps(netip.MustParsePrefix("10.244.1.0/24")) || a.Contains(netip.MustParseAddr("10.99.0.1")) || !netip.MustParsePrefix("10.244.0.0/16").Contains(a.Addr())) {
				t.Errorf("%s got allowed IP %s", p.Node, a)
			}
		}
	}
	want := d.wantIPCache(d.resolveNodes(nodes))
	if e := want[netip.MustParsePrefix("10.244.1.0/24")]; e.NodeIP != netip.MustParseAddr("10.99.0.2") || e.Kind&datapath.Tunnel == 0 {
		t.Errorf("ipcache for the victim's pod CIDR: %+v; want the victim's, tunnelled", e)
	}
	if e := want[netip.MustParsePrefix("10.99.0.1/32")]; e.NodeIP != netip.MustParseAddr("10.99.0.1") {
		t.Errorf("ipcache for this node's address: %+v; want this node's", e)
	}

	fp := nodeinfo.Fingerprint(keys["victim"])
	wantEvents := map[string]string{
		"mallory-cidr":    "node mallory-cidr claims pod CIDR 10.244.1.0/24, held by node victim",
		"mallory-outside": "node mallory-outside claims pod CIDR 192.168.7.0/24 outside the cluster CIDR",
		"mallory-self-ip": "node mallory-self-ip claims address 10.99.0.1, held by node self",
	}
	wantKey := "node mallory-self-ip claims public key " + fp + ", held by node victim"
	var seen []string
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		evs, err := d.cfg.Kube.CoreV1().Events("default").List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		seen = seen[:0]
		for _, e := range evs.Items {
			if e.Reason == reasonClaimRefused && e.Type == corev1.EventTypeWarning && e.InvolvedObject.Kind == "Node" {
				seen = append(seen, e.InvolvedObject.Name+": "+e.Message)
			}
		}
		for node, msg := range wantEvents {
			if !slices.Contains(seen, node+": "+msg) {
				return false, nil
			}
		}
		return slices.Contains(seen, "mallory-self-ip: "+wantKey), nil
	}); err != nil {
		t.Errorf("claim events on the API server: %q; want %v and %q", seen, wantEvents, wantKey)
	}

	// This node's annotations were published; edited by someone else, they
	// come back.
	got, err := d.cfg.Kube.CoreV1().Nodes().Get(ctx, "self", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.Annotations[annotations.WireGuardPublicKey] != keys["self"].String() {
		t.Fatalf("self's annotations %v; want its key published", got.Annotations)
	}
	got.Annotations[annotations.WireGuardPublicKey] = keys["mallory"].String()
	got.Annotations[annotations.WireGuardEndpoint] = "10.99.0.3:51871"
	if got, err = d.cfg.Kube.CoreV1().Nodes().Update(ctx, got, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := d.syncNodes(ctx, got.Name, got); err != nil {
		t.Fatal(err)
	}
	got, err = d.cfg.Kube.CoreV1().Nodes().Get(ctx, "self", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range enc.Annotations() {
		if got.Annotations[k] != v {
			t.Errorf("after re-assertion %s = %q; want %q", k, got.Annotations[k], v)
		}
	}
	if !strings.HasPrefix(got.Annotations[annotations.WireGuardEndpoint], "10.99.0.1:") {
		t.Errorf("endpoint %q; want this node's address", got.Annotations[annotations.WireGuardEndpoint])
	}
}
