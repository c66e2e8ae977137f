package agentclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/veilmesh/veil/api/agent/bridge"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
)

const ns = "veil-system"

func node(name string) *corev1.Node { return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}} }

func agentPod(name, nodeName string, phase corev1.PodPhase, ready bool) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app.kubernetes.io/name": "veil-agent"}},
		Spec:       corev1.PodSpec{NodeName: nodeName},
		Status:     corev1.PodStatus{Phase: phase},
	}
	if ready {
		p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	}
	return p
}

// access makes the fake API server answer SelfSubjectAccessReviews with
// allowed(attributes), and SelfSubjectReviews with user; it counts the
// access reviews.
func access(c *fake.Clientset, user string, allowed func(authorizationv1.ResourceAttributes) bool) *atomic.Int32 {
	var n atomic.Int32
	c.PrependReactor("create", "selfsubjectaccessreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		n.Add(1)
		r := a.(k8stesting.CreateAction).GetObject().(*authorizationv1.SelfSubjectAccessReview).DeepCopy()
		r.Status.Allowed = allowed(*r.Spec.ResourceAttributes)
		return true, r, nil
	})
	c.PrependReactor("create", "selfsubjectreviews", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, &authenticationv1.SelfSubjectReview{Status: authenticationv1.SelfSubjectReviewStatus{UserInfo: authenticationv1.UserInfo{Username: user}}}, nil
	})
	return &n
}

func allowAll(authorizationv1.ResourceAttributes) bool { return true }

func noExec(context.Context, string, string, string, []string, io.Reader, io.Writer, io.Writer) error {
	return errors.New("exec not expected")
}

func TestClusterResolverFindsTheNodesAgentPod(t *testing.T) {
	c := fake.NewClientset(node("node-1"), node("node-2"), node("node-3"), node("node-4"),
		agentPod("veil-agent-aaaaa", "node-1", corev1.PodRunning, true),
		// During a rollout: the old pod is going, the new one is not ready yet.
		func() *corev1.Pod {
			p := agentPod("veil-agent-old", "node-2", corev1.PodRunning, true)
			p.DeletionTimestamp = &metav1.Time{Time: time.Now()}
			p.Finalizers = []string{"test"}
			return p
		}(),
		agentPod("veil-agent-bbbbb", "node-2", corev1.PodRunning, false),
		agentPod("veil-agent-ready", "node-2", corev1.PodRunning, true),
		agentPod("veil-agent-ccccc", "node-3", corev1.PodPending, false),
	)
	access(c, "alice", allowAll)
	r := NewClusterResolver(c, noExec, ns, "--node")
	for _, tc := range []struct {
		node string
		kind Kind
		want string
	}{
		{"node-1", 0, "pod veil-system/veil-agent-aaaaa (node node-1)"},
		{"node-2", 0, "pod veil-system/veil-agent-ready (node node-2)"},
		{"node-3", Unreachable, "the veil-agent pod of node node-3 (veil-system/veil-agent-ccccc) is Pending, not running"},
		{"node-4", Unreachable, "node node-4 runs no veil-agent pod"},
		{"node-9", Usage, `node "node-9" is not in the cluster (its nodes: node-1, node-2, node-3, node-4)`},
	} {
		t.Run(tc.node, func(t *testing.T) {
			tgt, err := r.Resolve(context.Background(), tc.node)
			if tc.kind == 0 {
				if err != nil || tgt.Where != tc.want || tgt.Dial == nil {
					t.Fatalf("Resolve(%s) = %q, %v; want %q", tc.node, tgt.Where, err, tc.want)
				}
				return
			}
			var ae *Error
			if !errors.As(err, &ae) || ae.Kind != tc.kind || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Resolve(%s) = %v; want a kind %d error saying %q", tc.node, err, tc.kind, tc.want)
			}
		})
	}
}

