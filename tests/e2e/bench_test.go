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

// BenchmarkAgent measures the agent on the e2e cluster: pod create ->
// Running (scheduler, kubelet, containerd, veil-cni) and CNI ADD as the
// agent counts it, policy apply -> enforced latency (observed with packets
// from inside a pod, each probe an exec through containerd, so the figure
// includes up to one probe's time), pod churn, and the agent's memory and
// CPU as the cluster grows to 1,000 and 10,000 pod objects. These are
// absolute figures of one run; the machine is shared, so compare them
// within a run, not across runs.
func BenchmarkAgent(b *testing.B) {
	e := sharedEnv(b)
	ctx := context.Background()
	ns := e.namespace(b, "bench", nil)
	node := e.c.Nodes[0]

	// Pod create -> Running over a batch of pods, one at a time.
	var starts []time.Duration
	var pods []*pod
	for i := 0; i < 20; i++ {
		start := time.Now()
		p := e.addPods(b, podSpec{Namespace: ns, Name: fmt.Sprintf("p%d", i), Node: node.Name, Labels: map[string]string{"app": fmt.Sprintf("p%d", i)}, Ports: web[:1]})[0]
		starts = append(starts, time.Since(start))
		pods = append(pods, p)
	}

	// Policy apply -> enforced: toggle an allow for p0 -> p1 on top of a
	// default deny and time until packets agree.
	denyAll := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "deny-p1"},
		Spec:       networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "p1"}}},
	}
	if _, err := e.kube.NetworkingV1().NetworkPolicies(ns).Create(ctx, denyAll, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	src, dst := pods[0], pods[1]
	probe := func() bool {
		out, code, err := src.run(ctx, "/client", "connect", "-timeout", "50ms", fmt.Sprintf("%s:80", dst.IP))
		if err == nil {
			err = probeExit("p0 -> p1:80", out, code)
		}
		if err != nil && !isDenied(err) {
			b.Fatal(err)
		}
		return err == nil
	}
	waitFor := func(want bool) (time.Duration, error) {
		start := time.Now()
		for time.Since(start) < 15*time.Second {
			if probe() == want {
				return time.Since(start), nil
			}
		}
		return 0, fmt.Errorf("reachability did not become %v within 15s", want)
	}
	if _, err := waitFor(false); err != nil {
		b.Fatal(err)
	}
	allow := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "allow-p0"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "p1"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "p0"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromInt32(80))}},
			}},
		},
	}
	var applies []time.Duration
	for i := 0; i < 10; i++ {
		start := time.Now()
		if _, err := e.kube.NetworkingV1().NetworkPolicies(ns).Create(ctx, allow, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		if _, err := waitFor(true); err != nil {
			b.Fatal(err)
		}
		applies = append(applies, time.Since(start))
		start = time.Now()
		if err := e.kube.NetworkingV1().NetworkPolicies(ns).Delete(ctx, "allow-p0", metav1.DeleteOptions{}); err != nil {
			b.Fatal(err)
		}
		if _, err := waitFor(false); err != nil {
			b.Fatal(err)
		}
		applies = append(applies, time.Since(start))
	}

	// Pod churn: create pods, wait until they run, delete them and wait
	// until they are gone, one after another.
	churnStart := time.Now()
	const churn = 10
	for i := 0; i < churn; i++ {
		name := fmt.Sprintf("c%d", i)
		e.addPods(b, podSpec{Namespace: ns, Name: name, Node: node.Name})
		if err := e.kube.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			b.Fatal(err)
		}
		for {
			if _, err := e.kube.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
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
	ag := e.agentOf(b, node.Name)
	agentPID := func() int {
		b.Helper()
		out, err := node.Run(ctx, "sh", "-c", "pidof veil-agent")
		if err != nil {
			b.Fatal(err)
		}
		var pid int
		fmt.Sscan(out, &pid)
		return pid
	}
	pid := agentPID()
	rss0, cpu0, err := procUsage(pid)
	if err != nil {
		b.Fatal(err)
	}
	created := 0
	b.Cleanup(func() { deleteScaleObjects(b, e) })
	for _, target := range []int{1000, 10000} {
		start := time.Now()
		createPodObjects(b, e, created, target)
		created = target
		written := time.Now()
		if err := waitIdentityCount(b, ag, target/10, 5*time.Minute); err != nil {
			b.Fatal(err)
		}
		lag := time.Since(written)
		rss, cpu, err := procUsage(pid)
		if err != nil {
			b.Fatal(err)
		}
		scales = append(scales, scale{pods: target, rss: rss, cpu: cpu - cpu0, create: written.Sub(start), lag: lag})
	}

	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "\nagent on the e2e cluster (absolute figures of this run)")
	fmt.Fprintln(w, "METRIC\tVALUE")
	fmt.Fprintf(w, "pod create -> Running p50 / p99 (%d pods)\t%s / %s\n", len(starts), percentile(starts, 0.5).Round(time.Millisecond), percentile(starts, 0.99).Round(time.Millisecond))
	fmt.Fprintf(w, "policy apply -> enforced p50 / p99 (%d changes, packet-observed)\t%s / %s\n", len(applies), percentile(applies, 0.5).Round(time.Millisecond), percentile(applies, 0.99).Round(time.Millisecond))
	fmt.Fprintf(w, "pod churn (create -> Running -> deleted -> gone)\t%.2f pods/s\n", churnRate)
	fmt.Fprintf(w, "agent RSS at start\t%.1f MiB\n", float64(rss0)/(1<<20))
	for _, s := range scales {
		fmt.Fprintf(w, "agent RSS / CPU used so far at %d pod objects\t%.1f MiB / %s\n", s.pods, float64(s.rss)/(1<<20), s.cpu.Round(time.Millisecond))
		fmt.Fprintf(w, "  objects written in / agent converged after the last write\t%s / %s\n", s.create.Round(time.Millisecond), s.lag.Round(time.Millisecond))
	}
	w.Flush()
	b.ReportMetric(float64(percentile(applies, 0.99).Milliseconds()), "apply-p99-ms")
	b.ReportMetric(float64(percentile(starts, 0.99).Milliseconds()), "pod-start-p99-ms")
}

