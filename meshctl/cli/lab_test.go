package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/veilmesh/veil/lab"
)

// fakeLabDeps never touches the host: exec and cgroup joins are recorded.
type fakeLabDeps struct {
	env      map[string]string
	euid     int
	netnsDir string
	cgroups  string
	joined   string
	execed   []string
}

func newFakeLabDeps(t *testing.T) *fakeLabDeps {
	return &fakeLabDeps{env: map[string]string{}, netnsDir: t.TempDir(), cgroups: t.TempDir()}
}

func (f *fakeLabDeps) deps() labDeps {
	return labDeps{
		getenv:      func(k string) string { return f.env[k] },
		geteuid:     func() int { return f.euid },
		executable:  func() (string, error) { return "", errors.New("no executable in tests") },
		cgroupMount: func() (string, error) { return f.cgroups, nil },
		netnsDir:    f.netnsDir,
		joinCgroup:  func(path string) error { f.joined = path; return nil },
		execve: func(path string, argv, env []string) error {
			f.execed = argv
			return nil
		},
	}
}

// runLab runs `meshctl lab …` in-process with fake dependencies.
func runLab(t *testing.T, f *fakeLabDeps, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	root := &cobra.Command{Use: "meshctl", SilenceErrors: true, SilenceUsage: true}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return &exitError{code: ExitUsage, err: err, showUsage: true}
	})
	root.SetOut(&out)
	root.SetErr(&errb)
	root.AddCommand(newLabCommandWith(f.deps()))
	code = execute(context.Background(), root, append([]string{"lab"}, args...), Streams{Out: &out, Err: &errb})
	return out.String(), errb.String(), code
}

func testLabState(dir string) lab.State {
	return lab.State{
		Prefix:     "veil-lab",
		Kubeconfig: filepath.Join(dir, "veil-controlplane-1", "kubeconfig"),
		Nodes: []lab.NodeState{
			{Name: "node-1", Netns: "veil-lab-node-1", Underlay: "eth0", IP: "10.99.0.11", PodCIDR: "10.244.1.0/24", AgentPID: 101, Socket: filepath.Join(dir, "node-1", "agent.sock")},
			{Name: "node-2", Netns: "veil-lab-node-2", Underlay: "eth0", IP: "10.99.0.12", PodCIDR: "10.244.2.0/24", AgentPID: 102, Socket: filepath.Join(dir, "node-2", "agent.sock")},
		},
		Pods: []lab.PodState{
			{Pod: "demo/backend", Node: "node-2", IP: "10.244.2.2", Netns: "veil-lab-p-demo-backend"},
			{Pod: "demo/frontend", Node: "node-1", IP: "10.244.1.2", Netns: "veil-lab-p-demo-frontend"},
		},
	}
}

func writeJSON(t *testing.T, path string, v any) {
	t.Helper()
	raw, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
}

// writeCrashedLab leaves in dir what a lab whose supervisor died leaves: a
// record naming a process that is not a supervisor (this test), and state.
func writeCrashedLab(t *testing.T, dir string) {
	t.Helper()
	writeJSON(t, filepath.Join(dir, lab.SupervisorFile), lab.SupervisorState{
		Process: lab.Process{PID: os.Getpid(), Name: "supervisor"}, Prefix: "veil-lab", Dir: dir, Phase: lab.PhaseReady,
	})
	writeJSON(t, filepath.Join(dir, lab.StateFile), testLabState(dir))
}

