package v1alpha1

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// MaxListedPeers bounds EncryptionStatus.Peers (the CRD's MaxItems).
const MaxListedPeers = 100

// DefaultHealthyHandshakeAge bounds a healthy peer's last handshake:
// WireGuard renews a session every 2 minutes while it is used (Veil's
// persistent keepalive keeps every peer in use) and refuses one older than
// 3 minutes.
const DefaultHealthyHandshakeAge = 3 * time.Minute

// ProblemNotConfigured is the Problem of a node that published a key but
// has no peer on the device.
const ProblemNotConfigured = "not configured"

// ProblemUnknownKey is the Problem of a peer whose key no node publishes.
const ProblemUnknownKey = "key of no node"

// ProblemNoHandshake is the Problem of a peer that never completed a
// handshake.
const ProblemNoHandshake = "no handshake yet"

// PeerDigest is an order-free sum of peer views: the SHA-256 of each view
// (node, key, endpoint, allowed IPs; see AddPeer), read as four 64-bit
// words and added word by word. A reader builds the digest a node should
// report from what the other nodes publish, and subtracts the peers the
// node lists instead of summing again, so checking every node of an n-node
// mesh costs O(n) sums, not O(n²).
//
// +k8s:deepcopy-gen=false
type PeerDigest [4]uint64

func peerHash(node, publicKey, endpoint string, allowedIPs []string) [4]uint64 {
	ips := slices.Clone(allowedIPs)
	slices.Sort(ips)
	sum := sha256.Sum256([]byte(node + "\n" + publicKey + "\n" + endpoint + "\n" + strings.Join(ips, ",")))
	var w [4]uint64
	for i := range w {
		w[i] = binary.LittleEndian.Uint64(sum[i*8:])
	}
	return w
}

// AddPeer adds one peer's view; allowed IPs are compared as a set.
func (d *PeerDigest) AddPeer(node, publicKey, endpoint string, allowedIPs []string) {
	h := peerHash(node, publicKey, endpoint, allowedIPs)
	for i := range d {
		d[i] += h[i]
	}
}

// Add adds every peer of o.
func (d *PeerDigest) Add(o PeerDigest) {
	for i := range d {
		d[i] += o[i]
	}
}

// Sub takes every peer of o away.
func (d *PeerDigest) Sub(o PeerDigest) {
	for i := range d {
		d[i] -= o[i]
	}
}

// String is the digest as PeerSummary.Digest holds it.
func (d PeerDigest) String() string {
	return fmt.Sprintf("v1:%016x%016x%016x%016x", d[0], d[1], d[2], d[3])
}

// SummarizePeers sorts a node's peer view into what its EncryptionStatus
// records: counts, the digest of the healthy peers, and the unhealthy ones
// (at most MaxListedPeers, by node name; PeerSummary.Unlisted counts the
// rest). configured are the device's peers, each named by the node whose
// key it holds; expected are the nodes it should peer with, as they publish
// themselves (node, key, endpoint, allowed IPs). A configured peer whose
// node is not expected holds a key of no node.
func SummarizePeers(configured, expected []PeerStatus, now time.Time, healthyAge time.Duration) (PeerSummary, []PeerStatus) {
	s := PeerSummary{Expected: int32(len(expected)), HealthyHandshakeAge: metav1.Duration{Duration: healthyAge}}
	want := make(map[string]bool, len(expected))
	for _, e := range expected {
		want[e.Node] = true
	}
	var (
		digest   PeerDigest
		listed   []PeerStatus
		oldest   *metav1.Time
		have     = make(map[string]bool, len(configured))
		unlisted = func(p PeerStatus) { listed = append(listed, p) }
	)
	for _, p := range configured {
		have[p.Node] = true
		switch {
		case !want[p.Node]:
			s.Unknown++
			p.Problem = ProblemUnknownKey
			unlisted(p)
		case p.LastHandshake == nil || p.LastHandshake.IsZero():
			s.Handshaking++
			p.Problem = ProblemNoHandshake
			unlisted(p)
		case now.Sub(p.LastHandshake.Time) > healthyAge:
			s.Stale++
			p.Problem = fmt.Sprintf("last handshake %s ago", now.Sub(p.LastHandshake.Time).Round(time.Second))
			unlisted(p)
		default:
			s.Healthy++
			digest.AddPeer(p.Node, p.PublicKey, p.Endpoint, p.AllowedIPs)
			if oldest == nil || p.LastHandshake.Before(oldest) {
				oldest = p.LastHandshake.DeepCopy()
			}
		}
	}
	for _, e := range expected {
		if !have[e.Node] {
			s.Missing++
			unlisted(PeerStatus{Node: e.Node, Problem: ProblemNotConfigured})
		}
	}
	slices.SortFunc(listed, func(a, b PeerStatus) int { return cmp.Compare(a.Node, b.Node) })
	if len(listed) > MaxListedPeers {
		s.Unlisted = int32(len(listed) - MaxListedPeers)
		listed = listed[:MaxListedPeers]
	}
	s.OldestHealthyHandshake = oldest
	s.Digest = digest.String()
	return s, listed
}
