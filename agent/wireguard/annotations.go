package wireguard

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/veilmesh/veil/api/annotations"
	"github.com/veilmesh/veil/api/nodeinfo"
)

// Annotations returns the annotations that publish a node's public key, its
// underlay endpoint and its pod CIDRs. It takes the public key only: pass
// Key.PublicKey(), never the private half.
func Annotations(pub wgtypes.Key, endpoint netip.AddrPort, cidrs []netip.Prefix) map[string]string {
	parts := make([]string, 0, len(cidrs))
	for _, c := range cidrs {
		parts = append(parts, c.Masked().String())
	}
	return map[string]string{
		annotations.WireGuardPublicKey: pub.String(),
		annotations.WireGuardEndpoint:  endpoint.String(),
		annotations.WireGuardPodCIDRs:  strings.Join(parts, ","),
	}
}

// ErrNoAllowedIPs is wrapped by the error for a node that published a key
// but holds no pod CIDR (nor, with node-to-node encryption, an address):
// there is nothing the tunnel could carry to it.
var ErrNoAllowedIPs = errors.New("no allowed IPs")

// PeersFromNodes turns every node but self that published a key and an
// endpoint into a peer, sorted by node name. The cluster is resolved
// already (nodeinfo.Resolve), so a key, endpoint, pod CIDR or address that
// another node holds is not among a node's claims, and no two peers overlap.
//
// AllowedIPs are the node's pod CIDRs (spec.podCIDRs cut to the cluster
// CIDR) and, with nodeAddrs only, its own InternalIPs (those no other node
// holds) as host prefixes. The agent asks for node addresses with
// node-to-node encryption (host traffic goes into the tunnel) and in strict
// mode (a pod's traffic to another node's address may only leave through the
// tunnel, and WireGuard picks the peer by destination).
func PeersFromNodes(c nodeinfo.Cluster, self string, nodeAddrs bool) ([]Peer, []error) {
	var (
		peers []Peer
		errs  []error
	)
	for _, n := range c.Nodes {
		if n.Name == self || !n.Tunnel() {
			continue
		}
		allowed := append([]netip.Prefix(nil), n.PodCIDRs...)
		if nodeAddrs {
			for _, a := range n.InternalIPs {
				allowed = append(allowed, netip.PrefixFrom(a, a.BitLen()))
			}
		}
		if len(allowed) == 0 {
			errs = append(errs, &nodeinfo.NodeError{Node: n.Name, Err: fmt.Errorf("%w: no pod CIDR in spec.podCIDRs", ErrNoAllowedIPs)})
			continue
		}
		peers = append(peers, Peer{Node: n.Name, PublicKey: n.PublicKey, Endpoint: n.Endpoint, AllowedIPs: allowed})
	}
	return peers, errs
}
