package conformance

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/tests/testenv"
)

// prefix names the tests' cluster; a crashed run's leftovers are removed
// by it at the next start.
const prefix = "vconf"

// modes are the lab set-ups the suites run in, by ID: kube-proxy beside
// Veil (nftables mode), and no kube-proxy at all (Veil's Service
// translation replacing it), each with strict WireGuard; the last adds
// node-to-node encryption. `make conformance` runs the first two.
var modes = []Mode{
	{ID: "nftables", Name: "kube-proxy nftables, Veil strict WireGuard", KubeProxy: cluster.KubeProxyNFTables, Values: StrictValues()},
	{ID: "none", Name: "no kube-proxy, Veil strict WireGuard", KubeProxy: cluster.KubeProxyNone, Values: StrictValues()},
	{ID: "iptables", Name: "kube-proxy iptables, Veil strict WireGuard", KubeProxy: cluster.KubeProxyIPTables, Values: StrictValues()},
	{ID: "nftables-n2n", Name: "kube-proxy nftables, Veil strict WireGuard + node-to-node", KubeProxy: cluster.KubeProxyNFTables, Values: StrictNodeToNodeValues()},
}

// defaultModes are the modes run when VEIL_CONFORMANCE_MODES is unset.
var defaultModes = []string{"nftables", "none"}

// selectedModes are the modes VEIL_CONFORMANCE_MODES names (IDs, comma
// separated), or defaultModes.
func selectedModes(t *testing.T) []Mode {
	ids := defaultModes
	if env := os.Getenv("VEIL_CONFORMANCE_MODES"); env != "" {
		ids = strings.Split(env, ",")
	}
	var out []Mode
	for _, id := range ids {
		i := slices.IndexFunc(modes, func(m Mode) bool { return m.ID == strings.TrimSpace(id) })
		if i < 0 {
			known := make([]string, len(modes))
			for j, m := range modes {
				known[j] = m.ID
			}
			t.Fatalf("VEIL_CONFORMANCE_MODES: no mode %q (modes: %s)", id, strings.Join(known, ", "))
		}
		out = append(out, modes[i])
	}
	return out
}

// TestPrivilegedConformance is `make conformance`: the [sig-network]
// [Conformance] tests and the NetworkPolicy subset, on a 2-node lab with
// Veil installed (strict encryption), in every mode. VEIL_CONFORMANCE
// picks the suites (all, conformance, netpol: one lab, one run each),
// VEIL_CONFORMANCE_MODES the modes; VEIL_CONFORMANCE_FOCUS runs instead the
// upstream tests its ginkgo regexp selects (one test while debugging).
// Results go to VEIL_CONFORMANCE_OUT (default bin/conformance), one dir per
// suite and mode, and results.md sums up every run there. Any failed test
// fails this test. VEIL_CONFORMANCE_TIMEOUT lowers each suite's bound.
//
// VEIL_CONFORMANCE_PARALLEL=1 runs every mode's lab at once (each with its
// own prefix), and every suite of a lab at once: one e2e.test per suite,
// each in its own namespaces. The tests mostly wait, so the whole set fits
// in one bounded hold of the machine rather than modes × suites × 25 min.
func TestPrivilegedConformance(t *testing.T) {
	testenv.RequirePrivileged(t)
	which := os.Getenv("VEIL_CONFORMANCE")
	if which == "" {
		t.Skip("VEIL_CONFORMANCE unset: `make conformance` runs the upstream e2e suites (about an hour)")
	}
	suites := map[string][]SuiteSpec{
		"all":         {ConformanceSuite, NetpolSuite},
		"conformance": {ConformanceSuite},
		"netpol":      {NetpolSuite},
		"netpol-all":  {NetpolAllSuite},
	}[which]
	if suites == nil {
		t.Fatalf("VEIL_CONFORMANCE=%q: want all, conformance, netpol or netpol-all", which)
	}
	if focus := os.Getenv("VEIL_CONFORMANCE_FOCUS"); focus != "" {
		suites = []SuiteSpec{{ID: "focus", Name: "focus " + focus, Focus: focus, Timeout: 25 * time.Minute}}
	}
	if env := os.Getenv("VEIL_CONFORMANCE_TIMEOUT"); env != "" {
		// A shorter bound per suite, to fit a shared machine's slot; what
		// it cuts is reported as not reached.
		d, err := time.ParseDuration(env)
		if err != nil || d <= 0 {
			t.Fatalf("VEIL_CONFORMANCE_TIMEOUT=%q: want a positive duration such as 15m", env)
		}
		suites = slices.Clone(suites)
		for i := range suites {
			suites[i].Timeout = min(suites[i].Timeout, d)
		}
	}
	out := outDir(t)
	parallel := os.Getenv("VEIL_CONFORMANCE_PARALLEL") == "1"
	agentImage := buildAgentImage(t, t.TempDir())
	t.Run("modes", func(t *testing.T) {
		for i, mode := range selectedModes(t) {
			t.Run(mode.ID, func(t *testing.T) {
				if parallel {
					t.Parallel()
				}
				runSuites(t, fmt.Sprintf("%s%d", prefix, i), agentImage, mode, suites, out, parallel)
			})
		}
	})
	writeResults(t, out)
}

