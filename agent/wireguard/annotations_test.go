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
)

func pubKey(t *testing.T) wgtypes.Key {
	t.Helper()
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k.PublicKey()
}

func node(name string, ann map[string]string, podCIDRs ...string) *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann},
		Spec:       corev1.NodeSpec{PodCIDRs: podCIDRs},
	}
}

func pfx(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func TestAnnotationsRoundTrip(t *testing.T) {
	pub := pubKey(t)
	for _, tc := range []struct {
		name  string
		ep    string
		cidrs []netip.Prefix
	}{
		{"ipv4", "10.99.0.2:51820", pfx("10.244.1.0/24")},
		{"dual stack", "[fd00::2]:51820", pfx("10.244.1.0/24", "fd10:244:1::/64")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ep := netip.MustParseAddrPort(tc.ep)
			ann := Annotations(pub, ep, tc.cidrs)
			if len(ann) != 3 {
				t.Fatalf("annotations %v", ann)
			}
			peers, errs := PeersFromNodes("self", []*corev1.Node{node("n1", ann)}, false)
			if len(errs) != 0 || len(peers) != 1 {
				t.Fatalf("peers %v errs %v", peers, errs)
			}
			p := peers[0]
			if p.PublicKey != pub || p.Endpoint != ep || !slices.Equal(p.AllowedIPs, tc.cidrs) {
				t.Errorf("round trip: %+v", p)
			}
		})
	}
}

