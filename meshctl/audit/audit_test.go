package audit

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/api/annotations"
	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/meshctl/output"
)

// The engine's own tests, without cobra or an API server; meshctl/cli's
// tests run the same engine through the commands and golden files.

var now = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

var opts = Options{MaxHandshakeAge: 5 * time.Minute, MaxKeyAge: 2160 * time.Hour, StaleAfter: DefaultStaleAfter}

func key(i int) string { return base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{byte(i)}, 32)) }

func ago(d time.Duration) metav1.Time { return metav1.NewTime(now.Add(-d)) }

// healthy is n nodes, encrypted, strict, peered with recent handshakes,
// each MeshNode listing every peer.
func healthy(n int) *Cluster { return healthyWith(n, false) }

// Nodes past 255 get wider keys and addresses.
func nodeKey(i int) string {
	if i < 256 {
		return key(i)
	}
	var k [32]byte
	binary.BigEndian.PutUint32(k[:], uint32(i))
	return base64.StdEncoding.EncodeToString(k[:])
}

func nodeCIDR(i int) string {
	if i < 256 {
		return fmt.Sprintf("10.0.%d.0/24", i)
	}
	return fmt.Sprintf("10.%d.%d.0/24", i>>8, i&255)
}

func nodeAddr(i int) string {
	if i < 256 {
		return fmt.Sprintf("192.168.50.%d", i)
	}
	return fmt.Sprintf("192.169.%d.%d", i>>8, i&255)
}

// healthyWith is healthy; with compact, each MeshNode is written as this
// version's agents write it (counts and a digest, no healthy peer listed),
// without ever holding the n·(n-1) peers.
func healthyWith(n int, compact bool) *Cluster {
	cs := &Cluster{Server: "https://api.example:6443", MeshNodes: map[string]*meshv1alpha1.MeshNode{}}
	name := func(i int) string { return fmt.Sprintf("node-%d", i) }
	hs := ago(time.Minute)
	var peers []meshv1alpha1.PeerStatus
	for i := 1; i <= n; i++ {
		cs.Nodes = append(cs.Nodes, corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name(i), Annotations: map[string]string{
				annotations.WireGuardPublicKey: nodeKey(i),
				annotations.WireGuardEndpoint:  nodeAddr(i) + ":51820",
			}},
			Spec: corev1.NodeSpec{PodCIDRs: []string{nodeCIDR(i)}},
		})
		peers = append(peers, meshv1alpha1.PeerStatus{
			Node: name(i), PublicKey: nodeKey(i), Endpoint: nodeAddr(i) + ":51820", AllowedIPs: []string{nodeCIDR(i)}, LastHandshake: &hs,
		})
	}
	for i := 1; i <= n; i++ {
		enc := meshv1alpha1.EncryptionStatus{
			Mode: meshv1alpha1.EncryptionModeKernel, Interface: "veilwg0", PublicKey: nodeKey(i),
			KeyCreated: ago(24 * time.Hour), ListenPort: 51820, StrictMode: true, GuardedDevices: []string{"eth0"},
		}
		others := slices.Delete(slices.Clone(peers), i-1, i)
		if compact {
			s, listed := meshv1alpha1.SummarizePeers(others, others, now, meshv1alpha1.DefaultHealthyHandshakeAge)
			enc.PeerCount, enc.PeerSummary, enc.Peers = int32(len(others)), &s, listed
		} else {
			for _, p := range others {
				hs := *p.LastHandshake
				p.LastHandshake = &hs
				p.AllowedIPs = slices.Clone(p.AllowedIPs)
				enc.Peers = append(enc.Peers, p)
			}
		}
		cs.MeshNodes[name(i)] = &meshv1alpha1.MeshNode{
			ObjectMeta: metav1.ObjectMeta{Name: name(i)},
			Status: meshv1alpha1.MeshNodeStatus{
				NodeIP: nodeAddr(i), Updated: ago(10 * time.Second), Encryption: enc,
			},
		}
	}
	return cs
}

func TestHealthyClusterPasses(t *testing.T) {
	r := New(healthy(3), now, opts, "test")
	r.Finish(0)
	if r.Verdict != Pass || len(r.Failures) != 0 {
		t.Fatalf("verdict %s, failures %+v; want PASS", r.Verdict, r.Failures)
	}
	if got, want := len(r.AllChecks()), 3*len(NodeChecks())+6*2; got != want {
		t.Errorf("%d checks; want %d", got, want)
	}
}

