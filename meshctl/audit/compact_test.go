package audit

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
)

// compact rewrites every MeshNode of cs as an agent of this version
// writes it: the peers counted by health and digested, only the unhealthy
// ones listed. The view each agent summarizes is the full list it had.
func compact(cs *Cluster) {
	expected := slices.Clone(healthy(len(cs.Nodes)).MeshNodes["node-1"].Status.Encryption.Peers)
	self := healthy(len(cs.Nodes)).MeshNodes["node-2"].Status.Encryption.Peers[0] // node-1 as node-2 sees it
	expected = append(expected, self)
	for name, mn := range cs.MeshNodes {
		e := &mn.Status.Encryption
		var want []meshv1alpha1.PeerStatus
		for _, x := range expected {
			if x.Node != name {
				want = append(want, x)
			}
		}
		s, listed := meshv1alpha1.SummarizePeers(e.Peers, want, now, meshv1alpha1.DefaultHealthyHandshakeAge)
		e.PeerCount, e.PeerSummary, e.Peers = int32(len(e.Peers)), &s, listed
	}
}

func failedPairs(r Report) []string {
	var out []string
	for _, c := range r.AllChecks() {
		if c.Result != Pass && strings.Contains(c.Scope, "→") {
			out = append(out, c.Scope+" "+c.Check)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// TestCompactStatusFindsEveryUnhealthyPair: with MeshNodes that list only
// their unhealthy peers, the audit passes a healthy cluster with the same
// counts as full lists give, and fails every pair that full lists fail.
func TestCompactStatusFindsEveryUnhealthyPair(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(cs *Cluster)
		// exact: the compact audit fails exactly the pairs the full
		// lists fail (the fault is one a listed peer shows).
		exact bool
	}{
		{"healthy", func(*Cluster) {}, true},
		{"never handshaken", func(cs *Cluster) { cs.MeshNodes["node-1"].Status.Encryption.Peers[1].LastHandshake = nil }, true},
		{"stale handshake", func(cs *Cluster) {
			hs := ago(4 * time.Minute)
			cs.MeshNodes["node-3"].Status.Encryption.Peers[0].LastHandshake = &hs
		}, true},
		{"not peered", func(cs *Cluster) {
			e := &cs.MeshNodes["node-2"].Status.Encryption
			e.Peers = e.Peers[1:]
		}, true},
		{"no MeshNode", func(cs *Cluster) { delete(cs.MeshNodes, "node-4") }, true},
		// A healthy-looking peer with a key its node does not publish:
		// the digest tells that node-1's view is wrong, not which peer,
		// so all of node-1's unlisted pairs fail.
		{"wrong key", func(cs *Cluster) { cs.MeshNodes["node-1"].Status.Encryption.Peers[2].PublicKey = key(99) }, false},
		{"wrong allowed IPs", func(cs *Cluster) {
			cs.MeshNodes["node-5"].Status.Encryption.Peers[0].AllowedIPs = []string{"10.0.0.0/16"}
		}, false},
		{"wrong endpoint", func(cs *Cluster) {
			cs.MeshNodes["node-2"].Status.Encryption.Peers[3].Endpoint = "192.168.50.77:51820"
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			full := healthy(5)
			tc.break_(full)
			want := New(full, now, opts, "test")
			want.Finish(0)
			cs := healthy(5)
			tc.break_(cs)
			compact(cs)
			got := New(cs, now, opts, "test")
			got.Finish(0)
			wantFailed, gotFailed := failedPairs(want), failedPairs(got)
			for _, f := range wantFailed {
				if !slices.Contains(gotFailed, f) {
					t.Errorf("the full lists fail %s; the compact status does not (it fails %v)", f, gotFailed)
				}
			}
			if tc.exact && !slices.Equal(gotFailed, wantFailed) {
				t.Errorf("compact fails %v; full lists fail %v", gotFailed, wantFailed)
			}
			if !tc.exact && len(gotFailed) <= len(wantFailed) {
				t.Errorf("compact fails %v; want more than the full lists' %v (every unlisted pair of the node)", gotFailed, wantFailed)
			}
			if tc.exact && got.Summary.Checks != want.Summary.Checks {
				t.Errorf("compact counts %d checks; full lists %d", got.Summary.Checks, want.Summary.Checks)
			}
			if (got.Verdict == Pass) != (want.Verdict == Pass) {
				t.Errorf("verdict %s; full lists %s", got.Verdict, want.Verdict)
			}
			// The summary's counts equal those of the rows.
			failed := 0
			for _, c := range got.AllChecks() {
				if c.Result != Pass {
					failed++
				}
			}
			if failed != got.Summary.Failed || len(got.AllChecks()) != got.Summary.Checks {
				t.Errorf("summary %d checks, %d failed; the rows are %d, %d failed", got.Summary.Checks, got.Summary.Failed, len(got.AllChecks()), failed)
			}
		})
	}
}

// A node with more unhealthy peers than it lists cannot vouch for its
// unlisted ones: they all fail, and so do the listed ones.
func TestCompactStatusTruncatedFailsUnlisted(t *testing.T) {
	cs := healthy(3)
	for i := range cs.MeshNodes["node-1"].Status.Encryption.Peers {
		cs.MeshNodes["node-1"].Status.Encryption.Peers[i].LastHandshake = nil
	}
	compact(cs)
	s := cs.MeshNodes["node-1"].Status.Encryption.PeerSummary
	// As if node-1 had listed only node-2 of its unhealthy peers.
	cs.MeshNodes["node-1"].Status.Encryption.Peers = cs.MeshNodes["node-1"].Status.Encryption.Peers[:1]
	s.Unlisted = 1
	r := New(cs, now, opts, "test")
	r.Finish(0)
	got := failedPairs(r)
	want := []string{"node-1→node-2 handshake", "node-1→node-3 handshake", "node-1→node-3 peer"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("failed %v; want %v", got, want)
	}
}

// TestJSONDoesNotGrowWithPairs: -o json holds the summary, the nodes and
// at most the bounded failures, so 4× the nodes (16× the pairs) is about
// 4× the bytes even when every pair fails; --details streams every check.
func TestJSONDoesNotGrowWithPairs(t *testing.T) {
	size := func(n int, details bool) (int, Report) {
		cs := healthy(n)
		compact(cs)
		for _, mn := range cs.MeshNodes {
			mn.Status.Encryption.PeerSummary.Digest = "v1:wrong"
		}
		r := New(cs, now, opts, "test")
		r.Finish(0)
		var b strings.Builder
		if _, err := WriteStructured(&b, "json", r, View{Details: details}); err != nil {
			t.Fatal(err)
		}
		var back Report
		if err := json.Unmarshal([]byte(b.String()), &back); err != nil {
			t.Fatalf("decode: %v", err)
		}
		if details && len(back.Checks) != r.Summary.Checks {
			t.Errorf("--details lists %d checks; the summary counts %d", len(back.Checks), r.Summary.Checks)
		}
		if !details && (len(back.Checks) != 0 || len(back.Failures) != DefaultReportFailures || back.FailuresNotListed != r.Summary.Failed-DefaultReportFailures) {
			t.Errorf("default JSON: %d checks, %d failures, %d not listed; want 0, %d, %d", len(back.Checks), len(back.Failures), back.FailuresNotListed,
				DefaultReportFailures, r.Summary.Failed-DefaultReportFailures)
		}
		return b.Len(), r
	}
	small, _ := size(20, false)
	large, r := size(80, false)
	if r.Summary.PairsFailed != 80*79 {
		t.Fatalf("%d pairs failed; want all %d", r.Summary.PairsFailed, 80*79)
	}
	if ratio := float64(large) / float64(small); ratio > 5 {
		t.Errorf("default JSON %d bytes at 80 nodes, %d at 20: %.1f×; want about 4× (it grows with the pairs)", large, small, ratio)
	}
	full, _ := size(80, true)
	t.Logf("default JSON: %d bytes at 20 nodes, %d at 80; --details %d", small, large, full)
}
