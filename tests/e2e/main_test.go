// Package e2e runs Veil end to end on the lab's real cluster (lab/cluster):
// pods are created through the API server and placed by the scheduler
// (nodeSelector), containerd calls veil-cni for each, and the agents run in
// their DaemonSet's pods as the chart installs them. The tests of the
// package share one 3-node cluster, each in namespaces of its own.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/veilmesh/veil/api/agent/bridge"
	"github.com/veilmesh/veil/api/client/clientset/versioned"
	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/tests/testenv"
)

// prefix names the package's cluster; a crashed run's leftovers are
// removed by it at the next start.
const prefix = "veile2e"

// nodeCIDRBits is each node's pod CIDR size: small, so that
// TestPrivilegedAgentBadInput exhausts a node with few pods.
const nodeCIDRBits = 27

var shared struct {
	once sync.Once
	env  *env
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.env != nil {
		if err := shared.env.c.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "stop the e2e cluster: %v\n", err)
			code = 1
		}
		os.RemoveAll(shared.env.imageDir)
	}
	os.Exit(code)
}

// env is the package's cluster and its clients.
type env struct {
	c        *cluster.Cluster
	kube     kubernetes.Interface
	veil     versioned.Interface
	imageDir string
	// values are the chart values Veil was installed with.
	values map[string]any
}

// chartValues are the values of the package's install over the lab's
// (Cluster.Values): strict WireGuard. The agents reach the API server as a
// default install does, at the kubernetes Service's cluster IP (kube-proxy
// runs in this lab), through their own socket load-balancing: an API server
// stopped and started again must not cut them off
// (TestPrivilegedAgentRestartAndAPIServerAway).
func chartValues() map[string]any {
	return map[string]any{
		"encryption": map[string]any{"strictMode": true},
	}
}

// lockedBuffer keeps the cluster's progress log for an error message.
type lockedBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// requirePrivileged is the gate of every e2e test: privileged, and not
// under -short.
func requirePrivileged(t testing.TB) {
	t.Helper()
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("the e2e cluster runs Kubernetes from source: skipped with -short")
	}
}

// sharedEnv returns the package's 3-node cluster (strict WireGuard, no DNS
// or demo), bringing it up on first use, once every node's agent is ready
// and peers with every other node: a test that disturbed the mesh leaves
// it to the next one healed.
func sharedEnv(t testing.TB) *env {
	t.Helper()
	requirePrivileged(t)
	shared.once.Do(func() { shared.env, shared.err = startEnv() })
	if shared.err != nil {
		t.Fatalf("e2e cluster: %v", shared.err)
	}
	e := shared.env
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := e.c.WaitDaemonSetReady(ctx, deploy.Namespace, deploy.DaemonSetName); err != nil {
		t.Fatal(err)
	}
	if err := e.c.WaitMeshNodes(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			e.dumpLogs(t)
		}
	})
	return e
}

func startEnv() (*env, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	bins, err := controlplane.BuildCluster(ctx)
	if err != nil {
		return nil, fmt.Errorf("build cluster binaries (make controlplane builds them ahead of the tests): %w", err)
	}
	imageDir, err := os.MkdirTemp("", "veil-e2e-image-")
	if err != nil {
		return nil, err
	}
	image, err := buildAgentImage(ctx, imageDir)
	if err != nil {
		os.RemoveAll(imageDir)
		return nil, err
	}
	log := &lockedBuffer{}
	c, err := cluster.Up(ctx, cluster.UpOptions{
		Options: cluster.Options{
			Prefix: prefix, Nodes: 3, Binaries: bins, Images: []string{image},
			NodeCIDRMaskSize: nodeCIDRBits,
			Logger:           slog.New(slog.NewTextHandler(log, nil)),
		},
		Values: chartValues(),
		NoDNS:  true,
		NoDemo: true,
	})
	if err != nil {
		os.RemoveAll(imageDir)
		return nil, fmt.Errorf("bring the cluster up: %w\n%s", err, log.String())
	}
	var phases []string
	for _, p := range c.Phases {
		phases = append(phases, fmt.Sprintf("%s %s", p.Name, p.Took.Round(time.Millisecond)))
	}
	fmt.Fprintf(os.Stderr, "e2e cluster up in %s: %s\n", c.Startup.Round(time.Millisecond), strings.Join(phases, "; "))
	e := &env{c: c, imageDir: imageDir, values: c.Values()}
	maps.Copy(e.values, chartValues())
	if e.kube, err = kubernetes.NewForConfig(c.Config); err == nil {
		e.veil, err = versioned.NewForConfig(c.Config)
	}
	if err != nil {
		c.Stop()
		os.RemoveAll(imageDir)
		return nil, err
	}
	return e, nil
}

