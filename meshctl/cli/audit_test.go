package cli

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	kubefake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/veilmesh/veil/api/agent/bridge"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/api/annotations"
	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/meshctl/audit"
	"github.com/veilmesh/veil/meshctl/output"
)

// auditJSON runs audit encryption -o json on c and decodes the evidence.
func auditJSON(t *testing.T, c *cluster, vars map[string]string, args ...string) (audit.Report, int, string) {
	t.Helper()
	out, stderr, code := runCluster(t, c, vars, append([]string{"audit", "encryption", "-o", "json", "--details"}, args...)...)
	var r audit.Report
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("decode audit JSON: %v\nstdout: %s\nstderr: %s", err, out, stderr)
	}
	return r, code, stderr
}

func TestAuditHealthyPasses(t *testing.T) {
	r, code, stderr := auditJSON(t, healthyCluster(3), nil)
	if code != ExitOK || r.Verdict != audit.Pass || len(r.Failures) != 0 {
		t.Fatalf("exit %d, verdict %s, failures %+v, stderr %q; want PASS", code, r.Verdict, r.Failures, stderr)
	}
	// 8 checks per node, 2 per ordered pair.
	if want := 3*len(audit.NodeChecks()) + 6*2; len(r.Checks) != want {
		t.Errorf("%d checks; want %d", len(r.Checks), want)
	}
	for _, c := range r.Checks {
		if c.Reason == "" {
			t.Errorf("%s %s: no reason", c.Scope, c.Check)
		}
	}
}

