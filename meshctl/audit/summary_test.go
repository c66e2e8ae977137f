package audit

import (
	"fmt"
	"strings"
	"testing"

	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/meshctl/output"
)

// inconsistent is four healthy nodes but for two views: node-1 has
// node-2 with node-3's key, and node-4 lets node-3 send from 10.9.0.0/16,
// outside node-3's pod CIDR.
func inconsistent() *Cluster {
	cs := healthy(4)
	for i := range cs.MeshNodes["node-1"].Status.Encryption.Peers {
		if p := &cs.MeshNodes["node-1"].Status.Encryption.Peers[i]; p.Node == "node-2" {
			p.PublicKey = key(3)
		}
	}
	for i := range cs.MeshNodes["node-4"].Status.Encryption.Peers {
		if p := &cs.MeshNodes["node-4"].Status.Encryption.Peers[i]; p.Node == "node-3" {
			p.AllowedIPs = append(p.AllowedIPs, "10.9.0.0/16")
		}
	}
	return cs
}

func count(s Summary, check string) CheckCount {
	for _, c := range s.ByCheck {
		if c.Check == check {
			return c
		}
	}
	return CheckCount{Check: check, Passed: -1, Failed: -1}
}

func TestSummaryCountsInconsistentPairs(t *testing.T) {
	r := New(inconsistent(), now, opts, "test")
	r.Finish(0)
	s := r.Summary
	if s.Nodes != 4 || s.Reported != 4 || s.TunnelsUp != 4 || s.KeysConsistent != 4 {
		t.Errorf("nodes %d, reported %d, tunnels up %d, keys consistent %d; want 4 each", s.Nodes, s.Reported, s.TunnelsUp, s.KeysConsistent)
	}
	if s.Pairs != 12 || s.PairsFailed != 2 {
		t.Errorf("pairs %d, failed %d; want 12, 2", s.Pairs, s.PairsFailed)
	}
	if got := count(s, "peer"); got.Passed != 10 || got.Failed != 2 {
		t.Errorf("peer: %+v; want 10 passed, 2 failed", got)
	}
	if got := count(s, "handshake"); got.Passed != 12 || got.Failed != 0 {
		t.Errorf("handshake: %+v; want 12 passed", got)
	}
	total := 0
	for _, c := range s.ByCheck {
		total += c.Passed + c.Failed
	}
	if total != len(r.AllChecks()) {
		t.Errorf("summary counts %d checks; the report has %d", total, len(r.AllChecks()))
	}
	var reasons []string
	for _, f := range r.Failures {
		reasons = append(reasons, f.Scope+" "+f.Check+": "+f.Reason)
	}
	want := []string{
		"node-1→node-2 peer: node-1 has node-2 with key " + fp(3) + ", node-2 publishes and reports key " + fp(2),
		"node-4→node-3 peer: node-4 lets node-3 send from 10.9.0.0/16, which is not node-3's",
	}
	if strings.Join(reasons, "\n") != strings.Join(want, "\n") {
		t.Errorf("failures:\n%s\nwant:\n%s", strings.Join(reasons, "\n"), strings.Join(want, "\n"))
	}
}

func fp(i int) string { return output.Dash(nodeinfo.KeyFingerprint(key(i))) }

func TestWriteShowsInconsistentPairs(t *testing.T) {
	r := New(inconsistent(), now, opts, "test")
	r.Finish(0)
	for _, tc := range []struct {
		name    string
		view    View
		want    []string
		wantNot []string
	}{
		{"summary", View{}, []string{
			"Encryption audit: FAIL  4 nodes, 12 node pairs, 62/64 checks passed",
			"Pairs: 12 checked from each node's own peer view, 2 failed",
			"FAIL: 2 checks failed:", "node-1→node-2  peer", "node-4→node-3  peer",
		}, []string{"PASS    key", "node-2→node-1"}},
		{"node", View{Node: "node-3"}, []string{"node-4→node-3  peer                 FAIL", "node-3→node-1  peer                 PASS"},
			[]string{"node-1→node-2  peer                 FAIL"}},
		{"details", View{Details: true}, []string{"node-2→node-1  peer                 PASS", "node-1→node-2  peer                 FAIL"}, nil},
		{"bounded", View{MaxFailures: 1}, []string{"node-1→node-2  peer", "… and 1 more failed"}, []string{"node-4→node-3  peer"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b strings.Builder
			if err := Write(&b, output.Palette{}, r, tc.view); err != nil {
				t.Fatal(err)
			}
			for _, w := range tc.want {
				if !strings.Contains(b.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, b.String())
				}
			}
			for _, w := range tc.wantNot {
				if strings.Contains(b.String(), w) {
					t.Errorf("output has %q:\n%s", w, b.String())
				}
			}
		})
	}
}