func TestLabArguments(t *testing.T) {
	for _, tc := range []struct {
		name string
		euid int
		args []string
		code int
		want string
	}{
		{"up too few nodes", 0, []string{"up", "--nodes", "0"}, ExitUsage, "--nodes 0: want 1 to 32"},
		{"up too many nodes", 0, []string{"up", "--nodes", "33"}, ExitUsage, "--nodes 33"},
		{"up short prefix", 0, []string{"up", "--prefix", "lab"}, ExitUsage, `--prefix "lab"`},
		{"up prefix with capitals", 0, []string{"up", "--prefix", "Veil-Lab-1"}, ExitUsage, "--prefix"},
		{"up prefix ending in dash", 0, []string{"up", "--prefix", "veil-lab-"}, ExitUsage, "--prefix"},
		{"up wait", 0, []string{"up", "--wait", "0s"}, ExitUsage, "--wait must be positive"},
		{"up bad flag", 0, []string{"up", "--node-count", "2"}, ExitUsage, "unknown flag"},
		{"up not root", 1000, []string{"up"}, ExitUsage, "lab up needs root"},
		{"down not root", 1000, []string{"down"}, ExitUsage, "lab down needs root"},
		{"down bad prefix", 0, []string{"down", "--prefix", "x"}, ExitUsage, `--prefix "x"`},
		{"exec not root", 1000, []string{"exec", "demo/frontend", "--", "true"}, ExitUsage, "lab exec needs root"},
		{"exec no command", 0, []string{"exec", "demo/frontend", "--"}, ExitUsage, "no command"},
		{"exec one argument", 0, []string{"exec", "demo/frontend"}, ExitUsage, "requires at least 2 arg(s)"},
		{"exec not a pod", 0, []string{"exec", "frontend", "--", "true"}, ExitUsage, `pod "frontend": want NAMESPACE/NAME`},
		{"status bad output", 0, []string{"status", "-o", "xml"}, ExitUsage, "invalid output format"},
		{"env with argument", 0, []string{"env", "node-1"}, ExitUsage, "unknown command"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeLabDeps(t)
			f.euid = tc.euid
			f.env[envLabDir] = t.TempDir()
			_, stderr, code := runLab(t, f, tc.args...)
			if code != tc.code || !strings.Contains(stderr, tc.want) {
				t.Errorf("lab %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), code, stderr, tc.code, tc.want)
			}
		})
	}
}

