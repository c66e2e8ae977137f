package realcluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/veilmesh/veil/agent/capture"
	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/tests/testenv"
)

// npLabPrefix names the lab of TestPrivilegedNodePort.
const npLabPrefix = "vrcnp"

// NodePorts of the test's Services.
const (
	npCluster = 30080 // externalTrafficPolicy Cluster, TCP and UDP echo; backend on node-2 only
	npLocal   = 30081 // externalTrafficPolicy Local, "peer" server; backend on node-2 only
)

// TestPrivilegedNodePort: a client outside the nodes (the hub's network
// namespace, on the underlay) reaches NodePort Services on each node of a
// 2-node lab in strict mode (and in permissive mode with kube-proxy), once without kube-proxy (Veil translates in
// the datapath: --kube-proxy-replacement) and once with kube-proxy in
// iptables and in nftables mode (kube-proxy translates; Veil encrypts the
// forwarded leg). The only backend runs on node-2, so through node-1 the
// backend is remote and through node-2 local, over TCP and UDP. With
// externalTrafficPolicy Local the backend sees the client's own address,
// and node-1 (no local backend) does not answer. The forwarded leg from
// node-1 to node-2 is encrypted: the marker the client sends never crosses
// node-2's underlay link in the clear.
func TestPrivilegedNodePort(t *testing.T) {
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("skipped under -short: 2-node Kubernetes clusters")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	bins, err := controlplane.BuildCluster(ctx)
	if err != nil {
		t.Fatalf("build cluster binaries (make controlplane builds them ahead of the tests): %v", err)
	}
	agentImage := buildAgentImage(t, ctx)
	for _, mode := range []cluster.KubeProxyMode{cluster.KubeProxyNone, cluster.KubeProxyIPTables, cluster.KubeProxyNFTables} {
		t.Run("kube-proxy="+string(mode), func(t *testing.T) {
			testNodePort(t, ctx, bins, agentImage, mode, true)
		})
	}
	// Permissive mode (the chart's default) with kube-proxy: the forwarded
	// leg is the host's own traffic to another node's pod, and it too must
	// ride the tunnel where the peer has one.
	t.Run("kube-proxy=nftables/permissive", func(t *testing.T) {
		testNodePort(t, ctx, bins, agentImage, cluster.KubeProxyNFTables, false)
	})
}

func testNodePort(t *testing.T, ctx context.Context, bins controlplane.ClusterBinaries, agentImage string, mode cluster.KubeProxyMode, strict bool) {
	if err := cluster.Cleanup(npLabPrefix, ""); err != nil {
		t.Fatalf("remove leftovers of an earlier run: %v", err)
	}
	c, err := cluster.Up(ctx, cluster.UpOptions{
		Options: cluster.Options{
			Prefix: npLabPrefix, Nodes: 2, Binaries: bins, Images: []string{agentImage}, KubeProxy: mode,
			Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil)),
		},
		StrictMode: strict,
		NoDNS:      true,
		NoDemo:     true,
	})
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	clients := kubernetes.NewForConfigOrDie(c.Config)
	t.Cleanup(func() {
		if t.Failed() {
			for name, tail := range c.LogTails(3000) {
				t.Logf("--- last lines of %s:\n%s", name, tail)
			}
			dumpPodLogs(t, clients)
		}
		if err := c.Stop(); err != nil {
			t.Errorf("stop cluster: %v", err)
		}
	})

	createNodePortWorkload(t, ctx, clients)
	node1, node2 := cluster.NodeIP(1), cluster.NodeIP(2)
	at := func(node netip.Addr, port uint16) string { return netip.AddrPortFrom(node, port).String() }

	// The agents (or kube-proxy) see the Services and slices within
	// moments; the first answer says the path is there.
	for _, node := range []netip.Addr{node1, node2} {
		for _, network := range []string{"tcp", "udp"} {
			testenv.Eventually(t, 60*time.Second, 250*time.Millisecond, func() error {
				return hubEcho(ctx, c, network, at(node, npCluster), "warm-up")
			})
		}
	}

	// Backend remote (node-1) and local (node-2), TCP and UDP, each a
	// few times: new flows, each its own translation.
	for _, node := range []netip.Addr{node1, node2} {
		for _, network := range []string{"tcp", "udp"} {
			for i := range 5 {
				if err := hubEcho(ctx, c, network, at(node, npCluster), fmt.Sprintf("np-%d", i)); err != nil {
					t.Errorf("hub -> %s %s (externalTrafficPolicy Cluster): %v", network, at(node, npCluster), err)
				}
			}
		}
	}

	// externalTrafficPolicy Local: node-2's backend sees the hub's own
	// address; node-1 has no backend and does not serve the port.
	testenv.Eventually(t, 30*time.Second, 250*time.Millisecond, func() error {
		peer, err := hubPeer(ctx, c, at(node2, npLocal))
		if err != nil {
			return err
		}
		if peer.Addr() != cluster.HubIP {
			return fmt.Errorf("the backend saw the client as %s; want the client's own address %s", peer, cluster.HubIP)
		}
		return nil
	})
	if peer, err := hubPeer(ctx, c, at(node1, npLocal)); err == nil {
		t.Errorf("hub -> %s (externalTrafficPolicy Local, no backend on node-1) answered (backend saw %s); want no answer", at(node1, npLocal), peer)
	} else {
		t.Logf("node-1 without a local backend: %v", err)
	}

	// The leg node-1 forwards to node-2's backend is encrypted: node-2's
	// link on the underlay (the hub side of its veth) never carries the
	// marker in the clear, and carries WireGuard.
	marker := "VEIL-NODEPORT-" + string(mode)
	var under *capture.Capture
	if err := c.HubDo(func() (err error) {
		under, err = capture.Start("n2", capture.Options{Marker: []byte(marker), WireGuardPort: 51871, PodRange: cluster.ClusterCIDR})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		network := []string{"tcp", "udp"}[i%2]
		if err := hubEcho(ctx, c, network, at(node1, npCluster), fmt.Sprintf("%s-%d", marker, i)); err != nil {
			t.Errorf("hub -> %s %s during the capture: %v", network, at(node1, npCluster), err)
		}
	}
	sum := under.Stop()
	t.Logf("node-2's underlay link while the hub used node-1's NodePort 20 times (kube-proxy %s): %+v", mode, sum)
	if sum.Marker != 0 || sum.PlainPod != 0 {
		t.Errorf("plaintext between the nodes: %+v; want no marker and no pod traffic in the clear", sum)
	}
	if sum.WireGuard == 0 {
		t.Errorf("no WireGuard on node-2's link: %+v; want the forwarded leg in the tunnel", sum)
	}
}