// buildAgentImage builds Veil's image into dir as `make image` does.
func buildAgentImage(ctx context.Context, dir string) (string, error) {
	root, err := controlplane.RepoRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, "make", "--no-print-directory", "-C", root, "image", "BIN="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("make image: %w\n%s", err, out)
	}
	return filepath.Join(dir, "veil-image.tar"), nil
}

func (e *env) dumpLogs(t testing.TB) {
	for name, tail := range e.c.LogTails(3000) {
		if strings.Contains(name, "kubelet") || strings.Contains(name, "apiserver") {
			t.Logf("--- last lines of %s:\n%s", name, tail)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	agents, err := e.kube.CoreV1().Pods(deploy.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=veil-agent"})
	if err != nil {
		t.Logf("list agent pods: %v", err)
		return
	}
	for _, p := range agents.Items {
		raw, err := e.kube.CoreV1().Pods(p.Namespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: agentclient.AgentContainer, TailLines: ptr(int64(60))}).DoRaw(ctx)
		t.Logf("--- agent %s on %s (err %v):\n%s", p.Name, p.Spec.NodeName, err, raw)
	}
}

// node returns the cluster's node by name.
func (e *env) node(t testing.TB, name string) *cluster.Node {
	t.Helper()
	for _, nd := range e.c.Nodes {
		if nd.Name == name {
			return nd
		}
	}
	t.Fatalf("no node %s", name)
	return nil
}

// namespace creates namespace name with labels, waits for its default
// ServiceAccount, and deletes it when the test ends, waiting until it is
// gone (its pods with it) so that the next test finds the nodes' addresses
// free.
func (e *env) namespace(t testing.TB, name string, labels map[string]string) string {
	t.Helper()
	ctx := context.Background()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	if _, err := e.kube.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := e.kube.CoreV1().Namespaces().Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete namespace %s: %v", name, err)
			return
		}
		for ctx.Err() == nil {
			_, err := e.kube.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return
			}
			time.Sleep(250 * time.Millisecond)
		}
		t.Errorf("namespace %s still there after 2 minutes", name)
	})
	eventually(t, "ServiceAccount "+name+"/default", time.Minute, func() error {
		_, err := e.kube.CoreV1().ServiceAccounts(name).Get(ctx, "default", metav1.GetOptions{})
		return err
	})
	return name
}

// labelNamespace sets labels on a namespace.
func (e *env) labelNamespace(t testing.TB, name string, labels map[string]string) {
	t.Helper()
	ctx := context.Background()
	ns, err := e.kube.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	for k, v := range labels {
		ns.Labels[k] = v
	}
	if _, err := e.kube.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// pod is a running test pod.
type pod struct {
	Namespace, Name, Node string
	IP                    net.IP
	// Container is the containerd ID of its one container.
	Container string
	nd        *cluster.Node
}

// Key is how the agent API names the pod.
func (p *pod) Key() string { return p.Namespace + "/" + p.Name }

// podSpec is a test pod, placed on Node by a nodeSelector.
type podSpec struct {
	Namespace, Name, Node string
	Labels, Annotations   map[string]string
	// Ports are served by the test server (TCP and UDP echo); none means
	// 80/TCP.
	Ports []corev1.ContainerPort
	// Image replaces the test server (then Ports are only declared).
	Image string
}

func (s podSpec) object() *corev1.Pod {
	image, args := s.Image, []string(nil)
	if image == "" {
		image = cluster.TestServerImage
		args = []string{"serve"}
		for _, p := range s.Ports {
			args = append(args, fmt.Sprintf("%s/:%d", strings.ToLower(string(p.Protocol)), p.ContainerPort))
		}
		if len(s.Ports) == 0 {
			args = append(args, "tcp/:80")
		}
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name, Labels: s.Labels, Annotations: s.Annotations},
		Spec: corev1.PodSpec{
			NodeSelector: map[string]string{corev1.LabelHostname: s.Node},
			Containers: []corev1.Container{{
				Name: "main", Image: image, ImagePullPolicy: corev1.PullNever, Args: args, Ports: s.Ports,
			}},
			TerminationGracePeriodSeconds: ptr(int64(0)),
		},
	}
}

