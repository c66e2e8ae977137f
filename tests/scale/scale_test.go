package scale

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/flowcontrol"

	"github.com/veilmesh/veil/api/client/clientset/versioned"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/tests/testenv"
)

// modes are measured side by side at every size: the agent before node-local
// compilation first; node-local-before is node-local as it was before the
// pod cache held PodInfo and the client spoke protobuf, node-local-json has
// PodInfo alone, node-local is the agent, node-local-gogc100 the agent
// with the collector at GOGC=100 during the start too. Flags: full-objects
// (no transforms), whole-cluster (compile every endpoint), core-pods
// (slimmed corev1.Pods in the cache), json (JSON from the API server),
// startgc=N (the collector's percent until converged, as the agent's
// --startup-gc-percent; 0 leaves GOGC; unset, the agent's default),
// container-mib=N (the agent in a container limited to N MiB: its soft
// memory limit is --memory-limit-ratio of that), steadygc=N (the
// collector's percent once converged; 0: as before the start).
// node-local-320mib is the agent in a container limited to 320 MiB,
// node-local-steady100 the agent at GOGC=100 once converged.
// node-local-resume (flag resume) is the agent restarted: a first agent
// runs until converged and stops, writing its pod cache's checkpoint;
// resumeChanges pods elsewhere change while it is away; the agent
// measured starts from that checkpoint.
// The modes that compile the whole cluster need about 100 KiB per pod,
// so they run only up to wholeClusterMax pods (VEIL_SCALE_WHOLE_MAX).
var modes = []mode{
	{Name: "baseline", Flags: "full-objects,whole-cluster,json,startgc=0"},
	{Name: "slim-informers", Flags: "whole-cluster,json,startgc=0"},
	{Name: "node-local-before", Flags: "core-pods,json,startgc=0"},
	{Name: "node-local-json", Flags: "json,startgc=0"},
	{Name: "node-local", Flags: ""},
	{Name: "node-local-gogc100", Flags: "startgc=0"},
	{Name: "node-local-320mib", Flags: "container-mib=320"},
	{Name: "node-local-steady100", Flags: "steadygc=100"},
	{Name: "node-local-resume", Flags: "resume"},
}

const defaultWholeClusterMax = 10000

// VEIL_SCALE_BASELINE_BIN names an earlier build of this benchmark (go test
// -c ./tests/scale at another commit), measured last at every size as a
// mode named VEIL_SCALE_BASELINE_NAME (default "before") with the flags
// VEIL_SCALE_BASELINE_FLAGS (default none: that build's node-local agent).
// VEIL_SCALE_MODES picks it by that name too.
const (
	baselineBinEnv   = "VEIL_SCALE_BASELINE_BIN"
	baselineNameEnv  = "VEIL_SCALE_BASELINE_NAME"
	baselineFlagsEnv = "VEIL_SCALE_BASELINE_FLAGS"
)

// localEndpoints is how many of the local node's pods the agent restores
// as endpoints (the first ones, which every size has).
const localEndpoints = 20

// changes is the number of pod changes elsewhere whose CPU is measured;
// relabels the number of single relabels whose agent work is measured.
const (
	changes  = 1000
	relabels = 100
	// slowRelabel: a single relabel slower end to end is logged.
	slowRelabel = 50 * time.Millisecond
)

// child is one running agent process.
type child struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func startChild(kubeconfig string, m mode, env ...string) (*child, error) {
	bin := os.Args[0]
	if m.Binary != "" {
		bin = m.Binary
	}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), agentEnv+"="+kubeconfig, modeEnv+"="+m.Flags, podsEnv+"="+strconv.Itoa(localEndpoints))
	cmd.Env = append(cmd.Env, env...)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start agent: %w", err)
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	return &child{cmd: cmd, in: in, out: sc}, nil
}