// createNodePortWorkload runs the backend on node-2 and its two NodePort
// Services, in a namespace of its own without policy.
func createNodePortWorkload(t *testing.T, ctx context.Context, clients kubernetes.Interface) {
	t.Helper()
	const ns = "nodeport"
	if _, err := clients.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "backend", Namespace: ns, Labels: map[string]string{"app": "np-backend"}},
		Spec: corev1.PodSpec{
			NodeSelector: map[string]string{corev1.LabelHostname: cluster.NodeName(2)},
			Containers: []corev1.Container{{
				Name: "server", Image: cluster.TestServerImage, ImagePullPolicy: corev1.PullNever,
				Args: []string{"serve", "tcp/:8080", "udp/:8080", "peer/:8081"},
			}},
			TerminationGracePeriodSeconds: new(int64),
		},
	}
	if _, err := clients.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc := func(name string, etp corev1.ServiceExternalTrafficPolicy, ports ...corev1.ServicePort) *corev1.Service {
		return &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: corev1.ServiceSpec{
				Type: corev1.ServiceTypeNodePort, ExternalTrafficPolicy: etp,
				Selector: map[string]string{"app": "np-backend"}, Ports: ports,
			},
		}
	}
	for _, s := range []*corev1.Service{
		svc("echo", corev1.ServiceExternalTrafficPolicyCluster,
			corev1.ServicePort{Name: "tcp", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080), NodePort: npCluster},
			corev1.ServicePort{Name: "udp", Protocol: corev1.ProtocolUDP, Port: 80, TargetPort: intstr.FromInt32(8080), NodePort: npCluster}),
		svc("peer", corev1.ServiceExternalTrafficPolicyLocal,
			corev1.ServicePort{Name: "peer", Protocol: corev1.ProtocolTCP, Port: 81, TargetPort: intstr.FromInt32(8081), NodePort: npLocal}),
	} {
		if _, err := clients.CoreV1().Services(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create service %s: %v", s.Name, err)
		}
	}
	testenv.Eventually(t, 60*time.Second, 200*time.Millisecond, func() error {
		p, err := clients.CoreV1().Pods(ns).Get(ctx, "backend", metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cs := range p.Status.ContainerStatuses {
			if cs.Ready {
				return nil
			}
		}
		return fmt.Errorf("backend pod %s", p.Status.Phase)
	})
}

// hubEcho sends a line (TCP) or datagram (UDP) from the hub to addr and
// expects it back within a second.
func hubEcho(ctx context.Context, c *cluster.Cluster, network, addr, msg string) error {
	dctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	conn, err := c.HubDial(dctx, network, addr)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := fmt.Fprintln(conn, msg); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	buf := make([]byte, 256)
	n, err := conn.Read(buf)
	if err != nil {
		return fmt.Errorf("read the echo: %w", err)
	}
	if got := strings.TrimSpace(string(buf[:n])); got != msg {
		return fmt.Errorf("echo %q; want %q", got, msg)
	}
	return nil
}

// hubPeer asks the peer server at addr, from the hub, whom it sees.
func hubPeer(ctx context.Context, c *cluster.Cluster, addr string) (netip.AddrPort, error) {
	dctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	conn, err := c.HubDial(dctx, "tcp", addr)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("dial: %w", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return netip.AddrPort{}, fmt.Errorf("read: %w", err)
	}
	s, ok := strings.CutPrefix(strings.TrimSpace(line), "peer ")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("answer %q; want \"peer IP:PORT\"", line)
	}
	return netip.ParseAddrPort(s)
}
