package policysync

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/policy"
)

// The ipcache followed pod by pod (what a pod change elsewhere costs)
// equals the one built from the whole cluster, through random pod
// additions, relabels, moves between nodes, address changes, addresses
// shared by two pods, pods with two IPv4 addresses, deactivations and
// deletions, some of them several before a write; and a full rebuild
// afterwards writes nothing.
func TestIncrementalIPCacheMatchesFullBuild(t *testing.T) {
	for _, node := range []string{"", "self"} {
		t.Run("compiler node="+node, func(t *testing.T) { testIncrementalIPCache(t, node) })
	}
}

// testIncrementalIPCache runs the test with a compiler for node (""
// compiles every endpoint; the agent's compiles its own node's only, and
// keeps the pods elsewhere in no group).
func testIncrementalIPCache(t *testing.T, node string) {
	for seed := range 20 {
		r := rand.New(rand.NewPCG(uint64(seed), 5))
		d := testSyncer(t, "self", "10.99.0.1")
		c, err := policy.New(policy.Options{Node: node})
		if err != nil {
			t.Fatal(err)
		}
		d.cfg.Compiler = c
		dp := newFakeDatapath()
		d.cfg.Datapath = dp
		nodes := []*corev1.Node{
			agentNode(t, "self", 1, "10.244.0.0/24", "10.99.0.1:51871", "10.99.0.1"),
			agentNode(t, "n1", 2, "10.244.1.0/24", "10.99.0.2:51871", "10.99.0.2"),
			agentNode(t, "n2", 3, "10.244.2.0/24", "", "10.99.0.3"),
		}
		d.cfg.Listers.Nodes = nodeLister(t, nodes...)
		for _, n := range nodes {
			if err := d.apply(d.cfg.Compiler.UpsertNode(n)); err != nil {
				t.Fatal(err)
			}
		}
		// Resolving the nodes' claims is what a Node sync does.
		if err := d.syncNodes(t.Context(), "n1", nodes[1]); err != nil {
			t.Fatal(err)
		}
		if err := d.flushIPCache(); err != nil {
			t.Fatal(err)
		}
		pod := func(name string) *corev1.Pod {
			node := []string{"self", "n1", "n2", "gone"}[r.IntN(4)]
			ip := fmt.Sprintf("10.244.%d.%d", r.IntN(3), 2+r.IntN(6))
			p := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: name, Labels: map[string]string{"app": fmt.Sprint(r.IntN(3))}},
				Spec:       corev1.PodSpec{NodeName: node},
				Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}},
			}
			switch r.IntN(10) {
			case 0:
				p.Status.Phase = corev1.PodSucceeded
			case 1:
				p.Status.PodIP, p.Status.PodIPs = "", nil
			case 2:
				p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: "fd00::5"})
			case 3:
				// Two IPv4 addresses: the pod claims both.
				p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: fmt.Sprintf("10.244.%d.%d", r.IntN(3), 2+r.IntN(6))})
			}
			return p
		}
		for step := range 60 {
			name := fmt.Sprintf("p%d", r.IntN(8))
			var what string
			if r.IntN(5) == 0 {
				what = "delete " + name
				if err := d.apply(d.cfg.Compiler.DeletePod("x", name)); err != nil {
					t.Fatal(err)
				}
			} else {
				p := pod(name)
				what = fmt.Sprintf("upsert %s on %s at %s labels %v", name, p.Spec.NodeName, p.Status.PodIP, p.Labels)
				if err := d.apply(d.cfg.Compiler.UpsertPod(p)); err != nil {
					t.Fatal(err)
				}
			}
			// Sometimes several changes reach the compiler before the
			// ipcache is written, as in a burst.
			if r.IntN(3) == 0 && step < 59 {
				continue
			}
			if err := d.flushIPCache(); err != nil {
				t.Fatal(err)
			}
			want := d.wantIPCache(d.ResolvedCluster())
			if !maps.Equal(dp.ipcache, want) {
				t.Fatalf("seed %d step %d (%s): ipcache followed pod by pod\n%v\nwant (whole cluster)\n%v", seed, step, what, dp.ipcache, want)
			}
			if !maps.Equal(d.writtenIPCache(), want) {
				t.Fatalf("seed %d step %d (%s): the syncer's record of the ipcache differs from what it wrote", seed, step, what)
			}
		}
		// A full rebuild now changes nothing.
		d.IPCacheStale()
		before := maps.Clone(dp.ipcache)
		if err := d.flushIPCache(); err != nil {
			t.Fatal(err)
		}
		if !maps.Equal(dp.ipcache, before) {
			t.Fatalf("seed %d: a full rebuild changed the incrementally kept ipcache", seed)
		}
	}
}
