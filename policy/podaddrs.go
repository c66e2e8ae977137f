package policy

import (
	"iter"
	"net/netip"
)

// podAddrs are a pod's addresses, 16 bytes each (an IPv4 address
// IPv4-mapped; a pod's addresses are kept unmapped, so a mapped one is
// IPv4), packed in a string: one small allocation the collector need not
// scan, where a []netip.Addr took a 24-byte header and 24 bytes holding a
// pointer for each address. Equal addresses in equal order compare equal
// with ==. Zones are dropped: a pod's address has none.
type podAddrs string

// packAddrs packs addrs (unmapped, without repeats).
func packAddrs(addrs []netip.Addr) podAddrs {
	if len(addrs) == 0 {
		return ""
	}
	b := make([]byte, 0, 16*len(addrs))
	for _, a := range addrs {
		b16 := a.As16()
		b = append(b, b16[:]...)
	}
	return podAddrs(b)
}

// len is the number of addresses.
func (a podAddrs) len() int { return len(a) / 16 }

// at is the i-th address.
func (a podAddrs) at(i int) netip.Addr {
	var b [16]byte
	copy(b[:], a[16*i:16*i+16])
	return netip.AddrFrom16(b).Unmap()
}

// all yields the addresses in order.
func (a podAddrs) all() iter.Seq[netip.Addr] {
	return func(yield func(netip.Addr) bool) {
		for i := range a.len() {
			if !yield(a.at(i)) {
				return
			}
		}
	}
}

// contains reports whether ip is one of the addresses.
func (a podAddrs) contains(ip netip.Addr) bool {
	for x := range a.all() {
		if x == ip {
			return true
		}
	}
	return false
}

// slice is the addresses as a new slice (nil for none).
func (a podAddrs) slice() []netip.Addr {
	if a == "" {
		return nil
	}
	out := make([]netip.Addr, 0, a.len())
	for x := range a.all() {
		out = append(out, x)
	}
	return out
}
