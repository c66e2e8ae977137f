package cli

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kubefake "k8s.io/client-go/kubernetes/fake"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/api/annotations"
	meshfake "github.com/veilmesh/veil/api/client/clientset/versioned/fake"
	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/meshctl/audit"
	"github.com/veilmesh/veil/meshctl/output"
)

// cluster is what the fake API server holds.
type cluster struct {
	nodes []*corev1.Node
	mesh  []*meshv1alpha1.MeshNode
	pods  []*corev1.Pod
	// onCore, when set, adjusts the fake core clientset (reactors).
	onCore func(*kubefake.Clientset)
	// exec plays the API server's pods/exec (see withAgents).
	exec agentclient.Exec
}

// testKey is node i's public key: 32 bytes of i.
func testKey(i int) string {
	return base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{byte(i)}, 32))
}

func nodeName(i int) string { return fmt.Sprintf("node-%d", i) }

func ago(d time.Duration) metav1.Time { return metav1.NewTime(testNow.Add(-d)) }

// healthyCluster is n nodes, all encrypted (userspace WireGuard), strict,
// peered with each other with recent handshakes, each running a pod.
func healthyCluster(n int) *cluster {
	c := &cluster{}
	for i := 1; i <= n; i++ {
		name := nodeName(i)
		cidr := fmt.Sprintf("10.0.%d.0/24", i)
		c.nodes = append(c.nodes, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{
				annotations.WireGuardPublicKey: testKey(i),
				annotations.WireGuardEndpoint:  fmt.Sprintf("192.168.50.%d:51820", i),
				annotations.WireGuardPodCIDRs:  cidr,
			}},
			Spec: corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}},
		})
		mn := &meshv1alpha1.MeshNode{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Status: meshv1alpha1.MeshNodeStatus{
				AgentVersion: "v0.3.0", NodeIP: fmt.Sprintf("192.168.50.%d", i), PodCIDRs: []string{cidr},
				Updated: ago(10 * time.Second),
				Encryption: meshv1alpha1.EncryptionStatus{
					Mode: meshv1alpha1.EncryptionModeUserspace, Interface: "veilwg0", PublicKey: testKey(i), Fingerprint: nodeinfo.KeyFingerprint(testKey(i)),
					KeyCreated: ago(30 * 24 * time.Hour), ListenPort: 51820, StrictMode: true,
					GuardedDevices: []string{"eth0"},
				},
			},
		}
		for j := 1; j <= n; j++ {
			if j == i {
				continue
			}
			hs := ago(time.Duration(10*i+j) * time.Second)
			mn.Status.Encryption.Peers = append(mn.Status.Encryption.Peers, meshv1alpha1.PeerStatus{
				Node: nodeName(j), PublicKey: testKey(j), Endpoint: fmt.Sprintf("192.168.50.%d:51820", j),
				AllowedIPs: []string{fmt.Sprintf("10.0.%d.0/24", j)}, LastHandshake: &hs,
				RxBytes: int64(1<<20) * int64(j), TxBytes: int64(3<<20) * int64(i),
			})
		}
		mn.Status.Encryption.PeerCount = int32(len(mn.Status.Encryption.Peers))
		c.mesh = append(c.mesh, mn)
		c.pods = append(c.pods,
			&corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: fmt.Sprintf("a-%d", i)},
				Spec:       corev1.PodSpec{NodeName: name},
				Status:     corev1.PodStatus{PodIP: fmt.Sprintf("10.0.%d.5", i)},
			},
			// Host-network pods have the node's address: never a marker target.
			&corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: fmt.Sprintf("veil-agent-%d", i)},
				Spec:       corev1.PodSpec{NodeName: name, HostNetwork: true},
				Status:     corev1.PodStatus{PodIP: fmt.Sprintf("192.168.50.%d", i)},
			})
	}
	return c
}

// meshNode returns the MeshNode of node i.
func (c *cluster) meshNode(i int) *meshv1alpha1.MeshNode {
	for _, m := range c.mesh {
		if m.Name == nodeName(i) {
			return m
		}
	}
	panic("no MeshNode " + nodeName(i))
}

// enc returns the encryption status of node i.
func (c *cluster) enc(i int) *meshv1alpha1.EncryptionStatus { return &c.meshNode(i).Status.Encryption }

// peer returns node i's peer j.
func (c *cluster) peer(i, j int) *meshv1alpha1.PeerStatus {
	e := c.enc(i)
	for k := range e.Peers {
		if e.Peers[k].Node == nodeName(j) {
			return &e.Peers[k]
		}
	}
	panic(fmt.Sprintf("%s has no peer %s", nodeName(i), nodeName(j)))
}

// dropPeer removes peer j from node i.
func (c *cluster) dropPeer(i, j int) {
	e := c.enc(i)
	for k := range e.Peers {
		if e.Peers[k].Node == nodeName(j) {
			e.Peers = append(e.Peers[:k], e.Peers[k+1:]...)
			e.PeerCount--
			return
		}
	}
}

