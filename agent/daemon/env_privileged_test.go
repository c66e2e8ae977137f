package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/veilmesh/veil/agent/config"
	"github.com/veilmesh/veil/agent/datapath"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/tests/testenv"
)

func TestMain(m *testing.M) {
	netns.MaybeRunHelper()
	// An agent started here with acceleration re-executes this binary for
	// its self-test.
	datapath.MaybeRunSocketHelper()
	maybeRunAgent()
	os.Exit(m.Run())
}

// agentEnv carries the JSON configuration of an agent process: the test
// binary re-executed inside a node namespace, so that every thread of the
// agent (informer workers included) sees that namespace, as in a pod.
const agentEnv = "VEIL_TEST_AGENT"

func maybeRunAgent() {
	raw := os.Getenv(agentEnv)
	if raw == "" {
		return
	}
	var cfg config.Config
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "agent config:", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{Level: slog.LevelDebug}))
	restCfg, err := clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent kubeconfig:", err)
		os.Exit(2)
	}
	d, err := New(cfg, restCfg, log)
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := d.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

const (
	testNode   = "node-1"
	testNS     = "lc"
	allowPort  = 8080
	deniedPort = 8081
)

var (
	nodeAddr = netip.MustParseAddr("10.99.0.1")
	podCIDR  = "10.244.1.0/24"
)

// agentLab is one node namespace with a real API server behind it, pods
// wired by the agent's own CNI service, and an agent process that a test
// can kill and start again.
type agentLab struct {
	t      *testing.T
	prefix string
	cp     *controlplane.ControlPlane
	kube   kubernetes.Interface
	node   *netns.Node
	cfg    config.Config
	agent  *netns.Proc
	pods   map[string]*netns.Netns
	ips    map[string]netip.Addr
	logs   []string
}

func newAgentLab(t *testing.T, name string) *agentLab {
	t.Helper()
	testenv.RequirePrivileged(t)
	l := &agentLab{t: t, prefix: fmt.Sprintf("veiltest-%d-%s", os.Getpid(), name),
		pods: map[string]*netns.Netns{}, ips: map[string]netip.Addr{}}
	l.cp = controlplane.StartForTest(t, controlplane.Options{})
	l.kube = kubernetes.NewForConfigOrDie(l.cp.Config)
	dir := t.TempDir()
	l.cfg = config.Default()
	l.cfg.NodeName = testNode
	l.cfg.Kubeconfig = l.cp.Kubeconfig
	l.cfg.BPFFSRoot = filepath.Join("/sys/fs/bpf", l.prefix)
	l.cfg.CgroupRoot = ""
	l.cfg.Encryption = "none"
	l.cfg.StateDir = filepath.Join(dir, "state")
	l.cfg.SocketPath = filepath.Join(dir, "agent.sock")
	l.cfg.MetricsAddr = ""
	t.Cleanup(l.cleanup)

	var err error
	if l.node, err = netns.NewNode(l.prefix + "-node"); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		// A veth pair with nothing behind it: an underlay toward no node.
		{"link", "add", "und0", "type", "veth", "peer", "name", "und1"},
		{"addr", "add", nodeAddr.String() + "/24", "dev", "und0"},
		{"link", "set", "und0", "up"},
		{"link", "set", "und1", "up"},
		{"link", "set", "lo", "up"},
	} {
		if _, err := l.node.Run("ip", args...); err != nil {
			t.Fatal(err)
		}
	}

	// The agent reaches the API server at the same loopback address as the
	// test, relayed into the node namespace.
	u, err := url.Parse(l.cp.Server)
	if err != nil {
		t.Fatal(err)
	}
	fwd, err := netns.Forward(&l.node.Netns, u.Host, u.Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fwd.Close)

	ctx := l.ctx(30 * time.Second)
	node, err := l.kube.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: testNode},
		Spec:       corev1.NodeSpec{PodCIDR: podCIDR, PodCIDRs: []string{podCIDR}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: nodeAddr.String()}}
	if _, err := l.kube.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: testNS}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return l
}

func (l *agentLab) ctx(d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	l.t.Cleanup(cancel)
	return ctx
}

func (l *agentLab) cleanup() {
	if l.agent != nil {
		l.stopAgent()
	}
	if l.t.Failed() {
		l.t.Logf("agent logs:\n%s", strings.Join(l.logs, "\n"))
	}
	if err := datapath.RemovePins(l.cfg.BPFFSRoot); err != nil {
		l.t.Errorf("cleanup: %v", err)
	}
	for _, p := range l.pods {
		p.Delete()
	}
	if l.node != nil {
		l.node.Delete()
	}
	if err := netns.CleanupPrefix(l.prefix); err != nil {
		l.t.Errorf("cleanup: %v", err)
	}
}

