package nodeinfo

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/api/annotations"
)

// key is a base64 public key of 32 bytes of b.
func key(b byte) string { return base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{b}, 32)) }

type nodeOpt func(*corev1.Node)

func published(k byte, ep string) nodeOpt {
	return func(n *corev1.Node) {
		n.Annotations = map[string]string{annotations.WireGuardPublicKey: key(k), annotations.WireGuardEndpoint: ep}
	}
}

func internalIPs(ips ...string) nodeOpt {
	return func(n *corev1.Node) {
		for _, ip := range ips {
			n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip})
		}
	}
}

func mkNode(name string, created int64, podCIDR string, opts ...nodeOpt) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, CreationTimestamp: metav1.Unix(created, 0)}}
	if podCIDR != "" {
		n.Spec.PodCIDRs = []string{podCIDR}
	}
	for _, o := range opts {
		o(n)
	}
	return n
}

func TestParseAddresses(t *testing.T) {
	n, err := Parse(mkNode("n", 1, "10.244.1.0/24",
		internalIPs("10.99.0.2", "10.98.0.2", "not-an-ip"), published(1, "10.98.0.2:51871")))
	if err == nil {
		t.Error("a malformed InternalIP is not reported")
	}
	if got, want := n.Addrs(), []netip.Addr{netip.MustParseAddr("10.98.0.2"), netip.MustParseAddr("10.99.0.2")}; !slices.Equal(got, want) {
		t.Errorf("Addrs = %v; want the endpoint's first, then the other InternalIPs: %v", got, want)
	}
	if got := n.IP(); got != netip.MustParseAddr("10.98.0.2") {
		t.Errorf("IP = %s; want the endpoint's address", got)
	}
	if !n.Tunnel() {
		t.Error("Tunnel = false for a node that published a key and an endpoint")
	}
	bare, err := Parse(mkNode("b", 1, "", internalIPs("fd00::1", "10.99.0.3")))
	if err != nil || bare.IP() != netip.MustParseAddr("10.99.0.3") || bare.Tunnel() {
		t.Errorf("unpublished node: IP %s, tunnel %v, err %v; want its first IPv4 InternalIP, no tunnel", bare.IP(), bare.Tunnel(), err)
	}
}

