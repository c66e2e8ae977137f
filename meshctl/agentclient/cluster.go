package agentclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"

	"github.com/veilmesh/veil/api/agent/bridge"
)

// Where the agents run in a cluster: the DaemonSet of deploy/.
const (
	// AgentLabelSelector selects the veil-agent DaemonSet's pods.
	AgentLabelSelector = "app.kubernetes.io/name=veil-agent"
	// AgentContainer is the container the bridge runs in.
	AgentContainer = "agent"
	// AgentBinary is veil-agent's path in the image.
	AgentBinary = "/usr/bin/veil-agent"
	// MeshctlRole names the RBAC roles of deploy/ that let a user reach
	// agents through the API server.
	MeshctlRole = "veil-meshctl"
)

// Exec runs command in container of pod namespace/name with the given
// stdio until the command exits or ctx ends, as `kubectl exec -i` does.
type Exec func(ctx context.Context, namespace, pod, container string, command []string, stdin io.Reader, stdout, stderr io.Writer) error

// RemoteExec is Exec through the API server of cfg: WebSocket, falling
// back to SPDY where the server or a proxy does not upgrade (kubectl's
// choice).
func RemoteExec(cfg *rest.Config) (Exec, error) {
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("create Kubernetes client for %s: %w", cfg.Host, err)
	}
	return func(ctx context.Context, namespace, pod, container string, command []string, stdin io.Reader, stdout, stderr io.Writer) error {
		u := client.CoreV1().RESTClient().Post().Namespace(namespace).Resource("pods").Name(pod).SubResource("exec").
			VersionedParams(&corev1.PodExecOptions{
				Container: container, Command: command,
				Stdin: stdin != nil, Stdout: stdout != nil, Stderr: stderr != nil,
			}, scheme.ParameterCodec).URL()
		ws, err := remotecommand.NewWebSocketExecutor(cfg, "GET", u.String())
		if err != nil {
			return fmt.Errorf("create WebSocket executor: %w", err)
		}
		spdy, err := remotecommand.NewSPDYExecutor(cfg, "POST", u)
		if err != nil {
			return fmt.Errorf("create SPDY executor: %w", err)
		}
		exec, err := remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool {
			return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
		})
		if err != nil {
			return fmt.Errorf("create executor: %w", err)
		}
		return exec.StreamWithContext(ctx, remotecommand.StreamOptions{Stdin: stdin, Stdout: stdout, Stderr: stderr})
	}, nil
}

// ClusterResolver reaches a node's agent through the API server: it finds
// the node's veil-agent pod and, for each connection, execs
// `veil-agent api-bridge` in it, whose stdin and stdout carry the API
// (see api/agent/bridge). Nothing listens on the node's network for it,
// and the caller's own RBAC decides who may: before the first lookup it
// asks the API server (SelfSubjectAccessReview) whether the caller may
// list pods and create pods/exec in the agents' namespace, and says which
// permission is missing.
//
// Use NewClusterResolver; it is safe for concurrent use.
type ClusterResolver struct {
	client    kubernetes.Interface
	exec      Exec
	namespace string
	purpose   string

	// access is the outcome of the permission check, made once.
	accessOnce sync.Once
	accessErr  error
}

var _ NodeResolver = (*ClusterResolver)(nil)

// NewClusterResolver returns a resolver that finds agents in namespace
// with client and reaches them through exec. purpose names, in a refusal,
// what the caller asked for (e.g. "--node").
func NewClusterResolver(client kubernetes.Interface, exec Exec, namespace, purpose string) *ClusterResolver {
	return &ClusterResolver{client: client, exec: exec, namespace: namespace, purpose: purpose}
}

// Resolve finds the veil-agent pod of node; its Target execs the bridge in
// it for each dial.
func (r *ClusterResolver) Resolve(ctx context.Context, node string) (Target, error) {
	if err := r.CheckAccess(ctx); err != nil {
		return Target{}, err
	}
	pod, err := r.agentPod(ctx, node)
	if err != nil {
		return Target{}, err
	}
	where := fmt.Sprintf("pod %s/%s (node %s)", pod.Namespace, pod.Name, node)
	return Target{Where: where, Dial: func(ctx context.Context) (net.Conn, error) {
		return r.dialBridge(ctx, pod.Namespace, pod.Name, where)
	}}, nil
}

// ForbiddenError is a permission the caller lacks; its message names it,
// the namespace and the caller.
type ForbiddenError struct {
	User      string
	Namespace string
	// Missing are the permissions, as "VERB RESOURCE".
	Missing []string
	Purpose string
}

