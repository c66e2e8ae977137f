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
	"time"

	"github.com/spf13/cobra"

	labcluster "github.com/veilmesh/veil/lab/cluster"
)

// fakeLabDeps never touches the host.
type fakeLabDeps struct {
	env  map[string]string
	euid int
}

func newFakeLabDeps() *fakeLabDeps { return &fakeLabDeps{env: map[string]string{}} }

func (f *fakeLabDeps) deps() labDeps {
	return labDeps{
		getenv:     func(k string) string { return f.env[k] },
		geteuid:    func() int { return f.euid },
		executable: func() (string, error) { return "", errors.New("no executable in tests") },
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

// writeLabRecord leaves in dir the record of a lab whose supervisor is
// pid (this test's process is alive but is not the recorded start time,
// so it does not count as the supervisor unless start matches).
func writeLabRecord(t *testing.T, dir string, s labcluster.LabState) {
	t.Helper()
	s.Dir = dir
	raw, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, labcluster.StateFile), raw, 0o600); err != nil {
		t.Fatal(err)
	}
}

func testLabRecord() labcluster.LabState {
	return labcluster.LabState{
		Prefix: "veillab", Kubeconfig: "/tmp/veil lab/cluster/kubeconfig", KubeProxy: labcluster.KubeProxyNFTables, StrictMode: true,
		// A PID that is this test's, with a start time that is not: a
		// supervisor that is gone.
		Supervisor: os.Getpid(), SupervisorStart: 1, Phase: labcluster.LabReady,
		Phases: []labcluster.Phase{{Name: "control plane up", Took: 3200 * time.Millisecond}, {Name: "demo running, policy enforced", Took: 2500 * time.Millisecond}},
		Total:  19 * time.Second,
		Nodes:  []labcluster.LabNodeState{{Name: "node-1", IP: "10.250.0.11", PodCIDR: "10.244.0.0/24", Netns: "veillab-node-1"}},
	}
}

func TestLabArguments(t *testing.T) {
	for _, tc := range []struct {
		name string
		euid int
		args []string
		code int
		want string
	}{
		{"up too few nodes", 0, []string{"up", "--nodes", "0"}, ExitUsage, "--nodes 0: want 1 to 16"},
		{"up too many nodes", 0, []string{"up", "--nodes", "17"}, ExitUsage, "--nodes 17"},
		{"up short prefix", 0, []string{"up", "--prefix", "ab"}, ExitUsage, `--prefix "ab"`},
		{"up prefix with a dash", 0, []string{"up", "--prefix", "veil-lab"}, ExitUsage, "3 to 12 of a-z and 0-9"},
		{"up kube-proxy", 0, []string{"up", "--kube-proxy", "ipvs"}, ExitUsage, `--kube-proxy "ipvs": want none, iptables or nftables`},
		{"up kube-proxy empty", 0, []string{"up", "--kube-proxy", ""}, ExitUsage, "--kube-proxy"},
		{"up wait", 0, []string{"up", "--wait", "0s"}, ExitUsage, "--wait must be positive"},
		{"up bad flag", 0, []string{"up", "--node-count", "2"}, ExitUsage, "unknown flag"},
		{"up not root", 1000, []string{"up"}, ExitUsage, "lab up needs root"},
		{"down not root", 1000, []string{"down"}, ExitUsage, "lab down needs root"},
		{"down bad prefix", 0, []string{"down", "--prefix", "x"}, ExitUsage, `--prefix "x"`},
		{"exec no command", 0, []string{"exec", "demo/frontend", "--"}, ExitUsage, "no command"},
		{"exec one argument", 0, []string{"exec", "demo/frontend"}, ExitUsage, "requires at least 2 arg(s)"},
		{"exec not a pod", 0, []string{"exec", "frontend", "--", "true"}, ExitUsage, `pod "frontend": want NAMESPACE/NAME`},
		{"status bad output", 0, []string{"status", "-o", "xml"}, ExitUsage, "invalid output format"},
		{"env with argument", 0, []string{"env", "node-1"}, ExitUsage, "unknown command"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeLabDeps()
			f.euid = tc.euid
			f.env[envLabDir] = t.TempDir()
			_, stderr, code := runLab(t, f, tc.args...)
			if code != tc.code || !strings.Contains(stderr, tc.want) {
				t.Errorf("lab %v: exit %d, stderr %q; want %d and %q", tc.args, code, stderr, tc.code, tc.want)
			}
		})
	}
}

func TestLabUpRefusesOverALab(t *testing.T) {
	dir := t.TempDir()
	writeLabRecord(t, dir, testLabRecord())
	f := newFakeLabDeps()
	_, stderr, code := runLab(t, f, "up", "--dir", dir)
	if code != ExitFailure || !strings.Contains(stderr, "did not shut down cleanly") || !strings.Contains(stderr, "meshctl lab down") {
		t.Errorf("up over a crashed lab: exit %d, stderr %q; want 1 and a pointer to lab down", code, stderr)
	}
}

