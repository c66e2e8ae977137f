package wireguard

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/api/annotations"
	"github.com/veilmesh/veil/api/nodeinfo"
)

func pubKey(t *testing.T) wgtypes.Key {
	t.Helper()
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k.PublicKey()
}

// node is a Node created at second created, with the annotations of its
// agent, spec.podCIDRs and InternalIPs.
func node(name string, created int64, ann map[string]string, podCIDRs []string, internalIPs ...string) *corev1.Node {
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann, CreationTimestamp: metav1.Unix(created, 0)},
		Spec:       corev1.NodeSpec{PodCIDRs: podCIDRs},
	}
	for _, ip := range internalIPs {
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip})
	}
	return n
}

func pfx(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

var testClusterCIDRs = pfx("10.244.0.0/16", "fd10:244::/32")

// peersOf is what an agent on self makes of nodes: its peers, and every
// reported problem (malformed nodes, refused claims).
func peersOf(self string, nodes []*corev1.Node, nodeToNode bool) ([]Peer, []error) {
	c := nodeinfo.Resolve(nodes, nodeinfo.Options{Self: self, ClusterCIDRs: testClusterCIDRs})
	peers, errs := PeersFromNodes(c, self, nodeToNode)
	for _, x := range c.Conflicts {
		errs = append(errs, x)
	}
	return peers, append(c.Errors, errs...)
}

// problemNodes lists the node each error is about, sorted.
func problemNodes(t *testing.T, errs []error) []string {
	t.Helper()
	var out []string
	for _, err := range errs {
		var ne *nodeinfo.NodeError
		var c nodeinfo.Conflict
		switch {
		case errors.As(err, &ne):
			if !strings.HasPrefix(err.Error(), "node "+ne.Node+": ") {
				t.Errorf("error %q does not name the node", err)
			}
			out = append(out, ne.Node)
		case errors.As(err, &c):
			out = append(out, c.Node)
		default:
			t.Fatalf("error %v names no node", err)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func TestAnnotationsRoundTrip(t *testing.T) {
	pub := pubKey(t)
	for _, tc := range []struct {
		name  string
		ep    string
		cidrs []string
	}{
		{"ipv4", "10.99.0.2:51820", []string{"10.244.1.0/24"}},
		{"dual stack", "[fd00::2]:51820", []string{"10.244.1.0/24", "fd10:244:1::/64"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ep := netip.MustParseAddrPort(tc.ep)
			ann := Annotations(pub, ep, pfx(tc.cidrs...))
			if len(ann) != 3 {
				t.Fatalf("annotations %v", ann)
			}
			peers, errs := peersOf("self", []*corev1.Node{node("n1", 1, ann, tc.cidrs)}, false)
			if len(errs) != 0 || len(peers) != 1 {
				t.Fatalf("peers %v errs %v", peers, errs)
			}
			p := peers[0]
			if p.Node != "n1" || p.PublicKey != pub || p.Endpoint != ep || !slices.Equal(p.AllowedIPs, pfx(tc.cidrs...)) {
				t.Errorf("round trip: %+v", p)
			}
		})
	}
}

func TestPeersFromNodes(t *testing.T) {
	k1, k2, k3, kSelf := pubKey(t), pubKey(t), pubKey(t), pubKey(t)
	ann := func(k wgtypes.Key, ep string) map[string]string {
		return Annotations(k, netip.MustParseAddrPort(ep), nil)
	}
	edit := func(m map[string]string, k, v string) map[string]string {
		if v == "" {
			delete(m, k)
		} else {
			m[k] = v
		}
		return m
	}
	cidr := func(s ...string) []string { return s }
	type want struct {
		peers   []string // node names, in order
		errs    []string // node names with errors
		allowed map[string][]netip.Prefix
	}
	for _, tc := range []struct {
		name       string
		nodes      []*corev1.Node
		nodeToNode bool
		want       want
	}{
		{
			name: "self excluded, sorted by name",
			nodes: []*corev1.Node{
				node("n2", 1, ann(k2, "10.99.0.3:51820"), cidr("10.244.2.0/24")),
				node("self", 1, ann(kSelf, "10.99.0.1:51820"), cidr("10.244.0.0/24")),
				node("n1", 1, ann(k1, "10.99.0.2:51820"), cidr("10.244.1.0/24")),
				nil,
			},
			want: want{peers: []string{"n1", "n2"}, allowed: map[string][]netip.Prefix{"n1": pfx("10.244.1.0/24")}},
		},
		{
			name: "not yet published is skipped quietly",
			nodes: []*corev1.Node{
				node("n1", 1, nil, cidr("10.244.1.0/24")),
				node("n2", 1, ann(k2, "10.99.0.3:51820"), cidr("10.244.2.0/24")),
			},
			want: want{peers: []string{"n2"}},
		},
		{
			name: "missing or malformed annotations are reported",
			nodes: []*corev1.Node{
				node("no-endpoint", 1, edit(ann(pubKey(t), "10.99.0.11:51820"), annotations.WireGuardEndpoint, ""), cidr("10.244.11.0/24")),
				node("no-key", 1, edit(ann(pubKey(t), "10.99.0.12:51820"), annotations.WireGuardPublicKey, ""), cidr("10.244.12.0/24")),
				node("bad-key", 1, edit(ann(pubKey(t), "10.99.0.13:51820"), annotations.WireGuardPublicKey, "c2hvcnQ="), cidr("10.244.13.0/24")),
				node("zero-key", 1, edit(ann(pubKey(t), "10.99.0.14:51820"), annotations.WireGuardPublicKey, wgtypes.Key{}.String()), cidr("10.244.14.0/24")),
				node("no-port", 1, edit(ann(pubKey(t), "10.99.0.15:51820"), annotations.WireGuardEndpoint, "10.99.0.2"), cidr("10.244.15.0/24")),
				node("port-zero", 1, edit(ann(pubKey(t), "10.99.0.16:51820"), annotations.WireGuardEndpoint, "10.99.0.2:0"), cidr("10.244.16.0/24")),
				node("unspecified", 1, edit(ann(pubKey(t), "10.99.0.17:51820"), annotations.WireGuardEndpoint, "0.0.0.0:51820"), cidr("10.244.17.0/24")),
				node("hostname", 1, edit(ann(pubKey(t), "10.99.0.18:51820"), annotations.WireGuardEndpoint, "node1:51820"), cidr("10.244.18.0/24")),
				node("bad-cidr", 1, ann(pubKey(t), "10.99.0.4:51820"), cidr("banana")),
				node("host-bits", 1, ann(pubKey(t), "10.99.0.5:51820"), cidr("10.244.3.7/24")),
				node("no-cidrs-anywhere", 1, ann(k3, "10.99.0.6:51820"), nil),
				node("n2", 1, ann(k2, "10.99.0.3:51820"), cidr("10.244.2.0/24")),
			},
			want: want{peers: []string{"n2"}, errs: []string{
				"bad-cidr", "bad-key", "host-bits", "hostname", "no-cidrs-anywhere", "no-endpoint", "no-key",
				"no-port", "port-zero", "unspecified", "zero-key",
			}},
		},
		{
			name: "pod CIDRs come from spec.podCIDRs, not the annotation",
			nodes: []*corev1.Node{
				node("n1", 1, edit(ann(k1, "10.99.0.2:51820"), annotations.WireGuardPodCIDRs, "10.244.9.0/24,10.99.0.1/32"), cidr("10.244.1.0/24", "fd10:244:1::/64")),
			},
			want: want{peers: []string{"n1"}, allowed: map[string][]netip.Prefix{"n1": pfx("10.244.1.0/24", "fd10:244:1::/64")}},
		},
		{
			name: "node-to-node adds the node's own InternalIPs",
			nodes: []*corev1.Node{
				node("n1", 1, ann(k1, "10.99.0.2:51820"), cidr("10.244.1.0/24"), "10.99.0.2", "fd99::2"),
				node("n2", 1, ann(k2, "10.99.0.3:51820"), cidr("10.244.2.0/24")),
			},
			nodeToNode: true,
			want: want{peers: []string{"n1", "n2"}, allowed: map[string][]netip.Prefix{
				"n1": pfx("10.244.1.0/24", "10.99.0.2/32", "fd99::2/128"),
				"n2": pfx("10.244.2.0/24"),
			}},
		},
		{
			name: "without node-to-node no node addresses",
			nodes: []*corev1.Node{
				node("n1", 1, ann(k1, "10.99.0.2:51820"), cidr("10.244.1.0/24"), "10.99.0.2"),
			},
			want: want{peers: []string{"n1"}, allowed: map[string][]netip.Prefix{"n1": pfx("10.244.1.0/24")}},
		},
		{
			name: "duplicate keys: the older node keeps it",
			nodes: []*corev1.Node{
				node("n2", 1, ann(k1, "10.99.0.3:51820"), cidr("10.244.2.0/24")),
				node("n1", 2, ann(k1, "10.99.0.2:51820"), cidr("10.244.1.0/24")),
				node("n3", 3, ann(k3, "10.99.0.4:51820"), cidr("10.244.3.0/24")),
			},
			want: want{peers: []string{"n2", "n3"}, errs: []string{"n1"}},
		},
		{
			name: "overlapping CIDRs: the older node keeps them, none may take self's",
			nodes: []*corev1.Node{
				node("n3", 0, ann(k3, "10.99.0.4:51820"), cidr("10.244.0.0/16")),
				node("self", 9, ann(kSelf, "10.99.0.1:51820"), cidr("10.244.0.0/24")),
				node("n1", 1, ann(k1, "10.99.0.2:51820"), cidr("10.244.1.0/24")),
				node("n2", 2, ann(k2, "10.99.0.3:51820"), cidr("10.244.1.128/25")),
			},
			want: want{peers: []string{"n1"}, errs: []string{"n2", "n3"}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			peers, errs := peersOf("self", tc.nodes, tc.nodeToNode)
			var got []string
			for _, p := range peers {
				got = append(got, p.Node)
				if w, ok := tc.want.allowed[p.Node]; ok && !slices.Equal(p.AllowedIPs, w) {
					t.Errorf("%s allowed IPs %v, want %v", p.Node, p.AllowedIPs, w)
				}
			}
			if !slices.Equal(got, tc.want.peers) {
				t.Errorf("peers %v, want %v", got, tc.want.peers)
			}
			if got := problemNodes(t, errs); !slices.Equal(got, tc.want.errs) {
				t.Errorf("errors for %v, want %v: %v", got, tc.want.errs, errs)
			}
		})
	}
}

func TestDiffPeers(t *testing.T) {
	k1, k2, k3 := pubKey(t), pubKey(t), pubKey(t)
	ka := DefaultKeepalive
	cur := []wgtypes.Peer{
		{PublicKey: k1, Endpoint: udp("10.99.0.2:51820"), AllowedIPs: toIPNets(pfx("10.244.1.0/24")), PersistentKeepaliveInterval: ka},
		{PublicKey: k2, Endpoint: udp("10.99.0.3:51820"), AllowedIPs: toIPNets(pfx("10.244.2.0/24")), PersistentKeepaliveInterval: ka},
	}
	for _, tc := range []struct {
		name string
		want []Peer
		// expected changes: key -> "remove" | "add" | "update" (in place)
		changes map[wgtypes.Key]string
	}{
		{"unchanged peers are not touched", []Peer{
			{PublicKey: k2, Endpoint: netip.MustParseAddrPort("10.99.0.3:51820"), AllowedIPs: pfx("10.244.2.0/24")},
			{PublicKey: k1, Endpoint: netip.MustParseAddrPort("10.99.0.2:51820"), AllowedIPs: pfx("10.244.1.0/24")},
		}, nil},
		{"vanished removed, new added", []Peer{
			{PublicKey: k1, Endpoint: netip.MustParseAddrPort("10.99.0.2:51820"), AllowedIPs: pfx("10.244.1.0/24")},
			{PublicKey: k3, Endpoint: netip.MustParseAddrPort("10.99.0.4:51820"), AllowedIPs: pfx("10.244.3.0/24")},
		}, map[wgtypes.Key]string{k2: "remove", k3: "add"}},
		{"changed endpoint or allowed IPs updated in place", []Peer{
			{PublicKey: k1, Endpoint: netip.MustParseAddrPort("10.99.0.9:51820"), AllowedIPs: pfx("10.244.1.0/24")},
			{PublicKey: k2, Endpoint: netip.MustParseAddrPort("10.99.0.3:51820"), AllowedIPs: pfx("10.244.2.0/24", "10.99.0.3/32")},
		}, map[wgtypes.Key]string{k1: "update", k2: "update"}},
		{"empty removes all", nil, map[wgtypes.Key]string{k1: "remove", k2: "remove"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := diffPeers(cur, tc.want, ka)
			if len(got) != len(tc.changes) {
				t.Fatalf("%d changes, want %d: %+v", len(got), len(tc.changes), got)
			}
			seenSet := false
			for _, pc := range got {
				switch tc.changes[pc.PublicKey] {
				case "remove":
					if !pc.Remove || seenSet {
						t.Errorf("peer %s: want removal before any set", Fingerprint(pc.PublicKey))
					}
				case "add", "update":
					seenSet = true
					if pc.Remove || !pc.ReplaceAllowedIPs || pc.PersistentKeepaliveInterval == nil || *pc.PersistentKeepaliveInterval != ka {
						t.Errorf("peer %s: bad update %+v", Fingerprint(pc.PublicKey), pc)
					}
					if pc.UpdateOnly != (tc.changes[pc.PublicKey] == "update") {
						t.Errorf("peer %s: UpdateOnly=%v for an %s", Fingerprint(pc.PublicKey), pc.UpdateOnly, tc.changes[pc.PublicKey])
					}
				default:
					t.Errorf("unexpected change for %s", Fingerprint(pc.PublicKey))
				}
			}
		})
	}
	if got := diffPeers(cur, []Peer{{PublicKey: k1, Endpoint: netip.MustParseAddrPort("10.99.0.2:51820"), AllowedIPs: pfx("10.244.1.0/24")}, {PublicKey: k2, Endpoint: netip.MustParseAddrPort("10.99.0.3:51820"), AllowedIPs: pfx("10.244.2.0/24")}}, 10*time.Second); len(got) != 2 {
		t.Errorf("keepalive change: %d changes, want 2", len(got))
	}
}

func TestKernelUnsupported(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{unixErr("EOPNOTSUPP"), true},
		{unixErr("ENOTSUP"), true},
		{unixErr("EPERM"), false},
		{unixErr("EEXIST"), false},
		{errors.New("something else"), false},
		{nil, false},
	} {
		if got := kernelUnsupported(tc.err); got != tc.want {
			t.Errorf("kernelUnsupported(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestSetPeersRejectsBadInput(t *testing.T) {
	self, _ := GenerateKey()
	d := &Device{cfg: Config{Interface: "wgtest"}, key: self} // no device: validation comes first
	k1 := pubKey(t)
	ep := netip.MustParseAddrPort("10.99.0.2:51820")
	for _, tc := range []struct {
		name  string
		peers []Peer
	}{
		{"empty key", []Peer{{Endpoint: ep}}},
		{"own key", []Peer{{PublicKey: self.PublicKey(), Endpoint: ep}}},
		{"listed twice", []Peer{{PublicKey: k1, Endpoint: ep}, {PublicKey: k1, Endpoint: ep}}},
		{"no endpoint", []Peer{{PublicKey: k1}}},
		{"port zero", []Peer{{PublicKey: k1, Endpoint: netip.AddrPortFrom(ep.Addr(), 0)}}},
		{"invalid allowed IP", []Peer{{PublicKey: k1, Endpoint: ep, AllowedIPs: []netip.Prefix{{}}}}},
	} {
		if err := d.SetPeers(t.Context(), tc.peers); err == nil || !strings.Contains(err.Error(), "wgtest") {
			t.Errorf("%s: err %v, want a refusal naming the device", tc.name, err)
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := Open(ctx, Config{Interface: "wgtest", PrivateKey: self}); !errors.Is(err, context.Canceled) {
		t.Errorf("Open with a cancelled context: %v", err)
	}
}