// createPodObjects creates pods [from, to) on a node of their own, in 100
// namespaces with 10 pods per label set, with IPs in their status.
func createPodObjects(b *testing.B, e *env, from, to int) {
	ctx := context.Background()
	if from == 0 {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "scale-node"}, Spec: corev1.NodeSpec{PodCIDRs: []string{"10.245.0.0/16"}}}
		created, err := e.kube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		created.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "10.99.0.250"}}
		if _, err := e.kube.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			b.Fatal(err)
		}
		for i := 0; i < 100; i++ {
			ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("scale-%d", i), Labels: map[string]string{"team": fmt.Sprint(i % 7)}}}
			if _, err := e.kube.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
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
				created, err := e.kube.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
				if err == nil {
					ip := netip.AddrFrom4([4]byte{10, 245, byte(i >> 8), byte(i)})
					created.Status.PodIP = ip.String()
					created.Status.PodIPs = []corev1.PodIP{{IP: ip.String()}}
					_, err = e.kube.CoreV1().Pods(ns).UpdateStatus(ctx, created, metav1.UpdateOptions{})
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

// waitIdentityCount waits until the agent knows at least want identities
// and has converged.
func waitIdentityCount(b *testing.B, a *agent, want int, within time.Duration) error {
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		st := a.status(b)
		if int(st.Identities) >= want && st.Converged {
			return nil
		}
		time.Sleep(500 * time.Millisecond)
	}
	return fmt.Errorf("agent of %s did not reach %d identities within %s", a.nd.Name, want, within)
}

// deleteScaleObjects removes the scale node and its namespaces (and with
// them their pods), which the other tests of the cluster must not see.
func deleteScaleObjects(b *testing.B, e *env) {
	ctx := context.Background()
	for i := 0; i < 100; i++ {
		e.kube.CoreV1().Namespaces().Delete(ctx, fmt.Sprintf("scale-%d", i), metav1.DeleteOptions{})
	}
	e.kube.CoreV1().Nodes().Delete(ctx, "scale-node", metav1.DeleteOptions{})
}
