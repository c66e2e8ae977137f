package services

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	kubeinformers "k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/tests/testenv"
)

// realNode is a real API server and a real node's datapath maps, with the
// controller running between them until the test ends.
type realNode struct {
	kube *kubernetes.Clientset
	dp   *datapath.Datapath
	c    *Controller
	// runErr receives Run's result once it returns.
	runErr chan error
}

func startRealNode(t *testing.T, name string, logger *slog.Logger) *realNode {
	t.Helper()
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("skipped under -short: starts etcd and kube-apiserver")
	}
	cp := controlplane.StartForTest(t, controlplane.Options{SkipCRDs: true})
	cfg := rest.CopyConfig(cp.Config)
	cfg.QPS, cfg.Burst = 2000, 4000
	kube := kubernetes.NewForConfigOrDie(cfg)
	prefix := fmt.Sprintf("veiltest-%d-%s", os.Getpid(), name)
	node, err := netns.NewNode(prefix)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join("/sys/fs/bpf", prefix)
	t.Cleanup(func() {
		datapath.RemovePins(root)
		node.Delete()
		netns.CleanupPrefix(prefix)
	})
	var dp *datapath.Datapath
	if err := node.Do(func() (err error) { dp, err = datapath.Load(datapath.Config{BPFFSRoot: root}); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	factory := kubeinformers.NewSharedInformerFactory(kube, 0)
	c, err := New(factory, dp, Config{NodeName: "n1", Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	factory.Start(ctx.Done())
	n := &realNode{kube: kube, dp: dp, c: c, runErr: make(chan error, 1)}
	go func() { n.runErr <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-n.runErr
	})
	if _, err := kube.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return n
}

// mapped reads the node's map: backends per Service address.
func (n *realNode) mapped(t *testing.T) map[datapath.ServiceKey][]datapath.Backend {
	t.Helper()
	svcs, err := n.dp.Services()
	if err != nil {
		t.Fatal(err)
	}
	out := map[datapath.ServiceKey][]datapath.Backend{}
	for _, s := range svcs {
		out[s.ServiceKey] = s.Backends
	}
	return out
}

// TestPrivilegedServicesBadInput, through a real API server into a real
// node's map: a Service whose selector matches nothing gets an entry
// without backends (which the socket programs refuse at once, see
// datapath's TestPrivilegedServiceClusterIP); a Service port whose target
// port name no backend declares has no backends, is logged and counted,
// and is shown with why, while the Service's other port has its backends.
func TestPrivilegedServicesBadInput(t *testing.T) {
	logs := &testenv.SyncBuffer{}
	n := startRealNode(t, "svbad", slog.New(slog.NewTextHandler(logs, nil)))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	svcs := n.kube.CoreV1().Services("demo")
	eps := n.kube.DiscoveryV1().EndpointSlices("demo")

	nomatch, err := svcs.Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "nomatch"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "nothing"},
			Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// What the EndpointSlice controller publishes for a selector that
	// matches nothing: a slice without endpoints.
	if _, err := eps.Create(ctx, slice("nomatch", "nomatch-1", []discoveryv1.EndpointPort{{Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP), Name: ptr("")}}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	web, err := svcs.Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
			{Name: "metrics", Port: 9100, TargetPort: intstr.FromString("metrics")},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// The pods declare "http" but not "metrics": the controller leaves the
	// port out of their slice.
	if _, err := eps.Create(ctx, slice("web", "web-1", []discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, 8080)},
		readyEP("10.244.1.3", "n1"), readyEP("10.244.2.2", "n2")), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	nomatchKey := datapath.ServiceKey{VIP: netip.MustParseAddr(nomatch.Spec.ClusterIP), Port: 80, Proto: 6}
	httpKey := datapath.ServiceKey{VIP: netip.MustParseAddr(web.Spec.ClusterIP), Port: 80, Proto: 6}
	metricsKey := datapath.ServiceKey{VIP: netip.MustParseAddr(web.Spec.ClusterIP), Port: 9100, Proto: 6}
	for {
		m := n.mapped(t)
		_, hasNomatch := m[nomatchKey]
		_, hasMetrics := m[metricsKey]
		if hasNomatch && hasMetrics && len(m[httpKey]) == 2 && n.c.Problems() == 1 {
			if len(m[nomatchKey]) != 0 || len(m[metricsKey]) != 0 {
				t.Errorf("backends: nomatch %v, metrics %v; want none", m[nomatchKey], m[metricsKey])
			}
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("map %v, %d problems; want nomatch and metrics without backends, http with two", m, n.c.Problems())
		case <-time.After(20 * time.Millisecond):
		}
	}
	// default/kubernetes counts too: no controller publishes its endpoints
	// in this control plane.
	if got := n.c.WithoutBackends(); got != 3 {
		t.Errorf("%d Service addresses without backends; want 3 (nomatch, web's metrics, default/kubernetes)", got)
	}
	view, err := n.c.View("demo")
	if err != nil {
		t.Fatal(err)
	}
	var problem string
	for _, v := range view {
		for _, p := range v.Ports {
			if v.Name == "web" && p.Name == "metrics" {
				problem = p.Problem
			} else if p.Problem != "" {
				t.Errorf("%s port %s: unexpected problem %q", v.Name, p.Name, p.Problem)
			}
		}
	}
	if !strings.Contains(problem, `no endpoint declares target port "metrics"`) {
		t.Errorf("web's metrics port: problem %q", problem)
	}
	if l := logs.String(); !strings.Contains(l, "service port has no backends") || !strings.Contains(l, "demo/web") {
		t.Errorf("no log line for the unresolved port:\\n%s", l)
	}
}

// TestPrivilegedServices10k: 10,000 Services created at once through a real
// API server all land in a real node's map, nothing lost and no write
// failing, while the controller keeps running. It reports the time to
// converge and the heap the controller and its caches take.
func TestPrivilegedServices10k(t *testing.T) {
	n := startRealNode(t, "sv10k", slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const total, workers = 10000, 32
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	start := time.Now()
	var (
		mu   sync.Mutex
		want = map[datapath.ServiceKey]bool{}
		wg   sync.WaitGroup
		errs = make(chan error, workers)
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < total; i += workers {
				s, err := n.kube.CoreV1().Services("demo").Create(ctx, &corev1.Service{
					ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("s%05d", i)},
					Spec: corev1.ServiceSpec{Selector: map[string]string{"app": fmt.Sprint(i)},
						Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}}},
				}, metav1.CreateOptions{})
				if err != nil {
					errs <- fmt.Errorf("create service %d: %w", i, err)
					return
				}
				mu.Lock()
				want[datapath.ServiceKey{VIP: netip.MustParseAddr(s.Spec.ClusterIP), Port: 80, Proto: 6}] = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	created := time.Since(start)

	var have int
	for {
		svcs, err := n.dp.Services()
		if err != nil {
			t.Fatal(err)
		}
		have = 0
		for _, s := range svcs {
			if want[s.ServiceKey] {
				have++
			}
		}
		if have == total {
			break
		}
		select {
		case err := <-n.runErr:
			t.Fatalf("the controller stopped: %v", err)
		case <-ctx.Done():
			t.Fatalf("%d of %d Services in the map", have, total)
		case <-time.After(200 * time.Millisecond):
		}
	}
	converged := time.Since(start)
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	t.Logf("%d Services: created through the API server in %s (%d clients), all in the node's map after %s (%s after the last create); controller heap +%.1f MiB",
		total, created.Round(time.Millisecond), workers, converged.Round(time.Millisecond), (converged - created).Round(time.Millisecond),
		float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/(1<<20))
	if full, other := n.c.writeErrors(); full+other != 0 {
		t.Errorf("map write errors: %d full, %d other", full, other)
	}
	select {
	case err := <-n.runErr:
		t.Errorf("the controller stopped: %v", err)
	default:
	}
}