func (c *child) ask(cmd string) (agentStats, error) {
	var st agentStats
	if _, err := fmt.Fprintln(c.in, cmd); err != nil {
		return st, fmt.Errorf("ask agent %q: %w", cmd, err)
	}
	if !c.out.Scan() {
		return st, fmt.Errorf("agent exited: %v", c.out.Err())
	}
	if err := json.Unmarshal(c.out.Bytes(), &st); err != nil {
		return st, fmt.Errorf("agent answer: %w", err)
	}
	return st, nil
}

// await asks until cond holds, for at most timeout.
func (c *child) await(ctx context.Context, timeout time.Duration, what string, cond func(agentStats) bool) (agentStats, error) {
	deadline := time.Now().Add(timeout)
	for {
		st, err := c.ask("stats")
		if err != nil {
			return st, err
		}
		if cond(st) {
			return st, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return st, fmt.Errorf("agent: timed out waiting until %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (c *child) stop() {
	c.in.Close()
	_ = c.cmd.Wait()
}

// result is one row of the table.
type result struct {
	pods                   int
	mode                   string
	readyWall, readyCPU    time.Duration
	rss, heap, peak        int64
	cpuPer1000             time.Duration
	relabelP50, relabelP99 time.Duration
	relabelE2EP99          time.Duration
	// caughtUp: from start to the changes made while away handled
	// (node-local-resume).
	caughtUp                 time.Duration
	watchListMiB, watchPer1k float64
	ipcache, entries         int
}

func percentile(ns []int64, p float64) time.Duration {
	if len(ns) == 0 {
		return 0
	}
	s := slices.Clone(ns)
	slices.Sort(s)
	return time.Duration(s[min(len(s)-1, int(float64(len(s))*p))])
}

// measure runs one agent against the cluster as it stands and changes it:
// changes pods elsewhere get a new version label together, then relabels
// single pods, one at a time.
func measure(ctx context.Context, b *testing.B, p *populator, kubeconfig string, m mode, version *int) (result, error) {
	r := result{pods: p.pods, mode: m.Name}
	// Pods elsewhere: never the local node's.
	remote := func(i int) int { return podsPerNode + i%(p.pods-podsPerNode) }
	var env []string
	if hasFlag(m.Flags, "resume") {
		path := filepath.Join(b.TempDir(), "pod-cache.ckpt")
		env = []string{checkpointEnv + "=" + path}
		if err := primeCheckpoint(ctx, b, p, kubeconfig, m, env, path, remote, version); err != nil {
			return r, err
		}
	}
	started := time.Now()
	c, err := startChild(kubeconfig, m, env...)
	if err != nil {
		return r, err
	}
	defer c.stop()
	st, err := c.await(ctx, 10*time.Minute, "converged", func(s agentStats) bool { return s.Converged })
	if err != nil {
		return r, err
	}
	r.readyWall, r.readyCPU = time.Duration(st.ReadyWallNS), time.Duration(st.ReadyCPUNS)
	listBytes := st.WatchBytes
	if hasFlag(m.Flags, "resume") {
		// Converged on the checkpoint; caught up once the changes made
		// while it was away are handled too (as the parent sees it). The
		// first list reaches no handler (k8s.Watcher.OnChange): those
		// changes are the agent's only pod events so far.
		if _, err := c.await(ctx, 5*time.Minute, "caught up", func(s agentStats) bool {
			return s.PodEvents >= resumeChanges && s.Idle
		}); err != nil {
			return r, err
		}
		r.caughtUp = time.Since(started)
	}

	*version++
	before, err := c.ask("reset")
	if err != nil {
		return r, err
	}
	n := min(changes, p.pods-podsPerNode)
	if _, err := c.ask("profile"); err != nil {
		return r, err
	}
	if err := bulk(ctx, "relabels", 0, n, b.Logf, func(ctx context.Context, i int) error { return p.relabel(ctx, remote(i), *version) }); err != nil {
		return r, err
	}
	after, err := c.await(ctx, 5*time.Minute, "the changes synced", func(s agentStats) bool {
		return s.PodEvents >= before.PodEvents+int64(n) && s.Idle
	})
	if err != nil {
		return r, err
	}
	if _, err := c.ask("stop-profile"); err != nil {
		return r, err
	}
	r.cpuPer1000 = time.Duration(float64(after.CPUNS-before.CPUNS) * 1000 / float64(n))
	r.watchPer1k = float64(after.WatchBytes-before.WatchBytes) * 1000 / float64(n) / (1 << 20)

	*version++
	if _, err := c.ask("reset"); err != nil {
		return r, err
	}
	var e2e []int64
	for i := range relabels {
		seen, err := c.ask("stats")
		if err != nil {
			return r, err
		}
		start := time.Now()
		if err := p.relabel(ctx, remote(i*7919), *version); err != nil {
			return r, err
		}
		requested := time.Since(start)
		done, err := c.await(ctx, time.Minute, "the relabel synced", func(s agentStats) bool {
			return s.PodEvents > seen.PodEvents && s.Idle
		})
		if err != nil {
			return r, err
		}
		// From the request to the agent done with it, as the parent sees
		// it (asked every 2 ms).
		took := time.Since(start)
		e2e = append(e2e, took.Nanoseconds())
		if took > slowRelabel {
			// Where a slow one spent its time: the API server's answer,
			// the agent's own work, or neither (waiting to be run).
			var work time.Duration
			if len(done.Syncs) > 0 {
				work = time.Duration(done.Syncs[len(done.Syncs)-1])
			}
			// To stderr: a benchmark's log keeps only its first lines.
			fmt.Fprintf(os.Stderr, "%d pods, %s: relabel %d took %s end to end, %s of it the update request, %s the agent's sync; %s after the agent started\n",
				p.pods, m.Name, i, took.Round(time.Millisecond), requested.Round(time.Millisecond), work.Round(time.Microsecond), time.Since(started).Round(time.Millisecond))
		}
	}
	r.relabelE2EP99 = percentile(e2e, 0.99)
	st, err = c.ask("gc")
	if err != nil {
		return r, err
	}
	r.relabelP50, r.relabelP99 = percentile(st.Syncs, 0.5), percentile(st.Syncs, 0.99)
	r.rss, r.heap, r.peak = st.RSS, st.HeapInuse, st.PeakRSS
	r.watchListMiB = float64(listBytes) / (1 << 20)
	r.ipcache, r.entries = st.IPCache, st.PolicyEntries
	return r, nil
}

// resumeChanges pods elsewhere change while the agent of
// node-local-resume is away.
const resumeChanges = 50

// primeCheckpoint runs an agent until it converged and stops it, which
// writes its checkpoint at path, then changes resumeChanges pods.
func primeCheckpoint(ctx context.Context, b *testing.B, p *populator, kubeconfig string, m mode, env []string, path string, remote func(int) int, version *int) error {
	c, err := startChild(kubeconfig, m, env...)
	if err != nil {
		return err
	}
	_, err = c.await(ctx, 10*time.Minute, "converged", func(s agentStats) bool { return s.Converged })
	c.stop()
	if err != nil {
		return err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("the agent stopped without writing its checkpoint: %w", err)
	}
	b.Logf("%d pods, %s: checkpoint of %s MiB written", p.pods, m.Name, mib(fi.Size()))
	*version++
	return bulk(ctx, "changes while the agent is away", 0, resumeChanges, b.Logf, func(ctx context.Context, i int) error {
		return p.relabel(ctx, remote(i*31), *version)
	})
}

func mib(b int64) string { return fmt.Sprintf("%.0f", float64(b)/(1<<20)) }

// BenchmarkScale grows a cluster in a real API server to each size of
// VEIL_SCALE_PODS (default 1000,10000) and measures one agent in every
// mode (or those VEIL_SCALE_MODES names, comma-separated) at each size,
// side by side. Run it once (-benchtime 1x).
func BenchmarkScale(b *testing.B) {
	testenv.RequirePrivileged(b)
	sizes := []int{1000, 10000}
	if v := os.Getenv("VEIL_SCALE_PODS"); v != "" {
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 2*podsPerNode {
				b.Fatalf("VEIL_SCALE_PODS: %q is not a pod count of at least %d", f, 2*podsPerNode)
			}
			sizes = append(sizes, n)
		}
		slices.Sort(sizes)
	}
	cp := controlplane.StartForTest(b, controlplane.Options{Timeout: 5 * time.Minute})
	cfg := rest.CopyConfig(cp.Config)
	cfg.RateLimiter = flowcontrol.NewFakeAlwaysRateLimiter()
	p := &populator{kube: kubernetes.NewForConfigOrDie(cfg), veil: versioned.NewForConfigOrDie(cfg), logf: b.Logf}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Minute)
	defer cancel()
	if err := p.policies(ctx); err != nil {
		b.Fatal(err)
	}
	wholeMax := defaultWholeClusterMax
	if v := os.Getenv("VEIL_SCALE_WHOLE_MAX"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			b.Fatalf("VEIL_SCALE_WHOLE_MAX: %v", err)
		}
		wholeMax = n
	}
	run := modes
	// An earlier build of this benchmark (go test -c) measured as a mode
	// of its own, against the same cluster in the same run: the agent as
	// it was, side by side with the agent as it is.
	if bin := os.Getenv(baselineBinEnv); bin != "" {
		name := cmp.Or(os.Getenv(baselineNameEnv), "before")
		// Last: right after the cluster grew, the API server is still
		// busy (the first mode measured at a size started up to twice as
		// slowly), so the earlier build never gains from going first.
		run = append(slices.Clone(modes), mode{Name: name, Flags: os.Getenv(baselineFlagsEnv), Binary: bin})
	}
	baseline := run[len(run)-1]
	var results []result
	version := 1
	for b.Loop() {
		for _, size := range sizes {
			start := time.Now()
			if err := p.grow(ctx, size); err != nil {
				b.Fatal(err)
			}
			b.Logf("cluster at %d pods on %d nodes (%s to create)", p.pods, p.nodes, time.Since(start).Round(time.Second))
			for _, m := range run {
				if only := os.Getenv("VEIL_SCALE_MODES"); only != "" && !hasFlag(only, m.Name) {
					continue
				}
				if hasFlag(m.Flags, "whole-cluster") && size > wholeMax {
					b.Logf("%d pods, %s: skipped (above VEIL_SCALE_WHOLE_MAX=%d)", size, m.Name, wholeMax)
					continue
				}
				r, err := measure(ctx, b, p, cp.Kubeconfig, m, &version)
				if err != nil {
					b.Fatalf("%d pods, %s: %v", size, m.Name, err)
				}
				results = append(results, r)
				b.Logf("%d pods, %s: ready in %s", size, m.Name, r.readyWall.Round(time.Millisecond))
			}
		}
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%-8s %-22s %10s %10s %8s %8s %9s %12s %11s %11s %11s %9s %11s %8s %8s\n",
		"pods", "mode", "ready", "ready-cpu", "RSS-MiB", "heap-MiB", "peak-MiB", "cpu/1k-chg", "relabel-p50", "relabel-p99", "e2e-p99", "list-MiB", "MiB/1k-chg", "ipcache", "entries")
	for _, r := range results {
		fmt.Fprintf(&sb, "%-8d %-22s %10s %10s %8s %8s %9s %12s %11s %11s %11s %9.1f %11.2f %8d %8d\n",
			r.pods, r.mode, r.readyWall.Round(time.Millisecond), r.readyCPU.Round(time.Millisecond), mib(r.rss), mib(r.heap), mib(r.peak),
			r.cpuPer1000.Round(time.Millisecond), r.relabelP50.Round(time.Microsecond), r.relabelP99.Round(time.Microsecond), r.relabelE2EP99.Round(time.Microsecond),
			r.watchListMiB, r.watchPer1k, r.ipcache, r.entries)
	}
	// Ratios against the first mode (today's agent) at the same size.
	for _, r := range results {
		for _, base := range results {
			if base.pods == r.pods && base.mode == modes[0].Name && r.mode != base.mode {
				fmt.Fprintf(&sb, "%d pods, %s vs %s: RSS %.2fx, ready CPU %.2fx, CPU/1k changes %.2fx, relabel p99 %.2fx\n",
					r.pods, r.mode, base.mode, float64(r.rss)/float64(base.rss), float64(r.readyCPU)/float64(base.readyCPU),
					float64(r.cpuPer1000)/float64(base.cpuPer1000), float64(r.relabelP99)/float64(base.relabelP99))
			}
		}
	}
	// The agent against the earlier build, at every size.
	for _, r := range results {
		for _, base := range results {
			if base.pods == r.pods && base.mode == baseline.Name && baseline.Binary != "" && r.mode != base.mode {
				fmt.Fprintf(&sb, "%d pods, %s vs %s (%s): RSS %.2fx, heap %.2fx, peak %.2fx, ready wall %.2fx, ready CPU %.2fx, CPU/1k changes %.2fx, relabel p99 %.2fx\n",
					r.pods, r.mode, base.mode, baseline.Binary, float64(r.rss)/float64(base.rss), float64(r.heap)/float64(base.heap), float64(r.peak)/float64(base.peak),
					float64(r.readyWall)/float64(base.readyWall), float64(r.readyCPU)/float64(base.readyCPU),
					float64(r.cpuPer1000)/float64(base.cpuPer1000), float64(r.relabelP99)/float64(base.relabelP99))
			}
		}
	}
	// The agent restarted from its checkpoint against its cold start.
	for _, r := range results {
		for _, base := range results {
			if base.pods == r.pods && base.mode == "node-local" && r.mode == "node-local-resume" {
				fmt.Fprintf(&sb, "%d pods, node-local-resume vs node-local (cold start): ready wall %s vs %s (%.2fx), ready CPU %s vs %s (%.2fx), peak RSS %.2fx, RSS %.2fx, read before ready %.1f vs %.1f MiB; caught up with %d changes %s after start\n",
					r.pods, r.readyWall.Round(time.Millisecond), base.readyWall.Round(time.Millisecond), float64(r.readyWall)/float64(base.readyWall),
					r.readyCPU.Round(time.Millisecond), base.readyCPU.Round(time.Millisecond), float64(r.readyCPU)/float64(base.readyCPU),
					float64(r.peak)/float64(base.peak), float64(r.rss)/float64(base.rss), r.watchListMiB, base.watchListMiB, resumeChanges, r.caughtUp.Round(time.Millisecond))
			}
		}
	}
	// The pod cache's own type against slimmed corev1.Pods, at every size.
	for _, r := range results {
		for _, base := range results {
			if base.pods == r.pods && base.mode == "node-local-before" && (r.mode == "node-local" || r.mode == "node-local-json") {
				fmt.Fprintf(&sb, "%d pods, %s vs node-local-before: RSS %.2fx, heap %.2fx, ready wall %.2fx, CPU/1k changes %.2fx, relabel p99 %.2fx\n",
					r.pods, r.mode, float64(r.rss)/float64(base.rss), float64(r.heap)/float64(base.heap), float64(r.readyWall)/float64(base.readyWall),
					float64(r.cpuPer1000)/float64(base.cpuPer1000), float64(r.relabelP99)/float64(base.relabelP99))
			}
		}
	}
	b.Log(sb.String())
	fmt.Print(sb.String())
	if last := results[len(results)-1]; last.entries == 0 {
		b.Errorf("no local endpoint got policy entries at %d pods (%s): the measurement measured nothing", last.pods, last.mode)
	}
}