func TestLabUpRefusesOverALab(t *testing.T) {
	t.Run("crashed lab in dir", func(t *testing.T) {
		f := newFakeLabDeps(t)
		dir := t.TempDir()
		writeCrashedLab(t, dir)
		_, stderr, code := runLab(t, f, "up", "--dir", dir)
		if code != ExitFailure || !strings.Contains(stderr, "did not shut down cleanly") || !strings.Contains(stderr, "meshctl lab down") {
			t.Errorf("exit %d, stderr %q; want 1 and a pointer to lab down", code, stderr)
		}
	})
	t.Run("prefix in use", func(t *testing.T) {
		f := newFakeLabDeps(t)
		if err := os.WriteFile(filepath.Join(f.netnsDir, "veil-lab-b-ul"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		_, stderr, code := runLab(t, f, "up", "--dir", t.TempDir(), "--prefix", "veil-lab-b")
		if code != ExitFailure || !strings.Contains(stderr, "prefix veil-lab-b is in use") {
			t.Errorf("exit %d, stderr %q; want 1 and prefix in use", code, stderr)
		}
	})
	t.Run("prefix overlaps", func(t *testing.T) {
		f := newFakeLabDeps(t)
		if err := os.WriteFile(filepath.Join(f.netnsDir, "veil-lab-b-ul"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{"veil-lab", "veil-lab-b-2"} {
			_, stderr, code := runLab(t, f, "up", "--dir", t.TempDir(), "--prefix", p)
			if code != ExitFailure || !strings.Contains(stderr, "overlaps the prefix veil-lab-b") {
				t.Errorf("--prefix %s: exit %d, stderr %q; want 1 and overlap", p, code, stderr)
			}
		}
	})
}

func TestLabStatus(t *testing.T) {
	t.Run("no lab", func(t *testing.T) {
		f := newFakeLabDeps(t)
		dir := t.TempDir()
		out, _, code := runLab(t, f, "status", "--dir", dir)
		if code != ExitFailure || out != "No lab in "+dir+".\n" {
			t.Errorf("exit %d, output %q; want 1, no lab", code, out)
		}
		out, _, code = runLab(t, f, "status", "--dir", dir, "-o", "json")
		var s labStatus
		if err := json.Unmarshal([]byte(out), &s); err != nil || code != ExitFailure || s.Running || s.Dir != dir || s.Nodes == nil || s.Pods == nil {
			t.Errorf("exit %d, json %s (%v); want 1, running false, empty lists", code, out, err)
		}
	})
	t.Run("crashed lab", func(t *testing.T) {
		f := newFakeLabDeps(t)
		dir := t.TempDir()
		writeCrashedLab(t, dir)
		out, _, code := runLab(t, f, "status", "--dir", dir)
		for _, want := range []string{"Lab veil-lab in " + dir + ": not running: supervisor (pid", "meshctl lab down cleans up", "node-2  veil-lab-node-2  eth0 10.99.0.12", "demo/frontend  node-1  10.244.1.2  veil-lab-p-demo-frontend"} {
			if !strings.Contains(out, want) {
				t.Errorf("status lacks %q:\n%s", want, out)
			}
		}
		if code != ExitFailure {
			t.Errorf("exit %d; want 1 (not running)", code)
		}
		out, _, _ = runLab(t, f, "status", "--dir", dir, "-o", "json")
		var raw map[string]any
		if err := json.Unmarshal([]byte(out), &raw); err != nil {
			t.Fatal(err)
		}
		for _, k := range []string{"running", "dir", "phase", "prefix", "kubeconfig", "nodes", "pods"} {
			if _, ok := raw[k]; !ok {
				t.Errorf("status -o json lacks %q: %s", k, out)
			}
		}
		var s labStatus
		if err := json.Unmarshal([]byte(out), &s); err != nil {
			t.Fatal(err)
		}
		if s.Running || s.Phase != lab.PhaseFailed || len(s.Nodes) != 2 || s.Nodes[1].AgentPID != 102 || s.Nodes[0].Underlay != "eth0" || s.Pods[0].Pod != "demo/backend" || s.Pods[0].Netns != "veil-lab-p-demo-backend" {
			t.Errorf("status -o json = %+v", s)
		}
	})
}

func TestLabDownWithoutLab(t *testing.T) {
	dir := t.TempDir()
	out, stderr, code := runLab(t, newFakeLabDeps(t), "down", "--dir", dir)
	if code != ExitOK || out != "No lab in "+dir+": nothing to do.\n" {
		t.Errorf("exit %d, out %q, stderr %q; want 0, nothing to do", code, out, stderr)
	}
}

func TestLabTables(t *testing.T) {
	st := testLabState("/lab")
	var b bytes.Buffer
	if err := writeLabTables(&b, &st, func(pid int) bool { return pid == 101 }); err != nil {
		t.Fatal(err)
	}
	want := `NODE    NETNS            UNDERLAY         POD CIDR       AGENT PID   SOCKET
node-1  veil-lab-node-1  eth0 10.99.0.11  10.244.1.0/24  101         /lab/node-1/agent.sock
node-2  veil-lab-node-2  eth0 10.99.0.12  10.244.2.0/24  102 (gone)  /lab/node-2/agent.sock

POD            NODE    IP          NETNS
demo/backend   node-2  10.244.2.2  veil-lab-p-demo-backend
demo/frontend  node-1  10.244.1.2  veil-lab-p-demo-frontend
`
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}

func TestLabSummary(t *testing.T) {
	st := testLabState("/lab")
	r := labReading{dir: "/lab", sup: &lab.SupervisorState{Process: lab.Process{PID: 42}}, state: &st}
	var b bytes.Buffer
	if err := writeLabSummary(&b, r, " --dir /lab"); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"Lab veil-lab is up (supervisor pid 42). Kubeconfig: /lab/veil-controlplane-1/kubeconfig",
		"NetworkPolicy demo/backend-allow-frontend",
		"eval $(meshctl lab env --dir /lab)",
		"meshctl --node node-1 status",
		"meshctl policy trace --from demo/frontend --to demo/backend --port 80",
		"meshctl lab exec --dir /lab demo/frontend -- socat -T1 - TCP:10.244.2.2:80",
		"meshctl observe --node node-2 --verdict DENIED",
		"meshctl audit encryption --active",
		"meshctl lab down --dir /lab",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("summary lacks %q:\n%s", want, b.String())
		}
	}
}

func TestLabEnv(t *testing.T) {
	st := testLabState("/var/lib/my lab")
	var b bytes.Buffer
	if err := writeLabEnv(&b, "/var/lib/my lab", &st); err != nil {
		t.Fatal(err)
	}
	want := `export KUBECONFIG='/var/lib/my lab/veil-controlplane-1/kubeconfig';
export VEIL_LAB_STATE='/var/lib/my lab/lab-state.json';
export VEIL_SOCKET='/var/lib/my lab/node-1/agent.sock';
`
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
	st.Nodes = nil
	if err := writeLabEnv(&b, "/lab", &st); err == nil {
		t.Error("env of a lab without nodes: no error")
	}

	f := newFakeLabDeps(t)
	dir := t.TempDir()
	writeCrashedLab(t, dir)
	out, stderr, code := runLab(t, f, "env", "--dir", dir)
	if code != ExitFailure || out != "" || !strings.Contains(stderr, "is not running") {
		t.Errorf("env of a crashed lab: exit %d, out %q, stderr %q; want 1, nothing, not running", code, out, stderr)
	}
}

func TestLabExec(t *testing.T) {
	f := newFakeLabDeps(t)
	st := testLabState("/lab")
	r := labReading{dir: "/lab", state: &st}
	if err := os.WriteFile(filepath.Join(f.netnsDir, "veil-lab-p-demo-frontend"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cg := filepath.Join(f.cgroups, "veil-lab", "node-1")
	if err := os.MkdirAll(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := labExec(f.deps(), r, "demo/frontend", []string{"curl", "-s", "http://10.244.2.2/"}); err != nil {
		t.Fatal(err)
	}
	want := []string{"nsenter", "--net=" + filepath.Join(f.netnsDir, "veil-lab-p-demo-frontend"), "--", "curl", "-s", "http://10.244.2.2/"}
	if !slices.Equal(f.execed, want) || f.joined != cg {
		t.Errorf("exec %q in cgroup %q; want %q in %q", f.execed, f.joined, want, cg)
	}

	err := labExec(f.deps(), r, "demo/nope", []string{"true"})
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != ExitUsage || !strings.Contains(err.Error(), "pods: demo/backend, demo/frontend") {
		t.Errorf("unknown pod: %v; want a usage error listing the pods", err)
	}
	// demo/backend's node has no cgroup here: refused before anything runs.
	f.execed, f.joined = nil, ""
	os.WriteFile(filepath.Join(f.netnsDir, "veil-lab-p-demo-backend"), nil, 0o600)
	if err := labExec(f.deps(), r, "demo/backend", []string{"true"}); err == nil || f.execed != nil || f.joined != "" {
		t.Errorf("pod without node cgroup: err %v, exec %q, joined %q; want an error and nothing run", err, f.execed, f.joined)
	}
}

func TestParseLabExecArgs(t *testing.T) {
	for _, tc := range []struct {
		args []string
		argv []string
		ok   bool
	}{
		{[]string{"x/a", "--", "curl", "-s"}, []string{"curl", "-s"}, true},
		{[]string{"x/a", "curl", "--", "-s"}, []string{"curl", "--", "-s"}, true},
		{[]string{"x/a", "--"}, nil, false},
		{[]string{"x/a/b", "--", "true"}, nil, false},
		{[]string{"/a", "--", "true"}, nil, false},
		{nil, nil, false},
	} {
		_, _, argv, err := parseLabExecArgs(tc.args)
		if (err == nil) != tc.ok || !slices.Equal(argv, tc.argv) {
			t.Errorf("parseLabExecArgs(%q) = %q, %v; want %q, ok=%v", tc.args, argv, err, tc.argv, tc.ok)
		}
	}
}

func TestLabDir(t *testing.T) {
	f := newFakeLabDeps(t)
	o := &labOptions{deps: f.deps()}
	if d, _ := o.labDir(); d != defaultLabDir || o.dirFlag(d) != "" {
		t.Errorf("default dir %q (flag %q); want %s and no flag", d, o.dirFlag(d), defaultLabDir)
	}
	f.env[envLabDir] = "/srv/lab"
	if d, _ := o.labDir(); d != "/srv/lab" || o.dirFlag(d) != "" {
		t.Errorf("$%s dir %q (flag %q); want /srv/lab and no flag", envLabDir, d, o.dirFlag(d))
	}
	o.dir = "/tmp/my lab"
	if d, _ := o.labDir(); d != "/tmp/my lab" || o.dirFlag(d) != ` --dir '/tmp/my lab'` {
		t.Errorf("--dir %q (flag %q)", d, o.dirFlag(d))
	}
}

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"/var/lib/veil-lab": "/var/lib/veil-lab",
		"":                  "''",
		"a b":               "'a b'",
		"it's":              `'it'\''s'`,
		"$HOME":             "'$HOME'",
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s; want %s", in, got, want)
		}
	}
}

func TestLabHelp(t *testing.T) {
	out, _, code := runLab(t, newFakeLabDeps(t), "--help")
	if code != ExitOK || !strings.Contains(out, "Exit codes:") || strings.Contains(out, "supervise") {
		t.Errorf("lab --help: exit %d, want exit codes and no hidden supervise:\n%s", code, out)
	}
	out, _, _ = runLab(t, newFakeLabDeps(t), "exec", "--help")
	if !strings.Contains(out, "come from this host") && !strings.Contains(out, "program of this host") {
		t.Errorf("lab exec --help does not say CMD comes from the host:\n%s", out)
	}
}