func TestResolve(t *testing.T) {
	cluster := []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}
	for _, tc := range []struct {
		name      string
		self      string
		nodes     []*corev1.Node
		cidrs     map[string][]string // granted pod CIDRs
		tunnels   []string            // nodes left with a tunnel
		conflicts []Conflict
	}{
		{
			name: "older node keeps its pod CIDR",
			nodes: []*corev1.Node{
				mkNode("b", 1, "10.244.1.0/24"),
				mkNode("a", 2, "10.244.1.0/25"),
			},
			cidrs:     map[string][]string{"b": {"10.244.1.0/24"}, "a": nil},
			conflicts: []Conflict{{Node: "a", Owner: "b", Kind: "pod CIDR", Claim: "10.244.1.0/25"}},
		},
		{
			name: "same creation time: by name",
			nodes: []*corev1.Node{
				mkNode("b", 1, "10.244.1.0/24"),
				mkNode("a", 1, "10.244.1.0/24"),
			},
			cidrs:     map[string][]string{"a": {"10.244.1.0/24"}, "b": nil},
			conflicts: []Conflict{{Node: "b", Owner: "a", Kind: "pod CIDR", Claim: "10.244.1.0/24"}},
		},
		{
			name: "self first, whatever its age",
			self: "new",
			nodes: []*corev1.Node{
				mkNode("old", 1, "10.244.1.0/24", published(1, "10.99.0.1:51871")),
				mkNode("new", 9, "10.244.2.0/24", published(1, "10.99.0.2:51871")),
			},
			tunnels:   []string{"new"},
			conflicts: []Conflict{{Node: "old", Owner: "new", Kind: "public key", Claim: Fingerprint(mustKey(key(1)))}},
		},
		{
			name: "pod CIDRs are cut to the cluster CIDR",
			nodes: []*corev1.Node{
				mkNode("wide", 1, "10.0.0.0/8"),
				mkNode("out", 2, "192.168.0.0/24"),
			},
			cidrs:     map[string][]string{"wide": {"10.244.0.0/16"}, "out": nil},
			conflicts: []Conflict{{Node: "out", Kind: "pod CIDR", Claim: "192.168.0.0/24"}},
		},
		{
			name: "addresses and endpoints: no one else's, none in the pod space",
			nodes: []*corev1.Node{
				mkNode("a", 1, "10.244.1.0/24", internalIPs("10.99.0.1"), published(1, "10.99.0.1:51871")),
				mkNode("b", 2, "10.244.2.0/24", internalIPs("10.99.0.1", "10.99.0.2"), published(2, "10.99.0.2:51871")),
				mkNode("c", 3, "10.244.3.0/24", internalIPs("10.99.0.3"), published(3, "10.99.0.1:51871")),
				mkNode("d", 4, "10.244.4.0/24", internalIPs("10.244.9.9"), published(4, "10.244.1.7:51871")),
			},
			tunnels: []string{"a", "b"},
			conflicts: []Conflict{
				{Node: "b", Owner: "a", Kind: "address", Claim: "10.99.0.1"},
				{Node: "c", Owner: "a", Kind: "endpoint", Claim: "10.99.0.1:51871"},
				{Node: "d", Owner: "a", Kind: "endpoint", Claim: "10.244.1.7:51871"},
				{Node: "d", Kind: "address", Claim: "10.244.9.9"},
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Resolve(tc.nodes, Options{Self: tc.self, ClusterCIDRs: cluster})
			for name, want := range tc.cidrs {
				n, ok := c.Node(name)
				if !ok {
					t.Fatalf("node %s missing", name)
				}
				var got []string
				for _, p := range n.PodCIDRs {
					got = append(got, p.String())
				}
				if !slices.Equal(got, want) {
					t.Errorf("%s holds %v; want %v", name, got, want)
				}
			}
			if tc.tunnels != nil {
				var got []string
				for _, n := range c.Nodes {
					if n.Tunnel() {
						got = append(got, n.Name)
					}
				}
				if !slices.Equal(got, tc.tunnels) {
					t.Errorf("nodes with a tunnel %v; want %v", got, tc.tunnels)
				}
			}
			if !slices.Equal(c.Conflicts, tc.conflicts) {
				t.Errorf("conflicts %+v;\nwant %+v", c.Conflicts, tc.conflicts)
			}
		})
	}
}

func mustKey(s string) [32]byte {
	k, err := ParsePublicKey(s)
	if err != nil {
		panic(err)
	}
	return k
}

// An agent resolves the whole cluster on every Node event.
func BenchmarkResolve5000Nodes(b *testing.B) {
	var nodes []*corev1.Node
	for i := range 5000 {
		ip := netip.AddrFrom4([4]byte{10, 99, byte(i >> 8), byte(i)})
		n := mkNode(fmt.Sprintf("node-%d", i), int64(i), fmt.Sprintf("10.%d.%d.0/24", 100+i>>8, i&255), internalIPs(ip.String()))
		n.Annotations = map[string]string{annotations.WireGuardPublicKey: key(byte(i)), annotations.WireGuardEndpoint: ip.String() + ":51871"}
		nodes = append(nodes, n)
	}
	opts := Options{Self: "node-0", ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/11")}}
	b.ReportAllocs()
	for b.Loop() {
		Resolve(nodes, opts)
	}
}

func TestConflictNamesBothNodes(t *testing.T) {
	for _, tc := range []struct {
		c    Conflict
		want string
	}{
		{Conflict{Node: "b", Owner: "a", Kind: KindPublicKey, Claim: "0123"}, "node b claims public key 0123, held by node a"},
		{Conflict{Node: "b", Kind: KindPodCIDR, Claim: "192.168.0.0/24"}, "node b claims pod CIDR 192.168.0.0/24 outside the cluster CIDR"},
		{Conflict{Node: "b", Kind: KindAddress, Claim: "10.244.9.9"}, "node b claims address 10.244.9.9 inside the cluster CIDR, where only pods live"},
	} {
		if got := tc.c.Error(); got != tc.want {
			t.Errorf("%+v: %q; want %q", tc.c, got, tc.want)
		}
	}
}
