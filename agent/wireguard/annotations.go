package wireguard

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"
)

// Node annotations through which every agent publishes what its peers need.
const (
	AnnotationPublicKey = "wireguard.veil.dev/public-key"
	AnnotationEndpoint  = "wireguard.veil.dev/endpoint"  // underlay ip:port
	AnnotationPodCIDRs  = "wireguard.veil.dev/pod-cidrs" // comma-separated prefixes
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
		AnnotationPublicKey: pub.String(),
		AnnotationEndpoint:  endpoint.String(),
		AnnotationPodCIDRs:  strings.Join(parts, ","),
	}
}

// NodeError says why a node could not be made a peer.
type NodeError struct {
	Node string
	Err  error
}

func (e *NodeError) Error() string { return fmt.Sprintf("node %s: %v", e.Node, e.Err) }
func (e *NodeError) Unwrap() error { return e.Err }

// ErrOverlap is wrapped by a NodeError for a node whose allowed IPs overlap
// another node's: WireGuard would silently hand the prefix to one of them,
// so neither is trusted with it.
var ErrOverlap = errors.New("allowed IPs overlap")

// PeersFromNodes turns the published annotations of every node but self into
// peers, sorted by node name. A node that published nothing yet is skipped
// quietly (it is still starting); a node whose annotations are partial or
// malformed, whose key another node (self included) also claims, or whose
// allowed IPs overlap another node's (self included) is left out and
// reported as a *NodeError: guessing would send traffic to the wrong place.
//
// AllowedIPs are the node's pod CIDRs (the annotation, else spec.podCIDRs)
// and, with nodeToNode, its InternalIP addresses as host prefixes (else the
// endpoint's address).
func PeersFromNodes(self string, nodes []*corev1.Node, nodeToNode bool) ([]Peer, []error) {
	type cand struct {
		name string
		peer Peer
	}
	var (
		errs  []error
		cands []cand
		// Prefixes claimed by self: a peer claiming them would capture our
		// own pods' traffic.
		selfPrefixes []netip.Prefix
		selfKey      wgtypes.Key
	)
	for _, n := range nodes {
		if n == nil {
			continue
		}
		if n.Name == self {
			if cidrs, err := nodePodCIDRs(n); err == nil {
				selfPrefixes = cidrs
			}
			if k, err := wgtypes.ParseKey(strings.TrimSpace(n.Annotations[AnnotationPublicKey])); err == nil {
				selfKey = k
			}
			continue
		}
		p, ok, err := peerFromNode(n, nodeToNode)
		if err != nil {
			errs = append(errs, &NodeError{Node: n.Name, Err: err})
			continue
		}
		if ok {
			cands = append(cands, cand{n.Name, p})
		}
	}
	sort.Slice(cands, func(i, j int) bool { return cands[i].name < cands[j].name })

	bad := make(map[int]error)
	byKey := make(map[wgtypes.Key]int)
	for i, c := range cands {
		if selfKey != (wgtypes.Key{}) && c.peer.PublicKey == selfKey {
			bad[i] = fmt.Errorf("public key %s is this node's own", Fingerprint(selfKey))
			continue
		}
		if j, dup := byKey[c.peer.PublicKey]; dup {
			bad[i] = fmt.Errorf("public key %s is also published by node %s", Fingerprint(c.peer.PublicKey), cands[j].name)
			if _, already := bad[j]; !already {
				bad[j] = fmt.Errorf("public key %s is also published by node %s", Fingerprint(c.peer.PublicKey), c.name)
			}
			continue
		}
		byKey[c.peer.PublicKey] = i
	}
	for i := range cands {
		for _, a := range cands[i].peer.AllowedIPs {
			for _, s := range selfPrefixes {
				if a.Overlaps(s) && bad[i] == nil {
					bad[i] = fmt.Errorf("%w: %s overlaps this node's pod CIDR %s", ErrOverlap, a, s)
				}
			}
			for j := i + 1; j < len(cands); j++ {
				for _, b := range cands[j].peer.AllowedIPs {
					if !a.Overlaps(b) {
						continue
					}
					if bad[i] == nil {
						bad[i] = fmt.Errorf("%w: %s overlaps %s of node %s", ErrOverlap, a, b, cands[j].name)
					}
					if bad[j] == nil {
						bad[j] = fmt.Errorf("%w: %s overlaps %s of node %s", ErrOverlap, b, a, cands[i].name)
					}
				}
			}
		}
	}
	peers := make([]Peer, 0, len(cands))
	for i, c := range cands {
		if err := bad[i]; err != nil {
			errs = append(errs, &NodeError{Node: c.name, Err: err})
			continue
		}
		peers = append(peers, c.peer)
	}
	return peers, errs
}