func (e *ForbiddenError) Error() string {
	who := "you"
	if e.User != "" {
		who = fmt.Sprintf("you (user %q)", e.User)
	}
	return fmt.Sprintf("%s may not %s in namespace %s, which %s needs: ask for the %s role (a ClusterRole and a Role in %s; see deploy/README.md)",
		who, strings.Join(e.Missing, " or "), e.Namespace, e.Purpose, MeshctlRole, e.Namespace)
}

// CheckAccess asks the API server, once, whether the caller may do what
// reaching an agent takes; the error is a *Error of Kind Forbidden holding
// a *ForbiddenError when not.
func (r *ClusterResolver) CheckAccess(ctx context.Context) error {
	r.accessOnce.Do(func() { r.accessErr = r.checkAccess(ctx) })
	return r.accessErr
}

func (r *ClusterResolver) checkAccess(ctx context.Context) error {
	var missing []string
	for _, a := range []authorizationv1.ResourceAttributes{
		{Namespace: r.namespace, Verb: "list", Resource: "pods"},
		{Namespace: r.namespace, Verb: "create", Resource: "pods", Subresource: "exec"},
	} {
		ssar := &authorizationv1.SelfSubjectAccessReview{Spec: authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &a}}
		got, err := r.client.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, ssar, metav1.CreateOptions{})
		if err != nil {
			return unreachableErr(fmt.Errorf("ask the API server whether you may %s in namespace %s: %w", permission(a), r.namespace, err))
		}
		if !got.Status.Allowed {
			missing = append(missing, permission(a))
		}
	}
	if len(missing) == 0 {
		return nil
	}
	return &Error{Kind: Forbidden, Err: &ForbiddenError{User: r.user(ctx), Namespace: r.namespace, Missing: missing, Purpose: r.purpose}}
}

func permission(a authorizationv1.ResourceAttributes) string {
	res := a.Resource
	if a.Subresource != "" {
		res += "/" + a.Subresource
	}
	return a.Verb + " " + res
}

// user is the caller's user name as the API server knows it, or "" when
// it does not say.
func (r *ClusterResolver) user(ctx context.Context) string {
	ssr, err := r.client.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		return ""
	}
	return ssr.Status.UserInfo.Username
}

// agentPod is the running veil-agent pod of node.
func (r *ClusterResolver) agentPod(ctx context.Context, node string) (*corev1.Pod, error) {
	pods, err := r.client.CoreV1().Pods(r.namespace).List(ctx, metav1.ListOptions{
		LabelSelector: AgentLabelSelector, FieldSelector: "spec.nodeName=" + node,
	})
	if err != nil {
		return nil, r.apiErr("list veil-agent pods in namespace "+r.namespace, err)
	}
	var candidates []*corev1.Pod
	for i := range pods.Items {
		p := &pods.Items[i]
		// The selector is applied again: not every client (a fake one)
		// honours field selectors.
		if p.Spec.NodeName == node && p.DeletionTimestamp == nil {
			candidates = append(candidates, p)
		}
	}
	// A running pod, the ready one first (during a rollout the old pod may
	// still be there).
	slices.SortStableFunc(candidates, func(a, b *corev1.Pod) int { return rank(a) - rank(b) })
	if len(candidates) > 0 && candidates[0].Status.Phase == corev1.PodRunning {
		return candidates[0], nil
	}
	if _, err := r.client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{}); apierrors.IsNotFound(err) {
		return nil, usageErrorf("node %q is not in the cluster%s", node, r.nodeList(ctx))
	}
	if len(candidates) > 0 {
		p := candidates[0]
		return nil, unreachableErr(fmt.Errorf("the veil-agent pod of node %s (%s/%s) is %s, not running: see kubectl -n %s describe pod %s",
			node, p.Namespace, p.Name, p.Status.Phase, p.Namespace, p.Name))
	}
	return nil, unreachableErr(fmt.Errorf("node %s runs no veil-agent pod (none in namespace %s with labels %s): is Veil installed, and does the DaemonSet tolerate the node?",
		node, r.namespace, AgentLabelSelector))
}

// rank orders candidate agent pods: running and ready, running, other.
func rank(p *corev1.Pod) int {
	if p.Status.Phase != corev1.PodRunning {
		return 2
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return 0
		}
	}
	return 1
}

