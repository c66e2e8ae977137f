package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/veilmesh/veil/agent/capture"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/api/annotations"
	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/meshctl/cli"
)

// wireguardPort is the chart's default encryption.wireguardPort.
const wireguardPort = 51871

// wireguardInterface is the agents' WireGuard device (the DaemonSet's
// VEIL_WIREGUARD_INTERFACE).
const wireguardInterface = "veil-wg0"

// markerExchange sends marker over TCP from one pod to another (echoed
// back), while both nodes' agents capture their underlay and tunnel. The
// nodes in agentDown, whose agents a test stopped, capture nothing: their
// response stays nil.
func (e *env) markerExchange(t *testing.T, from, to *pod, marker string, agentDown ...string) (src, dst *agentv1.CaptureResponse, sendErr error) {
	t.Helper()
	var wg sync.WaitGroup
	capture := func(node string, out **agentv1.CaptureResponse) {
		defer wg.Done()
		if slices.Contains(agentDown, node) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, id, err := e.agentPod(ctx, node)
		if err != nil {
			return
		}
		c, err := (&agent{nd: e.node(t, node), container: id}).dial(ctx)
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close()
		resp, err := c.Client.CaptureUnderlay(ctx, &agentv1.CaptureRequest{Marker: marker, DurationMs: 4000})
		if err != nil {
			t.Error(err)
			return
		}
		*out = resp
	}
	wg.Add(2)
	go capture(from.Node, &src)
	go capture(to.Node, &dst)
	// The captures start once each agent's bridge is up.
	time.Sleep(1500 * time.Millisecond)
	for i := 0; i < 3; i++ {
		if sendErr = sendMarker(from, to, marker); sendErr == nil {
			break
		}
	}
	wg.Wait()
	return src, dst, sendErr
}

// sendMarker sends marker from inside a pod to another's echo server on
// 80/TCP and waits for it to come back.
func sendMarker(from, to *pod, marker string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, code, err := from.run(ctx, "/client", "connect", "-timeout", "2s", "-message", marker, fmt.Sprintf("%s:80", to.IP))
	if err != nil {
		return err
	}
	return probeExit(fmt.Sprintf("marker %s -> %s:80", from.Key(), to.Key()), out, code)
}

