package realcluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/tests/testenv"
)

// The labs of the meshctl lab tests, apart from the other tests' clusters.
const (
	cliLabPrefix   = "vrccli"
	crashLabPrefix = "vrccrash"
)

// labCLI runs a meshctl binary built from the checkout against one lab
// directory, as a user does.
type labCLI struct {
	t           *testing.T
	ctx         context.Context
	bin, root   string
	dir, prefix string
	image       string
}

// newLabCLI builds meshctl and the agent image, removes leftovers of an
// earlier run of prefix, and makes sure the lab is down when t ends.
func newLabCLI(t *testing.T, ctx context.Context, prefix string) *labCLI {
	t.Helper()
	root, err := controlplane.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	// The cluster's binaries come from make controlplane's cache; lab up
	// would build them, but not within the test's time.
	if _, err := controlplane.BuildCluster(ctx); err != nil {
		t.Fatalf("build cluster binaries (make controlplane builds them ahead of the tests): %v", err)
	}
	tmp := t.TempDir()
	c := &labCLI{t: t, ctx: ctx, bin: filepath.Join(tmp, "meshctl"), root: root, dir: filepath.Join(tmp, "lab"), prefix: prefix}
	build := exec.CommandContext(ctx, "go", "build", "-o", c.bin, "./meshctl/cmd/meshctl")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build meshctl: %v\n%s", err, out)
	}
	c.image = buildAgentImage(t, ctx)
	if err := cluster.Cleanup(prefix, ""); err != nil {
		t.Fatalf("remove leftovers of an earlier run: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- last lines of the supervisor's log:\n%s", tailFile(filepath.Join(c.dir, cluster.SupervisorLog), 6000))
		}
		if _, err := os.Stat(filepath.Join(c.dir, cluster.StateFile)); err == nil {
			if out, stderr, code := c.run(3*time.Minute, "lab", "down", "--dir", c.dir, "--prefix", c.prefix); code != 0 {
				t.Errorf("lab down at cleanup: exit %d\n%s%s", code, out, stderr)
			}
		}
		if err := cluster.Cleanup(prefix, ""); err != nil {
			t.Errorf("remove what the lab left: %v", err)
		}
	})
	return c
}

// run runs meshctl args from the checkout's root, bounded by timeout.
func (c *labCLI) run(timeout time.Duration, args ...string) (stdout, stderr string, code int) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(c.ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, args...)
	cmd.Dir = c.root
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		c.t.Fatalf("meshctl %s: %v", strings.Join(args, " "), err)
	}
	if ctx.Err() != nil {
		c.t.Fatalf("meshctl %s: not done within %s\n%s%s", strings.Join(args, " "), timeout, out.String(), errb.String())
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

// up runs lab up and returns its output and the time it took.
func (c *labCLI) up(nodes int) (string, time.Duration) {
	c.t.Helper()
	began := time.Now()
	out, stderr, code := c.run(6*time.Minute, "lab", "up", "--nodes", strconv.Itoa(nodes), "--prefix", c.prefix,
		"--dir", c.dir, "--image", c.image, "--wait", "5m")
	took := time.Since(began)
	if code != 0 {
		c.t.Fatalf("lab up: exit %d after %s\n%s%s", code, took.Round(time.Second), out, stderr)
	}
	return out, took
}

// labStatusJSON is what the tests read of lab status -o json.
type labStatusJSON struct {
	Running bool   `json:"running"`
	Phase   string `json:"phase"`
	Lab     *struct {
		Prefix     string `json:"prefix"`
		Kubeconfig string `json:"kubeconfig"`
		Supervisor int    `json:"supervisor"`
	} `json:"lab"`
	Nodes []struct {
		Name  string `json:"name"`
		Ready bool   `json:"ready"`
	} `json:"nodes"`
	Pods []struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
		Node      string `json:"node"`
		Phase     string `json:"phase"`
		Ready     bool   `json:"ready"`
	} `json:"pods"`
}

func (c *labCLI) status() (labStatusJSON, int) {
	c.t.Helper()
	out, stderr, code := c.run(30*time.Second, "lab", "status", "--dir", c.dir, "-o", "json")
	var st labStatusJSON
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		c.t.Fatalf("lab status -o json: exit %d, %v\n%s%s", code, err, out, stderr)
	}
	return st, code
}