func TestAuditFaults(t *testing.T) {
	type want struct{ scope, check, reason string }
	for _, tc := range []struct {
		name  string
		fault func(c *cluster)
		want  []want
	}{
		{"strict mode off", func(c *cluster) { c.enc(2).StrictMode = false }, []want{
			{"node-2", "strict-mode", "strict mode is off: pod traffic to a node without a working tunnel would leave unencrypted"},
		}},
		{"unguarded device", func(c *cluster) { c.enc(2).UnguardedDevices = []string{"eth1.100"} }, []want{
			{"node-2", "guard", "eth1.100 leads off the node without the strict-mode guard: pod packets routed that way would not be stopped"},
		}},
		{"no guard reported", func(c *cluster) { c.enc(3).GuardedDevices = nil }, []want{
			{"node-3", "guard", "the agent reports no guarded device (an agent older than the guard, or none attached)"},
		}},
		{"missing peer", func(c *cluster) { c.dropPeer(1, 3) }, []want{
			{"node-1→node-3", "peer", "node-3 is not a peer of node-1"},
			{"node-1→node-3", "handshake", "not checked: node-3 is not a peer of node-1"},
		}},
		{"stale handshake", func(c *cluster) { hs := ago(10 * time.Minute); c.peer(2, 1).LastHandshake = &hs }, []want{
			{"node-2→node-1", "handshake", "last handshake 10m ago at 2026-11-21T09:50:00Z, more than --max-handshake-age 5m0s"},
		}},
		{"no handshake", func(c *cluster) { c.peer(2, 1).LastHandshake = nil }, []want{
			{"node-2→node-1", "handshake", "node-2 has never completed a handshake with node-1"},
		}},
		{"leak", func(c *cluster) {
			e := c.enc(3)
			e.Leaks = 4
			e.RecentLeaks = []meshv1alpha1.LeakRecord{
				{Source: "10.0.3.5:40000", Destination: "10.0.1.5:80", Protocol: "TCP", Endpoint: "192.168.50.1:51820", Reason: "no-peer", Packets: 1, Last: ago(time.Hour)},
				{Source: "10.0.3.5:40001", Destination: "10.0.1.5:80", Protocol: "TCP", Endpoint: "192.168.50.1:51820", Reason: "no-peer", Packets: 3, Last: ago(time.Minute)},
			}
		}, []want{
			{"node-3", "leaks", "strict mode dropped 4 pod packets headed to other nodes unencrypted; latest: 10.0.3.5:40001 → 10.0.1.5:80 TCP via 192.168.50.1:51820 (no-peer) at 2026-11-21T09:59:00Z"},
		}},
		{"unencrypted packets", func(c *cluster) { c.enc(1).UnencryptedPackets = 12 }, []want{
			{"node-1", "unencrypted-packets", "12 pod packets sent to other nodes unencrypted"},
		}},
		{"missing key", func(c *cluster) {
			// The agent has no key, so it published none and nobody peers with it.
			c.enc(3).PublicKey, c.enc(3).Fingerprint = "", ""
			delete(c.nodes[2].Annotations, annotations.WireGuardPublicKey)
			c.dropPeer(1, 3)
			c.dropPeer(2, 3)
		}, []want{
			{"node-3", "key-present", "no public key: the node has no WireGuard key, so no peer can encrypt to it"},
			{"node-3", "key-published", "not checked: no public key"},
			{"node-3", "key-age", "not checked: no public key"},
			{"node-1→node-3", "peer", "node-3 is not a peer of node-1"},
			{"node-1→node-3", "handshake", "not checked"},
			{"node-2→node-3", "peer", "node-3 is not a peer of node-2"},
			{"node-2→node-3", "handshake", "not checked"},
		}},
		{"stale MeshNode", func(c *cluster) { c.meshNode(2).Status.Updated = ago(10 * time.Minute) }, []want{
			{"node-2", "status-fresh", "MeshNode status is stale: last updated 10m ago at 2026-11-21T09:50:00Z, more than --stale-after 2m0s (is veil-agent running on the node?)"},
		}},
		{"key mismatch with the annotation", func(c *cluster) { c.nodes[0].Annotations[annotations.WireGuardPublicKey] = testKey(9) }, []want{
			{"node-1", "key-published", "the Node's wireguard.veil.dev/public-key annotation is key " + nodeinfo.KeyFingerprint(testKey(9)) + ", the node's device has key " + nodeinfo.KeyFingerprint(testKey(1))},
			{"node-2→node-1", "peer", "node-2 has node-1 with key " + nodeinfo.KeyFingerprint(testKey(1)) + ", node-1 publishes key " + nodeinfo.KeyFingerprint(testKey(9))},
			{"node-3→node-1", "peer", "node-3 has node-1 with key " + nodeinfo.KeyFingerprint(testKey(1)) + ", node-1 publishes key " + nodeinfo.KeyFingerprint(testKey(9))},
		}},
		{"peer with an old key", func(c *cluster) { c.peer(2, 1).PublicKey = testKey(8) }, []want{
			{"node-2→node-1", "peer", "node-2 has node-1 with key " + nodeinfo.KeyFingerprint(testKey(8)) + ", node-1 publishes and reports key " + nodeinfo.KeyFingerprint(testKey(1))},
		}},
		{"allowed IPs miss the pod CIDR", func(c *cluster) { c.peer(1, 2).AllowedIPs = []string{"10.0.2.0/25"} }, []want{
			{"node-1→node-2", "peer", "allowed IPs 10.0.2.0/25 do not cover node-2's pod CIDRs 10.0.2.0/24"},
		}},
		{"wrong endpoint", func(c *cluster) { c.peer(1, 2).Endpoint = "192.168.50.99:51820" }, []want{
			{"node-1→node-2", "peer", "node-1 has node-2 at endpoint 192.168.50.99:51820, node-2 publishes and reports endpoint 192.168.50.2:51820"},
		}},
		// Forgeries: each view of a node must equal what the node publishes
		// (its Node) and what it reports about itself (its MeshNode).
		{"MeshNode and peer views forged to a key the node does not publish", func(c *cluster) {
			c.enc(2).PublicKey = testKey(9)
			c.peer(1, 2).PublicKey = testKey(9)
			c.peer(3, 2).PublicKey = testKey(9)
		}, []want{
			{"node-2", "key-published", "annotation is key " + nodeinfo.KeyFingerprint(testKey(2))},
			{"node-1→node-2", "peer", "node-1 has node-2 with key " + nodeinfo.KeyFingerprint(testKey(9)) + ", node-2 publishes key " + nodeinfo.KeyFingerprint(testKey(2))},
			{"node-3→node-2", "peer", "node-3 has node-2 with key " + nodeinfo.KeyFingerprint(testKey(9)) + ", node-2 publishes key " + nodeinfo.KeyFingerprint(testKey(2))},
		}},
		{"a peer's key is what the node publishes but not what it reports", func(c *cluster) {
			c.nodes[1].Annotations[annotations.WireGuardPublicKey] = testKey(9)
			c.peer(1, 2).PublicKey = testKey(9)
		}, []want{
			{"node-2", "key-published", "annotation is key " + nodeinfo.KeyFingerprint(testKey(9))},
			{"node-1→node-2", "peer", "node-1 has node-2 with key " + nodeinfo.KeyFingerprint(testKey(9)) + ", node-2 reports key " + nodeinfo.KeyFingerprint(testKey(2))},
			{"node-3→node-2", "peer", "node-3 has node-2 with key " + nodeinfo.KeyFingerprint(testKey(2)) + ", node-2 publishes key " + nodeinfo.KeyFingerprint(testKey(9))},
		}},
		{"endpoint the node does not report", func(c *cluster) { c.meshNode(2).Status.NodeIP = "192.168.50.77" }, []want{
			{"node-1→node-2", "peer", "node-1 has node-2 at endpoint 192.168.50.2:51820, node-2 reports endpoint 192.168.50.77:51820"},
			{"node-3→node-2", "peer", "node-3 has node-2 at endpoint 192.168.50.2:51820, node-2 reports endpoint 192.168.50.77:51820"},
		}},
		{"allowed IPs beyond the node's pod CIDRs", func(c *cluster) { c.peer(1, 2).AllowedIPs = []string{"10.0.2.0/24", "10.0.3.0/24"} }, []want{
			{"node-1→node-2", "peer", "node-1 lets node-2 send from 10.0.3.0/24, which is not node-2's"},
		}},
		{"pod CIDRs forged in the MeshNode and the peers", func(c *cluster) {
			c.meshNode(2).Status.PodCIDRs = []string{"10.0.9.0/24"}
			c.peer(1, 2).AllowedIPs = []string{"10.0.9.0/24"}
			c.peer(3, 2).AllowedIPs = []string{"10.0.9.0/24"}
		}, []want{
			{"node-1→node-2", "peer", "allowed IPs 10.0.9.0/24 do not cover node-2's pod CIDRs 10.0.2.0/24; node-1 lets node-2 send from 10.0.9.0/24, which is not node-2's"},
			{"node-3→node-2", "peer", "allowed IPs 10.0.9.0/24 do not cover node-2's pod CIDRs 10.0.2.0/24; node-3 lets node-2 send from 10.0.9.0/24, which is not node-2's"},
		}},
		{"a node claims another's pod CIDR and key", func(c *cluster) {
			c.nodes[2].Spec.PodCIDRs = append(c.nodes[2].Spec.PodCIDRs, "10.0.2.0/24")
			c.nodes[2].Annotations[annotations.WireGuardPublicKey] = testKey(2)
		}, []want{
			{"node-3", "key-published", "annotation is key " + nodeinfo.KeyFingerprint(testKey(2))},
			{"node-3", "claims", "node node-3 claims pod CIDR 10.0.2.0/24, held by node node-2; node node-3 claims public key " + nodeinfo.KeyFingerprint(testKey(2)) + ", held by node node-2"},
			{"node-1→node-3", "peer", "node-1 has node-3 with key " + nodeinfo.KeyFingerprint(testKey(3)) + ", node-3 publishes key " + nodeinfo.KeyFingerprint(testKey(2))},
			{"node-2→node-3", "peer", "node-2 has node-3 with key " + nodeinfo.KeyFingerprint(testKey(3)) + ", node-3 publishes key " + nodeinfo.KeyFingerprint(testKey(2))},
		}},
		{"old key", func(c *cluster) { c.enc(2).KeyCreated = ago(100 * 24 * time.Hour) }, []want{
			{"node-2", "key-age", "key " + nodeinfo.KeyFingerprint(testKey(2)) + " is 100d old, more than --max-key-age 2160h0m0s: rotate it (meshctl encryption rotate-key --node node-2)"},
		}},
		{"encryption disabled", func(c *cluster) { c.enc(1).Mode = meshv1alpha1.EncryptionModeDisabled }, []want{
			{"node-1", "encryption-enabled", "encryption is disabled"},
		}},
		{"no MeshNode", func(c *cluster) { c.dropMeshNode(3) }, []want{
			{"node-3", "status-fresh", "no MeshNode: the node's agent has never reported its encryption state"},
			{"node-3", "encryption-enabled", "not checked: no MeshNode"},
			{"node-3", "key-present", "not checked: no MeshNode"},
			{"node-3", "key-published", "not checked: no MeshNode"},
			{"node-3", "key-age", "not checked: no MeshNode"},
			{"node-3", "strict-mode", "not checked: no MeshNode"},
			{"node-3", "guard", "not checked: no MeshNode"},
			{"node-3", "leaks", "not checked: no MeshNode"},
			{"node-3", "unencrypted-packets", "not checked: no MeshNode"},
			{"node-3→node-1", "peer", "not checked: node-3 has no MeshNode"},
			{"node-3→node-1", "handshake", "not checked: node-3 has no MeshNode"},
			{"node-3→node-2", "peer", "not checked: node-3 has no MeshNode"},
			{"node-3→node-2", "handshake", "not checked: node-3 has no MeshNode"},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := healthyCluster(3)
			tc.fault(c)
			r, code, stderr := auditJSON(t, c, nil)
			if code != ExitFailure || r.Verdict != audit.Fail {
				t.Errorf("exit %d, verdict %s, stderr %q; want exit 1, FAIL", code, r.Verdict, stderr)
			}
			var got []want
			for _, f := range r.Failures {
				got = append(got, want{f.Scope, f.Check, f.Reason})
			}
			if len(got) != len(tc.want) {
				t.Fatalf("failures:\n%s\nwant %d failures: %v", failuresString(r.Failures), len(tc.want), tc.want)
			}
			for i, w := range tc.want {
				g := got[i]
				if g.scope != w.scope || g.check != w.check || !strings.Contains(g.reason, w.reason) {
					t.Errorf("failure %d = %s %s %q; want %s %s containing %q", i, g.scope, g.check, g.reason, w.scope, w.check, w.reason)
				}
			}
		})
	}
}

