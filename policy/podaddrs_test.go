package policy

import (
	"net/netip"
	"slices"
	"testing"
)

// TestPodAddrsRoundTrip packs IPv4, IPv6 and dual-stack address lists and
// reads them back: the family is kept (an IPv4 address is not read as
// IPv4-mapped IPv6), == is list equality, contains finds each address.
func TestPodAddrsRoundTrip(t *testing.T) {
	v4, v6, v4b := netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("fd00::10:1"), netip.MustParseAddr("10.1.2.4")
	for _, in := range [][]netip.Addr{nil, {v4}, {v6}, {v4, v6}, {v6, v4}} {
		a := packAddrs(in)
		if got := a.slice(); !slices.Equal(got, in) {
			t.Errorf("packAddrs(%v).slice() = %v", in, got)
		}
		if a.len() != len(in) {
			t.Errorf("packAddrs(%v).len() = %d", in, a.len())
		}
		for i, ip := range in {
			if a.at(i) != ip || !a.contains(ip) {
				t.Errorf("packAddrs(%v): at(%d) = %v, contains %v = %v", in, i, a.at(i), ip, a.contains(ip))
			}
		}
		if a.contains(v4b) || a.contains(netip.AddrFrom16(v4.As16())) {
			t.Errorf("packAddrs(%v) contains an address it does not hold", in)
		}
	}
	if packAddrs([]netip.Addr{v4, v6}) == packAddrs([]netip.Addr{v6, v4}) || packAddrs([]netip.Addr{v4}) != packAddrs([]netip.Addr{v4}) {
		t.Error("== is not equality of address lists")
	}
}

// TestPodStateAddresses: a pod's IPv4-mapped address is read
// as IPv4, a zone is dropped, a bad one skipped, and repeats (the same
// address as podIP and in podIPs) are kept
// once.
func TestPodStateAddresses(t *testing.T) {
	p := newPodState(&PodFacts{Namespace: "x", Name: "a", IPs: []string{"::ffff:10.0.0.1", "10.0.0.1", "fd00::1%eth0", "bad"}})
	want := []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")}
	if got := p.ips.slice(); !slices.Equal(got, want) || !p.active {
		t.Errorf("addresses %v (active %v), want %v", got, p.active, want)
	}
}
