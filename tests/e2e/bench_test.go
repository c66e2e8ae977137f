package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/veilmesh/veil/lab"
	"github.com/veilmesh/veil/lab/netns"
)

func percentile(ds []time.Duration, p float64) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	idx := int(p * float64(len(s)-1))
	return s[idx]
}

// procUsage reads a process's resident memory and CPU time from /proc.
func procUsage(pid int) (rssBytes int64, cpu time.Duration, err error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			rssBytes = kb * 1024
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// Fields after the command name (which may hold spaces) start at ")".
	rest := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	utime, _ := strconv.ParseInt(rest[11], 10, 64)
	stime, _ := strconv.ParseInt(rest[12], 10, 64)
	const clkTck = 100 // USER_HZ on Linux
	return rssBytes, time.Duration(utime+stime) * time.Second / clkTck, nil
}

// BenchmarkAgent measures the agent on the lab with a real API server: CNI
// ADD latency, policy apply -> enforced latency (observed with packets),
// pod churn, and the agent's memory and CPU as the cluster grows to 1,000
// and 10,000 pod objects. These are absolute figures of one run; the
// machine is shared, so compare them within a run, not across runs.
func BenchmarkAgent(b *testing.B) {
	requirePrivileged(b)
	l := startBenchLab(b)
	ctx := context.Background()
	node := l.Nodes[0]

	// CNI ADD latency over a batch of pods.
	var adds []time.Duration
	var pods []*lab.Pod
	for i := 0; i < 30; i++ {
		p, err := l.AddPod(ctx, lab.PodSpec{Namespace: "bench", Name: fmt.Sprintf("p%d", i), Node: node.Name, Labels: map[string]string{"app": fmt.Sprintf("p%d", i)}, Ports: web[:1]})
		if err != nil {
			b.Fatal(err)
		}
		adds = append(adds, p.CNIAdd)
		pods = append(pods, p)
	}

	// Policy apply -> enforced: toggle an allow for p0 -> p1 on top of a
	// default deny and time until packets agree.
	denyAll := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: "deny-p1"},
		Spec:       networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "p1"}}},
	}
	if _, err := l.Kube.NetworkingV1().NetworkPolicies("bench").Create(ctx, denyAll, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	src, dst := pods[0], pods[1]
	probe := func() bool {
		return netns.TCPEcho(src.Netns, fmt.Sprintf("%s:80", dst.IP), 40*time.Millisecond) == nil
	}
	waitFor := func(want bool) (time.Duration, error) {
		start := time.Now()
		for time.Since(start) < 10*time.Second {
			if probe() == want {
				return time.Since(start), nil
			}
		}
		return 0, fmt.Errorf("reachability did not become %v within 10s", want)
	}
	if _, err := waitFor(false); err != nil {
		b.Fatal(err)
	}
	allow := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: "allow-p0"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "p1"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "p0"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromInt32(80))}},
			}},
		},
	}
	var applies []time.Duration
	for i := 0; i < 15; i++ {
		start := time.Now()
		if _, err := l.Kube.NetworkingV1().NetworkPolicies("bench").Create(ctx, allow, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		if _, err := waitFor(true); err != nil {
			b.Fatal(err)
		}
		applies = append(applies, time.Since(start))
		start = time.Now()
		if err := l.Kube.NetworkingV1().NetworkPolicies("bench").Delete(ctx, "allow-p0", metav1.DeleteOptions{}); err != nil {
			b.Fatal(err)
		}
		if _, err := waitFor(false); err != nil {
			b.Fatal(err)
		}
		applies = append(applies, time.Since(start))
	}

	// Pod churn: create and delete pods (no server) back to back.
	churnStart := time.Now()
	const churn = 20
	for i := 0; i < churn; i++ {
		p, err := l.AddPod(ctx, lab.PodSpec{Namespace: "churn", Name: fmt.Sprintf("c%d", i), Node: node.Name})
		if err != nil {
			b.Fatal(err)
		}
		if err := l.DeletePod(ctx, p); err != nil {
			b.Fatal(err)
		}
	}
	churnRate := float64(churn) / time.Since(churnStart).Seconds()

	// Scale: pod objects on a node without real pods (as in a large
	// cluster), then the agent's memory and CPU once it has converged.
	type scale struct {
		pods   int
		rss    int64
		cpu    time.Duration
		create time.Duration // writing the objects (bounded by the client's QPS)
		lag    time.Duration // agent converged this long after the last write
	}
	var scales []scale
	rss0, cpu0, err := procUsage(node.AgentPID())
	if err != nil {
		b.Fatal(err)
	}
	created := 0
	for _, target := range []int{1000, 10000} {
		start := time.Now()
		createPodObjects(b, l, created, target)
		created = target
		written := time.Now()
		if err := waitIdentityCount(ctx, node, target/10, 5*time.Minute); err != nil {
			b.Fatal(err)
		}
		lag := time.Since(written)
		rss, cpu, err := procUsage(node.AgentPID())
		if err != nil {
			b.Fatal(err)
		}
		scales = append(scales, scale{pods: target, rss: rss, cpu: cpu - cpu0, create: written.Sub(start), lag: lag})
	}

	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "\nagent on the lab (absolute figures of this run)")
	fmt.Fprintln(w, "METRIC\tVALUE")
	fmt.Fprintf(w, "CNI ADD latency p50 / p99 (%d pods)\t%s / %s\n", len(adds), percentile(adds, 0.5).Round(time.Millisecond/10), percentile(adds, 0.99).Round(time.Millisecond/10))
	fmt.Fprintf(w, "policy apply -> enforced p50 / p99 (%d changes, packet-observed)\t%s / %s\n", len(applies), percentile(applies, 0.5).Round(time.Millisecond/10), percentile(applies, 0.99).Round(time.Millisecond/10))
	fmt.Fprintf(w, "pod churn (CNI ADD + DEL with API objects)\t%.1f pods/s\n", churnRate)
	fmt.Fprintf(w, "agent RSS at start\t%.1f MiB\n", float64(rss0)/(1<<20))
	for _, s := range scales {
		fmt.Fprintf(w, "agent RSS / CPU used so far at %d pod objects\t%.1f MiB / %s\n", s.pods, float64(s.rss)/(1<<20), s.cpu.Round(time.Millisecond))
		fmt.Fprintf(w, "  objects written in / agent converged after the last write\t%s / %s\n", s.create.Round(time.Millisecond), s.lag.Round(time.Millisecond))
	}
	w.Flush()
	b.ReportMetric(float64(percentile(applies, 0.99).Milliseconds()), "apply-p99-ms")
	b.ReportMetric(float64(percentile(adds, 0.99).Milliseconds()), "cni-add-p99-ms")
}