func TestFaults(t *testing.T) {
	for _, tc := range []struct {
		name  string
		spoil func(cs *Cluster)
		scope string
		check string
	}{
		{"no MeshNode", func(cs *Cluster) { delete(cs.MeshNodes, "node-2") }, "node-2", "status-fresh"},
		{"stale", func(cs *Cluster) { cs.MeshNodes["node-1"].Status.Updated = ago(time.Hour) }, "node-1", "status-fresh"},
		{"disabled", func(cs *Cluster) {
			cs.MeshNodes["node-1"].Status.Encryption.Mode = meshv1alpha1.EncryptionModeDisabled
		}, "node-1", "encryption-enabled"},
		{"key not published", func(cs *Cluster) { cs.Nodes[1].Annotations[annotations.WireGuardPublicKey] = key(9) }, "node-2", "key-published"},
		{"old handshake", func(cs *Cluster) {
			hs := ago(time.Hour)
			cs.MeshNodes["node-1"].Status.Encryption.Peers[0].LastHandshake = &hs
		}, "node-1→node-2", "handshake"},
		{"foreign allowed IPs", func(cs *Cluster) {
			p := &cs.MeshNodes["node-1"].Status.Encryption.Peers[0]
			p.AllowedIPs = append(p.AllowedIPs, "10.0.1.0/24")
		}, "node-1→node-2", "peer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cs := healthy(2)
			tc.spoil(cs)
			r := New(cs, now, opts, "test")
			r.Finish(0)
			if r.Verdict != Fail {
				t.Fatalf("verdict %s; want FAIL", r.Verdict)
			}
			for _, f := range r.Failures {
				if f.Scope == tc.scope && f.Check == tc.check {
					return
				}
			}
			t.Errorf("failures %+v; want %s %s among them", r.Failures, tc.scope, tc.check)
		})
	}
}

// Every node's rows come first, in node order, then the pairs, A then B
// by name, each pair's peer row before its handshake row.
func TestChecksInReportOrder(t *testing.T) {
	cs := healthy(3)
	r := New(cs, now, opts, "test")
	r.Finish(0)
	var nodes, pairs []string
	for _, c := range r.AllChecks() {
		if strings.Contains(c.Scope, "→") {
			pairs = append(pairs, c.Scope+" "+c.Check)
		} else if len(pairs) > 0 {
			t.Fatalf("node row %s %s after the pairs", c.Scope, c.Check)
		} else if len(nodes) == 0 || nodes[len(nodes)-1] != c.Scope {
			nodes = append(nodes, c.Scope)
		}
	}
	if want := "node-1|node-2|node-3"; strings.Join(nodes, "|") != want {
		t.Errorf("nodes in order %q; want %q", strings.Join(nodes, "|"), want)
	}
	want := "node-1→node-2 peer|node-1→node-2 handshake|node-1→node-3 peer|node-1→node-3 handshake|node-2→node-1 peer|node-2→node-1 handshake|" +
		"node-2→node-3 peer|node-2→node-3 handshake|node-3→node-1 peer|node-3→node-1 handshake|node-3→node-2 peer|node-3→node-2 handshake"
	if strings.Join(pairs, "|") != want {
		t.Errorf("pairs in order %q; want %q", strings.Join(pairs, "|"), want)
	}
}

func TestMarkerPort(t *testing.T) {
	udp := corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{Ports: []corev1.ContainerPort{
		{Protocol: corev1.ProtocolTCP, ContainerPort: 80}, {Protocol: corev1.ProtocolUDP, ContainerPort: 53},
	}}}}}
	for _, tc := range []struct {
		name string
		flag uint32
		pod  corev1.Pod
		want uint32
	}{
		{"flag wins", 4000, udp, 4000},
		{"declared UDP port", 0, udp, 53},
		{"discard", 0, corev1.Pod{}, defaultMarkerPort},
	} {
		if got := markerPort(tc.flag, tc.pod); got != tc.want {
			t.Errorf("%s: got %d; want %d", tc.name, got, tc.want)
		}
	}
}

func TestWriteColourOnlyWithPalette(t *testing.T) {
	r := New(healthy(2), now, opts, "test")
	r.Finish(0)
	var plain, coloured strings.Builder
	if err := Write(&plain, output.Palette{}, r, View{}); err != nil {
		t.Fatal(err)
	}
	if err := Write(&coloured, output.Palette{On: true}, r, View{}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(plain.String(), "\x1b[") || !strings.Contains(coloured.String(), "\x1b[") {
		t.Errorf("colour in plain output or none in coloured output")
	}
	if !strings.HasPrefix(plain.String(), "Encryption audit: PASS") {
		t.Errorf("output starts %q; want the verdict", strings.SplitN(plain.String(), "\n", 2)[0])
	}
}