func failuresString(fs []audit.Check) string {
	var b strings.Builder
	for _, f := range fs {
		b.WriteString("  " + f.Scope + " " + f.Check + " " + f.Reason + "\n")
	}
	return b.String()
}

func TestAuditThresholds(t *testing.T) {
	// Handshakes are 12s..32s old: a 15s limit fails the 4 older ones. Keys
	// are 30 days old, statuses 10s.
	r, code, _ := auditJSON(t, healthyCluster(3), nil, "--max-handshake-age", "15s", "--max-key-age", "700h", "--stale-after", "5s")
	if code != ExitFailure {
		t.Errorf("exit %d; want 1", code)
	}
	checks := map[string]int{}
	for _, f := range r.Failures {
		checks[f.Check]++
	}
	if checks["handshake"] != 4 || checks["key-age"] != 3 || checks["status-fresh"] != 3 {
		t.Errorf("failures by check = %v; want 4 handshake, 3 key-age, 3 status-fresh\n%s", checks, failuresString(r.Failures))
	}
	if r.Thresholds != (audit.Thresholds{MaxHandshakeAge: "15s", MaxKeyAge: "700h0m0s", StaleAfter: "5s"}) {
		t.Errorf("thresholds = %+v", r.Thresholds)
	}
	for _, args := range [][]string{{"--max-handshake-age", "0s"}, {"--max-key-age", "-1h"}, {"--capture-duration", "11s"}, {"--marker-port", "70000"}, {"-o", "xml"}} {
		_, stderr, code := runCluster(t, healthyCluster(2), nil, append([]string{"audit", "encryption"}, args...)...)
		if code != ExitUsage {
			t.Errorf("%v: exit %d, stderr %q; want 2", args, code, stderr)
		}
	}
}

