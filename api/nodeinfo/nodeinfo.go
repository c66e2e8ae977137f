// Package nodeinfo reads what Veil needs from a Kubernetes Node: its
// addresses, its pod CIDRs, and what its agent published in the
// wireguard.veil.dev/* annotations (their keys are in api/annotations).
// The agent (ipcache and WireGuard peers), the policy compiler and meshctl
// all read Nodes through it, so they agree on which address belongs to
// which node.
//
//	n, err := nodeinfo.Parse(node)   // what one Node says
//	c := nodeinfo.Resolve(nodes, nodeinfo.Options{Self: me, ClusterCIDRs: cidrs})
//	for _, n := range c.Nodes { … }  // what each node may be trusted with
//	for _, x := range c.Conflicts { … } // claims refused, naming both nodes
//
// The package holds no state; its functions are safe for concurrent use.
package nodeinfo

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/veilmesh/veil/api/annotations"
)

// Fingerprint identifies a public key in status, logs and audits: the first
// 8 bytes of its SHA-256, in hex; "" for the zero key.
func Fingerprint(pub [32]byte) string {
	if pub == ([32]byte{}) {
		return ""
	}
	sum := sha256.Sum256(pub[:])
	return hex.EncodeToString(sum[:8])
}

// KeyFingerprint is the Fingerprint of a base64 public key, "" when s is
// not one.
func KeyFingerprint(s string) string {
	k, err := ParsePublicKey(s)
	if err != nil {
		return ""
	}
	return Fingerprint(k)
}

// ParsePublicKey decodes a base64 WireGuard public key.
func ParsePublicKey(s string) ([32]byte, error) {
	var k [32]byte
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != len(k) {
		return k, errors.New("not a base64 WireGuard key")
	}
	copy(k[:], b)
	if k == ([32]byte{}) {
		return k, errors.New("all-zero key")
	}
	return k, nil
}

// Node is what Veil reads from one Node object.
type Node struct {
	Name    string
	Created time.Time
	// InternalIPs are status.addresses of type InternalIP, in order.
	// ExternalIPs are not the node's as far as Veil is concerned: traffic
	// from them is not told apart from the rest of the world.
	InternalIPs []netip.Addr
	// PodCIDRs are spec.podCIDRs (or the older spec.podCIDR).
	PodCIDRs []netip.Prefix
	// PublicKey and Endpoint are what the node's agent published; zero
	// when it published nothing (yet).
	PublicKey [32]byte
	Endpoint  netip.AddrPort
}

// Addrs are the node's addresses: the published endpoint's address first
// (the agent's --node-ip, which may not be an InternalIP), then the
// InternalIPs.
func (n Node) Addrs() []netip.Addr {
	var out []netip.Addr
	if n.Endpoint.IsValid() {
		out = append(out, n.Endpoint.Addr())
	}
	for _, a := range n.InternalIPs {
		if !n.Endpoint.IsValid() || a != n.Endpoint.Addr() {
			out = append(out, a)
		}
	}
	return out
}

// IP is the node's IPv4 underlay address: the published endpoint's, else
// its first IPv4 InternalIP; invalid when it has neither.
func (n Node) IP() netip.Addr {
	for _, a := range n.Addrs() {
		if a.Is4() {
			return a
		}
	}
	return netip.Addr{}
}

// Equal reports whether n and o claim the same: callers skip resolving the
// cluster again for Node updates (kubelet heartbeats) that change nothing
// Veil reads.
func (n Node) Equal(o Node) bool {
	return n.Name == o.Name && n.Created.Equal(o.Created) && slices.Equal(n.InternalIPs, o.InternalIPs) &&
		slices.Equal(n.PodCIDRs, o.PodCIDRs) && n.PublicKey == o.PublicKey && n.Endpoint == o.Endpoint
}

// Tunnel reports whether the node published what a WireGuard peer needs.
func (n Node) Tunnel() bool {
	return n.PublicKey != ([32]byte{}) && n.Endpoint.IsValid()
}

// Parse reads a Node. It returns every field that is well formed, and an
// error naming each one that is not (that field is left zero): a caller that
// must not guess, like the WireGuard peer list, refuses the node; one that
// only needs addresses uses what parsed.
func Parse(n *corev1.Node) (Node, error) {
	out := Node{Name: n.Name, Created: n.CreationTimestamp.Time}
	var errs []error
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		ip, err := netip.ParseAddr(a.Address)
		if err != nil || !usableUnicast(ip) {
			errs = append(errs, fmt.Errorf("status.addresses InternalIP %q is not a unicast address", a.Address))
			continue
		}
		out.InternalIPs = append(out.InternalIPs, ip.Unmap())
	}
	raw := n.Spec.PodCIDRs
	if len(raw) == 0 && n.Spec.PodCIDR != "" {
		raw = []string{n.Spec.PodCIDR}
	}
	for _, r := range raw {
		p, err := netip.ParsePrefix(r)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("spec.podCIDRs: %w", err))
		case p != p.Masked():
			errs = append(errs, fmt.Errorf("spec.podCIDRs: %s has host bits set", p))
		default:
			out.PodCIDRs = append(out.PodCIDRs, netip.PrefixFrom(p.Addr().Unmap(), p.Bits()))
		}
	}
	keyS, hasKey := n.Annotations[annotations.WireGuardPublicKey]
	epS, hasEP := n.Annotations[annotations.WireGuardEndpoint]
	switch {
	case !hasKey && !hasEP:
		// Not published yet: the agent is still starting, or encryption is off.
	case !hasKey:
		errs = append(errs, fmt.Errorf("annotation %s missing", annotations.WireGuardPublicKey))
	case !hasEP:
		errs = append(errs, fmt.Errorf("annotation %s missing", annotations.WireGuardEndpoint))
	default:
		k, err := ParsePublicKey(keyS)
		if err != nil {
			errs = append(errs, fmt.Errorf("annotation %s: %w", annotations.WireGuardPublicKey, err))
			break
		}
		ep, err := netip.ParseAddrPort(strings.TrimSpace(epS))
		if err != nil {
			errs = append(errs, fmt.Errorf("annotation %s: %w", annotations.WireGuardEndpoint, err))
			break
		}
		if ep.Port() == 0 || !usableUnicast(ep.Addr()) {
			errs = append(errs, fmt.Errorf("annotation %s: %s is not a unicast address with a port", annotations.WireGuardEndpoint, ep))
			break
		}
		out.PublicKey, out.Endpoint = k, netip.AddrPortFrom(ep.Addr().Unmap(), ep.Port())
	}
	if len(errs) > 0 {
		return out, &NodeError{Node: n.Name, Err: joinErrors(errs)}
	}
	return out, nil
}

// NodeError says what in a Node could not be used.
type NodeError struct {
	Node string
	Err  error
}

func (e *NodeError) Error() string { return fmt.Sprintf("node %s: %v", e.Node, e.Err) }
func (e *NodeError) Unwrap() error { return e.Err }

func usableUnicast(a netip.Addr) bool {
	return a.IsValid() && !a.IsUnspecified() && !a.IsMulticast() && !a.IsLoopback() &&
		a.Unmap() != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// joinErrors keeps a NodeError on one line, as logs and Events want it.
func joinErrors(errs []error) error {
	if len(errs) == 1 {
		return errs[0]
	}
	msgs := make([]string, len(errs))
	for i, e := range errs {
		msgs[i] = e.Error()
	}
	return errors.New(strings.Join(msgs, "; "))
}