// TestDefaultOutputDoesNotGrowWithPairs: a healthy cluster's default
// output is the same size at 5 and 60 nodes but for the digits of the
// counts, while -o json (the evidence) grows with the pairs.
func TestDefaultOutputDoesNotGrowWithPairs(t *testing.T) {
	size := func(n int) int {
		r := New(healthy(n), now, opts, "test")
		r.Finish(0)
		if r.Verdict != Pass {
			t.Fatalf("%d nodes: verdict %s: %+v", n, r.Verdict, r.Failures[:min(3, len(r.Failures))])
		}
		var b strings.Builder
		if err := Write(&b, output.Palette{}, r, View{}); err != nil {
			t.Fatal(err)
		}
		return b.Len()
	}
	small, large := size(5), size(60)
	if large-small > 64 {
		t.Errorf("default output %d bytes at 5 nodes, %d at 60; want the same but for digits", small, large)
	}
	r := New(healthy(60), now, opts, "test")
	r.Finish(0)
	if got, want := len(r.AllChecks()), 60*len(NodeChecks())+60*59*2; got != want {
		t.Errorf("%d checks at 60 nodes; want every one (%d) in the evidence", got, want)
	}
}

// TestPairsFromPeerView: a peer listed twice is judged once, a peer that
// is no node is not judged, and a node missing from the view still FAILs.
func TestPairsFromPeerView(t *testing.T) {
	cs := healthy(3)
	enc := &cs.MeshNodes["node-1"].Status.Encryption
	dup := enc.Peers[0]
	ghost := enc.Peers[1]
	ghost.Node = "node-9"
	enc.Peers = append(enc.Peers[:1], dup, ghost) // node-2 twice, node-9, no node-3
	r := New(cs, now, opts, "test")
	r.Finish(0)
	seen := map[string]int{}
	for _, c := range r.AllChecks() {
		seen[c.Scope+" "+c.Check]++
	}
	for k, n := range seen {
		if n != 1 {
			t.Errorf("%s judged %d times", k, n)
		}
	}
	if seen["node-1→node-9 peer"] != 0 {
		t.Error("node-9 is no node but was judged")
	}
	var failed []string
	for _, f := range r.Failures {
		failed = append(failed, fmt.Sprintf("%s %s", f.Scope, f.Check))
	}
	if strings.Join(failed, ",") != "node-1→node-3 peer,node-1→node-3 handshake" {
		t.Errorf("failures %v; want node-1→node-3 peer and handshake", failed)
	}
}

// TestPairsMatchAllPairsReference: judging pairs from each node's peer
// view by lookup gives the rows the all-pairs search gave, on a cluster
// with a missing peer, a duplicate, a stranger and an unreported node.
func TestPairsMatchAllPairsReference(t *testing.T) {
	cs := inconsistent()
	enc := &cs.MeshNodes["node-2"].Status.Encryption
	enc.Peers = append(enc.Peers[1:], enc.Peers[1]) // drop node-1, node-3 twice
	stranger := enc.Peers[0]
	stranger.Node = "node-0"
	enc.Peers = append(enc.Peers, stranger)
	delete(cs.MeshNodes, "node-4")
	r := New(cs, now, opts, "test")
	r.Finish(0)
	var got []Check
	for _, c := range r.AllChecks() {
		if strings.Contains(c.Scope, "→") {
			got = append(got, c)
		}
	}
	nodes, _ := Snapshots(cs, now, opts.StaleAfter)
	var want []Check
	for _, a := range nodes {
		for bi, b := range nodes {
			if a.Node == b.Node {
				continue
			}
			var p *PeerReport
			for i := range a.Peers {
				if a.Peers[i].Node == b.Node {
					p = &a.Peers[i]
					break
				}
			}
			want = append(want, auditPair(a, b, p, claimsOf(&cs.Nodes[bi]), now, opts)...)
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%d pair rows; the all-pairs search makes %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("row %d: %+v; want %+v", i, got[i], want[i])
		}
	}
}

// TestProblemsNameAFewMissingPeers: a node peered with none of 11 others
// names five and counts the rest.
func TestProblemsNameAFewMissingPeers(t *testing.T) {
	cs := healthy(12)
	cs.MeshNodes["node-1"].Status.Encryption.Peers = nil
	nodes, _ := Snapshots(cs, now, opts.StaleAfter)
	var names []string
	for _, n := range nodes {
		names = append(names, n.Node)
	}
	got := nodes[0].Problems(now, opts.StaleAfter, NewNodeSet(names))
	want := "not peered with node-2, node-3, node-4, node-5, node-6 and 6 more"
	if len(got) != 1 || got[0] != want {
		t.Errorf("problems %q; want [%q]", got, want)
	}
	if got := nodes[1].Problems(now, opts.StaleAfter, NewNodeSet(names)); len(got) != 0 {
		t.Errorf("a healthy node's problems: %q", got)
	}
}
