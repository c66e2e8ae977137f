package realcluster

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"

	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/tests/testenv"
)

// labPrefix names the lab of TestPrivilegedLabUp.
const labPrefix = "vrclab"

// TestPrivilegedLabUp brings up the lab as `meshctl lab up` does
// (cluster.Up: cluster, Veil in strict mode, cluster DNS, demo) with
// kube-proxy in nftables mode, in iptables mode, and without, and checks
// that kube-proxy's rules are in the nodes' network namespaces only, the
// demo's placement, DNS over UDP and TCP, connections by name and by
// Service, the demo policy, and that tearing it down leaves the host as it
// was. The nftables run also measures memory and pod start latency.
//
// In iptables mode the cluster DNS and Services are left out: a pod's
// connection to an address outside the cluster (CoreDNS's to the API
// server on the hub) hangs, because Veil delivers the replies straight
// into the pod (bpf_redirect_peer in veil_from_netdev), so netfilter's
// conntrack never sees them and kube-proxy's KUBE-FORWARD rule drops the
// pod's next packets as ctstate INVALID. That is a datapath bug, reported,
// not worked around here.
func TestPrivilegedLabUp(t *testing.T) {
	requireCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute)
	defer cancel()
	agentImage := buildAgentImage(t, ctx)
	for _, mode := range []cluster.KubeProxyMode{cluster.KubeProxyNFTables, cluster.KubeProxyIPTables, cluster.KubeProxyNone} {
		t.Run("kube-proxy="+string(mode), func(t *testing.T) {
			testLabUp(t, ctx, agentImage, mode)
		})
	}
}

func testLabUp(t *testing.T, ctx context.Context, agentImage string, mode cluster.KubeProxyMode) {
	services := true
	c := startLab(t, ctx, labSpec{Up: true, AgentImage: agentImage, UpOptions: cluster.UpOptions{
		Options:    cluster.Options{Prefix: labPrefix, Nodes: 2, KubeProxy: mode},
		StrictMode: true,
		NoDNS:      !services,
	}})
	var phases []string
	for _, p := range c.Phases {
		phases = append(phases, fmt.Sprintf("%s %s", p.Name, p.Took.Round(time.Millisecond)))
	}
	t.Logf("lab up (kube-proxy %s) in %s: %s", mode, c.Startup.Round(time.Millisecond), strings.Join(phases, "; "))
	clients := c.clients

	pods := map[string]*corev1.Pod{}
	for _, app := range cluster.DemoApps(2) {
		p, err := c.AppPod(ctx, app.Namespace, app.Name)
		if err != nil {
			t.Fatal(err)
		}
		if p.Spec.NodeName != app.Node {
			t.Errorf("demo pod %s/%s on %s; want %s", app.Namespace, p.Name, p.Spec.NodeName, app.Node)
		}
		pods[app.Namespace+"/"+app.Name] = p
	}
	// kube-proxy's rules are in the nodes' network namespaces (the host's
	// are compared before and after at the end).
	for _, nd := range c.Nodes {
		nftOut, err := nd.Run(ctx, "nft", "list", "tables")
		if err != nil {
			t.Fatalf("nft list tables on %s: %v", nd.Name, err)
		}
		iptOut, err := nd.Run(ctx, "iptables-save", "-t", "nat")
		if err != nil {
			t.Fatalf("iptables-save on %s: %v", nd.Name, err)
		}
		nftProxy := strings.Contains(nftOut, "table ip kube-proxy")
		iptProxy := strings.Contains(iptOut, ":KUBE-SERVICES")
		if nftProxy != (mode == cluster.KubeProxyNFTables) || iptProxy != (mode == cluster.KubeProxyIPTables) {
			t.Errorf("kube-proxy %s on %s: nft table kube-proxy %v, iptables KUBE-SERVICES %v", mode, nd.Name, nftProxy, iptProxy)
		}
	}
	exec := func(from string, argv ...string) cluster.ExecResult {
		t.Helper()
		p := pods[from]
		res, err := c.Exec(ctx, p.Namespace, p.Name, argv, nil)
		if err != nil {
			t.Fatalf("exec %v in %s: %v", argv, from, err)
		}
		return res
	}
	if services {
		checkServices(t, ctx, clients, c.Cluster, exec)
	}
	// By pod IP, whatever translates Services.
	for _, tc := range []struct {
		from  string
		allow bool
	}{{"demo/frontend", true}, {"other/client", false}} {
		res := exec(tc.from, "/client", "connect", "-timeout", "1500ms", pods["demo/backend"].Status.PodIP+":80")
		if (res.ExitCode == 0) != tc.allow {
			t.Errorf("%s -> demo/backend pod IP: exit %d (%s%s); want allowed=%v", tc.from, res.ExitCode, res.Stdout, res.Stderr, tc.allow)
		}
	}

	if mode == cluster.KubeProxyNFTables && !t.Failed() {
		logMemory(t, c.Cluster, "the 2-node lab with DNS and demo")
		measurePodStart(t, ctx, clients, pods["demo/backend"].Status.PodIP+":80", 20)
	}

	c.down()
}

