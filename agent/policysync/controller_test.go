package policysync

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/encryption"
	"github.com/veilmesh/veil/agent/endpoints"
	"github.com/veilmesh/veil/agent/k8s"
	veilfake "github.com/veilmesh/veil/api/client/clientset/versioned/fake"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// fakeDatapath remembers the last record and policy of every endpoint.
type fakeDatapath struct {
	mu        sync.Mutex
	endpoints map[netip.Addr]datapath.Endpoint
	policies  map[netip.Addr]policytypes.Defaults
	ipcache   map[netip.Prefix]datapath.IPCacheEntry
}

func newFakeDatapath() *fakeDatapath {
	return &fakeDatapath{
		endpoints: map[netip.Addr]datapath.Endpoint{}, policies: map[netip.Addr]policytypes.Defaults{},
		ipcache: map[netip.Prefix]datapath.IPCacheEntry{},
	}
}

func (f *fakeDatapath) UpsertEndpoint(ep datapath.Endpoint) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.endpoints[ep.IP] = ep
	return nil
}
func (f *fakeDatapath) DeleteEndpoint(ip netip.Addr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.endpoints, ip)
	return nil
}
func (f *fakeDatapath) SetPolicy(ip netip.Addr, _ []policytypes.Entry, defaults policytypes.Defaults) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.policies[ip] = defaults
	return nil
}
func (f *fakeDatapath) SetCIDRs(map[netip.Prefix]identity.ID) error { return nil }
func (f *fakeDatapath) UpsertIPCache(p netip.Prefix, e datapath.IPCacheEntry) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ipcache[p] = e
	return nil
}
func (f *fakeDatapath) DeleteIPCache(p netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.ipcache, p)
	return nil
}
func (f *fakeDatapath) EvictFlows(func(datapath.FlowKey) bool) (int, error) { return 0, nil }

func (f *fakeDatapath) state(ip netip.Addr) (datapath.Endpoint, policytypes.Defaults, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.policies[ip]
	return f.endpoints[ip], d, ok
}

// The controller as the agent runs it, against fake clientsets: handlers
// queue keys, the worker converges, a local pod gets its compiled policy,
// and a later change of the pod reaches its datapath record.
func TestRunConvergesAndFollowsChanges(t *testing.T) {
	ip := netip.MustParseAddr("10.244.0.5")
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "a", Labels: map[string]string{"app": "a"}},
		Spec:       corev1.PodSpec{NodeName: "self"},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip.String(), PodIPs: []corev1.PodIP{{IP: ip.String()}}},
	}
	kube := kubefake.NewClientset(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "x"}}, pod)
	veil := veilfake.NewSimpleClientset()
	w := k8s.New(kube, veil, 0)
	c, err := policy.New(policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	reg := endpoints.New(endpoints.Config{StateDir: t.TempDir()})
	reg.Restore([]*endpoints.Endpoint{{
		Pod: policy.EndpointID{Namespace: "x", Name: "a"}, ContainerID: "c1", ID: 1, IP: ip,
		HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:00:02",
	}})
	dp := newFakeDatapath()
	s := New(Config{
		NodeName: "self", NodeIP: netip.MustParseAddr("10.99.0.1"), ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		Compiler: c, Datapath: dp, Endpoints: reg, Encryption: encryption.New(encryption.Config{NodeName: "self"}),
		Listers: w.Listers, Kube: kube, Veil: veil, Events: record.NewFakeRecorder(16), Degraded: &fakeDegraded{},
	})
	if err := w.OnChange(s.Enqueue); err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	w.Start(ctx)
	if err := w.WaitForCacheSync(ctx, time.Hour, func([]string) {}); err != nil {
		t.Fatal(err)
	}
	for _, k := range w.Keys() {
		s.Enqueue(k)
	}
	done := make(chan struct{})
	go func() { defer close(done); s.Run(ctx) }()
	t.Cleanup(func() { <-done })

	eventually := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting until %s", what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	eventually("converged with the pod's policy", func() bool {
		ep, d, ok := dp.state(ip)
		return reg.Converged() && ok && d != denyAll && ep.Identity >= identity.MinPod
	})
	if s.LastSync() == 0 {
		t.Error("LastSync not recorded")
	}
	if s.IPCacheSize() == 0 {
		t.Error("nothing written to the ipcache")
	}
	// The keys queued before Run were synced from the syncer's own set,
	// dropped since, not through the workqueue (whose sets keep the room
	// they once needed).
	s.initialMu.Lock()
	initial := s.initial
	s.initialMu.Unlock()
	if initial != nil {
		t.Errorf("the first convergence's %d keys are still held", len(initial))
	}

	// A change reaches the datapath through the queue: new labels, a new
	// identity in the endpoint's record.
	first, _, _ := dp.state(ip)
	relabelled := pod.DeepCopy()
	relabelled.Labels["app"] = "b"
	if _, err := kube.CoreV1().Pods("x").Update(ctx, relabelled, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually("the relabelled pod has a new identity", func() bool {
		ep, _, _ := dp.state(ip)
		return ep.Identity != first.Identity && ep.Identity >= identity.MinPod
	})
	if got, _ := reg.Get(policy.EndpointID{Namespace: "x", Name: "a"}); got.Identity == first.Identity {
		t.Error("the registry does not record the identity written")
	}
}
