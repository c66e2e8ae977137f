// Package lab runs Veil for real on one Linux host: a control plane (etcd +
// kube-apiserver built from source), N node network namespaces on a bridged
// underlay, one veil-agent process per node started with only its network
// namespace switched, and a pod launcher that plays kubelet: Pod object,
// veil-cni ADD with kubelet's environment, pod IP written to the Pod status,
// a test server in the pod's namespace and cgroup.
//
// Everything the lab creates carries its prefix and is removed by exact name;
// no lab namespace gets a route out of the lab. Nodes reach the API server
// through a relay listening on their own loopback.
//
// The lab is a product: `meshctl lab` runs it and the end-to-end tests in
// tests/ drive it. It never imports test code, and it reaches the agent only
// through its binaries and its API (an agent's pinned datapath is removed by
// `veil-agent --cleanup`), so meshctl does not link the datapath.
package lab

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/vishvananda/netlink"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/api/client/clientset/versioned"
	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/lab/netns"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Address plan. Pod CIDRs are 10.244.<n>.0/24 for node n (from 1); node
// underlay addresses 10.99.0.<10+n>.
var (
	ClusterCIDR  = netip.MustParsePrefix("10.244.0.0/16")
	UnderlayCIDR = netip.MustParsePrefix("10.99.0.0/24")
	// PodRoutes are the only routes a lab pod gets.
	PodRoutes = []string{"10.244.0.0/16", "10.99.0.0/16"}
)

// apiRelay is where a node's loopback relay to the API server listens.
const apiRelay = "127.0.0.1:6443"

// Options configure a lab.
type Options struct {
	// Prefix names everything the lab creates; at least 8 characters.
	Prefix string
	// Nodes is the number of nodes (default 2).
	Nodes int
	// Dir holds kubeconfigs, agent state, sockets and logs.
	Dir string
	// AgentBin and CNIBin are the built binaries (see Build). AgentBin
	// also removes the nodes' pinned datapaths (Cleanup).
	AgentBin, CNIBin string
	// AgentEnv adds or replaces environment variables of a node's agent,
	// on top of the DaemonSet's and the lab's own (see AgentOverrides).
	AgentEnv func(n *Node) map[string]string
	// PodCIDRBits is the prefix length of each node's pod CIDR (default 24).
	PodCIDRBits int
}

// Lab is a running lab.
type Lab struct {
	opts     Options
	CP       *controlplane.ControlPlane
	Kube     kubernetes.Interface
	Veil     versioned.Interface
	underlay *netns.Netns
	cgroup   *netns.Cgroup
	Nodes    []*Node

	mu   sync.Mutex
	Pods map[string]*Pod
}

// Node is one lab node.
type Node struct {
	Name       string
	Netns      *netns.Node
	IP         netip.Addr
	PodCIDR    netip.Prefix
	Dir        string
	Kubeconfig string
	Socket     string
	BPFFSRoot  string
	Cgroup     *netns.Cgroup
	relay      *netns.Forwarder
	agent      *exec.Cmd
	agentDone  chan struct{}
	lab        *Lab
}

// Pod is one lab pod.
type Pod struct {
	Namespace, Name string
	Node            *Node
	IP              netip.Addr
	Netns           *netns.Netns
	ContainerID     string
	server          *netns.Proc
	// CNIAdd is how long veil-cni ADD took, as kubelet would see it.
	CNIAdd time.Duration
}

// Key is "namespace/name".
func (p *Pod) Key() string { return p.Namespace + "/" + p.Name }

// Build compiles veil-agent and veil-cni into dir.
func Build(ctx context.Context, dir string) (agentBin, cniBin string, err error) {
	agentBin, cniBin = filepath.Join(dir, "veil-agent"), filepath.Join(dir, "veil-cni")
	if err := build(ctx, map[string]string{agentBin: "./agent/cmd/veil-agent", cniBin: "./agent/cmd/veil-cni"}); err != nil {
		return "", "", err
	}
	return agentBin, cniBin, nil
}

// build compiles each package (relative to the checkout) into its binary.
func build(ctx context.Context, bins map[string]string) error {
	root, err := repoRoot(ctx)
	if err != nil {
		return err
	}
	for bin, pkg := range bins {
		cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("build %s: %w: %s", pkg, err, out)
		}
	}
	return nil
}

func repoRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("find module root: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("find module root: not inside the Veil module")
	}
	return filepath.Dir(mod), nil
}

// Start brings up the control plane, the nodes and their agents.
func Start(ctx context.Context, opts Options) (*Lab, error) {
	if len(opts.Prefix) < 8 {
		return nil, fmt.Errorf("lab prefix %q: at least 8 characters, so cleanup by prefix is safe", opts.Prefix)
	}
	if opts.Nodes == 0 {
		opts.Nodes = 2
	}
	if opts.Nodes > 200 {
		return nil, fmt.Errorf("lab: %d nodes is more than the address plan holds", opts.Nodes)
	}
	if opts.PodCIDRBits == 0 {
		opts.PodCIDRBits = 24
	}
	if opts.PodCIDRBits < 24 || opts.PodCIDRBits > 30 {
		return nil, fmt.Errorf("lab: pod CIDR prefix length %d: want 24..30", opts.PodCIDRBits)
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create lab dir: %w", err)
	}
	// Leftovers of a crashed lab with the same prefix go first.
	if err := Cleanup(ctx, opts.Prefix, opts.AgentBin); err != nil {
		return nil, err
	}
	l := &Lab{opts: opts, Pods: map[string]*Pod{}}
	ok := false
	defer func() {
		if !ok {
			l.Stop()
		}
	}()
	cp, err := controlplane.Start(ctx, controlplane.Options{TempDir: opts.Dir})
	if err != nil {
		return nil, err
	}
	l.CP = cp
	if l.Kube, err = kubernetes.NewForConfig(cp.Config); err != nil {
		return nil, err
	}
	if l.Veil, err = versioned.NewForConfig(cp.Config); err != nil {
		return nil, err
	}
	if l.underlay, err = netns.NewNetns(opts.Prefix + "-ul"); err != nil {
		return nil, err
	}
	if err := l.underlay.Do(func() error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
		if err := netlink.LinkAdd(br); err != nil {
			return err
		}
		return netlink.LinkSetUp(br)
	}); err != nil {
		return nil, fmt.Errorf("create underlay bridge: %w", err)
	}
	if l.cgroup, err = netns.NewCgroup(opts.Prefix); err != nil {
		return nil, err
	}
	for range opts.Nodes {
		if _, err := l.AddNode(ctx); err != nil {
			return nil, err
		}
	}
	ok = true
	return l, nil
}

// AddNode creates one more node and starts its agent.
func (l *Lab) AddNode(ctx context.Context) (*Node, error) {
	i := len(l.Nodes) + 1
	n := &Node{
		Name:    fmt.Sprintf("node-%d", i),
		IP:      netip.AddrFrom4([4]byte{10, 99, 0, byte(10 + i)}),
		PodCIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), l.opts.PodCIDRBits),
		lab:     l,
	}
	n.Dir = filepath.Join(l.opts.Dir, n.Name)
	n.Socket = filepath.Join(n.Dir, "agent.sock")
	n.Kubeconfig = filepath.Join(n.Dir, "kubeconfig")
	n.BPFFSRoot = nodeBPFFSRoot(l.opts.Prefix, n.Name)
	if err := os.MkdirAll(n.Dir, 0o700); err != nil {
		return nil, err
	}
	var err error
	if n.Netns, err = netns.NewNode(l.opts.Prefix + "-" + n.Name); err != nil {
		return nil, err
	}
	l.Nodes = append(l.Nodes, n)
	if err := l.wireUnderlay(n, i); err != nil {
		return nil, err
	}
	if n.Cgroup, err = netns.NewCgroup(filepath.Join(filepath.Base(l.cgroup.Path), n.Name)); err != nil {
		return nil, err
	}
	if err := l.createNodeObject(ctx, n); err != nil {
		return nil, err
	}
	if n.relay, err = netns.Forward(&n.Netns.Netns, apiRelay, strings.TrimPrefix(l.CP.Server, "https://")); err != nil {
		return nil, err
	}
	nodeCfg := rest.CopyConfig(l.CP.Config)
	nodeCfg.Host = "https://" + apiRelay
	if err := controlplane.WriteKubeconfig(n.Kubeconfig, nodeCfg); err != nil {
		return nil, err
	}
	if err := n.StartAgent(ctx); err != nil {
		return nil, err
	}
	return n, l.writeState()
}

