package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/veilmesh/veil/agent/capture"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/api/annotations"
	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/lab"
	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/meshctl/cli"
)

func strictEnv(*lab.Node) map[string]string {
	return map[string]string{"VEIL_STRICT_MODE": "true"}
}

// markerExchange sends marker over TCP from one pod to another (echoed
// back), while both nodes' agents capture their underlay and tunnel.
func markerExchange(t *testing.T, from, to *lab.Pod, marker string) (src, dst *agentv1.CaptureResponse, sendErr error) {
	t.Helper()
	var wg sync.WaitGroup
	capture := func(n *lab.Node, out **agentv1.CaptureResponse) {
		defer wg.Done()
		if n.AgentPID() == 0 {
			return // a stopped agent captures nothing: *out stays nil
		}
		conn, c, err := n.Dial()
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp, err := c.CaptureUnderlay(ctx, &agentv1.CaptureRequest{Marker: marker, DurationMs: 2500})
		if err != nil {
			t.Error(err)
			return
		}
		*out = resp
	}
	wg.Add(2)
	go capture(from.Node, &src)
	go capture(to.Node, &dst)
	time.Sleep(300 * time.Millisecond)
	for i := 0; i < 3 && sendErr == nil; i++ {
		sendErr = sendTCPMarker(from, fmt.Sprintf("%s:80", to.IP), marker)
	}
	wg.Wait()
	return src, dst, sendErr
}

func sendTCPMarker(p *lab.Pod, addr, marker string) error {
	var c net.Conn
	if err := p.Netns.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", addr, 2*time.Second)
		return err
	}); err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte(marker)); err != nil {
		return err
	}
	buf := make([]byte, len(marker))
	_, err := c.Read(buf)
	return err
}