// peerFromNode returns ok=false without error for a node that published
// none of the annotations.
func peerFromNode(n *corev1.Node, nodeToNode bool) (Peer, bool, error) {
	keyS, hasKey := n.Annotations[AnnotationPublicKey]
	epS, hasEP := n.Annotations[AnnotationEndpoint]
	_, hasCIDRs := n.Annotations[AnnotationPodCIDRs]
	if !hasKey && !hasEP {
		if hasCIDRs {
			return Peer{}, false, fmt.Errorf("annotation %s without %s and %s", AnnotationPodCIDRs, AnnotationPublicKey, AnnotationEndpoint)
		}
		return Peer{}, false, nil
	}
	if !hasKey {
		return Peer{}, false, fmt.Errorf("annotation %s missing", AnnotationPublicKey)
	}
	if !hasEP {
		return Peer{}, false, fmt.Errorf("annotation %s missing", AnnotationEndpoint)
	}
	pub, err := wgtypes.ParseKey(strings.TrimSpace(keyS))
	if err != nil {
		return Peer{}, false, fmt.Errorf("annotation %s: not a base64 WireGuard key", AnnotationPublicKey)
	}
	if pub == (wgtypes.Key{}) {
		return Peer{}, false, fmt.Errorf("annotation %s: all-zero key", AnnotationPublicKey)
	}
	ep, err := netip.ParseAddrPort(strings.TrimSpace(epS))
	if err != nil {
		return Peer{}, false, fmt.Errorf("annotation %s: %w", AnnotationEndpoint, err)
	}
	if ep.Port() == 0 || !usableUnicast(ep.Addr()) {
		return Peer{}, false, fmt.Errorf("annotation %s: %s is not a unicast address with a port", AnnotationEndpoint, ep)
	}
	ep = netip.AddrPortFrom(ep.Addr().Unmap(), ep.Port())
	allowed, err := nodePodCIDRs(n)
	if err != nil {
		return Peer{}, false, err
	}
	if nodeToNode {
		ips, err := nodeInternalIPs(n)
		if err != nil {
			return Peer{}, false, err
		}
		if len(ips) == 0 {
			ips = []netip.Addr{ep.Addr()}
		}
		for _, ip := range ips {
			allowed = append(allowed, netip.PrefixFrom(ip, ip.BitLen()))
		}
	}
	if len(allowed) == 0 {
		return Peer{}, false, errors.New("no pod CIDRs (annotation nor spec.podCIDRs)")
	}
	return Peer{PublicKey: pub, Endpoint: ep, AllowedIPs: allowed}, true, nil
}

func usableUnicast(a netip.Addr) bool {
	return a.IsValid() && !a.IsUnspecified() && !a.IsMulticast() && !a.IsLoopback() &&
		a.Unmap() != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// nodePodCIDRs parses the pod-cidrs annotation, falling back to
// spec.podCIDRs (and the older spec.podCIDR).
func nodePodCIDRs(n *corev1.Node) ([]netip.Prefix, error) {
	var raw []string
	src := "spec.podCIDRs"
	if s, ok := n.Annotations[AnnotationPodCIDRs]; ok {
		src = "annotation " + AnnotationPodCIDRs
		for _, f := range strings.Split(s, ",") {
			if f = strings.TrimSpace(f); f != "" {
				raw = append(raw, f)
			}
		}
		if len(raw) == 0 {
			return nil, fmt.Errorf("%s is empty", src)
		}
	} else {
		raw = n.Spec.PodCIDRs
		if len(raw) == 0 && n.Spec.PodCIDR != "" {
			raw = []string{n.Spec.PodCIDR}
		}
	}
	out := make([]netip.Prefix, 0, len(raw))
	for _, r := range raw {
		p, err := netip.ParsePrefix(r)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", src, err)
		}
		if p != p.Masked() {
			return nil, fmt.Errorf("%s: %s has host bits set", src, p)
		}
		// A default route as a pod CIDR would pull all traffic to one node.
		if p.Bits() == 0 {
			return nil, fmt.Errorf("%s: %s covers everything", src, p)
		}
		out = append(out, netip.PrefixFrom(p.Addr().Unmap(), p.Bits()))
	}
	return out, nil
}

func nodeInternalIPs(n *corev1.Node) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		ip, err := netip.ParseAddr(a.Address)
		if err != nil {
			return nil, fmt.Errorf("status.addresses InternalIP: %w", err)
		}
		if !usableUnicast(ip) {
			return nil, fmt.Errorf("status.addresses InternalIP %s is not unicast", ip)
		}
		out = append(out, ip.Unmap())
	}
	return out, nil
}