func (l *Lab) wireUnderlay(n *Node, i int) error {
	ul, err := l.underlay.Handle()
	if err != nil {
		return err
	}
	defer ul.Close()
	port := fmt.Sprintf("p%d", i)
	err = n.Netns.Do(func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: port, PeerNamespace: netlink.NsFd(int(ul))}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add underlay veth: %w", err)
		}
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: n.IP.AsSlice(), Mask: net.CIDRMask(UnderlayCIDR.Bits(), 32)}}); err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	})
	if err != nil {
		return err
	}
	return l.underlay.Do(func() error {
		p, err := netlink.LinkByName(port)
		if err != nil {
			return err
		}
		br, err := netlink.LinkByName("br0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetMaster(p, br); err != nil {
			return err
		}
		return netlink.LinkSetUp(p)
	})
}

func (l *Lab) createNodeObject(ctx context.Context, n *Node) error {
	obj := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: map[string]string{"kubernetes.io/hostname": n.Name}},
		Spec:       corev1.NodeSpec{PodCIDR: n.PodCIDR.String(), PodCIDRs: []string{n.PodCIDR.String()}},
	}
	// A just-started API server may still reset connections: retry a little.
	var created *corev1.Node
	var err error
	for try := 0; try < 20; try++ {
		created, err = l.Kube.CoreV1().Nodes().Create(ctx, obj, metav1.CreateOptions{})
		if err == nil || apierrors.IsAlreadyExists(err) || ctx.Err() != nil {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("create node %s: %w", n.Name, err)
	}
	created.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: n.IP.String()}, {Type: corev1.NodeHostName, Address: n.Name}}
	created.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now()}}
	if _, err := l.Kube.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("write status of node %s: %w", n.Name, err)
	}
	return nil
}

// AgentOverrides are the lab's changes to the DaemonSet's agent environment:
// only what must differ between nodes sharing one host (paths, socket,
// interface names, metrics address) and how to reach the API server.
func AgentOverrides(n *Node) map[string]string {
	return map[string]string{
		"VEIL_KUBECONFIG":          n.Kubeconfig,
		"VEIL_BPFFS_ROOT":          n.BPFFSRoot,
		"VEIL_CGROUP_ROOT":         n.Cgroup.Path,
		"VEIL_STATE_DIR":           filepath.Join(n.Dir, "state"),
		"VEIL_SOCKET":              n.Socket,
		"VEIL_METRICS_ADDR":        "127.0.0.1:9962",
		"VEIL_CLUSTER_CIDR":        ClusterCIDR.String(),
		"VEIL_WIREGUARD_INTERFACE": n.WireGuardInterface(),
	}
}

// agentCommand is what the node runs: the DaemonSet's agent container, with
// the built binary for the image's and the lab's overrides.
func (n *Node) agentCommand() (argv, env []string, err error) {
	over := AgentOverrides(n)
	if n.lab.opts.AgentEnv != nil {
		for k, v := range n.lab.opts.AgentEnv(n) {
			over[k] = v
		}
	}
	argv, env, err = deploy.AgentInvocation(n.Name, over)
	if err != nil {
		return nil, nil, fmt.Errorf("agent command of %s from the DaemonSet: %w", n.Name, err)
	}
	argv = append([]string{n.lab.opts.AgentBin}, argv[1:]...)
	return argv, append(env, "PATH="+os.Getenv("PATH")), nil
}

// WireGuardInterface names the node's WireGuard device. Userspace devices
// keep their control socket in the host-wide /var/run/wireguard, so the name
// must be unique on the host: a short hash of the lab prefix plus the node.
func (n *Node) WireGuardInterface() string {
	return wgName(n.lab.opts.Prefix, n.Name)
}

func wgName(prefix, node string) string {
	h := sha256.Sum256([]byte(prefix))
	return fmt.Sprintf("vw%x%s", h[:3], strings.TrimPrefix(node, "node-"))
}