// audit runs `meshctl audit encryption --active` against the lab, as a
// user would after `eval $(meshctl lab env)`.
func audit(t *testing.T, l *lab.Lab) (verdict, out string) {
	t.Helper()
	t.Setenv("VEIL_LAB_STATE", l.StatePath())
	t.Setenv("KUBECONFIG", l.CP.Kubeconfig)
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

func TestPrivilegedEncryptionOnThreeNodes(t *testing.T) {
	l := startLabWith(t, "enc", lab.Options{Nodes: 3, AgentEnv: strictEnv})
	ctx := context.Background()
	pods := []*lab.Pod{
		mustPod(t, l, "x", "a", "node-1", "a"),
		mustPod(t, l, "x", "b", "node-2", "b"),
		mustPod(t, l, "y", "c", "node-3", "c"),
	}
	// Every node peers with every other once the keys are published.
	eventually(t, "every node has two peers", 30*time.Second, func() error {
		for _, n := range l.Nodes {
			mn, err := l.Veil.MeshV1alpha1().MeshNodes().Get(ctx, n.Name, metav1.GetOptions{})
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
			expect(t, from, to, 80, true)
			marker := fmt.Sprintf("VEIL-E2E-%s-%s-%d", from.Name, to.Name, time.Now().UnixNano())
			src, dst, err := markerExchange(t, from, to, marker)
			if err != nil {
				t.Errorf("%s -> %s: %v", from.Key(), to.Key(), err)
				continue
			}
			if src == nil || dst == nil {
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

	// The audit passes on the healthy lab, active probes included.
	if verdict, out := audit(t, l); verdict != "PASS" {
		t.Errorf("audit encryption --active on a healthy lab: %s\n%s", verdict, out)
	}

	// An agent restarts while pods keep talking: the underlay never carries
	// plaintext (the userspace device goes with the agent; strict mode drops
	// meanwhile), and traffic resumes once it is back.
	var under *capture.Capture
	if err := l.Nodes[0].Netns.Do(func() (err error) {
		under, err = capture.Start("eth0", capture.Options{Marker: []byte("VEIL-E2E-RESTART"), WireGuardPort: 51871, PodRange: lab.ClusterCIDR})
		return err
	}); err != nil {
		t.Fatal(err)
	}
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
			sendTCPMarker(pods[0], fmt.Sprintf("%s:80", pods[1].IP), "VEIL-E2E-RESTART")
			time.Sleep(50 * time.Millisecond)
		}
	}()
	// An established connection across nodes rides through the restart.
	across := startStream(t, pods[0], pods[1], 5002, 16<<20, 10*time.Millisecond, false)
	l.Nodes[0].StopAgent(false)
	if err := l.Nodes[0].StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	expect(t, pods[0], pods[1], 80, true)
	across.finish("across node-1's agent restart")
	close(stopTalking)
	<-talked
	sum := under.Stop()
	t.Logf("underlay of node-1 across its agent's restart: %+v", sum)
	if sum.Marker != 0 || sum.PlainPod != 0 {
		t.Errorf("plaintext on node-1's underlay during the agent restart: %+v", sum)
	}
	if sum.WireGuard == 0 {
		t.Errorf("no WireGuard on node-1's underlay across the restart: %+v", sum)
	}

	// wg show (wireguard-tools) reads the userspace devices too.
	for _, n := range l.Nodes {
		out, err := n.Netns.Run("wg", "show", n.WireGuardInterface())
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Count(out, "peer:"); got != 2 || !strings.Contains(out, "latest handshake") {
			t.Errorf("wg show on %s: %d peers, want 2 with handshakes:\n%s", n.Name, got, out)
		}
	}

	// A continuous stream survives a key rotation.
	a, b, c := pods[0], pods[1], pods[2]
	st := startStream(t, a, b, 5001, 24<<20, 10*time.Millisecond, false)
	conn, client, err := l.Nodes[0].Dial()
	if err != nil {
		t.Fatal(err)
	}
	rot, err := client.RotateKey(ctx, &agentv1.RotateKeyRequest{})
	conn.Close()
	if err != nil {
		t.Fatal(err)
	}
	if rot.OldFingerprint == rot.NewFingerprint {
		t.Errorf("rotation kept the key: %+v", rot)
	}
	st.finish("across the key rotation")

	// Break the tunnel to node-3 (its key disappears from the API): strict
	// mode drops, records a leak, and sends nothing in the clear. node-3's
	// agent is stopped first: it would re-assert its annotations at once.
	l.Nodes[2].StopAgent(false)
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]any{
		"wireguard.veil.dev/public-key": nil, "wireguard.veil.dev/endpoint": nil, "wireguard.veil.dev/pod-cidrs": nil,
	}}})
	if _, err := l.Kube.CoreV1().Nodes().Patch(ctx, "node-3", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "node-1 drops node-3 as a peer", 30*time.Second, func() error {
		mn, err := l.Veil.MeshV1alpha1().MeshNodes().Get(ctx, "node-1", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if mn.Status.Encryption.PeerCount != 1 {
			return fmt.Errorf("peers %d", mn.Status.Encryption.PeerCount)
		}
		return nil
	})
	marker := fmt.Sprintf("VEIL-E2E-BROKEN-%d", time.Now().UnixNano())
	srcCap, _, err := markerExchange(t, a, c, marker)
	if err == nil {
		t.Errorf("a -> c passed with the tunnel broken in strict mode")
	}
	if srcCap != nil && (srcCap.UnderlayMarkerFrames != 0 || srcCap.PlaintextPodFrames != 0) {
		t.Errorf("plaintext left node-1 with the tunnel broken: %+v", srcCap)
	}
	if verdict, out := audit(t, l); verdict != "FAIL" || !strings.Contains(out, "node-3") {
		t.Errorf("audit with node-3's key gone: verdict %s, want FAIL naming node-3:\n%s", verdict, out)
	}
	eventually(t, "node-1 records the leak", 40*time.Second, func() error {
		mn, err := l.Veil.MeshV1alpha1().MeshNodes().Get(ctx, "node-1", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if mn.Status.Encryption.Leaks == 0 || len(mn.Status.Encryption.RecentLeaks) == 0 {
			return fmt.Errorf("no leaks recorded: %+v", mn.Status.Encryption)
		}
		return nil
	})

	// A node joins: its pod is reached through a tunnel of its own.
	n4, err := l.AddNode(ctx)
	if err != nil {
		t.Fatal(err)
	}
	d := mustPod(t, l, "y", "d", n4.Name, "d")
	expect(t, a, d, 80, true)
	src4, dst4, err := markerExchange(t, a, d, fmt.Sprintf("VEIL-E2E-JOIN-%d", os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	if src4.UnderlayMarkerFrames != 0 || dst4.UnderlayMarkerFrames != 0 || dst4.TunnelMarkerFrames == 0 || src4.WireguardFrames == 0 {
		t.Errorf("a -> new node: source %+v, destination %+v", src4, dst4)
	}
}

// TestPrivilegedNodeToNodeEncryption: with node-to-node encryption, traffic
// between the nodes' own addresses (host network) crosses the underlay only
// inside WireGuard too, and pod traffic keeps working.
func TestPrivilegedNodeToNodeEncryption(t *testing.T) {
	l := startLabWith(t, "n2n", lab.Options{Nodes: 2, AgentEnv: func(*lab.Node) map[string]string {
		return map[string]string{"VEIL_STRICT_MODE": "true", "VEIL_NODE_TO_NODE_ENCRYPTION": "true"}
	}})
	ctx := context.Background()
	a := mustPod(t, l, "x", "a", "node-1", "a")
	b := mustPod(t, l, "x", "b", "node-2", "b")
	n1, n2 := l.Nodes[0], l.Nodes[1]
	eventually(t, "node-1 peers with node-2, its address included", 30*time.Second, func() error {
		mn, err := l.Veil.MeshV1alpha1().MeshNodes().Get(ctx, n1.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, p := range mn.Status.Encryption.Peers {
			for _, ip := range p.AllowedIPs {
				if ip == n2.IP.String()+"/32" {
					return nil
				}
			}
		}
		// A healthy peer is not listed: its view is in the digest.
		node2, err := l.Kube.CoreV1().Nodes().Get(ctx, n2.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		var want meshv1alpha1.PeerDigest
		want.AddPeer(n2.Name, node2.Annotations[annotations.WireGuardPublicKey], node2.Annotations[annotations.WireGuardEndpoint],
			[]string{n2.PodCIDR.String(), n2.IP.String() + "/32"})
		if s := mn.Status.Encryption.PeerSummary; s != nil && s.Healthy == 1 && s.Digest == want.String() {
			return nil
		}
		return fmt.Errorf("peers %+v, summary %+v", mn.Status.Encryption.Peers, mn.Status.Encryption.PeerSummary)
	})
	server, err := netns.StartHelper(&n2.Netns.Netns, nil, -1, "serve", "tcp:7777")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(server.Kill)
	if _, err := server.WaitLine(ctxFor(t, 10*time.Second), "listening"); err != nil {
		t.Fatal(err)
	}
	marker := fmt.Sprintf("VEIL-E2E-N2N-%d", time.Now().UnixNano())
	var under *capture.Capture
	if err := n1.Netns.Do(func() (err error) {
		under, err = capture.Start("eth0", capture.Options{Marker: []byte(marker), WireGuardPort: 51871, PodRange: lab.ClusterCIDR})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var sendErr error
	for i := 0; i < 3; i++ {
		var c net.Conn
		if sendErr = n1.Netns.Do(func() (err error) {
			c, err = net.DialTimeout("tcp", fmt.Sprintf("%s:7777", n2.IP), 2*time.Second)
			return err
		}); sendErr != nil {
			break
		}
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, sendErr = c.Write([]byte(marker)); sendErr == nil {
			_, sendErr = c.Read(make([]byte, len(marker)))
		}
		c.Close()
	}
	expect(t, a, b, 80, true)
	sum := under.Stop()
	t.Logf("node-1 underlay during host-to-host traffic: %+v", sum)
	if sendErr != nil {
		t.Fatalf("node-1 -> node-2 host traffic through the tunnel: %v", sendErr)
	}
	if sum.Marker != 0 || sum.WireGuard == 0 {
		t.Errorf("host traffic between nodes not encrypted: %+v", sum)
	}
}

// TestPrivilegedStrictModeHostToRemotePod: in strict mode (without
// node-to-node encryption) a node's own processes — kubelet-style probes,
// hostNetwork pods, and pod traffic that the host's kube-proxy has
// translated to a remote backend — reach a pod on another node, and the
// underlay carries none of it in plaintext: the host routes a peer's pod
// CIDR through the tunnel, as pods' own traffic goes.
func TestPrivilegedStrictModeHostToRemotePod(t *testing.T) {
	l := startLabWith(t, "hostpod", lab.Options{Nodes: 2, AgentEnv: strictEnv})
	b := mustPod(t, l, "x", "b", "node-2", "b")
	n1 := l.Nodes[0]
	marker := fmt.Sprintf("VEIL-E2E-HOSTPOD-%d", time.Now().UnixNano())
	var under *capture.Capture
	if err := n1.Netns.Do(func() (err error) {
		under, err = capture.Start("eth0", capture.Options{Marker: []byte(marker), WireGuardPort: 51871, PodRange: lab.ClusterCIDR})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var sendErr error
	deadline := time.Now().Add(20 * time.Second)
	for attempt := 0; attempt < 20 && time.Now().Before(deadline); attempt++ {
		sendErr = func() error {
			var c net.Conn
			if err := n1.Netns.Do(func() (err error) {
				c, err = net.DialTimeout("tcp", fmt.Sprintf("%s:80", b.IP), 2*time.Second)
				return err
			}); err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := c.Write([]byte(marker)); err != nil {
				return err
			}
			_, err := c.Read(make([]byte, len(marker)))
			return err
		}()
		if sendErr == nil {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	sum := under.Stop()
	t.Logf("node-1 underlay during host-to-pod traffic: %+v", sum)
	if sendErr != nil {
		t.Fatalf("node-1 (host) -> %s:80 on node-2 in strict mode: %v", b.IP, sendErr)
	}
	if sum.Marker != 0 || sum.WireGuard == 0 {
		t.Errorf("host traffic to a remote pod not encrypted in strict mode: %+v", sum)
	}
}
