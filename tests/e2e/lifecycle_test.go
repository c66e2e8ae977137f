package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/lab"
	"github.com/veilmesh/veil/lab/netns"
)

func mustPod(t *testing.T, l *lab.Lab, ns, name, node, app string) *lab.Pod {
	t.Helper()
	p, err := l.AddPod(context.Background(), lab.PodSpec{Namespace: ns, Name: name, Node: node, Labels: map[string]string{"app": app}, Ports: web})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func endpointsOf(t *testing.T, n *lab.Node) []*agentv1.Endpoint {
	t.Helper()
	conn, c, err := n.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := c.ListEndpoints(ctx, &agentv1.ListEndpointsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return resp.Endpoints
}

// onlyFrom makes pod app=to accept TCP only from pods app=from of any
// namespace, on the given ports.
func onlyFrom(t *testing.T, l *lab.Lab, ns, name, to, from string, ports ...int) {
	t.Helper()
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": to}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{
					NamespaceSelector: &metav1.LabelSelector{},
					PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"app": from}},
				}},
			}},
		},
	}
	for _, p := range ports {
		np.Spec.Ingress[0].Ports = append(np.Spec.Ingress[0].Ports, networkingv1.NetworkPolicyPort{Port: ptr(intstr.FromInt32(int32(p)))})
	}
	if _, err := l.Kube.NetworkingV1().NetworkPolicies(ns).Create(context.Background(), np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func TestPrivilegedAgentPodAndNodeLifecycle(t *testing.T) {
	l := startLab(t, "life", 2)
	ctx := context.Background()
	a := mustPod(t, l, "x", "a", "node-1", "a")
	b := mustPod(t, l, "x", "b", "node-1", "b")
	expect(t, a, b, 80, true)
	if eps := endpointsOf(t, l.Nodes[0]); len(eps) != 2 {
		t.Fatalf("node-1 endpoints = %v, want 2", eps)
	}

	// Deleting a pod removes its endpoint and frees its address.
	bIP := b.IP.String()
	if err := l.DeletePod(ctx, b); err != nil {
		t.Fatal(err)
	}
	for _, ep := range endpointsOf(t, l.Nodes[0]) {
		if ep.Name == "b" {
			t.Errorf("endpoint of deleted pod still listed: %v", ep)
		}
	}
	raw, err := os.ReadFile(filepath.Join(l.Nodes[0].Dir, "state", "ipam.json"))
	if err != nil {
		t.Fatal(err)
	}
	var ipamState struct {
		Allocations []struct {
			IP string `json:"ip"`
		} `json:"allocations"`
	}
	if err := json.Unmarshal(raw, &ipamState); err != nil {
		t.Fatalf("read IPAM state: %v", err)
	}
	for _, a := range ipamState.Allocations {
		if a.IP == bIP {
			t.Errorf("IPAM still holds %s after DEL:\n%s", bIP, raw)
		}
	}
	// DEL is idempotent.
	if _, err := l.Nodes[0].RunCNI(ctx, "DEL", b.ContainerID, "", "K8S_POD_NAMESPACE=x;K8S_POD_NAME=b", l.Nodes[0].CNIConfig()); err != nil {
		t.Errorf("second DEL: %v", err)
	}

	// A node joins: its pods reach and are reached.
	n3, err := l.AddNode(ctx)
	if err != nil {
		t.Fatal(err)
	}
	e := mustPod(t, l, "x", "e", n3.Name, "e")
	expect(t, a, e, 80, true)
	expect(t, e, a, 80, true)
}

func TestPrivilegedAgentRestartAndAPIServerAway(t *testing.T) {
	l := startLab(t, "rst", 2)
	ctx := context.Background()
	a := mustPod(t, l, "x", "a", "node-1", "a")
	b := mustPod(t, l, "x", "b", "node-1", "b")
	c := mustPod(t, l, "y", "c", "node-2", "c")
	onlyFrom(t, l, "x", "b-from-a", "b", "a", 80, 5001)
	expect(t, a, b, 80, true)
	expect(t, c, b, 80, false)

	// A long transfer a -> b crosses an agent crash and restart.
	st := startStream(t, a, b, 5001, 64<<20, 3*time.Millisecond, true)
	l.Nodes[0].StopAgent(true)
	if err := reach(c, b, 80); err == nil {
		t.Errorf("denied flow passed while the agent was down")
	}
	if err := reach(a, b, 80); err != nil {
		t.Errorf("allowed flow failed while the agent was down: %v", err)
	}
	if err := l.Nodes[0].StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	if err := reach(c, b, 80); err == nil {
		t.Errorf("denied flow passed after the restart")
	}
	st.finish("across the agent restart")

	// The API server goes away: enforcement holds; a change made meanwhile
	// is applied once it is back.
	for _, n := range l.Nodes {
		n.CutAPIServer()
	}
	eventually(t, "agents notice the API server is away", 15*time.Second, func() error {
		st, err := l.Nodes[0].Status(ctx)
		if err != nil {
			return err
		}
		if st.ApiServerConnected {
			return fmt.Errorf("still connected")
		}
		return nil
	})
	if err := reach(a, b, 80); err != nil {
		t.Errorf("allowed flow failed while the API server was away: %v", err)
	}
	if err := reach(c, b, 80); err == nil {
		t.Errorf("denied flow passed while the API server was away")
	}
	onlyFrom(t, l, "x", "b-from-c", "b", "c", 80)
	time.Sleep(time.Second)
	if err := reach(c, b, 80); err == nil {
		t.Errorf("a policy applied while the agents could not see it took effect")
	}
	for _, n := range l.Nodes {
		if err := n.RestoreAPIServer(); err != nil {
			t.Fatal(err)
		}
	}
	// client-go's reflectors back off (0.8 s doubling up to 30 s) while the
	// API server is away, so convergence after its return is bounded by
	// that backoff.
	back := time.Now()
	eventually(t, "the change made while the API server was away is applied", 60*time.Second, func() error {
		return reach(c, b, 80)
	})
	t.Logf("converged %s after the API server came back", time.Since(back).Round(100*time.Millisecond))
}

func TestPrivilegedAgentBadInput(t *testing.T) {
	requirePrivileged(t)
	l := startLabWith(t, "bad", lab.Options{Nodes: 1, PodCIDRBits: 29})
	ctx := context.Background()
	n := l.Nodes[0]

	// Malformed CNI configuration: a CNI error that says what to fix, and
	// nothing allocated or wired.
	ns, err := netns.NewNetns(fmt.Sprintf("veile2e-%d-badcni", os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Delete() })
	out, err := n.RunCNI(ctx, "ADD", "badconf", ns.Path(), "K8S_POD_NAMESPACE=x;K8S_POD_NAME=p", []byte(`{"cniVersion":"1.0.0","name":"veil","type":"veil-cni","mtu":"big"}`))
	if err == nil {
		t.Fatalf("ADD with a malformed config succeeded: %s", out)
	}
	var cniErr struct {
		Code int    `json:"code"`
		Msg  string `json:"msg"`
	}
	if json.Unmarshal(out, &cniErr) != nil || cniErr.Code == 0 || cniErr.Msg == "" {
		t.Errorf("malformed config: want a CNI error, got %s", out)
	}
	if eps := endpointsOf(t, n); len(eps) != 0 {
		t.Errorf("malformed config left endpoints: %v", eps)
	}

	// Pod CIDR exhausted: a /29 holds 5 pods; the 6th gets a clear error
	// and the node stays consistent.
	var pods []*lab.Pod
	var addErr error
	for i := 0; i < 8 && addErr == nil; i++ {
		var p *lab.Pod
		p, addErr = l.AddPod(ctx, lab.PodSpec{Namespace: "x", Name: fmt.Sprintf("p%d", i), Node: n.Name, Ports: web})
		if addErr == nil {
			pods = append(pods, p)
		}
	}
	if addErr == nil || !strings.Contains(addErr.Error(), "exhausted") {
		t.Fatalf("after %d pods: want an exhausted-CIDR error, got %v", len(pods), addErr)
	}
	if len(pods) != 5 {
		t.Errorf("a /29 gave %d pods, want 5", len(pods))
	}
	if eps := endpointsOf(t, n); len(eps) != len(pods) {
		t.Errorf("endpoints = %d, want %d", len(eps), len(pods))
	}
	expect(t, pods[0], pods[1], 80, true)

	// An invalid policy is reported on its status and changes nothing.
	bad := &v1alpha1.MeshPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "bad-selector"},
		Spec: v1alpha1.MeshPolicySpec{
			PodSelector: metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "app", Operator: "Near", Values: []string{"a"}}}},
			PolicyRules: v1alpha1.PolicyRules{Ingress: []v1alpha1.IngressRule{}},
		},
	}
	if _, err := l.Veil.PolicyV1alpha1().MeshPolicies("x").Create(ctx, bad, metav1.CreateOptions{}); err != nil {
		t.Logf("the API server rejected the invalid policy itself: %v", err)
		return
	}
	eventually(t, "invalid MeshPolicy reported", 15*time.Second, func() error {
		got, err := l.Veil.PolicyV1alpha1().MeshPolicies("x").Get(ctx, "bad-selector", metav1.GetOptions{})
		if err != nil {
			return err
		}
		c := meta.FindStatusCondition(got.Status.Conditions, v1alpha1.ConditionAccepted)
		if c == nil || c.Status != metav1.ConditionFalse || !strings.Contains(c.Message, "Near") {
			return fmt.Errorf("conditions %+v", got.Status.Conditions)
		}
		return nil
	})
	expect(t, pods[0], pods[1], 80, true)
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestPrivilegedAccelerationOptOutAnnotation: a pod annotated
// veil.dev/socket-acceleration=false keeps its connections off the sockmap
// path; an unannotated pair on the same node is accelerated.
func TestPrivilegedAccelerationOptOutAnnotation(t *testing.T) {
	l := startLab(t, "accel", 1)
	ctx := context.Background()
	a := mustPod(t, l, "x", "a", "node-1", "a")
	b := mustPod(t, l, "x", "b", "node-1", "b")
	c, err := l.AddPod(ctx, lab.PodSpec{Namespace: "x", Name: "c", Node: "node-1", Labels: map[string]string{"app": "c"},
		Annotations: map[string]string{"veil.dev/socket-acceleration": "false"}, Ports: web})
	if err != nil {
		t.Fatal(err)
	}
	redirected := func() uint64 {
		st, err := l.Nodes[0].Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return st.Counters.SocketRedirectedBytes
	}
	r0 := redirected()
	startStream(t, a, c, 5005, 8<<20, 0, true).finish("to an opted-out pod")
	r1 := redirected()
	startStream(t, a, b, 5006, 8<<20, 0, true).finish("between accelerated pods")
	r2 := redirected()
	t.Logf("redirected bytes: to the opted-out pod %d, between accelerated pods %d", r1-r0, r2-r1)
	if r1 != r0 {
		t.Errorf("connection to an opted-out pod was accelerated: %d bytes redirected", r1-r0)
	}
	if r2-r1 < 8<<20 {
		t.Errorf("connection between accelerated pods: only %d bytes redirected", r2-r1)
	}
}