// dropMeshNode removes node i's MeshNode.
func (c *cluster) dropMeshNode(i int) {
	for k, m := range c.mesh {
		if m.Name == nodeName(i) {
			c.mesh = append(c.mesh[:k], c.mesh[k+1:]...)
			return
		}
	}
}

// connect is a kubeConnect to fresh fake clientsets holding the cluster.
func (c *cluster) connect() kubeConnect {
	return func(string, string, agentEnv) (*kubeClients, error) {
		var core, mesh []runtime.Object
		for _, n := range c.nodes {
			core = append(core, n.DeepCopy())
		}
		for _, p := range c.pods {
			core = append(core, p.DeepCopy())
		}
		for _, m := range c.mesh {
			mesh = append(mesh, m.DeepCopy())
		}
		cs := kubefake.NewClientset(core...)
		if c.onCore != nil {
			c.onCore(cs)
		}
		return &kubeClients{core: cs, mesh: meshfake.NewSimpleClientset(mesh...), server: "https://api.lab.example:6443", exec: c.exec}, nil
	}
}

// runCluster runs meshctl in-process against the fake cluster c, in env.
func runCluster(t *testing.T, c *cluster, vars map[string]string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	s := Streams{In: strings.NewReader(""), Out: &out, Err: &errb}
	code = execute(t.Context(), newRootCommand(s, testEnv(vars), c.connect()), args, s)
	return out.String(), errb.String(), code
}

// degradedCluster has one node in each kind of trouble: node-2 is not
// strict, node-3 has no key, node-4 has no MeshNode, node-5 is stale and
// has leaked; and a MeshNode is left over from a deleted node-9.
func degradedCluster() *cluster {
	c := healthyCluster(5)
	c.enc(2).StrictMode = false
	c.enc(2).UnencryptedPackets = 12
	c.enc(3).PublicKey, c.enc(3).Fingerprint = "", ""
	delete(c.nodes[2].Annotations, annotations.WireGuardPublicKey)
	for i := 1; i <= 5; i++ {
		if i != 3 {
			c.dropPeer(i, 3)
		}
	}
	c.dropMeshNode(4)
	c.meshNode(5).Status.Updated = ago(5 * time.Minute)
	c.enc(5).Leaks = 4
	c.peer(1, 2).LastHandshake = nil
	orphan := healthyCluster(9).meshNode(9)
	c.mesh = append(c.mesh, orphan)
	return c
}

// largeCluster has more nodes than the table lists in full: node-7 has no
// key and node-12's view of node-3 lacks a handshake.
func largeCluster() *cluster {
	c := healthyCluster(fullTableNodes + 5)
	c.enc(7).PublicKey = ""
	c.peer(12, 3).LastHandshake = nil
	return c
}

func TestEncryptionStatusGolden(t *testing.T) {
	for _, tc := range []struct {
		name     string
		cluster  *cluster
		args     []string
		wantCode int
	}{
		{"encryption-status-healthy.txt", healthyCluster(3), nil, ExitOK},
		{"encryption-status-healthy.yaml", healthyCluster(2), []string{"-o", "yaml"}, ExitOK},
		{"encryption-status-node.txt", healthyCluster(3), []string{"--node", "node-2"}, ExitOK},
		{"encryption-status-degraded.txt", degradedCluster(), nil, ExitFailure},
		{"encryption-status-degraded.json", degradedCluster(), []string{"-o", "json"}, ExitFailure},
		{"encryption-status-degraded-node.txt", degradedCluster(), []string{"--node", "node-1"}, ExitOK},
		{"encryption-status-large.txt", largeCluster(), nil, ExitFailure},
		{"encryption-status-large-details.txt", largeCluster(), []string{"--details"}, ExitFailure},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, stderr, code := runCluster(t, tc.cluster, nil, append([]string{"encryption", "status"}, tc.args...)...)
			if code != tc.wantCode {
				t.Errorf("exit code = %d; want %d\nstderr: %s", code, tc.wantCode, stderr)
			}
			if stderr != "" {
				t.Errorf("stderr = %q; want nothing", stderr)
			}
			golden(t, tc.name, out)
		})
	}
}

func TestEncryptionSummary(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cluster func() *cluster
		want    string
	}{
		{"healthy", func() *cluster { return healthyCluster(3) }, "Encryption: WireGuard (userspace), 3/3 nodes, strict"},
		{"no key", func() *cluster {
			c := healthyCluster(3)
			c.enc(3).PublicKey = ""
			return c
		}, "Encryption: WireGuard (userspace), 2/3 nodes encrypted, not strict: node-3 has no key"},
		{"strict off, mixed modes", func() *cluster {
			c := healthyCluster(3)
			c.enc(1).Mode = meshv1alpha1.EncryptionModeKernel
			c.enc(2).StrictMode = false
			return c
		}, "Encryption: WireGuard (kernel, userspace), 3/3 nodes, not strict: node-2 has strict mode off"},
		{"all disabled", func() *cluster {
			c := healthyCluster(2)
			c.enc(1).Mode, c.enc(2).Mode = meshv1alpha1.EncryptionModeDisabled, meshv1alpha1.EncryptionModeDisabled
			return c
		}, "Encryption: off, 0/2 nodes encrypted, not strict: node-1 has encryption disabled, node-2 has encryption disabled"},
		{"no nodes", func() *cluster { return &cluster{} }, "Encryption: no nodes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, stderr, _ := runCluster(t, tc.cluster(), nil, "encryption", "status", "-o", "json")
			var r encryptionStatusReport
			if err := json.Unmarshal([]byte(out), &r); err != nil {
				t.Fatalf("%v\nstdout: %s\nstderr: %s", err, out, stderr)
			}
			if r.Summary != tc.want {
				t.Errorf("summary = %q; want %q", r.Summary, tc.want)
			}
		})
	}
}