// TestPrivilegedMeshctlLabCLI drives the lab as a user does, through the
// meshctl binary: lab up (2 nodes), lab status -o json, lab env (its
// KUBECONFIG reaches the API server), lab exec (the demo policy: an allowed
// and a denied connection by Service name, and the command's exit code),
// lab down; then checks that nothing of the lab is left on the host.
func TestPrivilegedMeshctlLabCLI(t *testing.T) {
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("skipped under -short: a 2-node Kubernetes cluster")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute)
	defer cancel()
	c := newLabCLI(t, ctx, cliLabPrefix)
	before := snapshotHost(t, c.prefix)

	out, took := c.up(2)
	t.Logf("meshctl lab up --nodes 2 in %s:\n%s", took.Round(100*time.Millisecond), out)
	for _, want := range []string{"Lab " + c.prefix + " is up", "eval $(meshctl lab env --dir " + c.dir + ")", "meshctl lab down --dir " + c.dir} {
		if !strings.Contains(out, want) {
			t.Errorf("lab up's output lacks %q", want)
		}
	}
	if _, stderr, code := c.run(30*time.Second, "lab", "up", "--dir", c.dir, "--prefix", c.prefix, "--image", c.image); code != 1 || !strings.Contains(stderr, "already up") {
		t.Errorf("second lab up: exit %d, %q; want 1, already up", code, stderr)
	}

	st, code := c.status()
	if code != 0 || !st.Running || st.Lab == nil || st.Lab.Prefix != c.prefix {
		t.Fatalf("lab status: exit %d, %+v; want 0, running, prefix %s", code, st, c.prefix)
	}
	var ready []string
	for _, n := range st.Nodes {
		if n.Ready {
			ready = append(ready, n.Name)
		}
	}
	if slices.Sort(ready); !slices.Equal(ready, []string{cluster.NodeName(1), cluster.NodeName(2)}) {
		t.Errorf("lab status: ready nodes %v of %+v; want %s and %s", ready, st.Nodes, cluster.NodeName(1), cluster.NodeName(2))
	}
	for _, app := range cluster.DemoApps(2) {
		found := false
		for _, p := range st.Pods {
			if p.Namespace == app.Namespace && strings.HasPrefix(p.Name, app.Name+"-") {
				found = true
				if p.Phase != "Running" || !p.Ready || p.Node != app.Node {
					t.Errorf("lab status: demo pod %s/%s: %s, ready %v on %s; want Running, ready, on %s", p.Namespace, p.Name, p.Phase, p.Ready, p.Node, app.Node)
				}
			}
		}
		if !found {
			t.Errorf("lab status: no pod of %s/%s in %+v", app.Namespace, app.Name, st.Pods)
		}
	}

	// lab env: its export, evaluated, points a client at the lab.
	out, stderr, code := c.run(30*time.Second, "lab", "env", "--dir", c.dir)
	kubeconfig, ok := strings.CutPrefix(strings.TrimSpace(out), "export KUBECONFIG=")
	kubeconfig, ok2 := strings.CutSuffix(kubeconfig, ";")
	if code != 0 || !ok || !ok2 {
		t.Fatalf("lab env: exit %d, %q %q; want export KUBECONFIG=…;", code, out, stderr)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatalf("lab env's KUBECONFIG: %v", err)
	}
	nodes, err := kubernetes.NewForConfigOrDie(cfg).CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil || len(nodes.Items) != 2 {
		t.Errorf("list nodes with lab env's KUBECONFIG: %v, %d nodes; want 2", err, len(nodes.Items))
	}

	// lab exec: the demo policy, by Service name through the cluster DNS.
	for _, tc := range []struct {
		from  string
		allow bool
	}{{"demo/frontend", true}, {"other/client", false}} {
		out, stderr, code := c.run(time.Minute, "lab", "exec", "--dir", c.dir, tc.from, "--", "/client", "connect", "-timeout", "1500ms", "backend.demo:80")
		if want := map[bool]int{true: 0, false: 1}[tc.allow]; code != want {
			t.Errorf("lab exec %s -- /client connect backend.demo:80: exit %d (%s%s); want allowed=%v (the client exits 1 when the connection fails)", tc.from, code, out, stderr, tc.allow)
		}
	}
	// lab exec exits with the command's exit code: the client's usage
	// error is 2, and its message comes through on stderr.
	if _, stderr, code := c.run(time.Minute, "lab", "exec", "--dir", c.dir, "demo/frontend", "--", "/client", "no-such-command"); code != 2 || !strings.Contains(stderr, "usage: client") {
		t.Errorf("lab exec demo/frontend -- /client no-such-command: exit %d, %q; want the client's exit 2 and its usage", code, stderr)
	}

	procs := labProcesses(t, c.prefix, st.Lab.Supervisor)
	out, stderr, code = c.run(4*time.Minute, "lab", "down", "--dir", c.dir)
	if code != 0 {
		t.Fatalf("lab down: exit %d\n%s%s", code, out, stderr)
	}
	t.Logf("meshctl lab down: %s", strings.TrimSpace(out))
	assertLabGone(t, c.prefix, before, procs)
	if st, code := c.status(); code != 1 || st.Running {
		t.Errorf("lab status after down: exit %d, running %v; want 1, not running", code, st.Running)
	}
}

