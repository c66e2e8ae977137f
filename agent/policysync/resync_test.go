package policysync

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"

	"github.com/veilmesh/veil/agent/encryption"
	"github.com/veilmesh/veil/agent/endpoints"
	"github.com/veilmesh/veil/agent/k8s"
	veilfake "github.com/veilmesh/veil/api/client/clientset/versioned/fake"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/policytypes"
)

// countingDatapath counts the policy writes of each endpoint.
type countingDatapath struct {
	*fakeDatapath
	mu     sync.Mutex
	writes map[netip.Addr]int
}

func (c *countingDatapath) SetPolicy(ip netip.Addr, e []policytypes.Entry, d policytypes.Defaults) error {
	c.mu.Lock()
	c.writes[ip]++
	c.mu.Unlock()
	return c.fakeDatapath.SetPolicy(ip, e, d)
}

// TestResyncWritesEachEndpointOnce: after a restart, while the agent
// lists a cluster whose pods its endpoint's policy selects, the endpoint
// keeps its policy from the last run; it is written once, at convergence,
// not once per selected pod the lists bring (which cost the resync at
// 150,000 pods a tenth of its CPU, recompiling a half-listed policy).
func TestResyncWritesEachEndpointOnce(t *testing.T) {
	const remote = 60
	ip := netip.MustParseAddr("10.244.0.5")
	objs := []runtime.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "x"}},
		&corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "a", Labels: map[string]string{"app": "a"}},
			Spec:       corev1.PodSpec{NodeName: "self"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip.String()},
		},
		&networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "from-b"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{
					PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}},
				}}}},
			},
		},
	}
	for i := range remote {
		// Each with labels of its own: a new identity the policy selects.
		objs = append(objs, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: fmt.Sprintf("b-%d", i), Labels: map[string]string{"app": "b", "i": fmt.Sprint(i)}},
			Spec:       corev1.PodSpec{NodeName: "other"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: fmt.Sprintf("10.244.1.%d", i+2)},
		})
	}
	kube := kubefake.NewClientset(objs...)
	veil := veilfake.NewSimpleClientset()
	w := k8s.New(kube, veil, 0)
	c, err := policy.New(policy.Options{Node: "self"})
	if err != nil {
		t.Fatal(err)
	}
	reg := endpoints.New(endpoints.Config{StateDir: t.TempDir()})
	reg.Restore([]*endpoints.Endpoint{{
		Pod: policy.EndpointID{Namespace: "x", Name: "a"}, ContainerID: "c1", ID: 1, IP: ip,
		HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:00:02",
	}})
	dp := &countingDatapath{fakeDatapath: newFakeDatapath(), writes: map[netip.Addr]int{}}
	s := New(Config{
		NodeName: "self", NodeIP: netip.MustParseAddr("10.99.0.1"), ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		Compiler: c, Datapath: dp, Endpoints: reg, Encryption: encryption.New(encryption.Config{NodeName: "self"}),
		Listers: w.Listers, Kube: kube, Veil: veil, Events: record.NewFakeRecorder(16), Degraded: &fakeDegraded{},
	})
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
	deadline := time.Now().Add(10 * time.Second)
	for !(reg.Converged() && s.Idle()) {
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting for convergence")
		}
		time.Sleep(5 * time.Millisecond)
	}
	got, _ := c.Endpoint(policy.EndpointID{Namespace: "x", Name: "a"})
	if len(got.Entries) == 0 {
		t.Fatal("the endpoint compiled no entries: the test tests nothing")
	}
	dp.mu.Lock()
	writes := dp.writes[ip]
	dp.mu.Unlock()
	if writes != 1 {
		t.Errorf("the endpoint's policy was written %d times during the resync of %d selected pods; want once, at convergence", writes, remote)
	}
	if _, d, ok := dp.state(ip); !ok || d == denyAll {
		t.Errorf("the endpoint's policy after convergence: written %v, defaults %+v", ok, d)
	}
}