func TestAuditGolden(t *testing.T) {
	faulty := func() *cluster {
		c := healthyCluster(3)
		c.enc(2).StrictMode = false
		c.dropPeer(1, 3)
		hs := ago(10 * time.Minute)
		c.peer(3, 2).LastHandshake = &hs
		c.enc(3).Leaks = 1
		c.enc(3).RecentLeaks = []meshv1alpha1.LeakRecord{{Source: "10.0.3.5:40000", Destination: "10.0.2.5:80", Protocol: "TCP", Reason: "no-tunnel", Packets: 1, Last: ago(time.Minute)}}
		return c
	}
	for _, tc := range []struct {
		name     string
		cluster  *cluster
		args     []string
		wantCode int
	}{
		{"audit-healthy.txt", healthyCluster(3), nil, ExitOK},
		{"audit-healthy.json", healthyCluster(2), []string{"-o", "json"}, ExitOK},
		{"audit-faults.txt", faulty(), nil, ExitFailure},
		{"audit-faults.json", faulty(), []string{"-o", "json"}, ExitFailure},
		{"audit-faults-details.txt", faulty(), []string{"--details"}, ExitFailure},
		{"audit-faults-node.txt", faulty(), []string{"--node", "node-3"}, ExitFailure},
		{"audit-faults-max-failures.txt", faulty(), []string{"--max-failures", "2"}, ExitFailure},
		{"audit-no-nodes.txt", &cluster{}, nil, ExitFailure},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, stderr, code := runCluster(t, tc.cluster, nil, append([]string{"audit", "encryption"}, tc.args...)...)
			if code != tc.wantCode {
				t.Errorf("exit code = %d; want %d\nstderr: %s", code, tc.wantCode, stderr)
			}
			if stderr != "" {
				t.Errorf("stderr = %q; want nothing", stderr)
			}
			// The golden files are of a development build.
			if v := buildVersion().Version; v != "dev" {
				out = strings.ReplaceAll(out, "meshctl "+v+" against", "meshctl dev against")
				out = strings.ReplaceAll(out, `"meshctlVersion": "`+v+`"`, `"meshctlVersion": "dev"`)
			}
			golden(t, tc.name, out)
		})
	}
}

