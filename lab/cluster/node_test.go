package cluster

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/tests/testenv"
)

// TestRunInNodeCgroupWithoutCgroup2 checks that on a host without cgroup
// v2 (no NodeCgroupRoot, so no socket hooks) RunInNodeCgroup refuses
// rather than running the command where Veil's hooks are not.
func TestRunInNodeCgroupWithoutCgroup2(t *testing.T) {
	nd := &Node{Index: 1, Name: "node-1", c: &Cluster{Prefix: "vrc", path: os.Getenv("PATH")}}
	out, err := nd.RunInNodeCgroup(context.Background(), "true")
	if err == nil || !strings.Contains(err.Error(), "no cgroup v2") {
		t.Fatalf("RunInNodeCgroup without cgroup v2 = %q, %v; want an error saying there is no cgroup v2", out, err)
	}
}

// TestPrivilegedRunInNodeCgroup runs a command with RunInNodeCgroup on the
// real kernel, without a lab (host namespaces, the node's cgroups made as
// Start makes them), and checks that the process is born in the node's
// host cgroup below the node's cgroup v2 subtree, and that Run's is not.
func TestPrivilegedRunInNodeCgroup(t *testing.T) {
	testenv.RequirePrivileged(t)
	cg2, err := cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	if cg2 == "" {
		t.Skip("no cgroup v2 hierarchy on this host")
	}
	c := &Cluster{Prefix: "vtstcgrun", path: os.Getenv("PATH"), cgroup2: cg2}
	n := c.names()
	if err := removeCgroup(n.cgroup()); err != nil {
		t.Fatalf("remove leftovers: %v", err)
	}
	if err := makeCgroup(n.nodeCgroup(1)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := killCgroup(n.cgroup(), 5*time.Second); err != nil {
			t.Error(err)
		}
		if err := removeCgroup(n.cgroup()); err != nil {
			t.Error(err)
		}
	})
	nd := &Node{Index: 1, Name: "node-1", c: c}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	want := "0::/" + n.hostCgroup(1) + "\n"
	for try := range 2 { // the second reuses the cgroup the first made
		out, err := nd.RunInNodeCgroup(ctx, "cat", "/proc/self/cgroup")
		if err != nil {
			t.Fatalf("try %d: %v", try, err)
		}
		if !strings.Contains(out, want) {
			t.Errorf("try %d: RunInNodeCgroup's process is in\n%s; want the line %q", try, out, strings.TrimSpace(want))
		}
	}
	out, err := nd.Run(ctx, "cat", "/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, "0::/"+n.nodeCgroup(1)) {
		t.Errorf("Run's process is in the node's cgroup:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(cg2, n.hostCgroup(1))); err != nil {
		t.Errorf("host cgroup: %v", err)
	}
}