func TestPeersFromNodes(t *testing.T) {
	k1, k2, k3, kSelf := pubKey(t), pubKey(t), pubKey(t), pubKey(t)
	ann := func(k wgtypes.Key, ep string, cidrs ...string) map[string]string {
		return Annotations(k, netip.MustParseAddrPort(ep), pfx(cidrs...))
	}
	withInternalIP := func(n *corev1.Node, ips ...string) *corev1.Node {
		for _, ip := range ips {
			n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip})
		}
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeHostName, Address: n.Name})
		return n
	}
	edit := func(m map[string]string, k, v string) map[string]string {
		if v == "" {
			delete(m, k)
		} else {
			m[k] = v
		}
		return m
	}
	type want struct {
		peers   []string // node names, in order, identified by key
		errs    []string // node names with errors
		allowed map[string][]netip.Prefix
	}
	names := map[wgtypes.Key]string{k1: "n1", k2: "n2", k3: "n3", kSelf: "self"}
	for _, tc := range []struct {
		name       string
		nodes      []*corev1.Node
		nodeToNode bool
		want       want
	}{
		{
			name: "self excluded, sorted by name",
			nodes: []*corev1.Node{
				node("n2", ann(k2, "10.99.0.3:51820", "10.244.2.0/24")),
				node("self", ann(kSelf, "10.99.0.1:51820", "10.244.0.0/24")),
				node("n1", ann(k1, "10.99.0.2:51820", "10.244.1.0/24")),
				nil,
			},
			want: want{peers: []string{"n1", "n2"}, allowed: map[string][]netip.Prefix{"n1": pfx("10.244.1.0/24")}},
		},
		{
			name: "not yet published is skipped quietly",
			nodes: []*corev1.Node{
				node("n1", nil, "10.244.1.0/24"),
				node("n2", ann(k2, "10.99.0.3:51820", "10.244.2.0/24")),
			},
			want: want{peers: []string{"n2"}},
		},
		{
			name: "missing or malformed annotations are reported",
			nodes: []*corev1.Node{
				node("no-endpoint", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationEndpoint, "")),
				node("no-key", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationPublicKey, "")),
				node("cidrs-only", map[string]string{AnnotationPodCIDRs: "10.244.9.0/24"}),
				node("bad-key", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationPublicKey, "c2hvcnQ=")),
				node("zero-key", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationPublicKey, wgtypes.Key{}.String())),
				node("no-port", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationEndpoint, "10.99.0.2")),
				node("port-zero", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationEndpoint, "10.99.0.2:0")),
				node("unspecified", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationEndpoint, "0.0.0.0:51820")),
				node("hostname", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationEndpoint, "node1:51820")),
				node("bad-cidr", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationPodCIDRs, "10.244.1.0/24,banana")),
				node("host-bits", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationPodCIDRs, "10.244.1.7/24")),
				node("everything", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationPodCIDRs, "0.0.0.0/0")),
				node("empty-cidrs", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationPodCIDRs, " , ")),
				node("no-cidrs-anywhere", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationPodCIDRs, "")),
				node("n2", ann(k2, "10.99.0.3:51820", "10.244.2.0/24")),
			},
			want: want{peers: []string{"n2"}, errs: []string{
				"no-endpoint", "no-key", "cidrs-only", "bad-key", "zero-key", "no-port", "port-zero", "unspecified",
				"hostname", "bad-cidr", "host-bits", "everything", "empty-cidrs", "no-cidrs-anywhere",
			}},
		},
		{
			name: "pod CIDRs fall back to spec.podCIDRs",
			nodes: []*corev1.Node{
				node("n1", edit(ann(k1, "10.99.0.2:51820", "10.244.1.0/24"), AnnotationPodCIDRs, ""), "10.244.1.0/24", "fd10::/64"),
			},
			want: want{peers: []string{"n1"}, allowed: map[string][]netip.Prefix{"n1": pfx("10.244.1.0/24", "fd10::/64")}},
		},
		{
			name: "node-to-node adds InternalIPs, else the endpoint address",
			nodes: []*corev1.Node{
				withInternalIP(node("n1", ann(k1, "10.99.0.2:51820", "10.244.1.0/24")), "10.99.0.2", "fd99::2"),
				node("n2", ann(k2, "10.99.0.3:51820", "10.244.2.0/24")),
			},
			nodeToNode: true,
			want: want{peers: []string{"n1", "n2"}, allowed: map[string][]netip.Prefix{
				"n1": pfx("10.244.1.0/24", "10.99.0.2/32", "fd99::2/128"),
				"n2": pfx("10.244.2.0/24", "10.99.0.3/32"),
			}},
		},
		{
			name: "without node-to-node no node IPs",
			nodes: []*corev1.Node{
				withInternalIP(node("n1", ann(k1, "10.99.0.2:51820", "10.244.1.0/24")), "10.99.0.2"),
			},
			want: want{peers: []string{"n1"}, allowed: map[string][]netip.Prefix{"n1": pfx("10.244.1.0/24")}},
		},
		{
			name: "duplicate keys: both out",
			nodes: []*corev1.Node{
				node("n1", ann(k1, "10.99.0.2:51820", "10.244.1.0/24")),
				node("n2", ann(k1, "10.99.0.3:51820", "10.244.2.0/24")),
				node("n3", ann(k3, "10.99.0.4:51820", "10.244.3.0/24")),
			},
			want: want{peers: []string{"n3"}, errs: []string{"n1", "n2"}},
		},
		{
			name: "a node publishing self's key is left out",
			nodes: []*corev1.Node{
				node("self", ann(kSelf, "10.99.0.1:51820", "10.244.0.0/24")),
				node("n1", ann(kSelf, "10.99.0.2:51820", "10.244.1.0/24")),
				node("n2", ann(k2, "10.99.0.3:51820", "10.244.2.0/24")),
			},
			want: want{peers: []string{"n2"}, errs: []string{"n1"}},
		},
		{
			name: "overlapping CIDRs: both out, and none may take self's",
			nodes: []*corev1.Node{
				node("self", ann(kSelf, "10.99.0.1:51820", "10.244.0.0/24")),
				node("n1", ann(k1, "10.99.0.2:51820", "10.244.1.0/24")),
				node("n2", ann(k2, "10.99.0.3:51820", "10.244.1.128/25")),
				node("n3", ann(k3, "10.99.0.4:51820", "10.244.0.0/16")),
			},
			want: want{errs: []string{"n1", "n2", "n3"}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			peers, errs := PeersFromNodes("self", tc.nodes, tc.nodeToNode)
			var got []string
			for _, p := range peers {
				got = append(got, names[p.PublicKey])
				if w, ok := tc.want.allowed[names[p.PublicKey]]; ok && !slices.Equal(p.AllowedIPs, w) {
					t.Errorf("%s allowed IPs %v, want %v", names[p.PublicKey], p.AllowedIPs, w)
				}
			}
			if !slices.Equal(got, tc.want.peers) {
				t.Errorf("peers %v, want %v", got, tc.want.peers)
			}
			var errNodes []string
			for _, err := range errs {
				var ne *NodeError
				if !errors.As(err, &ne) {
					t.Fatalf("error %v is not a *NodeError", err)
				}
				if !strings.HasPrefix(err.Error(), "node "+ne.Node+": ") {
					t.Errorf("error %q does not name the node", err)
				}
				errNodes = append(errNodes, ne.Node)
			}
			slices.Sort(errNodes)
			wantErrs := slices.Clone(tc.want.errs)
			slices.Sort(wantErrs)
			if !slices.Equal(errNodes, wantErrs) {
				t.Errorf("errors for %v, want %v: %v", errNodes, wantErrs, errs)
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
		// expected changes: key -> "remove" | "set"
		changes map[wgtypes.Key]string
	}{
		{"unchanged peers are not touched", []Peer{
			{k2, netip.MustParseAddrPort("10.99.0.3:51820"), pfx("10.244.2.0/24")},
			{k1, netip.MustParseAddrPort("10.99.0.2:51820"), pfx("10.244.1.0/24")},
		}, nil},
		{"vanished removed, new added", []Peer{
			{k1, netip.MustParseAddrPort("10.99.0.2:51820"), pfx("10.244.1.0/24")},
			{k3, netip.MustParseAddrPort("10.99.0.4:51820"), pfx("10.244.3.0/24")},
		}, map[wgtypes.Key]string{k2: "remove", k3: "set"}},
		{"changed endpoint or allowed IPs updated in place", []Peer{
			{k1, netip.MustParseAddrPort("10.99.0.9:51820"), pfx("10.244.1.0/24")},
			{k2, netip.MustParseAddrPort("10.99.0.3:51820"), pfx("10.244.2.0/24", "10.99.0.3/32")},
		}, map[wgtypes.Key]string{k1: "set", k2: "set"}},
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
				case "set":
					seenSet = true
					if pc.Remove || !pc.ReplaceAllowedIPs || pc.PersistentKeepaliveInterval == nil || *pc.PersistentKeepaliveInterval != ka {
						t.Errorf("peer %s: bad update %+v", Fingerprint(pc.PublicKey), pc)
					}
				default:
					t.Errorf("unexpected change for %s", Fingerprint(pc.PublicKey))
				}
			}
		})
	}
	if got := diffPeers(cur, []Peer{{k1, netip.MustParseAddrPort("10.99.0.2:51820"), pfx("10.244.1.0/24")}, {k2, netip.MustParseAddrPort("10.99.0.3:51820"), pfx("10.244.2.0/24")}}, 10*time.Second); len(got) != 2 {
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