// audit runs `meshctl audit encryption --active` against the cluster, as a
// user would with the lab's kubeconfig: through the API server.
func (e *env) audit(t *testing.T) (verdict, out string) {
	t.Helper()
	t.Setenv("KUBECONFIG", e.c.Kubeconfig)
	var stdout, stderr bytes.Buffer
	code := cli.Main([]string{"audit", "encryption", "--active", "-o", "json"}, cli.Streams{In: strings.NewReader(""), Out: &stdout, Err: &stderr})
	var report struct {
		Verdict string `json:"verdict"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &report); err != nil {
		t.Fatalf("audit output (exit %d): %v\n%s\n%s", code, err, stdout.String(), stderr.String())
	}
	if (report.Verdict == "PASS") != (code == 0) {
		t.Errorf("audit verdict %s with exit code %d", report.Verdict, code)
	}
	return report.Verdict, stdout.String()
}

// underlay starts a capture of node's underlay (eth0) counting frames with
// marker, WireGuard frames and plaintext pod frames.
func underlay(t *testing.T, nd *cluster.Node, marker string) *capture.Capture {
	t.Helper()
	var c *capture.Capture
	if err := nd.Netns.Do(func() (err error) {
		c, err = capture.Start("eth0", capture.Options{Marker: []byte(marker), WireGuardPort: wireguardPort, PodRange: cluster.ClusterCIDR})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return c
}

// waitNewAgent waits until node runs a ready agent pod other than old.
func (e *env) waitNewAgent(t *testing.T, node, old string) {
	t.Helper()
	eventually(t, "a new ready agent on "+node, 2*time.Minute, func() error {
		p, _, err := e.agentPod(context.Background(), node)
		if err != nil {
			return err
		}
		if p.Name == old {
			return fmt.Errorf("still %s", old)
		}
		return nil
	})
}

// asNodeAgent returns a client that authenticates as node's own agent: a
// token of the veil-agent ServiceAccount bound to that node's agent pod,
// as the kubelet gives the agent (it carries the node's name, which the
// chart's admission policy requires for the wireguard.veil.dev/*
// annotations).
func (e *env) asNodeAgent(t *testing.T, node string) kubernetes.Interface {
	t.Helper()
	ctx := context.Background()
	p, _, err := e.agentPod(ctx, node)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := e.kube.CoreV1().ServiceAccounts(deploy.Namespace).CreateToken(ctx, p.Spec.ServiceAccountName, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			ExpirationSeconds: ptr(int64(600)),
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := rest.AnonymousClientConfig(e.c.Config)
	cfg.BearerToken = tok.Status.Token
	return kubernetes.NewForConfigOrDie(cfg)
}

func TestPrivilegedEncryptionOnThreeNodes(t *testing.T) {
	e := sharedEnv(t)
	ctx := context.Background()
	x := e.namespace(t, "enc-x", nil)
	y := e.namespace(t, "enc-y", nil)
	pods := e.addPods(t,
		podSpec{Namespace: x, Name: "a", Node: "node-1", Labels: map[string]string{"app": "a"}, Ports: web},
		podSpec{Namespace: x, Name: "b", Node: "node-2", Labels: map[string]string{"app": "b"}, Ports: web},
		podSpec{Namespace: y, Name: "c", Node: "node-3", Labels: map[string]string{"app": "c"}, Ports: web},
	)
	// Every node peers with every other, in strict mode.
	eventually(t, "every node has two peers", 30*time.Second, func() error {
		for _, n := range e.c.Nodes {
			mn, err := e.veil.MeshV1alpha1().MeshNodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if mn.Status.Encryption.PeerCount != 2 || !mn.Status.Encryption.StrictMode || mn.Status.Encryption.Mode != "userspace" {
				return fmt.Errorf("%s: %+v", n.Name, mn.Status.Encryption)
			}
		}
		return nil
	})
	for _, from := range pods {
		for _, to := range pods {
			if from == to {
				continue
			}
			e.expect(t, from, to, 80, true)
			marker := fmt.Sprintf("VEIL-E2E-%s-%s-%d", from.Name, to.Name, time.Now().UnixNano())
			src, dst, err := e.markerExchange(t, from, to, marker)
			if err != nil {
				t.Errorf("%s -> %s: %v", from.Key(), to.Key(), err)
				continue
			}
			if src == nil || dst == nil {
				t.Errorf("%s -> %s: a capture is missing: source %v, destination %v", from.Key(), to.Key(), src, dst)
				continue
			}
			for side, c := range map[string]*agentv1.CaptureResponse{"source": src, "destination": dst} {
				if c.UnderlayMarkerFrames != 0 || c.PlaintextPodFrames != 0 {
					t.Errorf("%s -> %s, %s node: plaintext on the underlay: %+v", from.Key(), to.Key(), side, c)
				}
				if c.WireguardFrames == 0 {
					t.Errorf("%s -> %s, %s node: no WireGuard on the underlay: %+v", from.Key(), to.Key(), side, c)
				}
			}
			if dst.TunnelMarkerFrames == 0 {
				t.Errorf("%s -> %s: the marker never came out of the destination's tunnel: %+v", from.Key(), to.Key(), dst)
			}
		}
	}

	// The audit passes on the healthy cluster, active probes included.
	if verdict, out := e.audit(t); verdict != "PASS" {
		t.Errorf("audit encryption --active on a healthy cluster: %s\n%s", verdict, out)
	}

	// node-1's agent pod is deleted and the DaemonSet brings a new one,
	// while pods keep talking: the underlay never carries plaintext (the
	// userspace device goes with the agent; strict mode drops meanwhile),
	// and traffic resumes once it is back.
	a, b, c := pods[0], pods[1], pods[2]
	under := underlay(t, e.c.Nodes[0], "VEIL-E2E-RESTART")
	stopTalking := make(chan struct{})
	talked := make(chan struct{})
	go func() {
		defer close(talked)
		for {
			select {
			case <-stopTalking:
				return
			default:
			}
			sendMarker(a, b, "VEIL-E2E-RESTART")
			time.Sleep(50 * time.Millisecond)
		}
	}()
	// An established connection across nodes rides through the restart.
	across := startStream(t, a, b, 5002, 16<<20, 10*time.Millisecond)
	old, _, err := e.agentPod(ctx, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.kube.CoreV1().Pods(deploy.Namespace).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitNewAgent(t, "node-1", old.Name)
	e.expect(t, a, b, 80, true)
	across.finish("across node-1's agent pod replaced")
	close(stopTalking)
	<-talked
	sum := under.Stop()
	t.Logf("underlay of node-1 across its agent pod's replacement: %+v", sum)
	if sum.Marker != 0 || sum.PlainPod != 0 {
		t.Errorf("plaintext on node-1's underlay during the agent restart: %+v", sum)
	}
	if sum.WireGuard == 0 {
		t.Errorf("no WireGuard on node-1's underlay across the restart: %+v", sum)
	}

	// wg show (wireguard-tools, on the node) reads the userspace devices,
	// whose sockets the chart puts in the node's /var/run/wireguard.
	eventually(t, "wg show: 2 peers with handshakes on every node", 30*time.Second, func() error {
		for _, n := range e.c.Nodes {
			out, err := n.Run(ctx, "wg", "show", wireguardInterface)
			if err != nil {
				return err
			}
			if got := strings.Count(out, "peer:"); got != 2 || strings.Count(out, "latest handshake") != 2 {
				return fmt.Errorf("wg show on %s: %d peers, want 2 with handshakes:\n%s", n.Name, got, out)
			}
		}
		return nil
	})

	// A continuous stream survives a key rotation.
	st := startStream(t, a, b, 5001, 24<<20, 10*time.Millisecond)
	rot := call(t, e.agentOf(t, "node-1"), "rotate key", func(ctx context.Context, c *agentclient.Conn) (*agentv1.RotateKeyResponse, error) {
		return c.Client.RotateKey(ctx, &agentv1.RotateKeyRequest{})
	})
	if rot.OldFingerprint == rot.NewFingerprint {
		t.Errorf("rotation kept the key: %+v", rot)
	}
	st.finish("across the key rotation")

	// Break the tunnel to node-3 (its key disappears from the API): strict
	// mode drops, records a leak, and sends nothing in the clear. node-3's
	// agent is stopped first, with its kubelet (which would restart it):
	// it would re-assert its annotations at once. The annotations go as
	// only node-3's own agent may remove them.
	node3 := e.node(t, "node-3")
	_, agent3, err := e.agentPod(ctx, "node-3")
	if err != nil {
		t.Fatal(err)
	}
	as3 := e.asNodeAgent(t, "node-3")
	if err := e.c.StopDaemon(cluster.KubeletDaemon("node-3"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// The kubelet restarts the agent, which publishes its key again.
		if err := e.c.StartDaemon(context.Background(), cluster.KubeletDaemon("node-3")); err != nil {
			t.Errorf("start node-3's kubelet again: %v", err)
		}
	})
	if err := node3.KillContainer(ctx, agent3); err != nil {
		t.Fatal(err)
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]any{
		"wireguard.veil.dev/public-key": nil, "wireguard.veil.dev/endpoint": nil, "wireguard.veil.dev/pod-cidrs": nil,
	}}})
	if _, err := as3.CoreV1().Nodes().Patch(ctx, "node-3", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "node-1 drops node-3 as a peer", 30*time.Second, func() error {
		mn, err := e.veil.MeshV1alpha1().MeshNodes().Get(ctx, "node-1", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if mn.Status.Encryption.PeerCount != 1 {
			return fmt.Errorf("peers %d", mn.Status.Encryption.PeerCount)
		}
		return nil
	})
	marker := fmt.Sprintf("VEIL-E2E-BROKEN-%d", time.Now().UnixNano())
	srcCap, _, err := e.markerExchange(t, a, c, marker, "node-3")
	if !isDenied(err) {
		t.Errorf("a -> c with the tunnel broken in strict mode: %v; want it dropped", err)
	}
	if srcCap == nil {
		t.Errorf("no capture from node-1 with the tunnel broken")
	} else if srcCap.UnderlayMarkerFrames != 0 || srcCap.PlaintextPodFrames != 0 {
		t.Errorf("plaintext left node-1 with the tunnel broken: %+v", srcCap)
	}
	if verdict, out := e.audit(t); verdict != "FAIL" || !strings.Contains(out, "node-3") {
		t.Errorf("audit with node-3's key gone: verdict %s, want FAIL naming node-3:\n%s", verdict, out)
	}
	eventually(t, "node-1 records the leak", 40*time.Second, func() error {
		mn, err := e.veil.MeshV1alpha1().MeshNodes().Get(ctx, "node-1", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if mn.Status.Encryption.Leaks == 0 || len(mn.Status.Encryption.RecentLeaks) == 0 {
			return fmt.Errorf("no leaks recorded: %+v", mn.Status.Encryption)
		}
		return nil
	})
}

// hostEcho sends marker from node from's own network (the host, not a pod)
// to addr and expects it echoed, up to attempts times.
func hostEcho(from *cluster.Node, addr, marker string, attempts int) error {
	var sendErr error
	for i := 0; i < attempts; i++ {
		sendErr = func() error {
			var c net.Conn
			if err := from.Netns.Do(func() (err error) {
				c, err = net.DialTimeout("tcp", addr, 2*time.Second)
				return err
			}); err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := c.Write([]byte(marker + "\n")); err != nil {
				return err
			}
			_, err := c.Read(make([]byte, len(marker)))
			return err
		}()
		if sendErr == nil {
			return nil
		}
		time.Sleep(500 * time.Millisecond)
	}
	return sendErr
}

// TestPrivilegedStrictModeHostToRemotePod: in strict mode (without
// node-to-node encryption) a node's own processes — kubelet-style probes,
// hostNetwork pods, and pod traffic that the host's kube-proxy has
// translated to a remote backend — reach a pod on another node, and the
// underlay carries none of it in plaintext: the host routes a peer's pod
// CIDR through the tunnel, as pods' own traffic goes.
func TestPrivilegedStrictModeHostToRemotePod(t *testing.T) {
	e := sharedEnv(t)
	x := e.namespace(t, "hostpod-x", nil)
	b := e.addPods(t, podSpec{Namespace: x, Name: "b", Node: "node-2", Labels: map[string]string{"app": "b"}, Ports: web})[0]
	n1 := e.c.Nodes[0]
	marker := fmt.Sprintf("VEIL-E2E-HOSTPOD-%d", time.Now().UnixNano())
	under := underlay(t, n1, marker)
	sendErr := hostEcho(n1, fmt.Sprintf("%s:80", b.IP), marker, 20)
	sum := under.Stop()
	t.Logf("node-1 underlay during host-to-pod traffic: %+v", sum)
	if sendErr != nil {
		t.Fatalf("node-1 (host) -> %s:80 on node-2 in strict mode: %v", b.IP, sendErr)
	}
	if sum.Marker != 0 || sum.WireGuard == 0 {
		t.Errorf("host traffic to a remote pod not encrypted in strict mode: %+v", sum)
	}
}

// restartAgents restarts every agent as `kubectl rollout restart` does and
// waits until the DaemonSet is rolled out and the mesh peered again.
func (e *env) restartAgents(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	patch := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":%q}}}}}`, time.Now().Format(time.RFC3339Nano))
	if _, err := e.kube.AppsV1().DaemonSets(deploy.Namespace).Patch(ctx, deploy.DaemonSetName, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "DaemonSet rolled out", 3*time.Minute, func() error {
		ds, err := e.kube.AppsV1().DaemonSets(deploy.Namespace).Get(ctx, deploy.DaemonSetName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ds.Status.ObservedGeneration < ds.Generation || ds.Status.UpdatedNumberScheduled != int32(len(e.c.Nodes)) || ds.Status.NumberReady != int32(len(e.c.Nodes)) {
			return fmt.Errorf("generation %d observed %d, updated %d, ready %d", ds.Generation, ds.Status.ObservedGeneration, ds.Status.UpdatedNumberScheduled, ds.Status.NumberReady)
		}
		return nil
	})
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := e.c.WaitMeshNodes(wctx); err != nil {
		t.Fatal(err)
	}
}

// setEncryption reinstalls the chart with encryption values (the agents'
// ConfigMap) and restarts the agents to take them.
func (e *env) setEncryption(t *testing.T, enc map[string]any) {
	t.Helper()
	values := maps.Clone(e.values)
	values["encryption"] = enc
	if err := e.c.InstallVeil(context.Background(), values); err != nil {
		t.Fatal(err)
	}
	e.restartAgents(t)
}

// TestPrivilegedNodeToNodeEncryption: with node-to-node encryption (the
// chart's encryption.nodeToNode), traffic between the nodes' own addresses
// (host network) crosses the underlay only inside WireGuard too, and pod
// traffic keeps working.
func TestPrivilegedNodeToNodeEncryption(t *testing.T) {
	e := sharedEnv(t)
	ctx := context.Background()
	e.setEncryption(t, map[string]any{"strictMode": true, "nodeToNode": true})
	t.Cleanup(func() { e.setEncryption(t, map[string]any{"strictMode": true}) })
	x := e.namespace(t, "n2n-x", nil)
	pods := e.addPods(t,
		podSpec{Namespace: x, Name: "a", Node: "node-1", Labels: map[string]string{"app": "a"}, Ports: web},
		podSpec{Namespace: x, Name: "b", Node: "node-2", Labels: map[string]string{"app": "b"}, Ports: web},
	)
	n1, n2 := e.c.Nodes[0], e.c.Nodes[1]
	eventually(t, "node-1 peers with node-2, its address included", 30*time.Second, func() error {
		mn, err := e.veil.MeshV1alpha1().MeshNodes().Get(ctx, n1.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		// Healthy peers are not listed: their views are in the digest,
		// which must be the one of every other node with its own address
		// among the allowed IPs.
		var want meshv1alpha1.PeerDigest
		for _, n := range e.c.Nodes[1:] {
			node, err := e.kube.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			want.AddPeer(n.Name, node.Annotations[annotations.WireGuardPublicKey], node.Annotations[annotations.WireGuardEndpoint],
				[]string{n.PodCIDR.String(), n.IP.String() + "/32"})
		}
		s := mn.Status.Encryption.PeerSummary
		if s != nil && int(s.Healthy) == len(e.c.Nodes)-1 && s.Digest == want.String() {
			return nil
		}
		return fmt.Errorf("peers %+v, summary %+v", mn.Status.Encryption.Peers, s)
	})
	// An echo server on node-2's own network.
	var ln net.Listener
	if err := n2.Netns.Do(func() (err error) {
		ln, err = net.Listen("tcp", n2.IP.String()+":7777")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				buf := make([]byte, 4096)
				n, _ := c.Read(buf)
				c.Write(buf[:n])
			}()
		}
	}()
	marker := fmt.Sprintf("VEIL-E2E-N2N-%d", time.Now().UnixNano())
	under := underlay(t, n1, marker)
	sendErr := hostEcho(n1, fmt.Sprintf("%s:7777", n2.IP), marker, 3)
	e.expect(t, pods[0], pods[1], 80, true)
	sum := under.Stop()
	t.Logf("node-1 underlay during host-to-host traffic: %+v", sum)
	if sendErr != nil {
		t.Fatalf("node-1 -> node-2 host traffic through the tunnel: %v", sendErr)
	}
	if sum.Marker != 0 || sum.WireGuard == 0 {
		t.Errorf("host traffic between nodes not encrypted: %+v", sum)
	}
}