// addPods creates pods through the API server and waits until each runs
// with an address, on the node its spec names.
func (e *env) addPods(t testing.TB, specs ...podSpec) []*pod {
	t.Helper()
	ctx := context.Background()
	for _, s := range specs {
		if _, err := e.kube.CoreV1().Pods(s.Namespace).Create(ctx, s.object(), metav1.CreateOptions{}); err != nil {
			t.Fatalf("create pod %s/%s: %v", s.Namespace, s.Name, err)
		}
	}
	out := make([]*pod, len(specs))
	for i, s := range specs {
		p, err := e.waitRunning(ctx, s.Namespace, s.Name, 2*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if p.Node != s.Node {
			t.Fatalf("pod %s on %s, want %s", p.Key(), p.Node, s.Node)
		}
		p.nd = e.node(t, p.Node)
		out[i] = p
	}
	return out
}

// waitRunning waits until pod ns/name runs with an address.
func (e *env) waitRunning(ctx context.Context, ns, name string, within time.Duration) (*pod, error) {
	deadline := time.Now().Add(within)
	var last error
	for time.Now().Before(deadline) {
		p, err := e.kube.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		switch {
		case err != nil:
			last = err
		case p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" || len(p.Status.ContainerStatuses) == 0 || p.Status.ContainerStatuses[0].State.Running == nil:
			last = fmt.Errorf("phase %s, IP %q, containers %+v", p.Status.Phase, p.Status.PodIP, p.Status.ContainerStatuses)
		default:
			_, id, _ := strings.Cut(p.Status.ContainerStatuses[0].ContainerID, "://")
			return &pod{Namespace: ns, Name: name, Node: p.Spec.NodeName, IP: net.ParseIP(p.Status.PodIP), Container: id}, nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return nil, fmt.Errorf("pod %s/%s not running within %s: %v", ns, name, within, last)
}

// run runs argv in the pod's container through the node's containerd (not
// the API server, which a test stops) and returns its exit code and its
// output: stdout, then stderr without ctr's own log lines.
func (p *pod) run(ctx context.Context, argv ...string) (string, int, error) {
	var stdout, stderr bytes.Buffer
	cmd := p.nd.ContainerCommand(ctx, p.Container, argv...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	out := stdout.String() + withoutCtrLog(stderr.String())
	var exit *exec.ExitError
	if errors.As(err, &exit) && ctx.Err() == nil {
		return out, exit.ExitCode(), nil
	}
	if err != nil {
		return out, 0, fmt.Errorf("run %v in %s: %w: %s", argv, p.Key(), err, out)
	}
	return out, 0, nil
}

// withoutCtrLog drops ctr's own log lines (time="…" level=…), such as its
// warning that cgroup v1 is deprecated, from what an exec wrote to stderr.
func withoutCtrLog(s string) string {
	var b strings.Builder
	for _, line := range strings.SplitAfter(s, "\n") {
		if strings.HasPrefix(line, `time="`) && strings.Contains(line, " level=") {
			continue
		}
		b.WriteString(line)
	}
	return b.String()
}

const probeTimeout = 700 * time.Millisecond

// notReached is a probe that ran and did not get through; any other error
// of a probe means it could not be run, which is no verdict.
type notReached struct{ msg string }

func (e *notReached) Error() string { return e.msg }

// isDenied says whether err is a probe that ran and did not get through.
func isDenied(err error) bool {
	var nr *notReached
	return errors.As(err, &nr)
}

// probeExit turns the exit of a client command run in a pod into reach's
// result: exit 1 with the client's own message is "not reached".
func probeExit(what, out string, code int) error {
	switch {
	case code == 0:
		return nil
	case code == 1 && strings.HasPrefix(out, "client: "):
		return &notReached{fmt.Sprintf("%s: %s", what, strings.TrimSpace(out))}
	}
	return fmt.Errorf("%s: the probe could not run: exit %d: %s", what, code, strings.TrimSpace(out))
}

// reach says whether from reaches to:port over TCP, from inside from: nil,
// a *notReached (isDenied), or an error of running the probe.
func reach(from, to *pod, port int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, code, err := from.run(ctx, "/client", "connect", "-timeout", probeTimeout.String(), fmt.Sprintf("%s:%d", to.IP, port))
	if err != nil {
		return err
	}
	return probeExit(fmt.Sprintf("%s -> %s:%d", from.Key(), to.Key(), port), out, code)
}

// eventually waits, polling every 100ms, until cond holds; a failure names
// what was awaited.
func eventually(t testing.TB, what string, within time.Duration, cond func() error) {
	t.Helper()
	testenv.Eventually(t, within, 100*time.Millisecond, func() error {
		if err := cond(); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	})
}

func ctxFor(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func ptr[T any](v T) *T { return &v }

// agentPod returns node's ready veil-agent pod and its agent container's
// containerd ID.
func (e *env) agentPod(ctx context.Context, node string) (*corev1.Pod, string, error) {
	pods, err := e.kube.CoreV1().Pods(deploy.Namespace).List(ctx, metav1.ListOptions{
		LabelSelector: "app.kubernetes.io/name=veil-agent", FieldSelector: "spec.nodeName=" + node,
	})
	if err != nil {
		return nil, "", fmt.Errorf("list the agent pods of %s: %w", node, err)
	}
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.DeletionTimestamp != nil {
			continue
		}
		for _, cs := range p.Status.ContainerStatuses {
			if cs.Name == agentclient.AgentContainer && cs.State.Running != nil && cs.Ready {
				_, id, _ := strings.Cut(cs.ContainerID, "://")
				return p, id, nil
			}
		}
	}
	return nil, "", fmt.Errorf("no ready agent pod on %s (%d pods)", node, len(pods.Items))
}

// agent is a node's agent API, reached through `veil-agent api-bridge` in
// its container, run through the node's containerd: it keeps working while
// the API server is away.
type agent struct {
	nd        *cluster.Node
	container string
}

// agentOf finds node's ready agent, waiting up to a minute for one.
func (e *env) agentOf(t testing.TB, node string) *agent {
	t.Helper()
	var id string
	eventually(t, "a ready agent on "+node, time.Minute, func() error {
		var err error
		_, id, err = e.agentPod(context.Background(), node)
		return err
	})
	return &agent{nd: e.node(t, node), container: id}
}

// dial connects to the agent's API.
func (a *agent) dial(ctx context.Context) (*agentclient.Conn, error) {
	return agentclient.Dial(ctx, agentclient.Target{Where: "agent of " + a.nd.Name, Dial: a.bridge}, 15*time.Second)
}

// bridge runs the agent's api-bridge and returns its stdin and stdout as a
// connection, once it said it reached the agent's socket.
func (a *agent) bridge(ctx context.Context) (net.Conn, error) {
	cctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	cmd := a.nd.ContainerCommand(cctx, a.container, agentclient.AgentBinary, bridge.Subcommand)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		cancel()
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		cancel()
		return nil, err
	}
	stderr := &lockedBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		cancel()
		return nil, fmt.Errorf("start the api-bridge on %s: %w", a.nd.Name, err)
	}
	c := &pipeConn{r: stdout, w: stdin, cancel: cancel, cmd: cmd}
	hello := make(chan error, 1)
	go func() { hello <- bridge.ReadHello(stdout) }()
	select {
	case err := <-hello:
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("api-bridge on %s: %w: %s", a.nd.Name, err, stderr.String())
		}
		return c, nil
	case <-ctx.Done():
		c.Close()
		return nil, ctx.Err()
	}
}

// pipeConn is a connection over a process's stdout and stdin; closing it
// ends the input, and the process if it does not end by itself.
type pipeConn struct {
	r      io.Reader
	w      io.WriteCloser
	cancel context.CancelFunc
	cmd    *exec.Cmd
	once   sync.Once
}

func (c *pipeConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *pipeConn) Write(p []byte) (int, error) { return c.w.Write(p) }

func (c *pipeConn) Close() error {
	c.once.Do(func() {
		c.w.Close()
		done := make(chan struct{})
		go func() { c.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			c.cancel()
			<-done
		}
		c.cancel()
	})
	return nil
}

func (c *pipeConn) LocalAddr() net.Addr              { return pipeAddr{} }
func (c *pipeConn) RemoteAddr() net.Addr             { return pipeAddr{} }
func (c *pipeConn) SetDeadline(time.Time) error      { return nil }
func (c *pipeConn) SetReadDeadline(time.Time) error  { return nil }
func (c *pipeConn) SetWriteDeadline(time.Time) error { return nil }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "api-bridge" }