func TestClusterResolverNamesTheMissingPermission(t *testing.T) {
	for _, tc := range []struct {
		name    string
		allowed func(authorizationv1.ResourceAttributes) bool
		user    string
		want    string
	}{
		{"no exec", func(a authorizationv1.ResourceAttributes) bool { return a.Subresource != "exec" }, "alice",
			`you (user "alice") may not create pods/exec in namespace veil-system, which --node needs: ask for the veil-meshctl role`},
		{"nothing", func(authorizationv1.ResourceAttributes) bool { return false }, "bob",
			`you (user "bob") may not list pods or create pods/exec in namespace veil-system, which --node needs`},
		{"unknown user", func(a authorizationv1.ResourceAttributes) bool { return a.Verb != "list" }, "",
			`you may not list pods in namespace veil-system`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := fake.NewClientset(node("node-1"), agentPod("veil-agent-aaaaa", "node-1", corev1.PodRunning, true))
			reviews := access(c, tc.user, tc.allowed)
			r := NewClusterResolver(c, noExec, ns, "--node")
			for range 2 {
				_, err := r.Resolve(context.Background(), "node-1")
				var ae *Error
				var fe *ForbiddenError
				if !errors.As(err, &ae) || ae.Kind != Forbidden || !errors.As(err, &fe) || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("Resolve = %v; want a Forbidden error saying %q", err, tc.want)
				}
			}
			if n := reviews.Load(); n != 2 {
				t.Errorf("%d access reviews for two lookups; want 2 (one per permission, asked once)", n)
			}
		})
	}
}

// statusAgent answers Status like an agent of node.
type statusAgent struct {
	agentv1.UnimplementedAgentServer
	node string
}

func (a statusAgent) Status(context.Context, *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	return &agentv1.StatusResponse{ApiVersion: APIVersion, Node: a.node, AgentVersion: "test"}, nil
}

func serveAgent(t *testing.T, node string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "veil-agentclient-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "agent.sock")
	ln, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	agentv1.RegisterAgentServer(srv, statusAgent{node: node})
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return socket
}

// bridgeExec plays the API server's exec: it runs the real bridge against
// the socket of the pod's node, as veil-agent api-bridge does in the pod.
// ended receives, for each exec, whether it ended by itself (nil) or was
// torn down (its context's error).
func bridgeExec(sockets map[string]string, execs *atomic.Int32, ended chan<- error) Exec {
	return func(ctx context.Context, namespace, pod, container string, command []string, stdin io.Reader, stdout, stderr io.Writer) error {
		execs.Add(1)
		defer func() {
			select {
			case ended <- ctx.Err():
			default:
			}
		}()
		if container != AgentContainer || strings.Join(command, " ") != AgentBinary+" "+bridge.Subcommand {
			return fmt.Errorf("exec of %v in container %s", command, container)
		}
		socket, ok := sockets[pod]
		if !ok {
			return fmt.Errorf("pods %q not found", pod)
		}
		if err := bridge.Serve(ctx, socket, stdin, stdout); err != nil {
			fmt.Fprintf(stderr, "veil-agent api-bridge: %v\n", err)
			return errors.New("command terminated with exit code 1")
		}
		return nil
	}
}

