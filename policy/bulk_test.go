package policy

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// TestBulkThenIncrementalMatchesScratch starts a compiler as the agent
// does after a restart, on random clusters: namespaces, nodes and
// policies one by one, a few pods one by one (endpoints the CNI wired
// before the caches synced), then every pod in one UpsertPodsFacts, in a
// random order, with label sets shared between pods as the pod cache
// interns them, some pods yielded twice (an older version first, so that
// identities appear and vanish within the batch); then random mutations
// one by one. After the batch and after each mutation the state equals a
// from-scratch compilation of the same objects (the node's endpoints and
// the ipcache, for a node-local compiler), and every local endpoint whose
// view changed in the batch was reported.
func TestBulkThenIncrementalMatchesScratch(t *testing.T) {
	seeds := 60
	if testing.Short() {
		seeds = 15
	}
	for seed := range seeds {
		g := gen{rand.New(rand.NewPCG(uint64(seed), 37))}
		world := g.input()
		// More pods than g.input makes, so that label sets repeat.
		for i := range g.r.IntN(12) {
			world.Pods = append(world.Pods, g.pod(fmt.Sprintf("b%d", i), g.r.IntN(40)))
		}
		dedupIPs(&world)
		node := []string{"", "node-1", "node-2"}[seed%3]
		c, err := New(Options{Node: node})
		if err != nil {
			t.Fatal(err)
		}
		for _, ns := range world.Namespaces {
			c.UpsertNamespace(ns)
		}
		for _, n := range world.Nodes {
			c.UpsertNode(n)
		}
		for _, np := range world.NetworkPolicies {
			c.UpsertNetworkPolicy(np)
		}
		for _, mp := range world.MeshPolicies {
			c.UpsertMeshPolicy(mp)
		}
		for _, cmp := range world.ClusterMeshPolicies {
			c.UpsertClusterMeshPolicy(cmp)
		}
		// Endpoints wired before the batch: the batch finds them in place.
		for _, p := range world.Pods {
			if g.chance(0.2) {
				c.UpsertPod(p)
			}
		}
		before := map[EndpointID]Endpoint{}
		for _, ep := range c.Endpoints() {
			before[ep.EndpointID], _ = c.Endpoint(ep.EndpointID)
		}

		interned := map[string]map[string]string{}
		facts := func(p *corev1.Pod) PodFacts {
			f := podFacts(p)
			key := fmt.Sprint(f.Labels)
			if m, ok := interned[key]; ok {
				f.Labels = m
			} else {
				f.Labels = maps.Clone(f.Labels)
				interned[key] = f.Labels
			}
			f.LabelsShared = true
			return f
		}
		var batch []PodFacts
		for _, p := range world.Pods {
			if g.chance(0.3) {
				// An older version: other labels (perhaps a label set
				// no other pod has), perhaps another node or no address.
				old := g.pod(p.Name, g.r.IntN(300))
				old.Namespace = p.Namespace
				batch = append(batch, facts(old))
			}
			batch = append(batch, facts(p))
		}
		// The older versions stay before their pod's last one.
		shuffled := shuffleKeepingLast(g.r, batch)
		ch := c.UpsertPodsFacts(slices.Values(shuffled))

		reported := map[EndpointID]bool{}
		for _, id := range append(slices.Clone(ch.Endpoints), ch.Removed...) {
			reported[id] = true
		}
		for _, ep := range c.Endpoints() {
			if node != "" && ep.Node != node {
				continue
			}
			now, _ := c.Endpoint(ep.EndpointID)
			if b, ok := before[ep.EndpointID]; (!ok || !sameEndpoint(now, b)) && !reported[ep.EndpointID] {
				t.Fatalf("seed %d: endpoint %s changed in the batch but was not reported", seed, ep.EndpointID)
			}
		}
		if len(world.Pods) > 0 && !ch.IPCache {
			t.Fatalf("seed %d: a batch of %d new pods reported no ipcache change", seed, len(world.Pods))
		}
		check := func(what string) {
			t.Helper()
			scratch, err := Compile(world, Options{})
			if err != nil {
				t.Fatal(err)
			}
			got, want := canonical(c), canonical(scratch)
			if node != "" {
				got, want = localCanonical(c, node), localCanonical(scratch, node)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("seed %d, %s: state differs from a from-scratch compilation:\n%s", seed, what, diffLines(got, want))
			}
		}
		check("after the batch")
		for step := range 20 {
			what, _ := mutate(g, &world, c)
			check(fmt.Sprintf("step %d (%s)", step, what))
		}
	}
}

// shuffleKeepingLast shuffles the facts but keeps each pod's facts in
// their order, so that the last yielded is its current version.
func shuffleKeepingLast(r *rand.Rand, facts []PodFacts) []PodFacts {
	byPod := map[EndpointID][]PodFacts{}
	var ids []EndpointID
	for _, f := range facts {
		id := EndpointID{Namespace: f.Namespace, Name: f.Name}
		if _, ok := byPod[id]; !ok {
			ids = append(ids, id)
		}
		byPod[id] = append(byPod[id], f)
	}
	// Draw pods at random, each time taking the next version of the one
	// drawn: versions of different pods interleave.
	var out []PodFacts
	for len(ids) > 0 {
		i := r.IntN(len(ids))
		id := ids[i]
		out = append(out, byPod[id][0])
		if byPod[id] = byPod[id][1:]; len(byPod[id]) == 0 {
			ids = slices.Delete(ids, i, i+1)
		}
	}
	return out
}

// dedupIPs drops pods whose address an earlier pod holds (see mutate).
func dedupIPs(world *Input) {
	seen := map[string]bool{}
	world.Pods = slices.DeleteFunc(world.Pods, func(p *corev1.Pod) bool {
		ip := p.Status.PodIP
		if ip == "" {
			return false
		}
		dup := seen[ip]
		seen[ip] = true
		return dup
	})
	names := map[EndpointID]bool{}
	world.Pods = slices.DeleteFunc(world.Pods, func(p *corev1.Pod) bool {
		id := EndpointID{Namespace: p.Namespace, Name: p.Name}
		dup := names[id]
		names[id] = true
		return dup
	})
}
