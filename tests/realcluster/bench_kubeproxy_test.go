package realcluster

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/tests/benchreport"
	"github.com/veilmesh/veil/tests/testenv"
)

// bpLabPrefix names the lab of BenchmarkServiceConnectVsKubeProxy.
const bpLabPrefix = "vrcbp"

// BenchmarkServiceConnectVsKubeProxy measures connects/s to one ClusterIP
// on a real 2-node lab running a real kube-proxy (iptables mode, then
// nftables mode), side by side in the same lab: a pod's connects, which
// Veil's socket load-balancing sends straight to the backend, against the
// same client binary's connects from node-1's own network namespace outside
// the pods' cgroup, which kube-proxy's rules translate. Backend and both
// clients are on node-1. Measured with the one Service, then with 10,000
// Services more (VEIL_BENCH_SERVICES overrides the count), in interleaved
// rounds; printed as Veil / kube-proxy ratios.
func BenchmarkServiceConnectVsKubeProxy(b *testing.B) {
	testenv.RequirePrivileged(b)
	extra := 10000
	if s := os.Getenv("VEIL_BENCH_SERVICES"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n >= 0 {
			extra = n
		}
	}
	modes := []cluster.KubeProxyMode{cluster.KubeProxyIPTables, cluster.KubeProxyNFTables}
	if s := os.Getenv("VEIL_BENCH_KUBE_PROXY"); s != "" {
		modes = []cluster.KubeProxyMode{cluster.KubeProxyMode(s)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute+30*time.Second)
	defer cancel()
	bins, err := controlplane.BuildCluster(ctx)
	if err != nil {
		b.Fatalf("build cluster binaries: %v", err)
	}
	agentImage := buildAgentImage(b, ctx)
	client := buildLabClient(b, ctx)
	var rows []benchreport.Row
	for _, mode := range modes {
		rows = append(rows, benchConnectVsKubeProxy(b, ctx, bins, agentImage, client, mode, extra)...)
	}
	benchreport.Print(os.Stdout, fmt.Sprintf("connects/s to a ClusterIP: Veil socket LB (VEIL) vs kube-proxy (BASELINE), same lab, median of 3 rounds, %d extra Services", extra), rows)
	if err := benchreport.AppendJSON(rows); err != nil {
		b.Error(err)
	}
	for _, r := range rows {
		b.ReportMetric(r.Ratio, r.Name+"-ratio")
	}
}

func buildLabClient(b *testing.B, ctx context.Context) string {
	b.Helper()
	root, err := controlplane.RepoRoot()
	if err != nil {
		b.Fatal(err)
	}
	out := filepath.Join(b.TempDir(), "client")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./lab/cluster/image/client")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if o, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("build the lab client: %v\n%s", err, o)
	}
	return out
}