// StartAgent starts the node's agent (only its network namespace switched)
// and waits until it has converged with the API server.
func (n *Node) StartAgent(ctx context.Context) error {
	logf, err := os.OpenFile(filepath.Join(n.Dir, "agent.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	argv, env, err := n.agentCommand()
	if err != nil {
		logf.Close()
		return err
	}
	cmd := exec.Command("nsenter", append([]string{"--net=" + n.Netns.Path(), "--"}, argv...)...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start agent of %s: %w", n.Name, err)
	}
	n.agent = cmd
	n.agentDone = make(chan struct{})
	go func() {
		cmd.Wait()
		logf.Close()
		close(n.agentDone)
	}()
	deadline := time.Now().Add(60 * time.Second)
	for {
		st, err := n.Status(ctx)
		if err == nil && st.Node == n.Name && st.Converged {
			return nil
		}
		if err == nil {
			err = fmt.Errorf("not converged yet: %v", st.Degraded)
		}
		select {
		case <-n.agentDone:
			return fmt.Errorf("agent of %s exited: %s", n.Name, n.AgentLogTail(4096))
		default:
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("agent of %s did not answer: %v; log: %s", n.Name, err, n.AgentLogTail(4096))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// StopAgent stops the agent: SIGTERM, or SIGKILL when kill is set (a crash).
func (n *Node) StopAgent(kill bool) {
	if n.agent == nil || n.agent.Process == nil {
		return
	}
	sig := syscall.SIGTERM
	if kill {
		sig = syscall.SIGKILL
	}
	n.agent.Process.Signal(sig)
	select {
	case <-n.agentDone:
	case <-time.After(10 * time.Second):
		n.agent.Process.Kill()
		<-n.agentDone
	}
	n.agent = nil
}

// AgentPID is the agent's process id, or 0.
func (n *Node) AgentPID() int {
	if n.agent == nil || n.agent.Process == nil {
		return 0
	}
	return n.agent.Process.Pid
}

// AgentLogTail returns the end of the agent's log.
func (n *Node) AgentLogTail(max int) string {
	b, _ := os.ReadFile(filepath.Join(n.Dir, "agent.log"))
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return string(b)
}

// Dial connects to the node agent's API.
func (n *Node) Dial() (*grpc.ClientConn, agentv1.AgentClient, error) {
	conn, err := grpc.NewClient("unix://"+n.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, fmt.Errorf("dial agent of %s: %w", n.Name, err)
	}
	return conn, agentv1.NewAgentClient(conn), nil
}

// Status asks the node's agent for its status.
func (n *Node) Status(ctx context.Context) (*agentv1.StatusResponse, error) {
	conn, c, err := n.Dial()
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return c.Status(cctx, &agentv1.StatusRequest{})
}

// CutAPIServer makes the API server unreachable from the node (its relay
// goes away, established connections included); RestoreAPIServer undoes it.
func (n *Node) CutAPIServer() {
	if n.relay != nil {
		n.relay.Close()
		n.relay = nil
	}
}

// RestoreAPIServer brings the node's path to the API server back.
func (n *Node) RestoreAPIServer() error {
	var err error
	n.relay, err = netns.Forward(&n.Netns.Netns, apiRelay, strings.TrimPrefix(n.lab.CP.Server, "https://"))
	return err
}

// PodSpec describes a pod to launch.
type PodSpec struct {
	Namespace, Name string
	Node            string
	Labels          map[string]string
	Annotations     map[string]string
	// Ports are served by the pod's test server: {Name, Port, Protocol}.
	Ports []corev1.ContainerPort
}

// EnsureNamespace creates a namespace with labels, or updates its labels.
func (l *Lab) EnsureNamespace(ctx context.Context, name string, labels map[string]string) error {
	ns, err := l.Kube.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = l.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	for k, v := range labels {
		ns.Labels[k] = v
	}
	_, err = l.Kube.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{})
	return err
}

// Node returns the node named name.
func (l *Lab) Node(name string) (*Node, error) {
	for _, n := range l.Nodes {
		if n.Name == name {
			return n, nil
		}
	}
	return nil, fmt.Errorf("no lab node %q", name)
}

// AddPod launches a pod as kubelet would, and starts its test server.
func (l *Lab) AddPod(ctx context.Context, spec PodSpec) (*Pod, error) {
	node, err := l.Node(spec.Node)
	if err != nil {
		return nil, err
	}
	if err := l.EnsureNamespace(ctx, spec.Namespace, nil); err != nil {
		return nil, fmt.Errorf("namespace %s: %w", spec.Namespace, err)
	}
	obj := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: spec.Namespace, Name: spec.Name, Labels: spec.Labels, Annotations: spec.Annotations},
		Spec: corev1.PodSpec{
			NodeName:   node.Name,
			Containers: []corev1.Container{{Name: "server", Image: "veil.dev/lab-server", Ports: spec.Ports}},
		},
	}
	created, err := l.Kube.CoreV1().Pods(spec.Namespace).Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create pod %s/%s: %w", spec.Namespace, spec.Name, err)
	}
	p := &Pod{Namespace: spec.Namespace, Name: spec.Name, Node: node, ContainerID: "lab" + strings.ReplaceAll(string(created.UID), "-", "")}
	if p.Netns, err = netns.NewNetns(fmt.Sprintf("%s-p-%s-%s", l.opts.Prefix, spec.Namespace, spec.Name)); err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.Pods[p.Key()] = p
	l.mu.Unlock()
	start := time.Now()
	res, err := node.runCNI(ctx, "ADD", p)
	p.CNIAdd = time.Since(start)
	if err != nil {
		return nil, err
	}
	var result struct {
		IPs []struct {
			Address string `json:"address"`
		} `json:"ips"`
	}
	if err := json.Unmarshal(res, &result); err != nil || len(result.IPs) == 0 {
		return nil, fmt.Errorf("CNI ADD of %s: unreadable result %s: %v", p.Key(), res, err)
	}
	pfx, err := netip.ParsePrefix(result.IPs[0].Address)
	if err != nil {
		return nil, fmt.Errorf("CNI ADD of %s: address %q: %w", p.Key(), result.IPs[0].Address, err)
	}
	p.IP = pfx.Addr()
	created.Status.PodIP = p.IP.String()
	created.Status.PodIPs = []corev1.PodIP{{IP: p.IP.String()}}
	created.Status.HostIP = node.IP.String()
	created.Status.Phase = corev1.PodRunning
	if _, err := l.Kube.CoreV1().Pods(spec.Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return nil, fmt.Errorf("write status of pod %s: %w", p.Key(), err)
	}
	var serve []string
	for _, port := range spec.Ports {
		proto := strings.ToLower(string(port.Protocol))
		if proto == "" {
			proto = "tcp"
		}
		if proto == "tcp" || proto == "udp" {
			serve = append(serve, fmt.Sprintf("%s:%d", proto, port.ContainerPort))
		}
	}
	if len(serve) > 0 {
		if p.server, err = netns.StartHelper(p.Netns, node.Cgroup, -1, "serve", serve...); err != nil {
			return nil, err
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if _, err := p.server.WaitLine(cctx, "listening"); err != nil {
			return nil, fmt.Errorf("test server of %s: %w", p.Key(), err)
		}
	}
	return p, l.writeState()
}

// DeletePod does what kubelet does when a pod goes: CNI DEL, then the
// object is deleted.
func (l *Lab) DeletePod(ctx context.Context, p *Pod) error {
	if p.server != nil {
		p.server.Kill()
	}
	if _, err := p.Node.runCNI(ctx, "DEL", p); err != nil {
		return err
	}
	if err := l.Kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete pod %s: %w", p.Key(), err)
	}
	l.mu.Lock()
	delete(l.Pods, p.Key())
	l.mu.Unlock()
	return errors.Join(p.Netns.Delete(), l.writeState())
}

// CNIConfig is the network configuration the lab's kubelet hands veil-cni.
func (n *Node) CNIConfig() []byte {
	conf := map[string]any{
		"cniVersion": "1.0.0", "name": "veil", "type": "veil-cni",
		"agentSocket": n.Socket, "routes": PodRoutes,
	}
	b, _ := json.Marshal(conf)
	return b
}

// runCNI runs veil-cni exactly as kubelet does: CNI_* environment, network
// configuration on stdin, result on stdout.
func (n *Node) runCNI(ctx context.Context, command string, p *Pod) ([]byte, error) {
	return n.RunCNI(ctx, command, p.ContainerID, p.Netns.Path(), fmt.Sprintf("IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s", p.Namespace, p.Name), n.CNIConfig())
}

// RunCNI runs veil-cni with the given command, container, netns, CNI_ARGS
// and configuration, returning stdout; a failure includes the CNI error.
func (n *Node) RunCNI(ctx context.Context, command, containerID, netnsPath, args string, conf []byte) ([]byte, error) {
	cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(cctx, n.lab.opts.CNIBin)
	cmd.Env = append(os.Environ(),
		"CNI_COMMAND="+command, "CNI_CONTAINERID="+containerID, "CNI_NETNS="+netnsPath,
		"CNI_IFNAME=eth0", "CNI_ARGS="+args, "CNI_PATH="+filepath.Dir(n.lab.opts.CNIBin))
	cmd.Stdin = strings.NewReader(string(conf))
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("veil-cni %s for %s: %w: %s", command, containerID, err, out)
	}
	return out, nil
}

