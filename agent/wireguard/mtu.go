package wireguard

import "fmt"

const (
	// Overhead is what WireGuard adds to every packet over an IPv6 underlay
	// (the worst case): IPv6 40 + UDP 8 + WireGuard header 16 + tag 16.
	Overhead = 80
	// MinMTU is the smallest pod MTU accepted: IPv6 requires 1280 on every
	// link, and pods may speak IPv6 even when the underlay does not.
	MinMTU = 1280
)

// PodMTU is the MTU pods (and the WireGuard device) get on an underlay with
// the given MTU, so that encrypted packets never need fragmenting. An
// underlay too small to carry a 1280-byte inner packet is an error rather
// than a silently broken IPv6.
func PodMTU(underlayMTU int) (int, error) {
	mtu := underlayMTU - Overhead
	if mtu < MinMTU {
		return 0, fmt.Errorf("pod mtu: underlay MTU %d leaves %d after WireGuard's %d bytes, below the minimum %d (underlay needs at least %d)",
			underlayMTU, mtu, Overhead, MinMTU, MinMTU+Overhead)
	}
	return mtu, nil
}