// call dials the agent and runs fn on its client.
func call[T any](t testing.TB, a *agent, what string, fn func(context.Context, *agentclient.Conn) (T, error)) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := a.dial(ctx)
	if err != nil {
		t.Fatalf("%s: dial the agent of %s: %v", what, a.nd.Name, err)
	}
	defer c.Close()
	v, err := fn(ctx, c)
	if err != nil {
		t.Fatalf("%s on %s: %v", what, a.nd.Name, err)
	}
	return v
}

// lines is a process's output, line by line, as it comes.
type lines struct {
	mu    sync.Mutex
	all   []string
	done  chan struct{}
	err   error
	label string
}

// startLines runs argv in pod p and collects its output.
func startLines(ctx context.Context, p *pod, label string, argv ...string) (*lines, error) {
	cmd := p.nd.ContainerCommand(ctx, p.Container, argv...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	stderr := &lockedBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: start %v in %s: %w", label, argv, p.Key(), err)
	}
	l := &lines{done: make(chan struct{}), label: label}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			l.mu.Lock()
			l.all = append(l.all, sc.Text())
			l.mu.Unlock()
		}
		err := cmd.Wait()
		l.mu.Lock()
		if err != nil {
			l.err = fmt.Errorf("%w: %s", err, stderr.String())
		}
		l.mu.Unlock()
		close(l.done)
	}()
	return l, nil
}

