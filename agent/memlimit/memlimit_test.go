package memlimit

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
)

func write(t *testing.T, root, rel, content string) {
	t.Helper()
	p := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func noEnv(string) (string, bool) { return "", false }

func TestDecideFromTheContainersCgroup(t *testing.T) {
	const gib = 1 << 30
	for _, tc := range []struct {
		name, cgroup string
		files        map[string]string
		ratio        float64
		env          map[string]string
		want         int64
		reason       string
	}{
		{name: "v2 in a cgroup namespace", cgroup: "0::/\n", files: map[string]string{"memory.max": "1073741824\n"}, ratio: 0.9, want: gib * 9 / 10},
		{name: "v2 own cgroup", cgroup: "0::/kubepods/pod1/c1\n", files: map[string]string{"kubepods/pod1/c1/memory.max": "536870912", "memory.max": "max"}, ratio: 0.5, want: gib / 4},
		{name: "v2 no limit", cgroup: "0::/\n", files: map[string]string{"memory.max": "max\n"}, ratio: 0.9, reason: "no memory limit"},
		{name: "v1 hybrid", cgroup: "4:memory:/x/y\n1:cpu:/\n0::/\n", files: map[string]string{"memory/x/y/memory.limit_in_bytes": "2147483648", "memory.max": "max"}, ratio: 0.9, want: 2 * gib * 9 / 10},
		{name: "v1 unlimited", cgroup: "4:memory,foo:/\n", files: map[string]string{"memory/memory.limit_in_bytes": "9223372036854771712"}, ratio: 0.9, reason: "no memory limit"},
		{name: "GOMEMLIMIT wins", cgroup: "0::/\n", files: map[string]string{"memory.max": "1073741824"}, ratio: 0.9, env: map[string]string{"GOMEMLIMIT": "300MiB"}, reason: "GOMEMLIMIT=300MiB"},
		{name: "off", cgroup: "0::/\n", files: map[string]string{"memory.max": "1073741824"}, ratio: 0, reason: "turned off"},
		{name: "no cgroup files", cgroup: "0::/\n", ratio: 0.9, reason: "no memory limit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			for rel, c := range tc.files {
				write(t, root, rel, c)
			}
			env := func(k string) (string, bool) { v, ok := tc.env[k]; return v, ok }
			st, err := Decide(tc.ratio, env, root, tc.cgroup)
			if err != nil {
				t.Fatal(err)
			}
			if st.Limit != tc.want {
				t.Errorf("limit %d; want %d", st.Limit, tc.want)
			}
			if tc.reason != "" && !strings.Contains(st.Reason, tc.reason) {
				t.Errorf("reason %q; want it to say %q", st.Reason, tc.reason)
			}
		})
	}
}

func TestDecideRejectsBadInput(t *testing.T) {
	root := t.TempDir()
	write(t, root, "memory.max", "lots")
	if _, err := Decide(0.9, noEnv, root, "0::/\n"); err == nil || !strings.Contains(err.Error(), "not a number") {
		t.Errorf("malformed memory.max: %v", err)
	}
	for _, r := range []float64{-0.1, 1.5} {
		if _, err := Decide(r, noEnv, root, "0::/\n"); err == nil {
			t.Errorf("ratio %g accepted", r)
		}
	}
}

// On this machine's real cgroup filesystem: Apply reads the process's own
// cgroup, and sets the runtime's limit exactly when it decided one.
func TestApplyOnTheRealCgroup(t *testing.T) {
	before := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(before) })
	st, err := Apply(DefaultRatio)
	if err != nil {
		t.Fatal(err)
	}
	now := debug.SetMemoryLimit(-1)
	if st.Limit > 0 && now != st.Limit {
		t.Errorf("decided %d but the runtime's limit is %d", st.Limit, now)
	}
	if st.Limit == 0 && now != before {
		t.Errorf("decided none (%s) but the runtime's limit changed from %d to %d", st.Reason, before, now)
	}
	t.Logf("container limit %d, soft limit %d (%s)", st.Container, st.Limit, st.Reason)
}

// StartupGC raises the collector's percent until the agent converged, then
// sets the steady percent, or puts back what was set; GOGC or 0 leave it
// alone.
func TestStartupGC(t *testing.T) {
	orig := debug.SetGCPercent(100)
	t.Cleanup(func() { debug.SetGCPercent(orig) })
	for _, tc := range []struct {
		name               string
		percent, steady    int
		env                func(string) (string, bool)
		during, afterwards int
	}{
		{"start and steady", 400, 50, noEnv, 400, 50},
		{"start, then back", 400, 0, noEnv, 400, 100},
		{"steady only", 0, 50, noEnv, 100, 50},
		{"GOGC set", 400, 50, func(k string) (string, bool) { return "70", k == "GOGC" }, 100, 100},
		{"off", 0, 0, noEnv, 100, 100},
	} {
		debug.SetGCPercent(100)
		converged := StartupGC(tc.percent, tc.steady, tc.env)
		if got := debug.SetGCPercent(tc.during); got != tc.during {
			t.Errorf("%s: during start GOGC is %d; want %d", tc.name, got, tc.during)
		}
		converged()
		if got := debug.SetGCPercent(123); got != tc.afterwards {
			t.Errorf("%s: after convergence GOGC is %d; want %d", tc.name, got, tc.afterwards)
		}
		converged() // once only
		if got := debug.SetGCPercent(100); got != 123 {
			t.Errorf("%s: a second call set GOGC to %d", tc.name, got)
		}
	}
}
