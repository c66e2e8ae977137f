package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/veilmesh/veil/lab"
	"github.com/veilmesh/veil/lab/netns"
)

// labCLI runs the meshctl binary against one lab directory and prefix.
type labCLI struct {
	t           *testing.T
	ctx         context.Context
	bin         string
	dir, prefix string
}

// newLabCLI builds meshctl and makes sure the lab of dir is gone when t
// ends, whatever happened.
func newLabCLI(t *testing.T, ctx context.Context, name string) *labCLI {
	tmp := t.TempDir()
	c := &labCLI{t: t, ctx: ctx, bin: filepath.Join(tmp, "meshctl"), dir: filepath.Join(tmp, "lab"), prefix: fmt.Sprintf("veile2e-%d-%s", os.Getpid(), name)}
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", c.bin, "github.com/veilmesh/veil/meshctl/cmd/meshctl").CombinedOutput(); err != nil {
		t.Fatalf("build meshctl: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if t.Failed() {
			if b, err := os.ReadFile(filepath.Join(c.dir, lab.SupervisorLog)); err == nil {
				t.Logf("supervisor log:\n%s", tailString(string(b), 6000))
			}
		}
		if _, err := os.Stat(c.dir); err == nil {
			c.run(nil, "lab", "down", "--dir", c.dir, "--prefix", c.prefix)
		}
	})
	return c
}