func TestAuditColourKeepsAlignment(t *testing.T) {
	c := healthyCluster(3)
	c.enc(2).StrictMode = false
	cs, err := readCluster(t.Context(), mustConnect(t, c), withTimeout(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	opts := audit.Options{MaxHandshakeAge: 5 * time.Minute, MaxKeyAge: 2160 * time.Hour, StaleAfter: audit.DefaultStaleAfter}
	r := audit.New(cs, testNow, opts, buildVersion().Version)
	r.Finish(0)
	var plain, coloured strings.Builder
	if err := audit.Write(&plain, output.Palette{}, r, audit.View{Details: true}); err != nil {
		t.Fatal(err)
	}
	if err := audit.Write(&coloured, output.Palette{On: true}, r, audit.View{Details: true}); err != nil {
		t.Fatal(err)
	}
	if got := ansi.ReplaceAllString(coloured.String(), ""); got != plain.String() || !ansi.MatchString(coloured.String()) {
		t.Errorf("coloured output differs from plain once uncoloured:\n%s\n---\n%s", got, plain.String())
	}
}

// TestAuditDeterministic: the evidence does not depend on the order the
// API server lists objects in.
func TestAuditDeterministic(t *testing.T) {
	a := healthyCluster(4)
	b := healthyCluster(4)
	slices.Reverse(b.nodes)
	slices.Reverse(b.mesh)
	for _, m := range b.mesh {
		slices.Reverse(m.Status.Encryption.Peers)
	}
	outA, _, _ := runCluster(t, a, nil, "audit", "encryption", "-o", "json")
	outB, _, _ := runCluster(t, b, nil, "audit", "encryption", "-o", "json")
	if outA != outB {
		t.Error("the audit differs with the listing order")
	}
}

func TestAuditAPIErrors(t *testing.T) {
	forbidden := healthyCluster(2)
	forbidden.onCore = func(cs *kubefake.Clientset) {
		cs.PrependReactor("list", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
			return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, "", errors.New("RBAC says no"))
		})
	}
	_, stderr, code := runCluster(t, forbidden, nil, "audit", "encryption")
	if code != ExitUnreachable || !strings.Contains(stderr, "list nodes at https://api.lab.example:6443") || !strings.Contains(stderr, "RBAC: meshctl needs get and list on nodes, pods and meshnodes.mesh.veil.dev") {
		t.Errorf("forbidden: exit %d, stderr %q", code, stderr)
	}

	failing := func(string, string, agentEnv) (*kubeClients, error) { return nil, usageErrorf("no kubeconfig: test") }
	var out strings.Builder
	s := Streams{In: strings.NewReader(""), Out: &out, Err: &out}
	if code := execute(t.Context(), newRootCommand(s, testEnv(nil), failing), []string{"encryption", "status"}, s); code != ExitUsage {
		t.Errorf("connect error: exit %d; want 2", code)
	}
}

