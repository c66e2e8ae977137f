// Package scaleshape holds the addressing of the synthetic large cluster
// that tests/scale creates in a real API server and that the agent's
// benchmarks build in informer caches: node i's name, InternalIP and pod
// CIDR, and its pods' addresses. Test code only.
package scaleshape

import (
	"fmt"
	"net/netip"
)

// ClusterCIDR holds every node's pod CIDR.
const ClusterCIDR = "10.128.0.0/9"

// NodeName names node i; node 0 is the one the measured agent runs for.
func NodeName(i int) string { return fmt.Sprintf("scale-node-%d", i) }

// NodeIP is node i's InternalIP, in 172.16.0.0/12.
func NodeIP(i int) netip.Addr {
	n := i + 1
	return netip.AddrFrom4([4]byte{172, byte(16 + n>>16), byte(n >> 8), byte(n)})
}

// PodCIDR is node i's /24 in ClusterCIDR.
func PodCIDR(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(128 + i>>8), byte(i), 0}), 24)
}

// PodIP is the address of the j-th pod on node i.
func PodIP(i, j int) netip.Addr {
	a := PodCIDR(i).Addr().As4()
	a[3] = byte(j + 2)
	return netip.AddrFrom4(a)
}