// run runs meshctl with args and extra environment env.
func (c *labCLI) run(env []string, args ...string) (stdout, stderr string, code int) {
	c.t.Helper()
	cctx, cancel := context.WithTimeout(c.ctx, 35*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(cctx, c.bin, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		c.t.Fatalf("meshctl %s: %v", strings.Join(args, " "), err)
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

// up starts the lab and returns its status.
func (c *labCLI) up(nodes int) (string, labStatusJSON) {
	c.t.Helper()
	out, stderr, code := c.run(nil, "lab", "up", "--nodes", fmt.Sprint(nodes), "--dir", c.dir, "--prefix", c.prefix)
	if code != 0 {
		c.t.Fatalf("lab up: exit %d\n%s%s", code, out, stderr)
	}
	js, _, code := c.run(nil, "lab", "status", "--dir", c.dir, "-o", "json")
	var st labStatusJSON
	if err := json.Unmarshal([]byte(js), &st); err != nil || code != 0 {
		c.t.Fatalf("lab status -o json: exit %d, %v\n%s", code, err, js)
	}
	return out, st
}

type labStatusJSON struct {
	Running bool `json:"running"`
	lab.State
}

// TestPrivilegedMeshctlLab drives the lab as a user does, through the
// meshctl binary: up, status, exec, env, down; then checks that nothing of
// the lab is left on the host.
func TestPrivilegedMeshctlLab(t *testing.T) {
	requirePrivileged(t)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	c := newLabCLI(t, ctx, "lab")
	dir, prefix, run := c.dir, c.prefix, c.run

	out, st := c.up(2)
	t.Logf("lab up:\n%s", out)
	for _, want := range []string{"eval $(meshctl lab env", "meshctl policy trace --from demo/frontend --to demo/backend --port 80", "meshctl lab down"} {
		if !strings.Contains(out, want) {
			t.Errorf("lab up does not say what to try next (%q)", want)
		}
	}
	if _, stderr, code := run(nil, "lab", "up", "--dir", dir, "--prefix", prefix); code != 1 || !strings.Contains(stderr, "already up") {
		t.Errorf("second lab up: exit %d, %q; want 1, already up", code, stderr)
	}

	if !st.Running || st.Prefix != prefix || len(st.Nodes) != 2 || len(st.Pods) < 3 {
		t.Fatalf("lab status: %+v; want running, 2 nodes, at least 3 pods", st)
	}
	pods := map[string]lab.PodState{}
	for _, p := range st.Pods {
		if p.IP == "" || p.Netns == "" || p.Node == "" {
			t.Errorf("pod %+v: want node, IP and netns", p)
		}
		pods[p.Pod] = p
	}
	for _, n := range st.Nodes {
		if n.AgentPID <= 0 || n.Socket == "" || n.Netns == "" || n.Underlay == "" || n.IP == "" {
			t.Errorf("node %+v: want agent PID, socket, netns, underlay and address", n)
		}
	}
	sup, err := lab.ReadSupervisor(dir)
	if err != nil {
		t.Fatal(err)
	}
	procs := append([]lab.Process{sup.Process}, sup.Processes...)
	names := map[string]bool{}
	for _, p := range procs {
		names[p.Name] = true
	}
	for _, want := range []string{"etcd", "kube-apiserver", "veil-agent"} {
		if !names[want] {
			t.Errorf("supervisor's processes %+v lack %s", sup.Processes, want)
		}
	}

	// The policy on the datapath, probed from inside the pods.
	backend := pods["demo/backend"].IP
	probe := fmt.Sprintf(`exec 3<>/dev/tcp/%s/80 && echo veil >&3 && read -t 3 r <&3 && [ "$r" = veil ]`, backend)
	for _, c := range []struct {
		pod   string
		allow bool
	}{{"demo/frontend", true}, {"other/client", false}} {
		_, stderr, code := run(nil, "lab", "exec", "--dir", dir, c.pod, "--", "timeout", "5", "bash", "-c", probe)
		if (code == 0) != c.allow {
			t.Errorf("%s -> demo/backend:80: exit %d (%s); want allowed=%v", c.pod, code, stderr, c.allow)
		}
	}
	out, _, code := run(nil, "lab", "exec", "--dir", dir, "demo/frontend", "--", "sh", "-c", "cat /proc/self/cgroup; exit 7")
	if code != 7 || !strings.Contains(out, "/"+prefix+"/node-1") {
		t.Errorf("lab exec: exit %d, cgroup %q; want exit 7 in %s/node-1", code, out, prefix)
	}

	out, _, code = run(nil, "lab", "env", "--dir", dir)
	wantEnv := []string{"export KUBECONFIG=" + st.Kubeconfig + ";", "export VEIL_LAB_STATE=" + filepath.Join(dir, lab.StateFile) + ";", "export VEIL_SOCKET=" + st.Nodes[0].Socket + ";"}
	if code != 0 || strings.TrimSpace(out) != strings.Join(wantEnv, "\n") {
		t.Errorf("lab env: exit %d\n%s\nwant\n%s", code, out, strings.Join(wantEnv, "\n"))
	}
	env := []string{"KUBECONFIG=" + st.Kubeconfig, "VEIL_LAB_STATE=" + filepath.Join(dir, lab.StateFile), "VEIL_SOCKET=" + st.Nodes[0].Socket}
	if _, stderr, code := run(env, "--node", "node-2", "status"); code != 0 {
		t.Errorf("meshctl --node node-2 status with the lab's env: exit %d, %s", code, stderr)
	}
	if out, stderr, code := run(env, "policy", "trace", "--from", "other/client", "--to", "demo/backend", "--port", "80"); code != 0 || !strings.HasPrefix(out, "DENIED") {
		t.Errorf("policy trace with the lab's env: exit %d, %s%s; want DENIED", code, out, stderr)
	}

	if out, stderr, code := run(env, "audit", "encryption", "--active"); code != 0 || !strings.HasPrefix(out, "Encryption audit: PASS") {
		t.Errorf("audit encryption --active on the lab: exit %d\n%s%s", code, out, stderr)
	}

	out, stderr, code := run(nil, "lab", "down", "--dir", dir)
	if code != 0 {
		t.Fatalf("lab down: exit %d\n%s%s", code, out, stderr)
	}
	assertLabGone(t, prefix, dir, st.Nodes, procs)
	if out, _, code := run(nil, "lab", "status", "--dir", dir, "-o", "json"); code != 1 || !strings.Contains(out, `"running": false`) {
		t.Errorf("lab status after down: exit %d, %s; want 1, not running", code, out)
	}
}

// TestPrivilegedMeshctlLabDownAfterCrash: when the supervisor dies hard,
// the agents and pod servers outlive it; lab down still removes it all.
func TestPrivilegedMeshctlLabDownAfterCrash(t *testing.T) {
	requirePrivileged(t)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	c := newLabCLI(t, ctx, "crash")
	_, st := c.up(1)
	sup, err := lab.ReadSupervisor(c.dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(sup.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for sup.Running() && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	survivors := 0
	for _, p := range sup.Processes {
		if p.Running() {
			survivors++
		}
	}
	if survivors == 0 {
		t.Fatal("nothing of the lab outlived its supervisor: the test proves nothing")
	}
	if out, _, code := c.run(nil, "lab", "status", "--dir", c.dir); code != 1 || !strings.Contains(out, "is gone") {
		t.Errorf("lab status after a crash: exit %d\n%s; want 1, supervisor gone", code, out)
	}
	if _, stderr, code := c.run(nil, "lab", "up", "--dir", c.dir, "--prefix", c.prefix); code != 1 || !strings.Contains(stderr, "did not shut down cleanly") {
		t.Errorf("lab up over a crashed lab: exit %d, %s; want 1, run lab down first", code, stderr)
	}
	if out, stderr, code := c.run(nil, "lab", "down", "--dir", c.dir); code != 0 {
		t.Fatalf("lab down after a crash: exit %d\n%s%s", code, out, stderr)
	}
	assertLabGone(t, c.prefix, c.dir, st.Nodes, append([]lab.Process{sup.Process}, sup.Processes...))
}

// assertLabGone checks that nothing of the lab is on the host.
func assertLabGone(t *testing.T, prefix, dir string, nodes []lab.NodeState, procs []lab.Process) {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatalf("ip netns list: %v", err)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, prefix+"-") {
			t.Errorf("network namespace left: %s", l)
		}
	}
	if pins, _ := filepath.Glob(filepath.Join("/sys/fs/bpf", prefix+"-*")); len(pins) > 0 {
		t.Errorf("bpffs left: %v", pins)
	}
	mount, err := netns.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(mount, prefix)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cgroup %s left (%v)", filepath.Join(mount, prefix), err)
	}
	for _, n := range nodes {
		procs = append(procs, lab.Process{PID: n.AgentPID, Name: "veil-agent of " + n.Name})
	}
	for _, p := range procs {
		// A reused PID is another process (its start time differs); an
		// orphan's zombie may wait a moment for init.
		deadline := time.Now().Add(5 * time.Second)
		for p.Running() || (p.Start == 0 && syscall.Kill(p.PID, 0) == nil) {
			if time.Now().After(deadline) {
				t.Errorf("process %s (pid %d) still runs", p.Name, p.PID)
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	if left := lab.Leftovers(prefix); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
	for _, f := range []string{lab.StateFile, lab.SupervisorFile, lab.SupervisorLog, "bin", "node-1"} {
		if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("file %s left in the lab dir (%v)", f, err)
		}
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lab dir %s left (%v)", dir, err)
	}
}

func tailString(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
