package realcluster

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/tests/testenv"
)

// nodeLabPrefix names TestPrivilegedMeshctlLabNodeAdd's lab.
const nodeLabPrefix = "vrcnode"

// TestPrivilegedMeshctlLabNodeAdd drives `meshctl lab node add` through
// the meshctl binary on a 1-node lab that `meshctl lab up` started: the
// supervisor joins node-2 (its socket in the lab dir, mode 0600), the
// command waits until Veil's agent on it is Ready (--wait-ready, -o json),
// and then the lab's record and `lab status` (the API server) list node-2
// Ready with a Ready agent pod on it; lab down removes the socket with the
// rest.
func TestPrivilegedMeshctlLabNodeAdd(t *testing.T) {
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("skipped under -short: a Kubernetes cluster")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	c := newLabCLI(t, ctx, nodeLabPrefix)
	_, took := c.up(1)
	t.Logf("meshctl lab up --nodes 1: %s", took.Round(100*time.Millisecond))

	sock := filepath.Join(c.dir, cluster.ControlSocket)
	fi, err := os.Lstat(sock)
	if err != nil {
		t.Fatalf("the supervisor's socket: %v", err)
	}
	if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("the supervisor's socket %s: mode %v; want a socket, 0600", sock, fi.Mode())
	}

	began := time.Now()
	out, stderr, code := c.run(4*time.Minute, "lab", "node", "add", "--dir", c.dir, "--wait-ready", "-o", "json")
	if code != 0 {
		t.Fatalf("lab node add: exit %d\n%s%s", code, out, stderr)
	}
	t.Logf("meshctl lab node add --wait-ready: %s\n%s%s", time.Since(began).Round(100*time.Millisecond), stderr, out)
	var added struct {
		Name       string        `json:"name"`
		IP         string        `json:"ip"`
		PodCIDR    string        `json:"podCIDR"`
		Took       time.Duration `json:"tookNs"`
		AgentReady bool          `json:"agentReady"`
		AgentPod   string        `json:"agentPod"`
	}
	if err := json.Unmarshal([]byte(out), &added); err != nil {
		t.Fatalf("lab node add -o json: %v\n%s", err, out)
	}
	node2 := cluster.NodeName(2)
	if added.Name != node2 || added.IP != cluster.NodeIP(2).String() || added.PodCIDR == "" || !added.AgentReady || added.AgentPod == "" {
		t.Errorf("lab node add: %+v; want %s at %s with a pod CIDR and a ready agent", added, node2, cluster.NodeIP(2))
	}
	if !strings.Contains(stderr, "Adding "+node2+" to lab "+c.prefix) {
		t.Errorf("lab node add: no progress on stderr: %q", stderr)
	}

	// The record lists it, with the CIDR the API server gave it.
	rec, err := cluster.ReadLabState(c.dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(rec.Nodes) != 2 || rec.Nodes[1].Name != node2 || rec.Nodes[1].PodCIDR != added.PodCIDR || rec.Nodes[1].IP != added.IP {
		t.Errorf("lab record's nodes %+v; want node-1 and %s (%s, %s)", rec.Nodes, node2, added.IP, added.PodCIDR)
	}

	// lab status (the API server): node-2 Ready, the agent on it Ready.
	testenv.Eventually(t, time.Minute, time.Second, func() error {
		st, code := c.status()
		if code != 0 || !st.Running {
			return errors.New("lab status: not running")
		}
		ready := false
		for _, n := range st.Nodes {
			if n.Name == node2 && n.Ready {
				ready = true
			}
		}
		if !ready {
			return errors.New("lab status: " + node2 + " not listed Ready")
		}
		for _, p := range st.Pods {
			if p.Name == added.AgentPod && p.Node == node2 && p.Phase == "Running" && p.Ready {
				return nil
			}
		}
		return errors.New("lab status: no Running, Ready agent pod " + added.AgentPod + " on " + node2)
	})

	if out, stderr, code := c.run(3*time.Minute, "lab", "down", "--dir", c.dir); code != 0 {
		t.Fatalf("lab down: exit %d\n%s%s", code, out, stderr)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the supervisor's socket after lab down: %v; want it gone", err)
	}
}
