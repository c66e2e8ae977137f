package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kubefake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/veilmesh/veil/api/agent/bridge"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/meshctl/audit"
	"github.com/veilmesh/veil/tests/testenv"
)

// These tests reach agents as meshctl does in a cluster: no lab state, the
// node's veil-agent pod found through the (fake) API server, and an exec
// into it that runs the real api-bridge against that node's agent.

// withAgents gives each node of c a veil-agent pod in the agents'
// namespace, serving agents[node], reached through exec; rbac answers
// the caller's access reviews (as user "alice").
func withAgents(t *testing.T, c *cluster, agents map[string]agentv1.AgentServer, rbac func(authorizationv1.ResourceAttributes) bool) {
	t.Helper()
	sockets := map[string]string{}
	for node, srv := range agents {
		pod := "veil-agent-" + strings.TrimPrefix(node, "node-") + "x"
		sockets[pod] = serve(t, srv)
		c.pods = append(c.pods, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: deploy.Namespace, Name: pod, Labels: map[string]string{"app.kubernetes.io/name": "veil-agent"}},
			Spec:       corev1.PodSpec{NodeName: node, HostNetwork: true},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
		})
	}
	c.exec = func(ctx context.Context, namespace, pod, container string, command []string, stdin io.Reader, stdout, stderr io.Writer) error {
		socket, ok := sockets[pod]
		if namespace != deploy.Namespace || !ok || container != agentclient.AgentContainer || !slices.Equal(command, []string{agentclient.AgentBinary, bridge.Subcommand}) {
			return fmt.Errorf("unexpected exec of %v in %s/%s container %s", command, namespace, pod, container)
		}
		if err := bridge.Serve(ctx, socket, stdin, stdout); err != nil {
			fmt.Fprintln(stderr, err)
			return errors.New("command terminated with exit code 1")
		}
		return nil
	}
	c.onCore = func(cs *kubefake.Clientset) {
		cs.PrependReactor("create", "selfsubjectaccessreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
			r := a.(k8stesting.CreateAction).GetObject().(*authorizationv1.SelfSubjectAccessReview).DeepCopy()
			r.Status.Allowed = rbac(*r.Spec.ResourceAttributes)
			return true, r, nil
		})
		cs.PrependReactor("create", "selfsubjectreviews", func(k8stesting.Action) (bool, runtime.Object, error) {
			return true, &authenticationv1.SelfSubjectReview{Status: authenticationv1.SelfSubjectReviewStatus{UserInfo: authenticationv1.UserInfo{Username: "alice"}}}, nil
		})
	}
}

func allowed(authorizationv1.ResourceAttributes) bool { return true }

func noExec(a authorizationv1.ResourceAttributes) bool { return a.Subresource != "exec" }

const forbiddenExec = `meshctl: you (user "alice") may not create pods/exec in namespace veil-system, which %s needs: ask for the veil-meshctl role`

// nodeAgent is a fake agent that says it runs on node and stores flows.
func nodeAgent(t *testing.T, node string, flows ...*agentv1.Flow) *fakeAgent {
	a := newFakeAgent(t)
	a.status = healthyStatus()
	a.status.Node = node
	a.flows = flows
	return a
}

func TestNodeThroughTheAPIServer(t *testing.T) {
	c := healthyCluster(2)
	withAgents(t, c, map[string]agentv1.AgentServer{"node-1": nodeAgent(t, "node-1"), "node-2": nodeAgent(t, "node-2")}, allowed)
	out, stderr, code := runCluster(t, c, nil, "status", "--node", "node-2", "-o", "json")
	var st struct {
		Node  string `json:"node"`
		Agent string `json:"agent"`
	}
	if code != ExitOK || json.Unmarshal([]byte(out), &st) != nil || st.Node != "node-2" {
		t.Fatalf("status --node node-2: exit %d, stdout %s, stderr %s; want node-2's status", code, out, stderr)
	}
	_, stderr, code = runCluster(t, c, nil, "status", "--node", "node-9")
	if code != ExitUsage || !strings.Contains(stderr, `node "node-9" is not in the cluster (its nodes: node-1, node-2)`) {
		t.Errorf("status --node node-9: exit %d, stderr %q; want 2 and the cluster's nodes", code, stderr)
	}
}

func TestNodeForbiddenByRBAC(t *testing.T) {
	c := healthyCluster(2)
	withAgents(t, c, map[string]agentv1.AgentServer{"node-1": nodeAgent(t, "node-1"), "node-2": nodeAgent(t, "node-2")}, noExec)
	out, stderr, code := runCluster(t, c, nil, "status", "--node", "node-2")
	if code != ExitUnreachable || out != "" || stderr != fmt.Sprintf(forbiddenExec, "--node")+" (a ClusterRole and a Role in veil-system; see deploy/README.md)\n" {
		t.Errorf("status --node under RBAC without exec: exit %d, stdout %q, stderr %q; want 3 and the missing permission", code, out, stderr)
	}
}

func flowAt(node string, sec int, src string) *agentv1.Flow {
	return &agentv1.Flow{
		TimeUnixNano: testNow.Add(time.Duration(sec) * time.Second).UnixNano(), Node: node,
		SrcPod: src, SrcIp: "10.0.1.5", SrcPort: 40000, DstPod: "x/b", DstIp: "10.0.2.5", DstPort: 80,
		Protocol: "TCP", Verdict: "ALLOWED",
	}
}