// TestKubeconfigLoading runs the real loader.
func TestKubeconfigLoading(t *testing.T) {
	home := t.TempDir()
	missing := filepath.Join(home, "nope")
	// A kubeconfig for an API server nobody runs: port 1 refuses at once.
	cfg := filepath.Join(home, "kubeconfig")
	if err := os.WriteFile(cfg, []byte(`apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}
users:
- name: lab
  user: {token: "t"}
contexts:
- name: lab
  context: {cluster: lab, user: lab}
current-context: lab
`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		vars     map[string]string
		args     []string
		wantCode int
		want     string
	}{
		{"KUBECONFIG", map[string]string{envKubeconfig: cfg}, []string{"--timeout", "2s"}, ExitUnreachable, "list nodes at https://127.0.0.1:1"},
		{"none", map[string]string{"HOME": home}, nil, ExitUsage, "no kubeconfig: --kubeconfig is not given, KUBECONFIG is not set and " + filepath.Join(home, ".kube", "config") + " does not exist"},
		{"no home", nil, nil, ExitUsage, "~/.kube/config does not exist"},
		{"KUBECONFIG missing", map[string]string{envKubeconfig: missing + string(filepath.ListSeparator) + missing + "2"}, nil, ExitUsage, "none of the files in KUBECONFIG="},
		{"--kubeconfig missing", nil, []string{"--kubeconfig", missing}, ExitUsage, "load kubeconfig (--kubeconfig " + missing + ")"},
		{"unknown context", nil, []string{"--kubeconfig", cfg, "--context", "prod"}, ExitUsage, `context "prod" does not exist`},
		{"unreachable API server", nil, []string{"--kubeconfig", cfg, "--timeout", "2s"}, ExitUnreachable, "list nodes at https://127.0.0.1:1"},
		{"KUBECONFIG", map[string]string{envKubeconfig: cfg}, []string{"--timeout", "2s"}, ExitUnreachable, "is the API server reachable from here?"},
		{"~/.kube/config", map[string]string{"HOME": filepath.Dir(filepath.Dir(kubeHome(t, cfg)))}, []string{"--timeout", "2s"}, ExitUnreachable, "list nodes at https://127.0.0.1:1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, stderr, code := runLive(t, t.Context(), testEnv(tc.vars), append([]string{"audit", "encryption"}, tc.args...)...)
			if code != tc.wantCode || out != "" || !strings.Contains(stderr, tc.want) {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit %d and %q", code, out, stderr, tc.wantCode, tc.want)
			}
		})
	}
}

// kubeHome puts a copy of cfg at DIR/.kube/config and returns its path.
func kubeHome(t *testing.T, cfg string) string {
	t.Helper()
	b, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), ".kube", "config")
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// labWire plays the lab's network for the fake agents: SendMarker hands the
// marker to the captures running on the sending and the receiving node.
type labWire struct {
	mu       sync.Mutex
	changed  chan struct{}
	captures map[string]*fakeCapture
	// owner maps pod CIDRs to nodes.
	owner map[netip.Prefix]string
	// clear makes the marker travel unencrypted on the underlay.
	clear bool
}

type fakeCapture struct {
	marker string
	resp   *agentv1.CaptureResponse
}

func newLabWire(c *cluster) *labWire {
	w := &labWire{changed: make(chan struct{}), captures: map[string]*fakeCapture{}, owner: map[netip.Prefix]string{}}
	for _, m := range c.mesh {
		for _, s := range m.Status.PodCIDRs {
			w.owner[netip.MustParsePrefix(s)] = m.Name
		}
	}
	return w
}

// wireAgent is a node's fake agent on the lab wire.
type wireAgent struct {
	agentv1.UnimplementedAgentServer
	node string
	wire *labWire
}

func (a *wireAgent) Status(context.Context, *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	st := healthyStatus()
	st.Node = a.node
	return st, nil
}

func (a *wireAgent) CaptureUnderlay(ctx context.Context, req *agentv1.CaptureRequest) (*agentv1.CaptureResponse, error) {
	if req.Marker == "" || req.DurationMs == 0 {
		return nil, status.Error(codes.InvalidArgument, "capture needs a marker and a duration")
	}
	w := a.wire
	c := &fakeCapture{marker: req.Marker, resp: &agentv1.CaptureResponse{
		UnderlayInterface: "eth0", TunnelInterface: "veilwg0", StartedUnixNano: time.Now().UnixNano(),
		// Background traffic: keepalives and other frames.
		UnderlayFrames: 10, WireguardFrames: 2,
	}}
	w.mu.Lock()
	w.captures[a.node] = c
	close(w.changed)
	w.changed = make(chan struct{})
	w.mu.Unlock()
	select {
	case <-time.After(time.Duration(req.DurationMs) * time.Millisecond):
	case <-ctx.Done():
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.captures, a.node)
	return c.resp, nil
}

