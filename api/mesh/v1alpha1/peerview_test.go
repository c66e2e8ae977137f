package v1alpha1

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

var now = time.Date(2026, 11, 30, 10, 0, 0, 0, time.UTC)

func peerOf(i int, hs *metav1.Time) PeerStatus {
	var k [32]byte
	binary.BigEndian.PutUint32(k[:], uint32(i))
	return PeerStatus{
		Node: fmt.Sprintf("node-%05d", i), PublicKey: base64.StdEncoding.EncodeToString(k[:]),
		Endpoint:   fmt.Sprintf("10.%d.%d.1:51820", i/256, i%256),
		AllowedIPs: []string{fmt.Sprintf("10.%d.%d.0/24", 100+i/256, i%256)}, LastHandshake: hs, RxBytes: 123456789, TxBytes: 987654321,
	}
}

func at(d time.Duration) *metav1.Time { t := metav1.NewTime(now.Add(-d)); return &t }

// statusBytes is the JSON of a MeshNode whose agent sees peers (the
// configured ones) against expected nodes.
func statusBytes(t *testing.T, configured, expected []PeerStatus) (int, PeerSummary) {
	t.Helper()
	s, listed := SummarizePeers(configured, expected, now, DefaultHealthyHandshakeAge)
	mn := MeshNode{ObjectMeta: metav1.ObjectMeta{Name: "node-00000"}}
	mn.Status.Encryption = EncryptionStatus{Mode: EncryptionModeKernel, PeerCount: int32(len(configured)), PeerSummary: &s, Peers: listed}
	b, err := json.Marshal(mn)
	if err != nil {
		t.Fatal(err)
	}
	return len(b), s
}

// TestMeshNodeStatusSizeAt5000Peers: a node of a 5,000-node mesh writes a
// MeshNode of a few KB, healthy or not (before, every peer was listed:
// about 1 MB).
func TestMeshNodeStatusSizeAt5000Peers(t *testing.T) {
	const peers = 4999
	const limit = 32 << 10
	var healthy, never, expected []PeerStatus
	for i := 1; i <= peers; i++ {
		healthy = append(healthy, peerOf(i, at(time.Duration(i%170)*time.Second)))
		never = append(never, peerOf(i, nil))
		e := peerOf(i, nil)
		e.RxBytes, e.TxBytes = 0, 0
		expected = append(expected, e)
	}
	full, err := json.Marshal(MeshNode{Status: MeshNodeStatus{Encryption: EncryptionStatus{Peers: healthy}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name       string
		configured []PeerStatus
		want       PeerSummary
	}{
		{"all healthy", healthy, PeerSummary{Expected: peers, Healthy: peers}},
		{"none handshaken", never, PeerSummary{Expected: peers, Handshaking: peers, Unlisted: peers - MaxListedPeers}},
		{"none configured", nil, PeerSummary{Expected: peers, Missing: peers, Unlisted: peers - MaxListedPeers}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			size, s := statusBytes(t, tc.configured, expected)
			if size > limit {
				t.Errorf("MeshNode is %d bytes at %d peers; want at most %d", size, peers, limit)
			}
			got := PeerSummary{Expected: s.Expected, Healthy: s.Healthy, Handshaking: s.Handshaking, Missing: s.Missing, Unlisted: s.Unlisted}
			if got != tc.want {
				t.Errorf("summary %+v; want %+v", got, tc.want)
			}
			t.Logf("%s: %d bytes (every peer listed: %d bytes, %.0f×)", tc.name, size, len(full), float64(len(full))/float64(size))
		})
	}
}

func TestSummarizePeersListsEveryUnhealthyKind(t *testing.T) {
	expected := []PeerStatus{peerOf(1, nil), peerOf(2, nil), peerOf(3, nil), peerOf(4, nil)}
	stranger := peerOf(9, at(time.Second))
	stranger.Node = "10.0.9.1"
	configured := []PeerStatus{peerOf(1, at(10*time.Second)), peerOf(2, nil), peerOf(3, at(4*time.Minute)), stranger}
	s, listed := SummarizePeers(configured, expected, now, DefaultHealthyHandshakeAge)
	want := map[string]string{"node-00002": ProblemNoHandshake, "node-00003": "last handshake 4m0s ago", "node-00004": ProblemNotConfigured, "10.0.9.1": ProblemUnknownKey}
	if len(listed) != len(want) {
		t.Fatalf("listed %v; want %v", listed, want)
	}
	for _, p := range listed {
		if want[p.Node] != p.Problem {
			t.Errorf("%s: problem %q; want %q", p.Node, p.Problem, want[p.Node])
		}
	}
	if s.Healthy != 1 || s.Handshaking != 1 || s.Stale != 1 || s.Missing != 1 || s.Unknown != 1 || s.Unlisted != 0 {
		t.Errorf("summary %+v", s)
	}
	if !s.OldestHealthyHandshake.Equal(at(10 * time.Second)) {
		t.Errorf("oldest healthy handshake %v; want %v", s.OldestHealthyHandshake, at(10*time.Second))
	}
	var d PeerDigest
	p := peerOf(1, nil)
	d.AddPeer(p.Node, p.PublicKey, p.Endpoint, p.AllowedIPs)
	if s.Digest != d.String() {
		t.Errorf("digest %s; want that of node-00001 alone, %s", s.Digest, d)
	}
}

func TestPeerDigestIsASetSum(t *testing.T) {
	var ab, ba, a PeerDigest
	ab.AddPeer("a", "ka", "1.1.1.1:1", []string{"10.0.0.0/24", "1.1.1.1/32"})
	ab.AddPeer("b", "kb", "1.1.1.2:1", []string{"10.0.1.0/24"})
	ba.AddPeer("b", "kb", "1.1.1.2:1", []string{"10.0.1.0/24"})
	ba.AddPeer("a", "ka", "1.1.1.1:1", []string{"1.1.1.1/32", "10.0.0.0/24"})
	if ab != ba {
		t.Errorf("digest depends on order: %s vs %s", ab, ba)
	}
	a.AddPeer("a", "ka", "1.1.1.1:1", []string{"10.0.0.0/24", "1.1.1.1/32"})
	var b PeerDigest
	b.AddPeer("b", "kb", "1.1.1.2:1", []string{"10.0.1.0/24"})
	ab.Sub(b)
	if ab != a {
		t.Errorf("a+b-b = %s; want %s", ab, a)
	}
	var other PeerDigest
	other.AddPeer("a", "ka", "1.1.1.9:1", []string{"10.0.0.0/24", "1.1.1.1/32"})
	if other == a {
		t.Errorf("a different endpoint gives the same digest %s", a)
	}
}
