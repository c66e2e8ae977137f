package cli

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/meshctl/audit"
)

// compactCluster rewrites every MeshNode of c as this version's agents
// write it: peers counted and digested, only the unhealthy ones listed.
// Each node's expected peers are the other nodes as healthyCluster peers
// them.
func compactCluster(c *cluster) *cluster {
	ref := healthyCluster(len(c.nodes))
	for _, mn := range c.mesh {
		var expected []meshv1alpha1.PeerStatus
		for _, other := range ref.mesh {
			if other.Name == mn.Name {
				continue
			}
			for _, p := range other.Status.Encryption.Peers {
				if p.Node != mn.Name && !slices.ContainsFunc(expected, func(e meshv1alpha1.PeerStatus) bool { return e.Node == p.Node }) {
					expected = append(expected, p)
				}
			}
		}
		e := &mn.Status.Encryption
		s, listed := meshv1alpha1.SummarizePeers(e.Peers, expected, testNow, meshv1alpha1.DefaultHealthyHandshakeAge)
		e.PeerCount, e.PeerSummary, e.Peers = int32(len(e.Peers)), &s, listed
	}
	return c
}

// encryption status and audit encryption read compact MeshNodes: a healthy
// cluster passes with every peer counted; a peer without a handshake and a
// node not peered are named, as they are from full lists.
func TestCompactMeshNodes(t *testing.T) {
	healthy := compactCluster(healthyCluster(4))
	out, stderr, code := runCluster(t, healthy, nil, "encryption", "status", "-o", "json")
	var st encryptionStatusReport
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	if code != ExitOK || st.Summary != "Encryption: WireGuard (userspace), 4/4 nodes, strict" || st.PeersConfigured != 12 || st.PeersExpected != 12 || len(st.Problems) != 0 {
		t.Errorf("exit %d, summary %q, peers %d/%d, problems %v", code, st.Summary, st.PeersConfigured, st.PeersExpected, st.Problems)
	}
	r, code, stderr := auditJSON(t, compactCluster(healthyCluster(4)), nil)
	if code != ExitOK || r.Verdict != audit.Pass || r.Summary.Pairs != 12 || r.Summary.Checks != len(r.Checks) {
		t.Fatalf("audit: exit %d, verdict %s, summary %+v, %d checks, stderr %s\n%s", code, r.Verdict, r.Summary, len(r.Checks), stderr, failuresString(r.Failures))
	}

	broken := healthyCluster(4)
	broken.peer(1, 2).LastHandshake = nil
	broken.dropPeer(3, 4)
	compactCluster(broken)
	out, _, code = runCluster(t, broken, nil, "encryption", "status")
	for _, want := range []string{"node-1  no handshake yet with node-2", "node-3  not peered with node-4"} {
		if !strings.Contains(out, want) {
			t.Errorf("encryption status does not say %q (exit %d):\n%s", want, code, out)
		}
	}
	r, code, _ = auditJSON(t, compactCluster(func() *cluster {
		c := healthyCluster(4)
		c.peer(1, 2).LastHandshake = nil
		c.dropPeer(3, 4)
		return c
	}()), nil)
	var failed []string
	for _, f := range r.Failures {
		failed = append(failed, f.Scope+" "+f.Check)
	}
	want := []string{"node-1→node-2 handshake", "node-3→node-4 peer", "node-3→node-4 handshake"}
	if code != ExitFailure || !slices.Equal(failed, want) {
		t.Errorf("audit: exit %d, failures %v; want %v", code, failed, want)
	}
}
