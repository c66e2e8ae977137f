package policysync

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/tools/cache"

	"github.com/veilmesh/veil/agent/k8s"
	"github.com/veilmesh/veil/api/annotations"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// entriesDatapath keeps every endpoint's entries too.
type entriesDatapath struct {
	*fakeDatapath
	mu      sync.Mutex
	entries map[netip.Addr][]policytypes.Entry
}

func (d *entriesDatapath) SetPolicy(ip netip.Addr, e []policytypes.Entry, def policytypes.Defaults) error {
	d.mu.Lock()
	d.entries[ip] = slices.Clone(e)
	d.mu.Unlock()
	return d.fakeDatapath.SetPolicy(ip, e, def)
}

// run starts s's worker, stopped when the test ends.
func run(t *testing.T, s *Syncer) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}

// awaitIdle waits until the agent converged and s is idle.
func awaitIdle(t *testing.T, s *Syncer, converged func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !(converged() && s.Idle()) {
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting for convergence")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// The first convergence syncs the pods in one batch and builds the
// ipcache once; the datapath it leaves (every endpoint's record, entries
// and defaults, the ipcache) equals what the same keys leave when they
// arrive one by one after an empty start, through the path that follows
// later changes (each pod's compile, its ipcache entries followed pod by
// pod), whether the pods' keys were queued before Run or not (the daemon
// queues none). Among the keys: a pod deleted since it was queued, and a
// local pod whose record opts out of socket acceleration.
func TestFirstConvergenceMatchesOneByOne(t *testing.T) {
	sc := newSyntheticCluster(t, 900, 12)
	optOut := sc.local[3].Pod
	pod, err := sc.listers.Pods.Get(optOut.Namespace, optOut.Name)
	if err != nil {
		t.Fatal(err)
	}
	f := pod.Fields()
	f.Annotations = map[string]string{annotations.SocketAcceleration: "false"}
	if err := sc.pods.Update(k8s.NewPodInfo(f)); err != nil {
		t.Fatal(err)
	}
	sc.keys = append(sc.keys, k8s.Key{Kind: k8s.Pod, Namespace: "team-001", Name: "deleted-meanwhile"})

	run := func(oneByOne, podsQueued bool) (*entriesDatapath, *policy.Compiler) {
		dp := &entriesDatapath{fakeDatapath: newFakeDatapath(), entries: map[netip.Addr][]policytypes.Entry{}}
		s, reg := sc.syncer(t, dp)
		if !podsQueued {
			// As the daemon queues them: objects but no pod.
			maps.DeleteFunc(s.initial, func(k k8s.Key, _ struct{}) bool { return k.Kind == k8s.Pod })
		}
		var pods cache.Indexer
		if oneByOne {
			// Nothing queued and no pod cached before Run: it converges
			// on nothing, then the pods are cached and every key follows
			// as a change.
			s.initial = map[k8s.Key]struct{}{}
			pods = cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
			s.cfg.Listers.Pods = k8s.NewPodStore(pods)
		}
		run(t, s)
		awaitIdle(t, s, reg.Converged)
		if oneByOne {
			for _, p := range sc.listers.Pods.List() {
				if err := pods.Add(p); err != nil {
					t.Fatal(err)
				}
			}
			for _, k := range sc.keys {
				s.Enqueue(k)
			}
			awaitIdle(t, s, reg.Converged)
		}
		return dp, s.cfg.Compiler
	}
	bulk, bulkC := run(false, false)
	queued, queuedC := run(false, true)
	single, singleC := run(true, true)

	// Identity and rule numbers depend on the order objects arrived in:
	// compared by what they stand for.
	got, want := datapathText(bulk, bulkC), datapathText(single, singleC)
	if len(got) < 900 {
		t.Fatalf("the datapath holds %d lines for 900 pods", len(got))
	}
	if q := datapathText(queued, queuedC); !slices.Equal(got, q) {
		t.Errorf("the datapath differs when the pods' keys were queued too (%d lines; %d without)", len(q), len(got))
	}
	if !slices.Equal(got, want) {
		n := 0
		for i := range max(len(got), len(want)) {
			var g, w string
			if i < len(got) {
				g = got[i]
			}
			if i < len(want) {
				w = want[i]
			}
			if g != w && n < 10 {
				t.Errorf("line %d: %q after the batch; %q one by one", i, g, w)
				n++
			}
		}
		t.Fatalf("the datapath differs (%d lines after the batch, %d one by one)", len(got), len(want))
	}
	entries := 0
	for _, ep := range sc.local {
		d, def, ok := bulk.state(ep.IP)
		if !ok || def == denyAll {
			t.Errorf("endpoint %s after convergence: written %v, defaults %+v", ep.Pod, ok, def)
		}
		entries += len(bulk.entries[ep.IP])
		if want := ep.Pod == optOut; d.NoAcceleration != want {
			t.Errorf("endpoint %s: acceleration opted out %v; want %v", ep.Pod, d.NoAcceleration, want)
		}
	}
	if entries == 0 {
		t.Fatal("no local endpoint has entries: the test compares nothing")
	}
}

// datapathText is what dp holds, sorted, with identities named by their
// labels and rules by their policy and section, as c has them.
func datapathText(dp *entriesDatapath, c *policy.Compiler) []string {
	names := map[identity.ID]string{}
	for _, id := range c.Identities() {
		names[id.ID] = id.Labels.Key()
	}
	for _, e := range c.CIDRTable() {
		names[e.ID] = "cidr:" + e.Prefix.String()
	}
	name := func(id identity.ID) string {
		if n, ok := names[id]; ok {
			return n
		}
		return fmt.Sprint(id)
	}
	rule := func(id uint32) string {
		r, ok := c.Rule(id)
		if !ok {
			return fmt.Sprint(id)
		}
		return r.Policy.String() + " " + r.Section
	}
	dp.mu.Lock()
	defer dp.mu.Unlock()
	dp.fakeDatapath.mu.Lock()
	defer dp.fakeDatapath.mu.Unlock()
	var out []string
	for p, e := range dp.ipcache {
		out = append(out, fmt.Sprintf("ipcache %s %s %s %d", p, name(e.Identity), e.NodeIP, e.Kind))
	}
	for ip, ep := range dp.endpoints {
		out = append(out, fmt.Sprintf("endpoint %s %d %s noaccel=%v %+v", ip, ep.ID, name(ep.Identity), ep.NoAcceleration, dp.policies[ip]))
		for _, e := range dp.entries[ip] {
			out = append(out, fmt.Sprintf("entry %s %s %s %d %d/%d %d %d %s", ip, e.Direction, name(e.Identity), e.Proto, e.Port, e.PortPrefixLen, e.Enforce, e.Audit, rule(e.RuleID)))
		}
	}
	slices.Sort(out)
	return out
}

var _ Datapath = (*entriesDatapath)(nil)