// Stop removes everything the lab created.
func (l *Lab) Stop() error {
	var errs []error
	for _, n := range l.Nodes {
		n.StopAgent(false)
		n.CutAPIServer()
	}
	l.mu.Lock()
	for _, p := range l.Pods {
		if p.server != nil {
			p.server.Kill()
		}
	}
	l.mu.Unlock()
	if l.CP != nil {
		errs = append(errs, l.CP.Stop())
	}
	errs = append(errs, Cleanup(context.Background(), l.opts.Prefix, l.opts.AgentBin))
	return errors.Join(errs...)
}

// labNetns reports whether name is one of the lab's namespaces:
// <prefix>-ul, <prefix>-node-<n> or <prefix>-p-<namespace>-<pod>.
func labNetns(prefix, name string) bool {
	rest, ok := strings.CutPrefix(name, prefix+"-")
	if !ok {
		return false
	}
	if rest == "ul" || strings.HasPrefix(rest, "p-") {
		return true
	}
	n, ok := strings.CutPrefix(rest, "node-")
	if !ok || n == "" {
		return false
	}
	_, err := strconv.Atoi(n)
	return err == nil
}

// Cleanup removes, by exact prefix, what a lab with that prefix left behind
// (also after a crash): pinned datapaths, namespaces, cgroups. agentBin is
// the veil-agent binary that removes each node's pinned datapath (see
// cleanupAgent); it may be empty when no node left a bpffs root.
func Cleanup(ctx context.Context, prefix, agentBin string) error {
	if len(prefix) < 8 {
		return fmt.Errorf("cleanup: prefix %q is too short to be safe", prefix)
	}
	var errs []error
	for _, node := range pinnedNodes(prefix) {
		errs = append(errs, cleanupAgent(ctx, agentBin, prefix, node))
	}
	// The lab's namespaces have exactly three shapes; matching them (not a
	// bare prefix) keeps a lab named veil-lab off one named veil-lab-b.
	errs = append(errs, netns.CleanupMatching(func(name string) bool { return labNetns(prefix, name) }))
	// Userspace WireGuard control sockets of the lab's nodes (an agent
	// killed hard leaves its socket behind).
	socks, _ := filepath.Glob(filepath.Join("/var/run/wireguard", wgName(prefix, "")+"*.sock"))
	for _, s := range socks {
		if err := os.Remove(s); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if mount, err := netns.Cgroup2Mount(); err == nil {
		root := filepath.Join(mount, prefix)
		subs, _ := filepath.Glob(filepath.Join(root, "*"))
		for _, s := range subs {
			if fi, err := os.Stat(s); err == nil && fi.IsDir() {
				errs = append(errs, (&netns.Cgroup{Path: s}).Delete())
			}
		}
		if _, err := os.Stat(root); err == nil {
			errs = append(errs, (&netns.Cgroup{Path: root}).Delete())
		}
	}
	return errors.Join(errs...)
}