// TestPrivilegedConformanceSlice runs CI's slice of the upstream e2e tests
// (SliceSuite) on a 2-node lab with Veil (strict encryption) and fails
// unless every one of them ran and passed.
func TestPrivilegedConformanceSlice(t *testing.T) {
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("skipped under -short: a 2-node Kubernetes cluster and upstream e2e tests")
	}
	results := runSuites(t, prefix, buildAgentImage(t, t.TempDir()), modes[0], []SuiteSpec{SliceSuite}, outDir(t), false)
	writeResults(t, outDir(t))
	if len(results) != 1 {
		t.Fatalf("slice: %d results; want 1", len(results))
	}
	if ran := len(results[0].Specs); ran != SliceSuite.Specs {
		names := make([]string, 0, ran)
		for _, s := range results[0].Specs {
			names = append(names, s.Name)
		}
		t.Errorf("slice: %d specs ran; want %d (did an upstream test change its name?): %s", ran, SliceSuite.Specs, strings.Join(names, "; "))
	}
}

func outDir(t *testing.T) string {
	if dir := os.Getenv("VEIL_CONFORMANCE_OUT"); dir != "" {
		return dir
	}
	root, err := controlplane.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, "bin", "conformance")
}

// runSuites starts a lab named labPrefix in mode, runs suites on it (one
// after the other, or all at once when parallel) and saves each one's
// results under out.
func runSuites(t *testing.T, labPrefix, agentImage string, mode Mode, suites []SuiteSpec, out string, parallel bool) []Suite {
	var budget time.Duration
	for _, s := range suites {
		budget += s.Timeout + 2*time.Minute
	}
	// Lab start-up, and a cold build of e2e.test when CI had none cached.
	ctx, cancel := context.WithTimeout(context.Background(), budget+25*time.Minute)
	defer cancel()

	if err := cluster.Cleanup(labPrefix, ""); err != nil {
		t.Fatalf("remove leftovers of an earlier run: %v", err)
	}
	work := t.TempDir()
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	lab, err := StartLab(ctx, LabOptions{Prefix: labPrefix, Nodes: 2, AgentImage: agentImage, Mode: mode, WorkDir: work, Logger: log})
	if err != nil {
		t.Fatalf("start the lab: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for name, tail := range lab.Cluster.LogTails(2000) {
				if strings.Contains(name, "veil") || strings.Contains(name, "kubelet") {
					t.Logf("--- last lines of %s:\n%s", name, tail)
				}
			}
		}
		if err := lab.Cluster.Stop(); err != nil {
			t.Errorf("stop the lab: %v", err)
		}
	})
	t.Logf("lab up in %s (mode %s); images without a stand-in: %d", lab.Startup.Round(time.Second), mode.Name, len(lab.Unsupported))

	results := make([]Suite, len(suites))
	var wg sync.WaitGroup
	for i, spec := range suites {
		run := func() { results[i] = runSuite(t, ctx, lab, mode, spec, out) }
		if parallel {
			wg.Go(run)
		} else {
			run()
		}
	}
	wg.Wait()
	return results
}

// runSuite runs one suite on lab and saves its results under out.
func runSuite(t *testing.T, ctx context.Context, lab *Lab, mode Mode, spec SuiteSpec, out string) Suite {
	dir := filepath.Join(out, spec.ID, mode.ID)
	if err := os.RemoveAll(dir); err != nil {
		t.Error(err)
		return Suite{Name: spec.Name, Mode: mode.Name, Err: err.Error()}
	}
	began := time.Now()
	specs, planned, runErr := lab.Run(spec.Focus, SkipRegexp(spec.Skips), spec.Timeout, dir).Execute(ctx)
	res := Suite{Name: spec.Name, Mode: mode.Name, Specs: specs, RunTime: time.Since(began), Skips: spec.Skips, Planned: planned}
	if runErr != nil {
		res.Err = runErr.Error()
		t.Errorf("%s: %v", spec.Name, runErr)
	}
	if err := SaveSuite(dir, res); err != nil {
		t.Error(err)
	}
	p, f, s := res.Counts()
	t.Logf("%s, %s: %d passed, %d failed, %d skipped, %d not reached in %s (log: %s)", spec.Name, mode.Name, p, f, s,
		max(0, planned-len(specs)), res.RunTime.Round(time.Second), filepath.Join(dir, "e2e.log"))
	if runErr == nil && spec.Specs > 0 && planned != spec.Specs {
		t.Errorf("%s: the focus selected %d specs; want %d (did an upstream test change its name?)", spec.Name, planned, spec.Specs)
	}
	if planned > len(specs) {
		t.Errorf("%s: %d of %d specs not reached in %s", spec.Name, planned-len(specs), planned, spec.Timeout)
	}
	for _, sp := range specs {
		if sp.Failed() {
			t.Errorf("%s FAILED (%s): %s", sp.Name, sp.Location, sp.Message)
		}
	}
	return res
}

func writeResults(t *testing.T, out string) {
	all, err := LoadSuites(out)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := WriteMarkdown(&b, all); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(out, "results.md"), b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func buildAgentImage(t *testing.T, dir string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	root, err := controlplane.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, "make", "--no-print-directory", "-C", root, "image", "BIN="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make image: %v\n%s", err, out)
	}
	return filepath.Join(dir, "veil-image.tar")
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
