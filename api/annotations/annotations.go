// Package annotations holds the Kubernetes annotation keys that are part of
// Veil's API: those every agent publishes on its Node for its peers (read
// through api/nodeinfo), and those users set on their pods. The agent,
// meshctl and the tests name them only through these constants.
package annotations

// Node annotations through which every agent publishes what its peers need.
// Only the node's own agent may write them (the admission policy in
// deploy/ enforces it).
const (
	WireGuardPrefix    = "wireguard.veil.dev/"
	WireGuardPublicKey = WireGuardPrefix + "public-key"
	WireGuardEndpoint  = WireGuardPrefix + "endpoint" // underlay ip:port
	// WireGuardPodCIDRs is informational: peers take a node's pod CIDRs
	// from spec.podCIDRs, which the control plane sets, never from here.
	WireGuardPodCIDRs = WireGuardPrefix + "pod-cidrs" // comma-separated prefixes
)

// SocketAcceleration on a pod set to "false" (or "off", "disabled", "no")
// keeps its TCP connections off socket acceleration (for applications that
// splice(2) sockets).
const SocketAcceleration = "veil.dev/socket-acceleration"