// last is the last line starting with prefix, "" if none.
func (l *lines) last(prefix string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.all) - 1; i >= 0; i-- {
		if strings.HasPrefix(l.all[i], prefix) {
			return l.all[i]
		}
	}
	return ""
}

// wait waits for a line starting with prefix.
func (l *lines) wait(ctx context.Context, prefix string) (string, error) {
	for {
		if s := l.last(prefix); s != "" {
			return s, nil
		}
		select {
		case <-l.done:
			if s := l.last(prefix); s != "" {
				return s, nil
			}
			l.mu.Lock()
			defer l.mu.Unlock()
			return "", fmt.Errorf("%s ended without %q (%v): %q", l.label, prefix, l.err, l.all)
		case <-ctx.Done():
			return "", fmt.Errorf("%s: no %q: %w", l.label, prefix, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stream is a checksummed TCP transfer between two pods (`client sink` and
// `client source` in them), paced so that it is still running while a
// test disturbs the mesh.
type stream struct {
	t         testing.TB
	size      int
	src, sink *lines
}

// startStream starts sending size bytes from one pod to a port of another
// and waits until data flows.
func startStream(t testing.TB, from, to *pod, port, size int, pace time.Duration) *stream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	sink, err := startLines(ctx, to, "sink in "+to.Key(), "/client", "sink", fmt.Sprintf(":%d", port))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sink.wait(ctxFor(t, 20*time.Second), "listening"); err != nil {
		t.Fatal(err)
	}
	src, err := startLines(ctx, from, "source in "+from.Key(), "/client", "source", "-pace", pace.String(), fmt.Sprintf("%s:%d", to.IP, port), fmt.Sprint(size))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "stream started", 20*time.Second, func() error {
		// A fast stream may finish before its first progress report.
		if sink.last("progress") == "" && sink.last("done") == "" {
			return fmt.Errorf("no progress yet")
		}
		return nil
	})
	return &stream{t: t, size: size, src: src, sink: sink}
}

// finish waits for the transfer to end and checks every byte arrived, in
// order.
func (s *stream) finish(what string) {
	s.t.Helper()
	srcDone, err := s.src.wait(ctxFor(s.t, 3*time.Minute), "done")
	if err != nil {
		s.t.Fatal(err)
	}
	sinkDone, err := s.sink.wait(ctxFor(s.t, time.Minute), "done")
	if err != nil {
		s.t.Fatal(err)
	}
	if want := fmt.Sprintf("done %d ", s.size); !strings.HasPrefix(sinkDone, want) || sinkDone != srcDone {
		s.t.Errorf("stream %s: source %q, sink %q", what, srcDone, sinkDone)
	}
}