func TestClusterTargetDialsThroughTheBridge(t *testing.T) {
	c := fake.NewClientset(node("node-1"), node("node-2"),
		agentPod("veil-agent-aaaaa", "node-1", corev1.PodRunning, true),
		agentPod("veil-agent-bbbbb", "node-2", corev1.PodRunning, true))
	access(c, "alice", allowAll)
	missing := filepath.Join(t.TempDir(), "agent.sock")
	var execs atomic.Int32
	ended := make(chan error, 2)
	r := NewClusterResolver(c, bridgeExec(map[string]string{
		"veil-agent-aaaaa": serveAgent(t, "node-1"),
		"veil-agent-bbbbb": missing,
	}, &execs, ended), ns, "--node")
	ctx := context.Background()

	tgt, err := r.Resolve(ctx, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := Dial(ctx, tgt, 5*time.Second)
	if err != nil {
		t.Fatalf("Dial through the bridge: %v", err)
	}
	if conn.Status.Node != "node-1" {
		t.Errorf("agent of node-1 says it is on %q", conn.Status.Node)
	}
	for range 3 {
		if _, err := conn.Client.Status(ctx, &agentv1.StatusRequest{}); err != nil {
			t.Errorf("Status on the bridged connection: %v", err)
		}
	}
	conn.Close()
	if n := execs.Load(); n != 1 {
		t.Errorf("%d execs for one connection; want 1", n)
	}
	// Closing the connection ends the exec as end of input does, not by
	// tearing the stream down (which client-go reports as errors).
	select {
	case err := <-ended:
		if err != nil {
			t.Errorf("after Close the exec was torn down (%v); want it to end by itself", err)
		}
	default:
		t.Error("Close returned before the exec ended")
	}

	// The pod is there but its agent's socket is not: the bridge's own
	// words reach the user, naming the pod and the socket.
	tgt, err = r.Resolve(ctx, "node-2")
	if err != nil {
		t.Fatal(err)
	}
	_, err = Dial(ctx, tgt, 2*time.Second)
	var ae *Error
	if !errors.As(err, &ae) || ae.Kind != Unreachable {
		t.Fatalf("Dial with no agent behind the bridge = %v; want Unreachable", err)
	}
	for _, want := range []string{"veil-system/veil-agent-bbbbb (node node-2)", missing, "exit code 1", "api-bridge"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Dial with no agent behind the bridge = %q; want it to say %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "--socket") {
		t.Errorf("a bridge error gives the local socket's hints: %q", err)
	}
}

func TestDialBridgeRefusesAStreamWithoutHello(t *testing.T) {
	// Something else answers: an image whose veil-agent has no bridge
	// prints its usage and exits.
	exec := func(ctx context.Context, _, _, _ string, _ []string, stdin io.Reader, stdout, stderr io.Writer) error {
		io.WriteString(stdout, "unknown command \"api-bridge\" for \"veil-agent\"\n")
		<-ctx.Done()
		return ctx.Err()
	}
	r := NewClusterResolver(fake.NewClientset(), exec, ns, "--node")
	_, err := r.dialBridge(context.Background(), ns, "veil-agent-aaaaa", "pod x")
	if !errors.Is(err, bridge.ErrNoHello) || !strings.Contains(err.Error(), "older than this meshctl") {
		t.Fatalf("dialBridge against a stream without hello = %v; want ErrNoHello", err)
	}
}

func TestSelectionChoosesTheResolver(t *testing.T) {
	cluster := func(context.Context) (NodeResolver, error) { return fixedResolver("cluster"), nil }
	noKubeconfig := func(context.Context) (NodeResolver, error) {
		return nil, usageErrorf("no kubeconfig")
	}
	for _, tc := range []struct {
		name    string
		env     map[string]string
		cluster func(context.Context) (NodeResolver, error)
		want    string
		wantErr string
	}{
		{"cluster", nil, cluster, "cluster node-1", ""},
		{"no cluster", nil, nil, "", "no cluster to find the node's agent in"},
		{"no kubeconfig", nil, noKubeconfig, "", "no kubeconfig"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := Selection{Node: "node-1", Getenv: func(k string) string { return tc.env[k] }}
			if tc.cluster != nil {
				s.Cluster = tc.cluster
			}
			tgt, err := s.Target(context.Background())
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Target = %q, %v; want error %q", tgt.Where, err, tc.wantErr)
				}
				return
			}
			if err != nil || tgt.Where != tc.want {
				t.Fatalf("Target = %q, %v; want %q", tgt.Where, err, tc.want)
			}
		})
	}
}

type fixedResolver string

func (f fixedResolver) Resolve(_ context.Context, node string) (Target, error) {
	return Target{Where: string(f) + " " + node}, nil
}