// SendMarker waits until both ends capture (the real agents' captures
// start as soon as they are asked), then delivers the marker.
func (a *wireAgent) SendMarker(ctx context.Context, req *agentv1.SendMarkerRequest) (*agentv1.SendMarkerResponse, error) {
	w := a.wire
	ip, err := netip.ParseAddr(req.Destination)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "destination %q", req.Destination)
	}
	var dst string
	for p, n := range w.owner {
		if p.Contains(ip) {
			dst = n
		}
	}
	for {
		w.mu.Lock()
		src, to, changed := w.captures[a.node], w.captures[dst], w.changed
		if src != nil && to != nil {
			break
		}
		w.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, status.Error(codes.DeadlineExceeded, "no capture")
		}
	}
	defer w.mu.Unlock()
	n := uint64(req.Count)
	for _, c := range []*fakeCapture{w.captures[a.node], w.captures[dst]} {
		if c.marker != req.Marker {
			continue
		}
		c.resp.UnderlayFrames += n
		if w.clear {
			c.resp.UnderlayMarkerFrames += n
			c.resp.PlaintextPodFrames += n
		} else {
			c.resp.WireguardFrames += n
		}
	}
	if to := w.captures[dst]; to.marker == req.Marker {
		to.resp.TunnelMarkerFrames += n
	}
	return &agentv1.SendMarkerResponse{SourcePod: "x/a-" + strings.TrimPrefix(a.node, "node-"), SourceIp: "10.0." + strings.TrimPrefix(a.node, "node-") + ".5", Sent: req.Count}, nil
}

// wireAgents gives each node listed a veil-agent pod serving a wireAgent
// on w, reached through the (fake) API server's exec.
func wireAgents(t *testing.T, c *cluster, w *labWire, nodes ...string) {
	t.Helper()
	agents := map[string]agentv1.AgentServer{}
	for _, n := range nodes {
		agents[n] = &wireAgent{node: n, wire: w}
	}
	withAgents(t, c, agents, allowed)
}

func activeChecks(r audit.Report) map[string]audit.Check {
	out := map[string]audit.Check{}
	for _, c := range r.Checks {
		if c.Check == "active" {
			out[c.Scope] = c
		}
	}
	return out
}

func TestAuditActive(t *testing.T) {
	c := healthyCluster(3)
	// node-3 runs only its host-network agent pod: nothing to send to or from.
	c.pods = slices.DeleteFunc(c.pods, func(p *corev1.Pod) bool { return p.Name == "a-3" })
	// node-1's pod serves DNS: markers to it go to its UDP port.
	c.pods[0].Spec.Containers = []corev1.Container{{Name: "dns", Ports: []corev1.ContainerPort{{ContainerPort: 8080}, {ContainerPort: 53, Protocol: corev1.ProtocolUDP}}}}
	w := newLabWire(c)
	wireAgents(t, c, w, "node-1", "node-2", "node-3")
	r, code, stderr := auditJSON(t, c, nil, "--active", "--capture-duration", "500ms")
	if code != ExitOK || r.Verdict != audit.Pass {
		t.Fatalf("exit %d, verdict %s, stderr %q\n%s", code, r.Verdict, stderr, failuresString(r.Failures))
	}
	active := activeChecks(r)
	if len(active) != 2 || active["node-1→node-2"].Result != audit.Pass || active["node-2→node-1"].Result != audit.Pass {
		t.Errorf("active checks = %+v; want node-1→node-2 and node-2→node-1 PASS", active)
	}
	if got := active["node-1→node-2"].Reason; !strings.Contains(got, "marker sent 3× from x/a-1 (10.0.1.5) to x/a-2 (10.0.2.5) arrived through node-2's tunnel 3×") {
		t.Errorf("reason = %q", got)
	}
	if len(r.NotTested) != 4 || r.NotTested[0] != (audit.Check{Scope: "node-1→node-3", Check: "active", Reason: "node-3 runs no pod to send the marker to"}) {
		t.Errorf("not tested = %+v", r.NotTested)
	}
	if len(r.Active) != 2 || r.Active[0].Marker == r.Active[1].Marker || !strings.HasPrefix(r.Active[0].Marker, "veil-audit-") ||
		r.Active[0].Destination == nil || r.Active[0].Destination.TunnelMarkerFrames != 3 || r.Active[0].DestinationPod != "x/a-2" ||
		r.Active[0].DestinationPort != 9 || r.Active[1].DestinationPort != 53 {
		t.Errorf("active evidence = %+v", r.Active)
	}
	if !r.Thresholds.Active || r.Thresholds.CaptureDuration != "500ms" || r.Thresholds.MarkerPort != 0 {
		t.Errorf("thresholds = %+v", r.Thresholds)
	}
}

