package realcluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/meshctl/audit"
	"github.com/veilmesh/veil/meshctl/cli"
	"github.com/veilmesh/veil/tests/testenv"
)

// meshctlPrefix names this test's cluster, apart from TestPrivilegedRealCluster's.
const meshctlPrefix = "vrcmesh"

// TestPrivilegedMeshctlThroughAPIServer runs meshctl, in-process, against a
// 2-node cluster with no lab state file: as a user bound to the chart's
// veil-meshctl roles, `--node node-2` (status, endpoints), `observe
// --all-nodes` and `audit encryption --active` reach the agents through
// the API server (an exec of veil-agent api-bridge into their pods); as a
// user whose RBAC allows reads but not pods/exec, meshctl says which
// permission is missing, for whom and where, with exit code 3.
func TestPrivilegedMeshctlThroughAPIServer(t *testing.T) {
	requireCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	c := startLab(t, ctx, labSpec{UpOptions: cluster.UpOptions{Options: cluster.Options{Prefix: meshctlPrefix, Nodes: 2}}})
	clients := c.clients
	values := cluster.LabValues()
	values["meshctl"] = map[string]any{"users": []any{"alice"}}
	c.installVeil(ctx, values)
	// mallory may read what veil-meshctl reads, but not exec.
	if _, err := clients.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "mallory-reads"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: agentclient.MeshctlRole},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: "mallory"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	c.waitServiceAccount(ctx, "default")
	server := createPod(t, ctx, clients, "server", []string{"serve", ":8080"})
	client := createPod(t, ctx, clients, "client", []string{"probe", server.Status.PodIP + ":8080"})
	waitProbe(t, ctx, clients, "ok")

	dir := t.TempDir()
	kubeconfig := func(user string) string {
		cfg, err := c.UserConfig(user)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, user+".kubeconfig")
		if err := controlplane.WriteKubeconfig(path, cfg); err != nil {
			t.Fatal(err)
		}
		return path
	}
	alice, mallory := kubeconfig("alice"), kubeconfig("mallory")
	// No local socket: only the API server leads to agents.
	t.Setenv(agentclient.EnvSocket, "")

	meshctl := func(kubeconfig string, args ...string) (stdout, stderr string, code int) {
		t.Setenv("KUBECONFIG", kubeconfig)
		var out, errb bytes.Buffer
		began := time.Now()
		code = cli.Main(args, cli.Streams{In: strings.NewReader(""), Out: &out, Err: &errb})
		t.Logf("meshctl %s: exit %d in %s", strings.Join(args, " "), code, time.Since(began).Round(time.Millisecond))
		return out.String(), errb.String(), code
	}

	t.Run("node", func(t *testing.T) {
		out, stderr, code := meshctl(alice, "--node", "node-2", "status", "-o", "json")
		var st struct {
			Node string `json:"node"`
		}
		// 1 is a degraded agent, which still answered.
		if code > cli.ExitFailure || json.Unmarshal([]byte(out), &st) != nil || st.Node != "node-2" {
			t.Fatalf("meshctl --node node-2 status: exit %d, stdout %s, stderr %s; want node-2's agent's status", code, out, stderr)
		}
		onNode2 := server
		if client.Spec.NodeName == "node-2" {
			onNode2 = client
		}
		out, stderr, code = meshctl(alice, "--node", "node-2", "endpoints", "-o", "json")
		if code != cli.ExitOK || !strings.Contains(out, onNode2.Status.PodIP) {
			t.Errorf("meshctl --node node-2 endpoints: exit %d, stdout %s, stderr %s; want pod %s (%s)", code, out, stderr, onNode2.Name, onNode2.Status.PodIP)
		}
	})

	t.Run("observe across nodes", func(t *testing.T) {
		// The client probes the server across nodes: both agents see it.
		testenv.Eventually(t, 30*time.Second, time.Second, func() error {
			out, stderr, code := meshctl(alice, "observe", "--all-nodes", "--last", "0", "-o", "json")
			if code != cli.ExitOK {
				return fmt.Errorf("exit %d, stderr %s", code, stderr)
			}
			nodes := map[string]int{}
			for line := range strings.Lines(out) {
				var f struct {
					Node string `json:"node"`
				}
				if err := json.Unmarshal([]byte(line), &f); err != nil {
					return fmt.Errorf("flow %q: %v", line, err)
				}
				nodes[f.Node]++
			}
			if nodes["node-1"] == 0 || nodes["node-2"] == 0 {
				return fmt.Errorf("flows per node %v; want flows from both nodes", nodes)
			}
			t.Logf("observe --all-nodes: flows per node %v", nodes)
			return nil
		})
	})

	t.Run("audit active", func(t *testing.T) {
		out, stderr, code := meshctl(alice, "audit", "encryption", "--active", "--details", "-o", "json")
		var r audit.Report
		if err := json.Unmarshal([]byte(out), &r); err != nil || code > cli.ExitFailure {
			t.Fatalf("meshctl audit encryption --active: exit %d, %v, stderr %s", code, err, stderr)
		}
		var active []string
		for _, ch := range r.Checks {
			if ch.Check == "active" {
				active = append(active, ch.Scope)
				if ch.Result != audit.Pass {
					t.Errorf("active %s: %s: %s", ch.Scope, ch.Result, ch.Reason)
				}
			}
		}
		slices.Sort(active)
		if !slices.Equal(active, []string{"node-1→node-2", "node-2→node-1"}) {
			t.Errorf("active checks on %v; want both node pairs", active)
		}
	})

	t.Run("forbidden", func(t *testing.T) {
		want := `you (user "mallory") may not create pods/exec in namespace veil-system, which %s needs: ask for the veil-meshctl role`
		for _, tc := range []struct {
			args    []string
			purpose string
		}{
			{[]string{"--node", "node-2", "status"}, "--node"},
			{[]string{"observe", "--all-nodes"}, "observe --all-nodes"},
			{[]string{"audit", "encryption", "--active"}, "audit encryption --active"},
		} {
			_, stderr, code := meshctl(mallory, tc.args...)
			if code != cli.ExitUnreachable || !strings.Contains(stderr, fmt.Sprintf(want, tc.purpose)) {
				t.Errorf("meshctl %s as mallory: exit %d, stderr %q; want 3 and %q", strings.Join(tc.args, " "), code, stderr, fmt.Sprintf(want, tc.purpose))
			}
		}
	})
}
