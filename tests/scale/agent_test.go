package scale

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/flowcontrol"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/encryption"
	"github.com/veilmesh/veil/agent/endpoints"
	"github.com/veilmesh/veil/agent/k8s"
	"github.com/veilmesh/veil/agent/memlimit"
	"github.com/veilmesh/veil/agent/policysync"
	"github.com/veilmesh/veil/api/client/clientset/versioned"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
	"github.com/veilmesh/veil/tests/scaleshape"
)

// The benchmark runs the agent's components in a child process (this test
// binary again, with agentEnv set), so that the RSS, heap, CPU and watch
// bytes measured are the agent's alone. The child reads one command a line
// on stdin and answers each with one JSON line on stdout.
const (
	agentEnv = "VEIL_SCALE_AGENT" // the kubeconfig path
	modeEnv  = "VEIL_SCALE_MODE"  // a mode's flags, comma-separated
	podsEnv  = "VEIL_SCALE_LOCAL" // how many local endpoints to restore
	// profileEnv, when set, is where the child writes a CPU profile of the
	// pod changes (one file per mode).
	profileEnv = "VEIL_SCALE_PROFILE"
	// checkpointEnv, when set, is the pod cache's checkpoint file: the
	// agent resumes from it and writes it, as with --pod-cache-checkpoint.
	checkpointEnv = "VEIL_SCALE_CHECKPOINT"
)

// mode is one configuration of the agent under measurement.
type mode struct {
	Name string
	// Flags switch on what the agent may do to scale.
	Flags string
	// Binary, when set, is the test binary the agent runs from (an
	// earlier build; see baselineBinEnv), else this one.
	Binary string
}

// agentStats is the child's answer to "stats".
type agentStats struct {
	// ReadyWallNS and ReadyCPUNS: from process start to the first
	// convergence.
	ReadyWallNS int64 `json:"readyWallNs"`
	ReadyCPUNS  int64 `json:"readyCpuNs"`
	Converged   bool  `json:"converged"`
	Idle        bool  `json:"idle"`
	CPUNS       int64 `json:"cpuNs"`
	RSS         int64 `json:"rss"`
	PeakRSS     int64 `json:"peakRss"`
	HeapInuse   int64 `json:"heapInuse"`
	WatchBytes  int64 `json:"watchBytes"`
	PodEvents   int64 `json:"podEvents"`
	IPCache     int   `json:"ipcache"`
	// Syncs are the durations of the syncs since the last "reset".
	Syncs []int64 `json:"syncs"`
	// PolicyEntries is the sum over local endpoints of their entries.
	PolicyEntries int    `json:"policyEntries"`
	Error         string `json:"error,omitempty"`
}

func TestMain(m *testing.M) {
	if kc := os.Getenv(agentEnv); kc != "" {
		if err := runAgent(kc); err != nil {
			fmt.Fprintln(os.Stderr, "scale agent:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// countingBody counts what the API server sent.
type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}

type countingTransport struct {
	rt http.RoundTripper
	n  *atomic.Int64
}

func (t countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.rt.RoundTrip(r)
	if resp != nil && resp.Body != nil {
		resp.Body = countingBody{resp.Body, t.n}
	}
	return resp, err
}

// recordingDatapath keeps only what the measurement reports, not the
// entries: in the real agent they live in BPF maps, outside its heap.
type recordingDatapath struct {
	mu      sync.Mutex
	entries map[netip.Addr]int
	ipcache atomic.Int64
}

func (d *recordingDatapath) UpsertEndpoint(datapath.Endpoint) error { return nil }
func (d *recordingDatapath) DeleteEndpoint(netip.Addr) error        { return nil }
func (d *recordingDatapath) SetPolicy(ip netip.Addr, e []policytypes.Entry, _ policytypes.Defaults) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.entries[ip] = len(e)
	return nil
}
func (d *recordingDatapath) SetCIDRs(map[netip.Prefix]identity.ID) error { return nil }
func (d *recordingDatapath) UpsertIPCache(netip.Prefix, datapath.IPCacheEntry) error {
	d.ipcache.Add(1)
	return nil
}
func (d *recordingDatapath) DeleteIPCache(netip.Prefix) error                    { return nil }
func (d *recordingDatapath) EvictFlows(func(datapath.FlowKey) bool) (int, error) { return 0, nil }

func (d *recordingDatapath) policyEntries() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, e := range d.entries {
		n += e
	}
	return n
}

type noDegraded struct{}

func (noDegraded) Set(string, string) {}
func (noDegraded) Clear(string)       {}

func cpuNS() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// procStatus reads a kB field of /proc/self/status in bytes.
func procStatus(field string) int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb * 1024
		}
	}
	return 0
}

