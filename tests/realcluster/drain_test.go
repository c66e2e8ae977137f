package realcluster

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/tests/testenv"
)

// drainPrefix names TestPrivilegedDrain's cluster.
const drainPrefix = "vrcdrain"

// TestPrivilegedDrain drains node-2 of a 2-node cluster in strict mode as
// `kubectl drain --ignore-daemonsets` does (cordon, then evict every pod
// that no DaemonSet owns) while clients on node-1 loop through a Service to
// a Deployment spread over both nodes, and proves: the evicted pods come
// up on node-1; node-1's agent drops the drained pods' addresses from its
// ipcache; the allowed client keeps getting through and the denied one
// never does; and after uncordon a new pod schedules onto node-2 and is
// reached from node-1 through the tunnel, by the allowed client only, with
// nothing in the clear on the underlay.
func TestPrivilegedDrain(t *testing.T) {
	requireCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	l := startLab(t, ctx, labSpec{Up: true, UpOptions: cluster.UpOptions{
		Options:    cluster.Options{Prefix: drainPrefix, Nodes: 2},
		StrictMode: true, NoDNS: true, NoDemo: true,
	}})
	setupTraffic(t, ctx, l)
	node1, node2 := cluster.NodeName(1), cluster.NodeName(2)

	web := webDeployment(2)
	if _, err := l.clients.AppsV1().Deployments(trafficNS).Create(ctx, web, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: trafficNS},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "server"},
			Ports:    []corev1.ServicePort{{Port: serverPort, TargetPort: intstr.FromInt32(serverPort), Protocol: corev1.ProtocolTCP}},
		},
	}
	if svc, err := l.clients.CoreV1().Services(trafficNS).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	} else {
		target := &corev1.Pod{Status: corev1.PodStatus{PodIP: svc.Spec.ClusterIP}}
		runPods(t, ctx, l,
			clientPod("allowed", node1, "allowed", "probe", target),
			clientPod("denied", node1, "denied", "probe", target))
	}
	byNode := waitWeb(t, ctx, l, 2)
	if len(byNode[node1]) != 1 || len(byNode[node2]) != 1 {
		t.Fatalf("web pods by node %v; want one on each (preferred anti-affinity)", byNode)
	}
	drained := byNode[node2][0]
	if !ipcacheHas(t, ctx, l.Nodes[0], drained) {
		t.Fatalf("%s's ipcache lacks the web pod %s on %s before the drain", node1, drained, node2)
	}
	testenv.Eventually(t, time.Minute, time.Second, func() error {
		cl, err := readClientLog(ctx, l, "allowed")
		if err != nil || len(cl.oks) == 0 {
			return fmt.Errorf("allowed client: no exchange yet (%v)", err)
		}
		return nil
	})

	began := time.Now()
	evicted := drain(t, ctx, l, node2)
	after := waitWeb(t, ctx, l, 2)
	took := time.Since(began)
	if len(after[node1]) != 2 || len(after[node2]) != 0 {
		t.Errorf("web pods by node after draining %s: %v; want both on %s", node2, after, node1)
	}
	t.Logf("drain of %s: %d pods evicted; replacements running on %s %s after the cordon", node2, evicted, node1, took.Round(time.Millisecond))
	testenv.Eventually(t, 30*time.Second, 500*time.Millisecond, func() error {
		if ipcacheHas(t, ctx, l.Nodes[0], drained) {
			return fmt.Errorf("%s's ipcache still holds the drained pod %s", node1, drained)
		}
		return nil
	})
	drainedAt := time.Now()
	// The allowed client reaches the moved backends; the denied one is
	// still refused.
	testenv.Eventually(t, 30*time.Second, time.Second, func() error {
		cl, err := readClientLog(ctx, l, "allowed")
		if err != nil {
			return err
		}
		if n := len(cl.oks); n == 0 || !cl.oks[n-1].After(drainedAt) {
			return fmt.Errorf("allowed client: no exchange since the drain")
		}
		return nil
	})
	if cl, err := readClientLog(ctx, l, "allowed"); err == nil {
		gap, fails := cl.window(began, drainedAt)
		t.Logf("allowed client through the Service during the drain: longest gap %s, %d failed connects", gap.Round(time.Millisecond), fails)
	}

	// Uncordon: a third replica prefers the emptier node-2.
	uncordon := `{"spec":{"unschedulable":false}}`
	if _, err := l.clients.CoreV1().Nodes().Patch(ctx, node2, types.StrategicMergePatchType, []byte(uncordon), metav1.PatchOptions{}); err != nil {
		t.Fatalf("uncordon %s: %v", node2, err)
	}
	scale := `{"spec":{"replicas":3}}`
	if _, err := l.clients.AppsV1().Deployments(trafficNS).Patch(ctx, "web", types.StrategicMergePatchType, []byte(scale), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	back := waitWeb(t, ctx, l, 3)
	if len(back[node2]) != 1 {
		t.Fatalf("web pods by node after uncordon and scale to 3: %v; want one back on %s", back, node2)
	}
	underlay := startUnderlayCapture(t, l)
	allowed, denied := trafficPodNamed(t, ctx, l, "allowed"), trafficPodNamed(t, ctx, l, "denied")
	target := fmt.Sprintf("%s:%d", back[node2][0], serverPort)
	for _, tc := range []struct {
		pod   *corev1.Pod
		allow bool
	}{{allowed, true}, {denied, false}} {
		res, err := l.Exec(ctx, trafficNS, tc.pod.Name, []string{"/client", "connect", "-timeout", "1500ms", target}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if (res.ExitCode == 0) != tc.allow {
			t.Errorf("%s on %s -> web pod %s back on %s: exit %d (%s%s); want allowed=%v", tc.pod.Name, node1, target, node2, res.ExitCode, res.Stdout, res.Stderr, tc.allow)
		}
	}
	checkEncrypted(t, underlay.stop(), "after uncordon")
	if cl, err := readClientLog(ctx, l, "denied"); err != nil {
		t.Fatal(err)
	} else if len(cl.oks) != 0 {
		t.Errorf("denied client got through %d times (first at %s)", len(cl.oks), cl.oks[0].Format(time.StampMilli))
	}
}

// webDeployment runs replicas servers (app=server, admitted to role=allowed
// by the traffic policy), preferring nodes without one.
func webDeployment(replicas int32) *appsv1.Deployment {
	labels := map[string]string{"app": "server"}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: trafficNS},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					Containers: []corev1.Container{{
						Name: "web", Image: cluster.TestServerImage, ImagePullPolicy: corev1.PullNever,
						Args: []string{"serve", fmt.Sprintf(":%d", serverPort)},
					}},
					Affinity: &corev1.Affinity{PodAntiAffinity: &corev1.PodAntiAffinity{
						PreferredDuringSchedulingIgnoredDuringExecution: []corev1.WeightedPodAffinityTerm{{
							Weight: 100,
							PodAffinityTerm: corev1.PodAffinityTerm{
								LabelSelector: &metav1.LabelSelector{MatchLabels: labels},
								TopologyKey:   corev1.LabelHostname,
							},
						}},
					}},
					TerminationGracePeriodSeconds: new(int64),
				},
			},
		},
	}
}