// checkServices checks DNS over UDP and TCP, at the DNS pod and through
// kube-dns's cluster IP, and connections by name through the demo's
// Services against the demo policy.
func checkServices(t *testing.T, ctx context.Context, clients kubernetes.Interface, c *cluster.Cluster, exec func(string, ...string) cluster.ExecResult) {
	t.Helper()
	backendSvc, err := clients.CoreV1().Services("demo").Get(ctx, "backend", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dnsPod, err := c.AppPodBySelector(ctx, cluster.DNSNamespace, "k8s-app="+cluster.DNSService)
	if err != nil {
		t.Fatal(err)
	}
	const backendName = "backend.demo.svc.cluster.local"
	// The DNS server itself, by its pod IP: no Service translation needed.
	for _, tcp := range []bool{false, true} {
		args := []string{"/client", "resolve", "-server", dnsPod.Status.PodIP + ":53"}
		if tcp {
			args = append(args, "-tcp")
		}
		res := exec("demo/frontend", append(args, backendName)...)
		if res.ExitCode != 0 || strings.TrimSpace(res.Stdout) != backendSvc.Spec.ClusterIP {
			t.Errorf("resolve %s at the DNS pod (tcp=%v): exit %d, %q %q; want %s", backendName, tcp, res.ExitCode, res.Stdout, res.Stderr, backendSvc.Spec.ClusterIP)
		}
	}
	// Through kube-dns's cluster IP (resolv.conf) and the demo's Services:
	// translated by Veil's socket load-balancing, and by kube-proxy too
	// where it runs.
	for _, tcp := range []bool{false, true} {
		args := []string{"/client", "resolve"}
		if tcp {
			args = append(args, "-tcp")
		}
		res := exec("demo/frontend", append(args, backendName)...)
		if res.ExitCode != 0 || strings.TrimSpace(res.Stdout) != backendSvc.Spec.ClusterIP {
			t.Errorf("resolve %s through resolv.conf's kube-dns (tcp=%v): exit %d, %q %q; want %s", backendName, tcp, res.ExitCode, res.Stdout, res.Stderr, backendSvc.Spec.ClusterIP)
		}
	}
	// By name, through the Service, as the demo policy says.
	for _, tc := range []struct {
		from, to string
		udp      bool
		allow    bool
	}{
		{"demo/frontend", "backend.demo:80", false, true},
		{"other/client", "backend.demo:80", false, false},
		{"demo/frontend", "backend.demo:81", true, false}, // the policy admits 80/TCP only
		{"other/client", "frontend.demo:81", true, true},  // the MeshPolicy only audits
	} {
		args := []string{"/client", "connect", "-timeout", "1500ms"}
		if tc.udp {
			args = append(args, "-udp")
		}
		res := exec(tc.from, append(args, tc.to)...)
		if (res.ExitCode == 0) != tc.allow {
			t.Errorf("%s -> %s (udp=%v): exit %d (%s%s); want allowed=%v", tc.from, tc.to, tc.udp, res.ExitCode, res.Stdout, res.Stderr, tc.allow)
		}
	}
}

// logMemory logs the resident memory of every process of c, by name, and
// their sum; what says what c runs.
func logMemory(t *testing.T, c *cluster.Cluster, what string) {
	t.Helper()
	mem, err := c.Memory()
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	var parts []string
	for _, name := range slices.Sorted(maps.Keys(mem)) {
		total += mem[name]
		parts = append(parts, fmt.Sprintf("%s %d MB", name, mem[name]>>20))
	}
	t.Logf("memory (RSS) of %s: %d MB: %s", what, total>>20, strings.Join(parts, ", "))
}

// measurePodStart creates n pods one after another, each a probe that an
// allowed peer (label app=frontend in demo) reaches target with, and logs
// p50/p99 of create → Running (seen by a watch) and create → first echo
// (the probe's own timestamp: pods and test share the host's clock).
func measurePodStart(t *testing.T, ctx context.Context, clients kubernetes.Interface, target string, n int) {
	t.Helper()
	var running, first []time.Duration
	for i := range n {
		name := fmt.Sprintf("latency-%d", i)
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "demo", Labels: map[string]string{"app": "frontend", "latency": "probe"}},
			Spec: corev1.PodSpec{
				NodeSelector: map[string]string{corev1.LabelHostname: cluster.NodeName(1 + i%2)},
				Containers: []corev1.Container{{
					Name: "probe", Image: cluster.TestServerImage, ImagePullPolicy: corev1.PullNever,
					Args: []string{"probe", target},
				}},
				TerminationGracePeriodSeconds: new(int64),
			},
		}
		w, err := clients.CoreV1().Pods("demo").Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + name})
		if err != nil {
			t.Fatal(err)
		}
		created := time.Now()
		if _, err := clients.CoreV1().Pods("demo").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			w.Stop()
			t.Fatal(err)
		}
		var runAt time.Time
		for ev := range w.ResultChan() {
			if p, ok := ev.Object.(*corev1.Pod); ok && ev.Type != watch.Deleted && p.Status.Phase == corev1.PodRunning {
				runAt = time.Now()
				break
			}
			if time.Since(created) > time.Minute {
				break
			}
		}
		w.Stop()
		if runAt.IsZero() {
			t.Fatalf("pod %s not Running within a minute", name)
		}
		var okAt time.Time
		testenv.Eventually(t, 30*time.Second, 100*time.Millisecond, func() error {
			out, err := clients.CoreV1().Pods("demo").GetLogs(name, &corev1.PodLogOptions{}).DoRaw(ctx)
			if err != nil {
				return err
			}
			for _, line := range strings.Split(string(out), "\n") {
				if _, ts, ok := strings.Cut(line, " t="); ok && strings.HasPrefix(line, "ok ") {
					ns, err := strconv.ParseInt(ts, 10, 64)
					if err != nil {
						return fmt.Errorf("probe line %q: %w", line, err)
					}
					okAt = time.Unix(0, ns)
					return nil
				}
			}
			return fmt.Errorf("pod %s: no allowed connection yet", name)
		})
		running = append(running, runAt.Sub(created))
		first = append(first, okAt.Sub(created))
		if err := clients.CoreV1().Pods("demo").Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
			t.Fatal(err)
		}
	}
	q := func(d []time.Duration, p float64) time.Duration {
		s := slices.Clone(d)
		slices.Sort(s)
		return s[min(len(s)-1, int(p*float64(len(s))))].Round(time.Millisecond)
	}
	t.Logf("pod start over %d pods (Veil CNI, kube-proxy nftables): create → Running p50 %s p99 %s; create → first allowed connection p50 %s p99 %s",
		n, q(running, 0.5), q(running, 0.99), q(first, 0.5), q(first, 0.99))
}