func hasFlag(flags, f string) bool {
	for _, x := range strings.Split(flags, ",") {
		if x == f {
			return true
		}
	}
	return false
}

// runAgent wires the components as the daemon does, for node localNode,
// with the first local pods restored as endpoints.
func runAgent(kubeconfig string) error {
	start := time.Now()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	flags := os.Getenv(modeEnv)
	local, _ := strconv.Atoi(os.Getenv(podsEnv))
	// VEIL_SCALE_PROFILE also names a CPU profile of the start, until
	// ready.
	startProfile := func() {}
	if path := os.Getenv(profileEnv); path != "" {
		f, err := os.Create(fmt.Sprintf("%s.start.%s.%d", path, strings.ReplaceAll(flags, ",", "+"), local))
		if err != nil {
			return fmt.Errorf("create profile: %w", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			f.Close()
			return fmt.Errorf("start profile: %w", err)
		}
		startProfile = func() { pprof.StopCPUProfile(); f.Close() }
	}

	// As the agent: the collector's startup percent until converged
	// (memlimit.StartupGC; startgc=N sets N, 0 leaves GOGC alone).
	// steadygc=N: the collector's percent once converged (0: as before
	// the start).
	startGC, steadyGC := memlimit.DefaultStartupGCPercent, memlimit.DefaultSteadyGCPercent
	for _, f := range strings.Split(flags, ",") {
		for name, to := range map[string]*int{"startgc=": &startGC, "steadygc=": &steadyGC} {
			if v, ok := strings.CutPrefix(f, name); ok {
				n, err := strconv.Atoi(v)
				if err != nil {
					return fmt.Errorf("mode flag %q: %w", f, err)
				}
				*to = n
			}
		}
	}
	gcConverged := memlimit.StartupGC(startGC, steadyGC, os.LookupEnv)
	// container-mib=N: as the agent in a container limited to N MiB, with
	// the default --memory-limit-ratio.
	for _, f := range strings.Split(flags, ",") {
		if v, ok := strings.CutPrefix(f, "container-mib="); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				return fmt.Errorf("mode flag %q: %w", f, err)
			}
			debug.SetMemoryLimit(int64(float64(n<<20) * memlimit.DefaultRatio))
		}
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return fmt.Errorf("load kubeconfig: %w", err)
	}
	cfg.RateLimiter = flowcontrol.NewFakeAlwaysRateLimiter()
	var watchBytes atomic.Int64
	cfg.WrapTransport = func(rt http.RoundTripper) http.RoundTripper { return countingTransport{rt, &watchBytes} }
	kubeCfg := k8s.KubeClientConfig(cfg)
	if hasFlag(flags, "json") {
		kubeCfg = cfg
	}
	kube, err := kubernetes.NewForConfig(kubeCfg)
	if err != nil {
		return fmt.Errorf("kube client: %w", err)
	}
	veil, err := versioned.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("veil client: %w", err)
	}

	wopts := k8s.Options{FullObjects: hasFlag(flags, "full-objects"), CorePods: hasFlag(flags, "core-pods")}
	if path := os.Getenv(checkpointEnv); path != "" {
		wopts.Checkpoint = &k8s.CheckpointOptions{Path: path, Node: localNode, MaxAge: 10 * time.Minute, Log: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	}
	w := k8s.NewWithOptions(kube, veil, wopts)
	// When the start reached each step, reported once ready.
	built := time.Since(start)
	opts := policy.Options{Node: localNode}
	if hasFlag(flags, "whole-cluster") {
		opts.Node = ""
	}
	compiler, err := policy.New(opts)
	if err != nil {
		return err
	}
	reg := endpoints.New(endpoints.Config{StateDir: os.TempDir()})
	var eps []*endpoints.Endpoint
	for j := range local {
		s := spot(j)
		eps = append(eps, &endpoints.Endpoint{
			Pod: policy.EndpointID{Namespace: nsName(s.ns), Name: s.name()}, ContainerID: s.name(), ID: uint32(j + 1),
			IP: scaleshape.PodIP(s.node, s.slot), HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:00:02",
		})
	}
	reg.Restore(eps)
	dp := &recordingDatapath{entries: map[netip.Addr]int{}}
	var (
		syncMu sync.Mutex
		syncs  []int64
	)
	s := policysync.New(policysync.Config{
		NodeName: localNode, NodeIP: netip.MustParseAddr(localNodeIP), ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix(clusterCIDR)},
		Compiler: compiler, Datapath: dp, Endpoints: reg, Encryption: encryption.New(encryption.Config{NodeName: localNode}),
		Listers: w.Listers, Kube: kube, Veil: veil, Events: &record.FakeRecorder{}, Degraded: noDegraded{},
		Converged: gcConverged,
		Synced: func(d time.Duration) {
			syncMu.Lock()
			syncs = append(syncs, d.Nanoseconds())
			syncMu.Unlock()
		},
		Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	var podEvents atomic.Int64
	if err := w.OnChange(func(k k8s.Key) {
		s.Enqueue(k)
		if k.Kind == k8s.Pod {
			podEvents.Add(1)
		}
	}); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	w.Start(ctx)
	// As the daemon: the checkpoint is written once more as the agent
	// stops (here: when its stdin closes).
	checkpointed := make(chan struct{})
	go func() { w.RunCheckpoints(ctx); close(checkpointed) }()
	defer func() { cancel(); <-checkpointed }()
	if err := w.WaitForCacheSync(ctx, time.Minute, func([]string) {}); err != nil {
		return err
	}
	synced := time.Since(start)
	for _, k := range w.Keys() {
		s.Enqueue(k)
	}
	queued := time.Since(start)
	go s.Run(ctx)
	var readyWall, readyCPU atomic.Int64
	go func() {
		var converged time.Duration
		for ctx.Err() == nil && !(reg.Converged() && s.Idle()) {
			if converged == 0 && reg.Converged() {
				converged = time.Since(start)
			}
			time.Sleep(2 * time.Millisecond)
		}
		startProfile()
		// CPU first: a reader takes a wall time as the sign both are set.
		readyCPU.Store(cpuNS())
		readyWall.Store(time.Since(start).Nanoseconds())
		fmt.Fprintf(os.Stderr, "scale agent %q: start: watcher built %s, caches synced %s, keys queued %s, endpoints converged %s, ready %s\n",
			flags, built.Round(time.Millisecond), synced.Round(time.Millisecond), queued.Round(time.Millisecond),
			cmp.Or(converged, time.Duration(readyWall.Load())).Round(time.Millisecond), time.Duration(readyWall.Load()).Round(time.Millisecond))
	}()

	out := json.NewEncoder(os.Stdout)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		cmd := in.Text()
		switch cmd {
		case "gc":
			runtime.GC()
			if path := os.Getenv(profileEnv); path != "" {
				f, err := os.Create(fmt.Sprintf("%s.heap.%s.%d", path, strings.ReplaceAll(flags, ",", "+"), local))
				if err != nil {
					return fmt.Errorf("create heap profile: %w", err)
				}
				err = pprof.Lookup("heap").WriteTo(f, 0)
				f.Close()
				if err != nil {
					return fmt.Errorf("write heap profile: %w", err)
				}
			}
		case "profile":
			// VEIL_SCALE_PROFILE names a file for a CPU profile of what
			// follows, until "stop-profile".
			if path := os.Getenv(profileEnv); path != "" {
				f, err := os.Create(fmt.Sprintf("%s.%s.%d", path, strings.ReplaceAll(flags, ",", "+"), local))
				if err != nil {
					return fmt.Errorf("create profile: %w", err)
				}
				defer f.Close()
				if err := pprof.StartCPUProfile(f); err != nil {
					return fmt.Errorf("start profile: %w", err)
				}
			}
		case "stop-profile":
			pprof.StopCPUProfile()
		}
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		if cmd == "gc" {
			// Where the resident size goes when it is sampled: the heap
			// in use, free heap pages still resident, the rest of the
			// runtime's memory.
			fmt.Fprintf(os.Stderr, "scale agent %q: rss %d MiB heap-inuse %d MiB heap-idle-resident %d MiB heap-released %d MiB stacks %d MiB runtime-other %d MiB sys %d MiB gc-cycles %d\n",
				flags, procStatus("VmRSS")>>20, ms.HeapInuse>>20, (ms.HeapIdle-ms.HeapReleased)>>20, ms.HeapReleased>>20, ms.StackSys>>20,
				(ms.MSpanSys+ms.MCacheSys+ms.BuckHashSys+ms.GCSys+ms.OtherSys)>>20, ms.Sys>>20, ms.NumGC)
		}
		syncMu.Lock()
		st := agentStats{
			ReadyWallNS: readyWall.Load(), ReadyCPUNS: readyCPU.Load(), Converged: readyWall.Load() > 0, Idle: s.Idle(),
			CPUNS: cpuNS(), RSS: procStatus("VmRSS"), PeakRSS: procStatus("VmHWM"), HeapInuse: int64(ms.HeapInuse),
			WatchBytes: watchBytes.Load(), PodEvents: podEvents.Load(), IPCache: s.IPCacheSize(), Syncs: syncs,
			PolicyEntries: dp.policyEntries(),
		}
		if cmd == "reset" {
			syncs = nil
		}
		syncMu.Unlock()
		if err := out.Encode(st); err != nil {
			return fmt.Errorf("answer %q: %w", cmd, err)
		}
	}
	return in.Err()
}