// nodeList is ": nodes are a, b" for a message, or "" when the nodes
// cannot be listed.
func (r *ClusterResolver) nodeList(ctx context.Context) string {
	nodes, err := r.client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil || len(nodes.Items) == 0 {
		return ""
	}
	var names []string
	for _, n := range nodes.Items {
		names = append(names, n.Name)
	}
	slices.Sort(names)
	return " (its nodes: " + strings.Join(names, ", ") + ")"
}

func (r *ClusterResolver) apiErr(op string, err error) error {
	if apierrors.IsForbidden(err) {
		return &Error{Kind: Forbidden, Err: fmt.Errorf("%s: %w", op, err)}
	}
	return unreachableErr(fmt.Errorf("%s: %w", op, err))
}

// BridgeError is why the bridge to an agent pod could not be opened.
type BridgeError struct {
	Where string
	Err   error
	// Stderr is what the bridge (or the runtime) wrote to stderr.
	Stderr string
}

func (e *BridgeError) Error() string {
	msg := fmt.Sprintf("exec %s %s in %s: %v", AgentBinary, bridge.Subcommand, e.Where, e.Err)
	if e.Stderr != "" {
		msg += ": " + e.Stderr
	}
	return msg
}

func (e *BridgeError) Unwrap() error { return e.Err }

// execEndTimeout bounds the wait for an exec that failed to say why.
const execEndTimeout = 5 * time.Second

// maxStderr bounds the bridge's stderr kept for a message.
const maxStderr = 4 << 10

// dialBridge execs the bridge in the pod and returns the connection once
// the bridge said it reached the agent's socket. The exec lives until the
// connection is closed.
func (r *ClusterResolver) dialBridge(ctx context.Context, namespace, pod, where string) (net.Conn, error) {
	local, remote := net.Pipe()
	// The exec outlives the dial: it ends when the connection is closed.
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stderr := &limitedBuffer{max: maxStderr}
	done := make(chan error, 1)
	finished := make(chan struct{})
	go func() {
		// What the agent still sends after the caller hung up is dropped
		// rather than failing the exec's copy (client-go would log it).
		err := r.exec(sctx, namespace, pod, AgentContainer, []string{AgentBinary, bridge.Subcommand}, remote, dropAfterClose{remote}, stderr)
		remote.Close()
		done <- err
		close(finished)
	}()
	hello := make(chan error, 1)
	go func() { hello <- bridge.ReadHello(local) }()
	fail := func(err error) (net.Conn, error) {
		local.Close()
		cancel()
		return nil, &BridgeError{Where: where, Err: err, Stderr: strings.TrimSpace(stderr.String())}
	}
	select {
	case err := <-hello:
		if err == nil {
			return &bridgeConn{Conn: local, cancel: cancel, finished: finished}, nil
		}
		// The exec ended before the bridge said hello, whose error says
		// why; or something else answered, and the exec is ended.
		local.Close()
		cancel()
		select {
		case execErr := <-done:
			if execErr != nil && !errors.Is(execErr, context.Canceled) {
				return fail(execErr)
			}
		case <-time.After(execEndTimeout):
		}
		return fail(err)
	case <-ctx.Done():
		return fail(ctx.Err())
	}
}

// bridgeConn is the caller's end of a bridge; closing it ends the exec.
type bridgeConn struct {
	net.Conn
	cancel   context.CancelFunc
	finished <-chan struct{}
}

// closeGrace bounds how long Close waits for the exec to end by itself.
const closeGrace = 2 * time.Second

// Close ends the exec the way `kubectl exec -i` ends when its stdin does:
// the bridge sees end of input, passes it to the agent, and exits; only
// an exec that does not end within closeGrace is torn down.
func (c *bridgeConn) Close() error {
	err := c.Conn.Close()
	select {
	case <-c.finished:
	case <-time.After(closeGrace):
	}
	c.cancel()
	return err
}

// dropAfterClose writes to a pipe whose reader may have gone: writes after
// that are dropped.
type dropAfterClose struct{ w io.Writer }

func (d dropAfterClose) Write(p []byte) (int, error) {
	// An error here only means the caller closed its end.
	d.w.Write(p)
	return len(p), nil
}

// limitedBuffer keeps the first max bytes written to it; it is safe for
// concurrent use.
type limitedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	max int
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if room := b.max - b.buf.Len(); room > 0 {
		b.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (b *limitedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// isBridgeError reports whether err is a bridge's, whose message is
// complete without the socket hints.
func isBridgeError(err error) bool {
	var be *BridgeError
	return errors.As(err, &be)
}