// createPodObjects creates pods [from, to) on a node of their own, in 100
// namespaces with 10 pods per label set, with IPs in their status.
func createPodObjects(b *testing.B, l *lab.Lab, from, to int) {
	ctx := context.Background()
	if from == 0 {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "scale-node"}, Spec: corev1.NodeSpec{PodCIDRs: []string{"10.245.0.0/16"}}}
		created, err := l.Kube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		created.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "10.99.0.250"}}
		if _, err := l.Kube.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			b.Fatal(err)
		}
		for i := 0; i < 100; i++ {
			if err := l.EnsureNamespace(ctx, fmt.Sprintf("scale-%d", i), map[string]string{"team": fmt.Sprint(i % 7)}); err != nil {
				b.Fatal(err)
			}
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	next := make(chan int)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				ns := fmt.Sprintf("scale-%d", i%100)
				pod := &corev1.Pod{
					ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("s%d", i), Labels: map[string]string{"app": fmt.Sprintf("a%d", i/100/10)}},
					Spec:       corev1.PodSpec{NodeName: "scale-node", Containers: []corev1.Container{{Name: "c", Image: "x"}}},
				}
				created, err := l.Kube.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
				if err == nil {
					ip := netip.AddrFrom4([4]byte{10, 245, byte(i >> 8), byte(i)})
					created.Status.PodIP = ip.String()
					created.Status.PodIPs = []corev1.PodIP{{IP: ip.String()}}
					_, err = l.Kube.CoreV1().Pods(ns).UpdateStatus(ctx, created, metav1.UpdateOptions{})
				}
				if err != nil {
					select {
					case errs <- err:
					default:
					}
					return
				}
			}
		}()
	}
	for i := from; i < to; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errs:
		b.Fatal(err)
	default:
	}
}

// waitIdentityCount waits until the agent knows at least n identities and
// has converged.
func waitIdentityCount(ctx context.Context, n *lab.Node, want int, within time.Duration) error {
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		st, err := n.Status(ctx)
		if err == nil && int(st.Identities) >= want && st.Converged {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("agent of %s did not reach %d identities within %s", n.Name, want, within)
}

func startBenchLab(b *testing.B) *lab.Lab {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	dir := b.TempDir()
	agentBin, cniBin, err := lab.Build(ctx, dir)
	if err != nil {
		b.Fatal(err)
	}
	l, err := lab.Start(ctx, lab.Options{Prefix: fmt.Sprintf("veilbench-%d", os.Getpid()), Nodes: 1, Dir: dir, AgentBin: agentBin, CNIBin: cniBin})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := l.Stop(); err != nil {
			b.Errorf("stop lab: %v", err)
		}
	})
	return l
}