func TestLabStatus(t *testing.T) {
	t.Run("no lab", func(t *testing.T) {
		dir := t.TempDir()
		out, _, code := runLab(t, newFakeLabDeps(), "status", "--dir", dir)
		if code != ExitFailure || !strings.Contains(out, "No lab in "+dir) {
			t.Errorf("status without a lab: exit %d, out %q; want 1 and 'No lab'", code, out)
		}
	})
	t.Run("crashed lab", func(t *testing.T) {
		dir := t.TempDir()
		writeLabRecord(t, dir, testLabRecord())
		out, _, code := runLab(t, newFakeLabDeps(), "status", "--dir", dir)
		if code != ExitFailure {
			t.Errorf("status of a crashed lab: exit %d; want 1", code)
		}
		for _, want := range []string{"Lab veillab in " + dir + ": not running: its supervisor (pid", "meshctl lab down cleans up", "control plane up", "3.2s", "total", "19s"} {
			if !strings.Contains(out, want) {
				t.Errorf("status lacks %q:\n%s", want, out)
			}
		}
		out, _, _ = runLab(t, newFakeLabDeps(), "status", "--dir", dir, "-o", "json")
		var got map[string]any
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("status -o json: %v\n%s", err, out)
		}
		for _, k := range []string{"running", "dir", "phase", "lab", "nodes", "pods"} {
			if _, ok := got[k]; !ok {
				t.Errorf("status -o json lacks %q: %s", k, out)
			}
		}
		if got["running"] != false {
			t.Errorf("status -o json of a crashed lab: running %v", got["running"])
		}
	})
	t.Run("failed lab", func(t *testing.T) {
		dir := t.TempDir()
		s := testLabRecord()
		s.Phase, s.Error = labcluster.LabFailed, "wait for cluster DNS: context deadline exceeded"
		writeLabRecord(t, dir, s)
		out, _, code := runLab(t, newFakeLabDeps(), "status", "--dir", dir)
		if code != ExitFailure || !strings.Contains(out, "not running: failed: wait for cluster DNS") {
			t.Errorf("status of a failed lab: exit %d:\n%s", code, out)
		}
	})
}

func TestLabDownWithoutLab(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "none")
	out, stderr, code := runLab(t, newFakeLabDeps(), "down", "--dir", dir)
	if code != ExitOK || !strings.Contains(out, "No lab in "+dir) {
		t.Errorf("down without a lab: exit %d, out %q, stderr %q; want 0 and 'No lab'", code, out, stderr)
	}
}

func TestLabEnv(t *testing.T) {
	s := testLabRecord()
	var b bytes.Buffer
	if err := writeLabEnv(&b, &s); err != nil {
		t.Fatal(err)
	}
	if want := "export KUBECONFIG='/tmp/veil lab/cluster/kubeconfig';\n"; b.String() != want {
		t.Errorf("got %q; want %q", b.String(), want)
	}
	s.Kubeconfig = ""
	if err := writeLabEnv(&b, &s); err == nil {
		t.Error("env of a lab without a kubeconfig: no error")
	}

	dir := t.TempDir()
	writeLabRecord(t, dir, testLabRecord())
	out, stderr, code := runLab(t, newFakeLabDeps(), "env", "--dir", dir)
	if code != ExitFailure || out != "" || !strings.Contains(stderr, "is not running") {
		t.Errorf("env of a crashed lab: exit %d, out %q, stderr %q; want 1, nothing, not running", code, out, stderr)
	}
}

func TestLabExecNeedsARunningLab(t *testing.T) {
	dir := t.TempDir()
	_, stderr, code := runLab(t, newFakeLabDeps(), "exec", "--dir", dir, "demo/frontend", "--", "/client", "connect", "backend.demo:80")
	if code != ExitFailure || !strings.Contains(stderr, "no lab in "+dir) {
		t.Errorf("exec without a lab: exit %d, stderr %q; want 1 and 'no lab'", code, stderr)
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
	f := newFakeLabDeps()
	o := &labOptions{deps: f.deps()}
	if d, _ := o.labDir(); d != defaultLabDir() || o.dirFlag(d) != "" {
		t.Errorf("default dir %q (flag %q); want %s and no flag", d, o.dirFlag(d), defaultLabDir())
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
		"/tmp/veil-lab": "/tmp/veil-lab",
		"":              "''",
		"a b":           "'a b'",
		"it's":          `'it'\''s'`,
		"$HOME":         "'$HOME'",
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s; want %s", in, got, want)
		}
	}
}

func TestLabHelp(t *testing.T) {
	out, _, code := runLab(t, newFakeLabDeps(), "--help")
	if code != ExitOK || !strings.Contains(out, "Exit codes:") || strings.Contains(out, "supervise") {
		t.Errorf("lab --help: exit %d, want exit codes and no hidden supervise:\n%s", code, out)
	}
	out, _, _ = runLab(t, newFakeLabDeps(), "exec", "--help")
	if !strings.Contains(out, "through the lab's API") {
		t.Errorf("lab exec --help does not say it goes through the API server:\n%s", out)
	}
}