func TestEncryptionStatusUnknownNode(t *testing.T) {
	_, stderr, code := runCluster(t, healthyCluster(2), nil, "encryption", "status", "--node", "node-7")
	if code != ExitUsage || !strings.Contains(stderr, `node "node-7" is not in the cluster (nodes: node-1, node-2)`) {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
}

func TestEncryptionStatusColourKeepsAlignment(t *testing.T) {
	for _, c := range []*cluster{healthyCluster(3), degradedCluster()} {
		cs, err := readCluster(t.Context(), mustConnect(t, c), withTimeout(time.Second))
		if err != nil {
			t.Fatal(err)
		}
		r, err := newEncryptionStatusReport(cs, testNow, audit.DefaultStaleAfter, "")
		if err != nil {
			t.Fatal(err)
		}
		var plain, coloured bytes.Buffer
		if err := writeEncryptionStatus(&plain, output.Palette{}, r, testNow); err != nil {
			t.Fatal(err)
		}
		if err := writeEncryptionStatus(&coloured, output.Palette{On: true}, r, testNow); err != nil {
			t.Fatal(err)
		}
		if !ansi.Match(coloured.Bytes()) {
			t.Error("no colour with the output.Palette on")
		}
		if got := ansi.ReplaceAllString(coloured.String(), ""); got != plain.String() {
			t.Errorf("coloured output differs from plain once uncoloured:\n%s\n---\n%s", got, plain.String())
		}
	}
}

func mustConnect(t *testing.T, c *cluster) *kubeClients {
	t.Helper()
	kc, err := c.connect()("", "", testEnv(nil))
	if err != nil {
		t.Fatal(err)
	}
	return kc
}

// rotatingAgent answers RotateKey.
type rotatingAgent struct {
	agentv1.UnimplementedAgentServer
	node string
	err  error
}

func (a *rotatingAgent) Status(context.Context, *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	st := healthyStatus()
	st.Node = a.node
	return st, nil
}

func (a *rotatingAgent) RotateKey(context.Context, *agentv1.RotateKeyRequest) (*agentv1.RotateKeyResponse, error) {
	if a.err != nil {
		return nil, a.err
	}
	return &agentv1.RotateKeyResponse{OldFingerprint: nodeinfo.KeyFingerprint(testKey(1)), NewFingerprint: nodeinfo.KeyFingerprint(testKey(7))}, nil
}

func TestRotateKey(t *testing.T) {
	local := serve(t, &rotatingAgent{node: "node-1"})
	out, stderr, code := runAgainst(t, local, "encryption", "rotate-key")
	if code != ExitOK {
		t.Fatalf("exit %d, stderr %s", code, stderr)
	}
	golden(t, "encryption-rotate-key.txt", out)

	// Another node's agent, through the API server.
	c := healthyCluster(2)
	withAgents(t, c, map[string]agentv1.AgentServer{"node-1": &rotatingAgent{node: "node-1"}, "node-2": &rotatingAgent{node: "node-2"}}, allowed)
	out, stderr, code = runCluster(t, c, nil, "encryption", "rotate-key", "--node", "node-2", "-o", "json")
	var r rotateKeyReport
	if err := json.Unmarshal([]byte(out), &r); code != ExitOK || err != nil {
		t.Fatalf("exit %d, %v, stdout %q, stderr %q", code, err, out, stderr)
	}
	if want := (rotateKeyReport{Node: "node-2", OldFingerprint: nodeinfo.KeyFingerprint(testKey(1)), NewFingerprint: nodeinfo.KeyFingerprint(testKey(7))}); r != want {
		t.Errorf("got %+v; want %+v", r, want)
	}

	off := serve(t, &rotatingAgent{node: "node-3", err: status.Error(codes.FailedPrecondition, "encryption is off on node node-3")})
	_, stderr, code = runAgainst(t, off, "encryption", "rotate-key")
	if code != ExitUsage || stderr != "meshctl: rotate key: encryption is off on node node-3\n" {
		t.Errorf("encryption off: exit %d, stderr %q", code, stderr)
	}

	_, stderr, code = runLive(t, t.Context(), testEnv(nil), "encryption", "rotate-key", "--socket", "/nonexistent/veil/agent.sock")
	if code != ExitUnreachable || !strings.Contains(stderr, "cannot reach veil-agent") {
		t.Errorf("unreachable agent: exit %d, stderr %q", code, stderr)
	}
}