// waitWeb waits until the web Deployment has n ready pods and no others,
// and returns their addresses by node.
func waitWeb(t *testing.T, ctx context.Context, l *testLab, n int) map[string][]netip.Addr {
	t.Helper()
	var byNode map[string][]netip.Addr
	testenv.Eventually(t, 2*time.Minute, 250*time.Millisecond, func() error {
		pods, err := l.clients.CoreV1().Pods(trafficNS).List(ctx, metav1.ListOptions{LabelSelector: "app=server"})
		if err != nil {
			return err
		}
		byNode = map[string][]netip.Addr{}
		ready := 0
		for _, p := range pods.Items {
			if p.DeletionTimestamp != nil || p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
				return fmt.Errorf("web pod %s: %s on %q", p.Name, p.Status.Phase, p.Spec.NodeName)
			}
			ready++
			byNode[p.Spec.NodeName] = append(byNode[p.Spec.NodeName], netip.MustParseAddr(p.Status.PodIP))
		}
		if ready != n {
			return fmt.Errorf("%d web pods running; want %d", ready, n)
		}
		return nil
	})
	return byNode
}

// drain cordons node and evicts every pod on it that no DaemonSet owns, as
// `kubectl drain --ignore-daemonsets` does, and waits until they are gone.
// It returns how many it evicted.
func drain(t *testing.T, ctx context.Context, l *testLab, node string) int {
	t.Helper()
	cordon := `{"spec":{"unschedulable":true}}`
	if _, err := l.clients.CoreV1().Nodes().Patch(ctx, node, types.StrategicMergePatchType, []byte(cordon), metav1.PatchOptions{}); err != nil {
		t.Fatalf("cordon %s: %v", node, err)
	}
	pods, err := l.clients.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
	if err != nil {
		t.Fatal(err)
	}
	var evicted []corev1.Pod
	for _, p := range pods.Items {
		if owner := metav1.GetControllerOf(&p); owner != nil && owner.Kind == "DaemonSet" {
			continue
		}
		ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace}}
		if err := l.clients.PolicyV1().Evictions(p.Namespace).Evict(ctx, ev); err != nil {
			t.Fatalf("evict %s/%s from %s: %v", p.Namespace, p.Name, node, err)
		}
		evicted = append(evicted, p)
	}
	testenv.Eventually(t, 2*time.Minute, 250*time.Millisecond, func() error {
		for _, p := range evicted {
			got, err := l.clients.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
			if apierrors.IsNotFound(err) || (err == nil && got.UID != p.UID) {
				continue
			}
			if err != nil {
				return err
			}
			return fmt.Errorf("evicted pod %s/%s still there (%s)", p.Namespace, p.Name, got.Status.Phase)
		}
		return nil
	})
	return len(evicted)
}

