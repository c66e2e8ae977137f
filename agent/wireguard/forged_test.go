package wireguard

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"

	"github.com/veilmesh/veil/api/nodeinfo"
)

// A node that claims what belongs to another (a pod CIDR, this node's
// address, a range outside the cluster, another node's key), in its
// annotations and in its spec, changes nothing for the nodes it claims
// from, gets none of it, and is reported by name.
func TestForgedClaimsChangeNothingForVictims(t *testing.T) {
	kSelf, kVictim, kMallory := pubKey(t), pubKey(t), pubKey(t)
	publish := func(k wgtypes.Key, ep string, cidrs ...string) map[string]string {
		return Annotations(k, netip.MustParseAddrPort(ep), pfx(cidrs...))
	}
	self := node("self", 1, publish(kSelf, "10.99.0.1:51820", "10.244.0.0/24"), []string{"10.244.0.0/24"}, "10.99.0.1")
	victim := node("victim", 2, publish(kVictim, "10.99.0.2:51820", "10.244.1.0/24"), []string{"10.244.1.0/24"}, "10.99.0.2")
	victimPeer := Peer{Node: "victim", PublicKey: kVictim, Endpoint: netip.MustParseAddrPort("10.99.0.2:51820"), AllowedIPs: pfx("10.244.1.0/24")}
	victimPeerN2N := victimPeer
	victimPeerN2N.AllowedIPs = pfx("10.244.1.0/24", "10.99.0.2/32")

	for _, tc := range []struct {
		name       string
		mallory    *corev1.Node
		nodeToNode bool
		// owner is the node whose claim Mallory's collides with; empty
		// for a claim outside the cluster.
		owner string
	}{
		{"another node's pod CIDR", node("mallory", 3, publish(kMallory, "10.99.0.3:51820", "10.244.1.0/24"), []string{"10.244.1.0/24"}, "10.99.0.3"), false, "victim"},
		{"part of another node's pod CIDR", node("mallory", 3, publish(kMallory, "10.99.0.3:51820", "10.244.1.128/25"), []string{"10.244.1.128/25"}, "10.99.0.3"), false, "victim"},
		{"this node's pod CIDR", node("mallory", 0, publish(kMallory, "10.99.0.3:51820", "10.244.0.0/24"), []string{"10.244.0.0/24"}, "10.99.0.3"), false, "self"},
		{"this node's IP as a pod CIDR", node("mallory", 3, publish(kMallory, "10.99.0.3:51820", "10.99.0.1/32"), []string{"10.99.0.1/32"}, "10.99.0.3"), false, ""},
		{"this node's IP as its own address", node("mallory", 0, publish(kMallory, "10.99.0.3:51820", "10.244.3.0/24"), []string{"10.244.3.0/24"}, "10.99.0.3", "10.99.0.1"), true, "self"},
		{"another node's IP as its endpoint", node("mallory", 3, publish(kMallory, "10.99.0.2:51820", "10.244.3.0/24"), []string{"10.244.3.0/24"}, "10.99.0.3"), false, "victim"},
		{"a range outside the cluster CIDR", node("mallory", 3, publish(kMallory, "10.99.0.3:51820", "192.168.0.0/16"), []string{"192.168.0.0/16"}, "10.99.0.3"), false, ""},
		{"another node's key", node("mallory", 3, publish(kVictim, "10.99.0.3:51820", "10.244.3.0/24"), []string{"10.244.3.0/24"}, "10.99.0.3"), false, "victim"},
		{"this node's key", node("mallory", 0, publish(kSelf, "10.99.0.3:51820", "10.244.3.0/24"), []string{"10.244.3.0/24"}, "10.99.0.3"), false, "self"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			peers, errs := peersOf("self", []*corev1.Node{self, victim, tc.mallory}, tc.nodeToNode)
			want := victimPeer
			if tc.nodeToNode {
				want = victimPeerN2N
			}
			i := slices.IndexFunc(peers, func(p Peer) bool { return p.PublicKey == kVictim && p.Endpoint == want.Endpoint })
			if i < 0 {
				t.Fatalf("victim is no longer a peer: peers %+v, errors %v", peers, errs)
			}
			if got := peers[i]; !slices.Equal(got.AllowedIPs, want.AllowedIPs) {
				t.Errorf("victim's allowed IPs %v, want %v", got.AllowedIPs, want.AllowedIPs)
			}
			selfIP := netip.MustParsePrefix("10.99.0.1/32")
			mayHold := append(pfx("10.99.0.3/32"), testClusterCIDRs...)
			for _, p := range peers {
				if p.PublicKey == kVictim && p.Endpoint == want.Endpoint {
					continue
				}
				for _, a := range p.AllowedIPs {
					inside := slices.ContainsFunc(mayHold, func(c netip.Prefix) bool { return c.Contains(a.Addr()) && c.Bits() <= a.Bits() })
					if a.Overlaps(selfIP) || !inside {
						t.Errorf("peer %s got %s", Fingerprint(p.PublicKey), a)
					}
					for _, v := range want.AllowedIPs {
						if a.Overlaps(v) {
							t.Errorf("peer %s got %s, which overlaps the victim's %s", Fingerprint(p.PublicKey), a, v)
						}
					}
				}
			}
			reported := false
			for _, err := range errs {
				msg := err.Error()
				if strings.Contains(msg, "mallory") && (tc.owner == "" || strings.Contains(msg, tc.owner)) {
					reported = true
				}
			}
			if !reported {
				t.Errorf("no error names mallory (and the owner %q): %v", tc.owner, errs)
			}
			var c nodeinfo.Conflict
			for _, err := range errs {
				if x, ok := err.(nodeinfo.Conflict); ok && x.Node == "mallory" {
					c = x
				}
			}
			if c.Node == "" || c.Owner != tc.owner {
				t.Errorf("conflicts %v: want one refusing mallory in favour of %q", errs, tc.owner)
			}
		})
	}
}