// TestPrivilegedMeshctlLabDownAfterCrash: when the supervisor is killed
// (SIGKILL, so it stops nothing), the cluster's processes outlive it; lab
// status says so, and lab down still removes everything.
func TestPrivilegedMeshctlLabDownAfterCrash(t *testing.T) {
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("skipped under -short: a 2-node Kubernetes cluster")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute)
	defer cancel()
	c := newLabCLI(t, ctx, crashLabPrefix)
	before := snapshotHost(t, c.prefix)

	_, took := c.up(2)
	t.Logf("meshctl lab up --nodes 2 in %s", took.Round(100*time.Millisecond))
	st, code := c.status()
	if code != 0 || !st.Running || st.Lab == nil || st.Lab.Supervisor <= 0 {
		t.Fatalf("lab status: exit %d, %+v; want 0, running, a supervisor pid", code, st)
	}
	sup := st.Lab.Supervisor
	procs := labProcesses(t, c.prefix, sup)
	if len(procs) < 10 {
		t.Fatalf("the lab's processes: %v; want the supervisor, control plane and both nodes' (at least 10)", procs)
	}
	if err := syscall.Kill(sup, syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 the supervisor %d: %v", sup, err)
	}
	testenv.Eventually(t, 10*time.Second, 100*time.Millisecond, func() error {
		if running(sup) {
			return fmt.Errorf("supervisor %d still runs", sup)
		}
		return nil
	})
	var alive []int
	for _, pid := range procs {
		if pid != sup && running(pid) {
			alive = append(alive, pid)
		}
	}
	if len(alive) == 0 {
		t.Errorf("no process of the lab outlived its supervisor: the crash test tests nothing")
	}
	if st, code := c.status(); code != 1 || st.Running || !strings.Contains(st.Phase, "is gone") {
		t.Errorf("lab status after the crash: exit %d, running %v, phase %q; want 1, not running, supervisor gone", code, st.Running, st.Phase)
	}
	if _, stderr, code := c.run(30*time.Second, "lab", "up", "--dir", c.dir, "--prefix", c.prefix, "--image", c.image); code != 1 || !strings.Contains(stderr, "lab down first") {
		t.Errorf("lab up over the crashed lab: exit %d, %q; want 1, run lab down first", code, stderr)
	}

	out, stderr, code := c.run(4*time.Minute, "lab", "down", "--dir", c.dir)
	if code != 0 {
		t.Fatalf("lab down after the crash: exit %d\n%s%s", code, out, stderr)
	}
	t.Logf("meshctl lab down after kill -9 of the supervisor: %s", strings.TrimSpace(out))
	assertLabGone(t, c.prefix, before, procs)
}

// labProcesses lists the lab's processes: its supervisor and every
// process running in its cgroup veil-<prefix> (control plane, nodes,
// containers).
func labProcesses(t *testing.T, prefix string, supervisor int) []int {
	t.Helper()
	pids := []int{supervisor}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == supervisor || !running(pid) {
			continue // zombies have ended, their parents not yet reaped them
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup"))
		if err != nil {
			continue // ended meanwhile
		}
		for _, line := range strings.Split(string(b), "\n") {
			// hierarchy-ID:controllers:path
			if f := strings.SplitN(line, ":", 3); len(f) == 3 && (f[2] == "/veil-"+prefix || strings.HasPrefix(f[2], "/veil-"+prefix+"/")) {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// assertLabGone checks that procs ended and that the host is as before.
func assertLabGone(t *testing.T, prefix string, before map[string]string, procs []int) {
	t.Helper()
	testenv.Eventually(t, 10*time.Second, 100*time.Millisecond, func() error {
		for _, pid := range procs {
			if running(pid) {
				return fmt.Errorf("process %d (%s) of the lab still runs", pid, comm(pid))
			}
		}
		return nil
	})
	if left := labProcesses(t, prefix, 0); len(left) > 1 {
		t.Errorf("processes in the lab's cgroup after lab down: %v", left[1:])
	}
	after := snapshotHost(t, prefix)
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range before {
			if !yield(k) {
				return
			}
		}
	}) {
		if before[k] != after[k] {
			t.Errorf("host %s changed by lab up/down:\nbefore:\n%s\nafter:\n%s", k, before[k], after[k])
		}
	}
}

// tailFile is the last n bytes of a file, for a failed test's output.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(read %s: %v)", path, err)
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