// trafficPodNamed returns pod name of trafficNS.
func trafficPodNamed(t *testing.T, ctx context.Context, l *testLab, name string) *corev1.Pod {
	t.Helper()
	p, err := l.clients.CoreV1().Pods(trafficNS).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// ipcacheHas reports whether the agent's pinned ipcache on nd holds addr
// (as a /32: a remote pod's entry).
func ipcacheHas(t *testing.T, ctx context.Context, nd *cluster.Node, addr netip.Addr) bool {
	t.Helper()
	const script = `m=$(find /sys/fs/bpf/veil -name veil_ipcache | head -1); [ -n "$m" ] || { echo "no pinned veil_ipcache" >&2; exit 1; }; bpftool -j map dump pinned "$m"`
	out, err := nd.Run(ctx, "sh", "-c", script)
	if err != nil {
		t.Fatalf("dump %s's ipcache: %v", nd.Name, err)
	}
	var entries []struct {
		Key []string `json:"key"`
	}
	if err := json.Unmarshal([]byte(out), &entries); err != nil {
		t.Fatalf("dump %s's ipcache: %v: %.300s", nd.Name, err, out)
	}
	for _, e := range entries {
		// struct lpm_v4_key: __u32 prefixlen (host order), __be32 addr.
		if len(e.Key) != 8 {
			t.Fatalf("%s's ipcache key %v: want 8 bytes", nd.Name, e.Key)
		}
		var b [8]byte
		for i, h := range e.Key {
			v, err := strconv.ParseUint(strings.TrimPrefix(h, "0x"), 16, 8)
			if err != nil {
				t.Fatalf("%s's ipcache key %v: %v", nd.Name, e.Key, err)
			}
			b[i] = byte(v)
		}
		if b[0] == 32 && netip.AddrFrom4([4]byte(b[4:8])) == addr {
			return true
		}
	}
	return false
}