// startAgent starts an agent process in the node namespace.
func (l *agentLab) startAgent() {
	l.t.Helper()
	raw, err := json.Marshal(l.cfg)
	if err != nil {
		l.t.Fatal(err)
	}
	p, err := netns.StartProc(&l.node.Netns, nil, -1, []string{agentEnv + "=" + string(raw)})
	if err != nil {
		l.t.Fatal(err)
	}
	l.agent = p
	ctx := l.ctx(60 * time.Second)
	if _, err := p.WaitLine(ctx, "time="); err != nil {
		l.t.Fatal(err)
	}
	for {
		if _, err := os.Stat(l.cfg.SocketPath); err == nil {
			if _, err := l.status(); err == nil {
				return
			}
		}
		select {
		case <-ctx.Done():
			l.t.Fatalf("agent API never came up: %v\n%s", ctx.Err(), strings.Join(p.Lines(), "\n"))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// killAgent ends the agent with SIGKILL: nothing it held in memory survives.
func (l *agentLab) killAgent() {
	l.agent.Kill()
	l.logs = append(l.logs, l.agent.Lines()...)
	l.agent = nil
}

func (l *agentLab) stopAgent() {
	syscall.Kill(l.agent.PID(), syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := l.agent.Wait(ctx); err != nil {
		l.agent.Kill()
	}
	l.logs = append(l.logs, l.agent.Lines()...)
	l.agent = nil
}

func (l *agentLab) client() (agentv1.AgentClient, func()) {
	l.t.Helper()
	conn, err := grpc.NewClient("unix://"+l.cfg.SocketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		l.t.Fatal(err)
	}
	return agentv1.NewAgentClient(conn), func() { conn.Close() }
}

func (l *agentLab) status() (*agentv1.StatusResponse, error) {
	c, done := l.client()
	defer done()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return c.Status(ctx, &agentv1.StatusRequest{})
}

func (l *agentLab) waitConverged(within time.Duration) {
	l.t.Helper()
	deadline := time.Now().Add(within)
	for {
		st, err := l.status()
		if err == nil && st.Converged {
			return
		}
		if time.Now().After(deadline) {
			l.t.Fatalf("agent did not converge within %s: %v %v", within, st, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// createPod creates the Pod object (bound to the node; no kubelet runs, so
// its status stays empty, as it is while CNI ADD runs).
func (l *agentLab) createPod(name string, labels map[string]string) {
	l.t.Helper()
	_, err := l.kube.CoreV1().Pods(testNS).Create(l.ctx(10*time.Second), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: testNS, Labels: labels},
		Spec:       corev1.PodSpec{NodeName: testNode, Containers: []corev1.Container{{Name: "c", Image: "none"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		l.t.Fatal(err)
	}
}

func containerID(name string) string { return "ctr-" + name }

func (l *agentLab) cniRequest(name string) *agentv1.CNIRequest {
	return &agentv1.CNIRequest{
		ContainerId: containerID(name), Netns: l.pods[name].Path(), Ifname: "eth0",
		Args:   fmt.Sprintf("IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_UID=uid-%s", testNS, name, name),
		Config: []byte(`{"cniVersion":"1.0.0","name":"veil","type":"veil-cni","routes":["10.244.0.0/16"]}`),
	}
}

// cniAdd creates the pod's namespace and calls CNI ADD on the agent, as
// kubelet's runtime does; it returns the pod's address.
func (l *agentLab) cniAdd(name string) netip.Addr {
	l.t.Helper()
	ns, err := netns.NewNetns(l.prefix + "-" + name)
	if err != nil {
		l.t.Fatal(err)
	}
	l.pods[name] = ns
	c, done := l.client()
	defer done()
	resp, err := c.CNIAdd(l.ctx(30*time.Second), l.cniRequest(name))
	if err != nil {
		l.t.Fatalf("CNI ADD %s: %v", name, err)
	}
	var res struct {
		IPs []struct{ Address string } `json:"ips"`
	}
	if err := json.Unmarshal(resp.ResultJson, &res); err != nil || len(res.IPs) == 0 {
		l.t.Fatalf("CNI ADD %s result %s: %v", name, resp.ResultJson, err)
	}
	p, err := netip.ParsePrefix(res.IPs[0].Address)
	if err != nil {
		l.t.Fatal(err)
	}
	l.ips[name] = p.Addr()
	return p.Addr()
}

// cniDel calls CNI DEL for the pod, as the runtime does when it stops it.
func (l *agentLab) cniDel(name string) {
	l.t.Helper()
	c, done := l.client()
	defer done()
	if _, err := c.CNIDel(l.ctx(30*time.Second), l.cniRequest(name)); err != nil {
		l.t.Fatalf("CNI DEL %s: %v", name, err)
	}
}

// pinnedLinks lists the names of the datapath's pinned links.
func (l *agentLab) pinnedLinks() []string {
	l.t.Helper()
	entries, err := os.ReadDir(filepath.Join(l.cfg.BPFFSRoot, "links"))
	if err != nil {
		l.t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// serve runs TCP echo servers in the pod on ports.
func (l *agentLab) serve(name string, ports ...int) {
	l.t.Helper()
	for _, port := range ports {
		var ln net.Listener
		err := l.pods[name].Do(func() (err error) {
			ln, err = net.Listen("tcp4", fmt.Sprintf("%s:%d", l.ips[name], port))
			return err
		})
		if err != nil {
			l.t.Fatal(err)
		}
		l.t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					buf := make([]byte, 64)
					n, _ := c.Read(buf)
					c.Write(buf[:n])
				}()
			}
		}()
	}
}

// reach reports whether a TCP echo from pod from to pod to:port succeeds.
func (l *agentLab) reach(from, to string, port int) error {
	return netns.TCPEcho(l.pods[from], fmt.Sprintf("%s:%d", l.ips[to], port), 700*time.Millisecond)
}

// onlyFromA is a NetworkPolicy: pods app=b accept TCP allowPort from app=a,
// nothing else.
func onlyFromA() *networkingv1.NetworkPolicy {
	tcp := corev1.ProtocolTCP
	port := intstr.FromInt32(allowPort)
	return &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "b-only-from-a", Namespace: testNS},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}},
			}},
		},
	}
}

func (l *agentLab) endpointIPs() map[string]bool {
	l.t.Helper()
	c, done := l.client()
	defer done()
	resp, err := c.ListEndpoints(l.ctx(5*time.Second), &agentv1.ListEndpointsRequest{})
	if err != nil {
		l.t.Fatal(err)
	}
	out := map[string]bool{}
	for _, ep := range resp.Endpoints {
		out[ep.Ip] = true
	}
	return out
}