func TestAuditActiveFails(t *testing.T) {
	t.Run("marker on the underlay", func(t *testing.T) {
		c := healthyCluster(2)
		w := newLabWire(c)
		w.clear = true
		wireAgents(t, c, w, "node-1", "node-2")
		r, code, _ := auditJSON(t, c, nil, "--active", "--capture-duration", "500ms")
		if code != ExitFailure || r.Verdict != audit.Fail || len(r.Failures) != 2 {
			t.Fatalf("exit %d, verdict %s; want 1, FAIL with the 2 active checks\n%s", code, r.Verdict, failuresString(r.Failures))
		}
		got := activeChecks(r)["node-1→node-2"]
		for _, want := range []string{
			"the marker was seen in the clear on node-1's underlay (eth0): 3 frames",
			"the marker was seen in the clear on node-2's underlay (eth0): 3 frames",
			"3 plaintext pod frames on node-2's underlay (eth0)",
		} {
			if got.Result != audit.Fail || !strings.Contains(got.Reason, want) {
				t.Errorf("node-1→node-2 = %s %q; want FAIL containing %q", got.Result, got.Reason, want)
			}
		}
	})
	t.Run("no agent pod", func(t *testing.T) {
		c := healthyCluster(2)
		wireAgents(t, c, newLabWire(c), "node-1")
		r, code, _ := auditJSON(t, c, nil, "--active", "--capture-duration", "100ms")
		got := activeChecks(r)
		if code != ExitFailure || len(got) != 2 {
			t.Fatalf("exit %d, active checks %+v", code, got)
		}
		for _, s := range []string{"node-1→node-2", "node-2→node-1"} {
			if want := `cannot reach the agent of node-2: node node-2 runs no veil-agent pod`; !strings.Contains(got[s].Reason, want) {
				t.Errorf("%s: %q; want it to contain %q", s, got[s].Reason, want)
			}
		}
	})
	t.Run("agent not running", func(t *testing.T) {
		c := healthyCluster(2)
		wireAgents(t, c, newLabWire(c), "node-1", "node-2")
		// node-2's agent pod runs, but its agent's socket is gone.
		served := c.exec
		c.exec = func(ctx context.Context, namespace, pod, container string, command []string, stdin io.Reader, stdout, stderr io.Writer) error {
			if pod == "veil-agent-2x" {
				return bridge.Serve(ctx, filepath.Join(t.TempDir(), "gone.sock"), stdin, stdout)
			}
			return served(ctx, namespace, pod, container, command, stdin, stdout, stderr)
		}
		r, code, _ := auditJSON(t, c, nil, "--active", "--capture-duration", "100ms")
		got := activeChecks(r)["node-1→node-2"]
		if code != ExitFailure || !strings.Contains(got.Reason, "cannot reach the agent of node-2: cannot reach veil-agent: exec /usr/bin/veil-agent api-bridge in pod veil-system/veil-agent-2x (node node-2): connect to the agent's API socket") || strings.Contains(got.Reason, "\n") {
			t.Errorf("exit %d, %q; want one line naming the unreachable agent", code, got.Reason)
		}
	})
}

func TestAuditEncryptionViewUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--node", "node-7"}, `node "node-7" is not in the cluster (3 nodes)`},
		{[]string{"--max-failures", "0"}, "--max-failures must be positive"},
	} {
		_, stderr, code := runCluster(t, healthyCluster(3), nil, append([]string{"audit", "encryption"}, tc.args...)...)
		if code != ExitUsage || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and %q", tc.args, code, stderr, ExitUsage, tc.want)
		}
	}
}
