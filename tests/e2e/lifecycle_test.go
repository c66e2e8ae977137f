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

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/meshctl/agentclient"
)

func (a *agent) endpoints(t testing.TB) []*agentv1.Endpoint {
	t.Helper()
	return call(t, a, "list endpoints", func(ctx context.Context, c *agentclient.Conn) ([]*agentv1.Endpoint, error) {
		resp, err := c.Client.ListEndpoints(ctx, &agentv1.ListEndpointsRequest{})
		if err != nil {
			return nil, err
		}
		return resp.Endpoints, nil
	})
}

func (a *agent) status(t testing.TB) *agentv1.StatusResponse {
	t.Helper()
	return call(t, a, "status", func(ctx context.Context, c *agentclient.Conn) (*agentv1.StatusResponse, error) {
		return c.Client.Status(ctx, &agentv1.StatusRequest{})
	})
}

// endpointsIn are the endpoints of namespace ns: other tests' pods may
// still be on the node.
func endpointsIn(eps []*agentv1.Endpoint, ns string) []*agentv1.Endpoint {
	var out []*agentv1.Endpoint
	for _, ep := range eps {
		if ep.Namespace == ns {
			out = append(out, ep)
		}
	}
	return out
}

// onlyFrom makes pod app=to accept TCP only from pods app=from of any
// namespace, on the given ports.
func (e *env) onlyFrom(t *testing.T, ns, name, to, from string, ports ...int) {
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
	if _, err := e.kube.NetworkingV1().NetworkPolicies(ns).Create(context.Background(), np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// cniResult is what veil-cni printed and how it exited.
type cniResult struct {
	Stdout   string
	ExitCode int
}

// runCNI runs the node's veil-cni (installed by the DaemonSet's init
// container) as containerd does: CNI_* environment, the network
// configuration on stdin, in a network namespace of its own made for the
// call (removed after), in the node's namespaces.
func runCNI(ctx context.Context, nd *cluster.Node, command, containerID, args string, conf []byte) (cniResult, error) {
	const script = `
ip netns add "$NS"
out=$(printf '%s' "$CONF" | env CNI_COMMAND="$CMD" CNI_CONTAINERID="$CID" CNI_NETNS="/run/netns/$NS" CNI_IFNAME=eth0 CNI_ARGS="$ARGS" CNI_PATH=/opt/cni/bin /opt/cni/bin/veil-cni 2>/dev/null)
rc=$?
ip netns del "$NS"
printf '%s\n' "$out"
echo "exit $rc"
`
	ns := fmt.Sprintf("veile2e-cni-%d", time.Now().UnixNano())
	out, err := nd.Run(ctx, "env", "NS="+ns, "CONF="+string(conf), "CMD="+command, "CID="+containerID, "ARGS="+args, "sh", "-c", script)
	if err != nil {
		return cniResult{}, err
	}
	out = strings.TrimRight(out, "\n")
	i := strings.LastIndex(out, "\nexit ")
	if i < 0 {
		return cniResult{}, fmt.Errorf("veil-cni %s: no exit code in %q", command, out)
	}
	var code int
	fmt.Sscan(out[i+len("\nexit "):], &code)
	return cniResult{Stdout: out[:i], ExitCode: code}, nil
}

// nodeCNIConfig is the plugin configuration containerd passes veil-cni on
// nd: the first plugin of the conflist the init container installed, with
// the list's name and version.
func nodeCNIConfig(t *testing.T, nd *cluster.Node) []byte {
	t.Helper()
	out, err := nd.Run(context.Background(), "sh", "-c", "cat /etc/cni/net.d/*veil*")
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		CNIVersion string           `json:"cniVersion"`
		Name       string           `json:"name"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list.Plugins) == 0 {
		t.Fatalf("node %s CNI config: %v:\n%s", nd.Name, err, out)
	}
	conf := list.Plugins[0]
	conf["cniVersion"], conf["name"] = list.CNIVersion, list.Name
	b, _ := json.Marshal(conf)
	return b
}

// TestPrivilegedAgentPodAndNodeLifecycle: a deleted pod's endpoint goes
// and its address is freed (kubelet's CNI DEL through containerd), and a
// second DEL is harmless.
func TestPrivilegedAgentPodAndNodeLifecycle(t *testing.T) {
	e := sharedEnv(t)
	ctx := context.Background()
	x := e.namespace(t, "life-x", nil)
	pods := e.addPods(t,
		podSpec{Namespace: x, Name: "a", Node: "node-1", Labels: map[string]string{"app": "a"}, Ports: web},
		podSpec{Namespace: x, Name: "b", Node: "node-1", Labels: map[string]string{"app": "b"}, Ports: web},
	)
	a, b := pods[0], pods[1]
	e.expect(t, a, b, 80, true)
	ag := e.agentOf(t, "node-1")
	eps := endpointsIn(ag.endpoints(t), x)
	if len(eps) != 2 {
		t.Fatalf("node-1 endpoints of %s = %v, want 2", x, eps)
	}
	var bSandbox string
	for _, ep := range eps {
		if ep.Name == "b" {
			bSandbox = ep.ContainerId
		}
	}
	if bSandbox == "" {
		t.Fatalf("endpoint of b has no container ID: %v", eps)
	}

	// Deleting a pod removes its endpoint and frees its address.
	bIP := b.IP.String()
	if err := e.kube.CoreV1().Pods(x).Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "pod b gone", time.Minute, func() error {
		if _, err := e.kube.CoreV1().Pods(x).Get(ctx, "b", metav1.GetOptions{}); err == nil {
			return fmt.Errorf("still there")
		}
		return nil
	})
	eventually(t, "b's endpoint removed", 30*time.Second, func() error {
		for _, ep := range ag.endpoints(t) {
			if ep.Namespace == x && ep.Name == "b" {
				return fmt.Errorf("endpoint of deleted pod still listed: %v", ep)
			}
		}
		return nil
	})
	// The agent's IPAM state, in the node's /var/lib/veil.
	raw, err := os.ReadFile(filepath.Join(e.node(t, "node-1").Dir, "var-lib", "veil", "ipam.json"))
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
	for _, al := range ipamState.Allocations {
		if al.IP == bIP {
			t.Errorf("IPAM still holds %s after DEL:\n%s", bIP, raw)
		}
	}
	// DEL is idempotent.
	n1 := e.node(t, "node-1")
	res, err := runCNI(ctx, n1, "DEL", bSandbox, "K8S_POD_NAMESPACE="+x+";K8S_POD_NAME=b", nodeCNIConfig(t, n1))
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Errorf("second DEL: exit %d: %s", res.ExitCode, res.Stdout)
	}
}

// TestPrivilegedAgentRestartAndAPIServerAway: node-1's agent crashes
// (killed, with its kubelet stopped so that it stays down) while a
// transfer runs, and comes back when the kubelet restarts it; then the API
// server is stopped and started again. Enforcement holds throughout, and a
// policy made while the agents could not see it is applied once they can.
func TestPrivilegedAgentRestartAndAPIServerAway(t *testing.T) {
	e := sharedEnv(t)
	ctx := context.Background()
	x := e.namespace(t, "rst-x", nil)
	y := e.namespace(t, "rst-y", nil)
	pods := e.addPods(t,
		podSpec{Namespace: x, Name: "a", Node: "node-1", Labels: map[string]string{"app": "a"}, Ports: web},
		podSpec{Namespace: x, Name: "b", Node: "node-1", Labels: map[string]string{"app": "b"}, Ports: web},
		podSpec{Namespace: y, Name: "c", Node: "node-2", Labels: map[string]string{"app": "c"}, Ports: web},
	)
	a, b, c := pods[0], pods[1], pods[2]
	e.onlyFrom(t, x, "b-from-a", "b", "a", 80, 5001)
	e.expect(t, a, b, 80, true)
	e.expect(t, c, b, 80, false)

	// The agent keeps a checkpoint of its pod cache in the node's
	// /var/lib/veil (every 30 s while the cache changes): the restarted
	// agent resumes from it rather than listing every pod.
	n1 := e.node(t, "node-1")
	ckpt := filepath.Join(n1.Dir, "var-lib", "veil", "pod-cache.ckpt")
	eventually(t, "node-1's agent wrote its pod cache checkpoint", 75*time.Second, func() error {
		_, err := os.Stat(ckpt)
		return err
	})
	// A long transfer a -> b crosses an agent crash and restart.
	st := startStream(t, a, b, 5001, 64<<20, 3*time.Millisecond)
	_, agent1, err := e.agentPod(ctx, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	kubelet1 := cluster.KubeletDaemon("node-1")
	if err := e.c.StopDaemon(kubelet1, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	kubeletUp := false
	t.Cleanup(func() {
		if !kubeletUp {
			e.c.StartDaemon(context.Background(), kubelet1)
		}
	})
	if err := n1.KillContainer(ctx, agent1); err != nil {
		t.Fatal(err)
	}
	if err := reach(c, b, 80); !isDenied(err) {
		t.Errorf("denied flow while the agent was down: %v; want it dropped", err)
	}
	if err := reach(a, b, 80); err != nil {
		t.Errorf("allowed flow failed while the agent was down: %v", err)
	}
	// A pod that appears while node-1's agent is down, which its
	// checkpoint cannot hold: it must learn it from the watch that
	// resumes at the checkpoint's version.
	d := e.addPods(t, podSpec{Namespace: y, Name: "d", Node: "node-2", Labels: map[string]string{"app": "a"}, Ports: web})[0]
	if err := e.c.StartDaemon(ctx, kubelet1); err != nil {
		t.Fatal(err)
	}
	kubeletUp = true
	eventually(t, "node-1's agent restarted by its kubelet", 2*time.Minute, func() error {
		_, id, err := e.agentPod(ctx, "node-1")
		if err != nil {
			return err
		}
		if id == agent1 {
			return fmt.Errorf("still the killed container %s", id)
		}
		return nil
	})
	if err := reach(c, b, 80); !isDenied(err) {
		t.Errorf("denied flow after the restart: %v; want it dropped", err)
	}
	eventually(t, "the pod made while node-1's agent was down is allowed by its labels", 30*time.Second, func() error {
		return reach(d, b, 80)
	})
	p1, _, err := e.agentPod(ctx, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	logs, err := e.kube.CoreV1().Pods(p1.Namespace).GetLogs(p1.Name, &corev1.PodLogOptions{Container: agentclient.AgentContainer}).DoRaw(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(logs), "pod cache: resuming from checkpoint") {
		t.Errorf("the restarted agent did not resume its pod cache from the checkpoint; its log:\n%s", logs)
	}
	st.finish("across the agent restart")

	// The API server goes away: enforcement holds; a change made meanwhile
	// is applied once it is back. The agents are asked through their
	// containers, not the API server.
	agents := []*agent{e.agentOf(t, "node-1"), e.agentOf(t, "node-2")}
	if err := e.c.StopDaemon(cluster.APIServerDaemon, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	apiUp := false
	t.Cleanup(func() {
		if !apiUp {
			e.c.StartDaemon(context.Background(), cluster.APIServerDaemon)
		}
	})
	eventually(t, "agents notice the API server is away", 30*time.Second, func() error {
		for _, ag := range agents {
			if ag.status(t).ApiServerConnected {
				return fmt.Errorf("%s: still connected", ag.nd.Name)
			}
		}
		return nil
	})
	if err := reach(a, b, 80); err != nil {
		t.Errorf("allowed flow failed while the API server was away: %v", err)
	}
	if err := reach(c, b, 80); !isDenied(err) {
		t.Errorf("denied flow while the API server was away: %v; want it dropped", err)
	}
	// A change made while the API server is down cannot be: it is made
	// as soon as it is back, while the agents' watches are still backing
	// off, and must be picked up.
	if err := e.c.StartDaemon(ctx, cluster.APIServerDaemon); err != nil {
		t.Fatal(err)
	}
	apiUp = true
	back := time.Now()
	e.onlyFrom(t, x, "b-from-c", "b", "c", 80)
	// client-go's reflectors back off (0.8 s doubling up to 30 s) while the
	// API server is away, so convergence after its return is bounded by
	// that backoff.
	eventually(t, "the change made while the agents were cut off is applied", 90*time.Second, func() error {
		return reach(c, b, 80)
	})
	t.Logf("converged %s after the API server came back", time.Since(back).Round(100*time.Millisecond))
	// Status follows the agent's own probe of the API server, every 3 s.
	eventually(t, "agents report the API server back", 15*time.Second, func() error {
		for _, ag := range agents {
			if !ag.status(t).ApiServerConnected {
				return fmt.Errorf("%s: not reconnected", ag.nd.Name)
			}
		}
		return nil
	})
}

// TestPrivilegedAgentBadInput: a malformed CNI configuration gets a CNI
// error and wires nothing; node-3's pod CIDR (a /27) runs out, and the pod
// past it gets a clear error while the node stays consistent; an invalid
// MeshPolicy is reported on its status and changes nothing.
func TestPrivilegedAgentBadInput(t *testing.T) {
	e := sharedEnv(t)
	ctx := context.Background()
	x := e.namespace(t, "bad-x", nil)
	n3 := e.node(t, "node-3")
	ag := e.agentOf(t, "node-3")

	// Malformed CNI configuration: a CNI error that says what to fix, and
	// nothing allocated or wired.
	before := len(ag.endpoints(t))
	res, err := runCNI(ctx, n3, "ADD", "badconf", "K8S_POD_NAMESPACE="+x+";K8S_POD_NAME=p", []byte(`{"cniVersion":"1.0.0","name":"veil","type":"veil-cni","mtu":"big"}`))
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode == 0 {
		t.Fatalf("ADD with a malformed config succeeded: %s", res.Stdout)
	}
	var cniErr struct {
		Code int    `json:"code"`
		Msg  string `json:"msg"`
	}
	if json.Unmarshal([]byte(res.Stdout), &cniErr) != nil || cniErr.Code == 0 || cniErr.Msg == "" {
		t.Errorf("malformed config: want a CNI error, got %s", res.Stdout)
	}
	if after := len(ag.endpoints(t)); after != before {
		t.Errorf("malformed config changed the endpoints: %d -> %d", before, after)
	}

	// Pod CIDR exhausted: the node's /27 holds 29 pods (the network
	// address, the gateway and the broadcast address are not given out).
	// Some may be other tests' still. Two test servers, then pause pods
	// fill the rest; the pods past it get a clear error from the CNI (on
	// their FailedCreatePodSandBox events) and never run.
	capacity := 1<<(32-nodeCIDRBits) - 3
	servers := e.addPods(t,
		podSpec{Namespace: x, Name: "s1", Node: n3.Name, Labels: map[string]string{"app": "s"}, Ports: web},
		podSpec{Namespace: x, Name: "s2", Node: n3.Name, Labels: map[string]string{"app": "s"}, Ports: web},
	)
	free := capacity - before - len(servers)
	const extra = 2
	for i := 0; i < free+extra; i++ {
		s := podSpec{Namespace: x, Name: fmt.Sprintf("p%d", i), Node: n3.Name, Labels: map[string]string{"app": "p"}, Image: cluster.PauseImage}
		if _, err := e.kube.CoreV1().Pods(x).Create(ctx, s.object(), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, fmt.Sprintf("%d pause pods running and %d refused for an exhausted CIDR", free, extra), 3*time.Minute, func() error {
		pl, err := e.kube.CoreV1().Pods(x).List(ctx, metav1.ListOptions{LabelSelector: "app=p"})
		if err != nil {
			return err
		}
		running := 0
		for _, p := range pl.Items {
			if p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" {
				running++
			}
		}
		evs, err := e.kube.CoreV1().Events(x).List(ctx, metav1.ListOptions{FieldSelector: "reason=FailedCreatePodSandBox"})
		if err != nil {
			return err
		}
		refused := map[string]bool{}
		for _, ev := range evs.Items {
			if strings.Contains(ev.Message, "exhausted") {
				refused[ev.InvolvedObject.Name] = true
			}
		}
		if running != free || len(refused) != extra {
			return fmt.Errorf("%d running, %d refused with \"exhausted\"", running, len(refused))
		}
		return nil
	})
	if eps := ag.endpoints(t); len(eps) != capacity {
		t.Errorf("node-3 endpoints = %d, want %d (its CIDR full)", len(eps), capacity)
	}
	e.expect(t, servers[0], servers[1], 80, true)

	// An invalid policy is reported on its status and changes nothing.
	bad := &v1alpha1.MeshPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: x, Name: "bad-selector"},
		Spec: v1alpha1.MeshPolicySpec{
			PodSelector: metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "app", Operator: "Near", Values: []string{"a"}}}},
			PolicyRules: v1alpha1.PolicyRules{Ingress: []v1alpha1.IngressRule{}},
		},
	}
	if _, err := e.veil.PolicyV1alpha1().MeshPolicies(x).Create(ctx, bad, metav1.CreateOptions{}); err != nil {
		t.Logf("the API server rejected the invalid policy itself: %v", err)
		return
	}
	eventually(t, "invalid MeshPolicy reported", 15*time.Second, func() error {
		got, err := e.veil.PolicyV1alpha1().MeshPolicies(x).Get(ctx, "bad-selector", metav1.GetOptions{})
		if err != nil {
			return err
		}
		c := meta.FindStatusCondition(got.Status.Conditions, v1alpha1.ConditionAccepted)
		if c == nil || c.Status != metav1.ConditionFalse || !strings.Contains(c.Message, "Near") {
			return fmt.Errorf("conditions %+v", got.Status.Conditions)
		}
		return nil
	})
	e.expect(t, servers[0], servers[1], 80, true)
}

// TestPrivilegedAccelerationOptOutAnnotation: a pod annotated
// veil.dev/socket-acceleration=false keeps its connections off the sockmap
// path; an unannotated pair on the same node is accelerated.
func TestPrivilegedAccelerationOptOutAnnotation(t *testing.T) {
	e := sharedEnv(t)
	x := e.namespace(t, "accel-x", nil)
	pods := e.addPods(t,
		podSpec{Namespace: x, Name: "a", Node: "node-1", Labels: map[string]string{"app": "a"}, Ports: web},
		podSpec{Namespace: x, Name: "b", Node: "node-1", Labels: map[string]string{"app": "b"}, Ports: web},
		podSpec{Namespace: x, Name: "c", Node: "node-1", Labels: map[string]string{"app": "c"}, Ports: web,
			Annotations: map[string]string{"veil.dev/socket-acceleration": "false"}},
	)
	a, b, c := pods[0], pods[1], pods[2]
	ag := e.agentOf(t, "node-1")
	redirected := func() uint64 { return ag.status(t).Counters.SocketRedirectedBytes }
	r0 := redirected()
	startStream(t, a, c, 5005, 8<<20, 0).finish("to an opted-out pod")
	r1 := redirected()
	startStream(t, a, b, 5006, 8<<20, 0).finish("between accelerated pods")
	r2 := redirected()
	t.Logf("redirected bytes: to the opted-out pod %d, between accelerated pods %d", r1-r0, r2-r1)
	if r1 != r0 {
		t.Errorf("connection to an opted-out pod was accelerated: %d bytes redirected", r1-r0)
	}
	if r2-r1 < 8<<20 {
		t.Errorf("connection between accelerated pods: only %d bytes redirected", r2-r1)
	}
}