func TestObserveAllNodes(t *testing.T) {
	c := healthyCluster(3)
	// node-3 runs no agent pod: it is named on stderr, the others shown.
	withAgents(t, c, map[string]agentv1.AgentServer{
		"node-1": nodeAgent(t, "node-1", flowAt("node-1", 1, "x/one"), flowAt("node-1", 4, "x/four")),
		"node-2": nodeAgent(t, "node-2", flowAt("node-2", 2, "x/two"), flowAt("node-2", 3, "x/three"), flowAt("", 5, "x/five")),
	}, allowed)
	out, stderr, code := runCluster(t, c, nil, "observe", "--all-nodes", "--last", "4")
	if code != ExitUnreachable {
		t.Errorf("exit %d; want 3: node-3 could not be observed", code)
	}
	if !strings.Contains(stderr, "meshctl: node node-3: node node-3 runs no veil-agent pod") || !strings.Contains(stderr, "1 of 3 nodes could not be observed") {
		t.Errorf("stderr %q; want node-3's error and a summary", stderr)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 5 || !strings.HasPrefix(strings.Join(strings.Fields(lines[0]), " "), "TIME NODE SOURCE") {
		t.Fatalf("stdout:\n%s\nwant a header with NODE and the last 4 flows", out)
	}
	// Merged by time across nodes; the last 4 of 5; an agent that does not
	// name its node gets the node it was reached on.
	for i, want := range []string{"node-2  x/two", "node-2  x/three", "node-1  x/four", "node-2  x/five"} {
		if !strings.Contains(lines[i+1], want) {
			t.Errorf("flow %d = %q; want %q", i+1, lines[i+1], want)
		}
	}
}

func TestObserveAllNodesForbidden(t *testing.T) {
	c := healthyCluster(2)
	withAgents(t, c, map[string]agentv1.AgentServer{"node-1": nodeAgent(t, "node-1"), "node-2": nodeAgent(t, "node-2")}, noExec)
	_, stderr, code := runCluster(t, c, nil, "observe", "--all-nodes")
	if code != ExitUnreachable || strings.Count(stderr, "meshctl:") != 1 || !strings.Contains(stderr, fmt.Sprintf(forbiddenExec, "observe --all-nodes")) {
		t.Errorf("observe --all-nodes without exec: exit %d, stderr %q; want 3 and the missing permission once", code, stderr)
	}
	_, stderr, code = runCluster(t, c, nil, "observe", "--all-nodes", "--node", "node-1")
	if code != ExitUsage || !strings.Contains(stderr, "not both") {
		t.Errorf("observe --all-nodes --node: exit %d, stderr %q; want a usage error", code, stderr)
	}
}

func TestAuditActiveThroughTheAPIServer(t *testing.T) {
	c := healthyCluster(2)
	w := newLabWire(c)
	agents := map[string]agentv1.AgentServer{}
	for _, n := range []string{"node-1", "node-2"} {
		agents[n] = &wireAgent{node: n, wire: w}
	}
	withAgents(t, c, agents, allowed)
	r, code, stderr := auditJSON(t, c, nil, "--active", "--capture-duration", "300ms")
	active := activeChecks(r)
	if code != ExitOK || r.Verdict != audit.Pass || len(active) != 2 || active["node-1→node-2"].Result != audit.Pass || active["node-2→node-1"].Result != audit.Pass {
		t.Fatalf("exit %d, verdict %s, active %+v, stderr %q\n%s", code, r.Verdict, active, stderr, failuresString(r.Failures))
	}
}

func TestAuditActiveForbidden(t *testing.T) {
	c := healthyCluster(2)
	w := newLabWire(c)
	withAgents(t, c, map[string]agentv1.AgentServer{"node-1": &wireAgent{node: "node-1", wire: w}, "node-2": &wireAgent{node: "node-2", wire: w}}, noExec)
	out, stderr, code := runCluster(t, c, nil, "audit", "encryption", "--active", "--capture-duration", "100ms")
	if code != ExitUnreachable || out != "" || !strings.Contains(stderr, fmt.Sprintf(forbiddenExec, "audit encryption --active")) {
		t.Errorf("audit --active without exec: exit %d, stdout %q, stderr %q; want 3, no report, the missing permission", code, out, stderr)
	}
}

func TestObserveAllNodesFollow(t *testing.T) {
	c := healthyCluster(2)
	one, two := nodeAgent(t, "node-1"), nodeAgent(t, "node-2")
	one.live = []*agentv1.Flow{flowAt("node-1", 1, "x/one")}
	two.live = []*agentv1.Flow{flowAt("node-2", 2, "x/two")}
	withAgents(t, c, map[string]agentv1.AgentServer{"node-1": one, "node-2": two}, allowed)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var out, errb testenv.SyncBuffer
	s := Streams{In: strings.NewReader(""), Out: &out, Err: &errb}
	code := make(chan int, 1)
	go func() {
		code <- execute(ctx, newRootCommand(s, testEnv(nil), c.connect()), []string{"observe", "--all-nodes", "--follow"}, s)
	}()
	deadline := time.After(10 * time.Second)
	for !strings.Contains(out.String(), "x/one") || !strings.Contains(out.String(), "x/two") {
		select {
		case <-deadline:
			t.Fatalf("observe --all-nodes --follow printed %q, stderr %q; want both nodes' live flows", out.String(), errb.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	// Interrupted: what was shown is the answer.
	cancel()
	if got := <-code; got != ExitOK || errb.String() != "" {
		t.Errorf("exit %d, stderr %q after the interrupt; want 0 and nothing", got, errb.String())
	}
	flat := strings.Join(strings.Fields(out.String()), " ")
	if n := strings.Count(flat, "TIME NODE"); n != 1 || !strings.Contains(flat, "node-1 x/one") || !strings.Contains(flat, "node-2 x/two") {
		t.Errorf("stdout:\n%s\nwant one header and each flow with its node", out.String())
	}
}