func benchConnectVsKubeProxy(b *testing.B, ctx context.Context, bins controlplane.ClusterBinaries, agentImage, client string, mode cluster.KubeProxyMode, extra int) []benchreport.Row {
	if err := cluster.Cleanup(bpLabPrefix, ""); err != nil {
		b.Fatalf("remove leftovers of an earlier run: %v", err)
	}
	c, err := cluster.Up(ctx, cluster.UpOptions{
		Options: cluster.Options{
			Prefix: bpLabPrefix, Nodes: 2, Binaries: bins, Images: []string{agentImage}, KubeProxy: mode,
			Logger: slog.New(slog.NewTextHandler(testWriter{b}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		},
		NoDNS: true, NoDemo: true,
	})
	if err != nil {
		b.Fatalf("lab up: %v", err)
	}
	defer func() {
		if err := c.Stop(); err != nil {
			b.Errorf("stop cluster: %v", err)
		}
	}()
	clients := kubernetes.NewForConfigOrDie(c.Config)
	const ns = "bench"
	if _, err := clients.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	pod := func(name string, args ...string) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name}},
			Spec: corev1.PodSpec{
				NodeSelector: map[string]string{corev1.LabelHostname: cluster.NodeName(1)},
				Containers: []corev1.Container{{
					Name: name, Image: cluster.TestServerImage, ImagePullPolicy: corev1.PullNever, Args: args,
				}},
				TerminationGracePeriodSeconds: new(int64),
			},
		}
	}
	for _, p := range []*corev1.Pod{pod("backend", "serve", "tcp/:8080"), pod("client", "serve", "tcp/:9")} {
		if _, err := clients.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	svc := func(name string) *corev1.Service {
		return &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "backend"},
				Ports: []corev1.ServicePort{{Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}}},
		}
	}
	target, err := clients.CoreV1().Services(ns).Create(ctx, svc("target"), metav1.CreateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	vip := target.Spec.ClusterIP + ":80"
	node := c.Nodes[0]

	veil := func(args ...string) (string, error) {
		res, err := c.Exec(ctx, ns, "client", append([]string{"/client"}, args...), nil)
		if err != nil {
			return "", err
		}
		if res.ExitCode != 0 {
			return res.Stdout, fmt.Errorf("exit %d: %s%s", res.ExitCode, res.Stdout, res.Stderr)
		}
		return res.Stdout, nil
	}
	kubeProxy := func(args ...string) (string, error) {
		return node.Run(ctx, append([]string{client}, args...)...)
	}
	reachable := func(addr string) {
		b.Helper()
		testenv.Eventually(b, 3*time.Minute, 500*time.Millisecond, func() error {
			if _, err := veil("connect", "-timeout", "1s", addr); err != nil {
				return fmt.Errorf("from the pod (Veil): %w", err)
			}
			if _, err := kubeProxy("connect", "-timeout", "1s", addr); err != nil {
				return fmt.Errorf("from node-1 (kube-proxy %s): %w", mode, err)
			}
			return nil
		})
	}
	reachable(vip)

	rate := func(run func(...string) (string, error)) float64 {
		b.Helper()
		out, err := run("connrate", "-duration", "2s", vip)
		if err != nil {
			b.Fatalf("connrate: %v", err)
		}
		var n, secs float64
		line := strings.TrimSpace(out[strings.LastIndex(strings.TrimSpace(out), "ok "):])
		if _, err := fmt.Sscanf(line, "ok %f %f", &n, &secs); err != nil || secs == 0 {
			b.Fatalf("connrate output %q: %v", out, err)
		}
		return n / secs
	}
	const rounds = 3
	measure := func() (veilRate, kpRate float64) {
		var v, k []float64
		for range rounds {
			v = append(v, rate(veil))
			k = append(k, rate(kubeProxy))
		}
		return median(v), median(k)
	}
	v1, k1 := measure()
	b.Logf("kube-proxy %s, 1 Service: Veil %.0f conn/s, kube-proxy %.0f conn/s", mode, v1, k1)

	// The crowd: extra Services, each with an EndpointSlice of its own
	// naming the backend (selectorless, so the controller manager's rate
	// limit on writing slices does not pace the run), created by a few
	// workers at once. A Service with a selector created after them being
	// reachable both ways says both translators have taken them all in.
	backend, err := clients.CoreV1().Pods(ns).Get(ctx, "backend", metav1.GetOptions{})
	if err != nil {
		b.Fatal(err)
	}
	began := time.Now()
	const workers = 16
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < extra; i += workers {
				name := fmt.Sprintf("crowd-%d", i)
				s := svc(name)
				s.Spec.Selector = nil
				if _, err := clients.CoreV1().Services(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
					errs <- fmt.Errorf("create service %d: %w", i, err)
					return
				}
				if _, err := clients.DiscoveryV1().EndpointSlices(ns).Create(ctx, crowdSlice(ns, name, backend.Status.PodIP), metav1.CreateOptions{}); err != nil {
					errs <- fmt.Errorf("create endpointslice %d: %w", i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	b.Logf("kube-proxy %s: %d Services with their slices created in %s", mode, extra, time.Since(began).Round(time.Millisecond))
	last, err := clients.CoreV1().Services(ns).Create(ctx, svc("last"), metav1.CreateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	reachable(last.Spec.ClusterIP + ":80")
	b.Logf("kube-proxy %s: %d Services translated both ways %s after the first create", mode, extra+1, time.Since(began).Round(time.Millisecond))
	vN, kN := measure()
	b.Logf("kube-proxy %s, %d Services: Veil %.0f conn/s, kube-proxy %.0f conn/s", mode, extra+2, vN, kN)
	return []benchreport.Row{
		benchreport.NewRow(fmt.Sprintf("svc-connect-1-veil-vs-kube-proxy-%s", mode), "conn/s", k1, v1, true, 0),
		benchreport.NewRow(fmt.Sprintf("svc-connect-%d-veil-vs-kube-proxy-%s", extra+2, mode), "conn/s", kN, vN, true, 2),
	}
}

// crowdSlice is a Service's EndpointSlice with one ready endpoint, ip:8080.
func crowdSlice(ns, svc, ip string) *discoveryv1.EndpointSlice {
	ready := true
	port, proto := int32(8080), corev1.ProtocolTCP
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: svc, Namespace: ns,
			Labels: map[string]string{discoveryv1.LabelServiceName: svc, discoveryv1.LabelManagedBy: "veil-bench"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: &port, Protocol: &proto}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
	}
}

// median of xs (not empty).
func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}
