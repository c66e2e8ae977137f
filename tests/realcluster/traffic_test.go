package realcluster

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/veilmesh/veil/agent/capture"
	"github.com/veilmesh/veil/agent/config"
	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/tests/testenv"
)

// The traffic of the node lifecycle tests (rollout, drain, join): a server
// pod per node in namespace trafficNS, and a policy that admits only
// clients labelled role=allowed, on serverPort.
const (
	trafficNS  = "traffic"
	serverPort = 8080
)

// probeMarker is in every line the test clients send: a frame holding it
// on the underlay is pod payload in the clear.
var probeMarker = []byte("probe")

// setupTraffic creates the namespace and its policy.
func setupTraffic(t *testing.T, ctx context.Context, l *testLab) {
	t.Helper()
	if _, err := l.clients.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: trafficNS}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	l.waitServiceAccount(ctx, trafficNS)
	tcp := corev1.ProtocolTCP
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "servers-admit-allowed", Namespace: trafficNS},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "server"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "allowed"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: new(intstr.FromInt32(serverPort))}},
			}},
		},
	}
	if _, err := l.clients.NetworkingV1().NetworkPolicies(trafficNS).Create(ctx, np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// podSpec is one test-server pod of trafficNS, placed on node.
type podSpec struct {
	name, node string
	labels     map[string]string
	args       []string
}

// serverPod serves on serverPort on node.
func serverPod(node string) podSpec {
	return podSpec{name: "server-" + node, node: node, labels: map[string]string{"app": "server"}, args: []string{"serve", fmt.Sprintf(":%d", serverPort)}}
}

// clientPod runs testserver mode (probe, stream) against target with role
// (allowed, denied).
func clientPod(name, node, role, mode string, target *corev1.Pod) podSpec {
	return podSpec{name: name, node: node, labels: map[string]string{"role": role}, args: []string{mode, fmt.Sprintf("%s:%d", target.Status.PodIP, serverPort)}}
}

// runPods creates the pods and waits until all of them run. They never
// restart: a client that exits has something to say.
func runPods(t *testing.T, ctx context.Context, l *testLab, specs ...podSpec) map[string]*corev1.Pod {
	t.Helper()
	for _, s := range specs {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: s.name, Namespace: trafficNS, Labels: s.labels},
			Spec: corev1.PodSpec{
				NodeSelector: map[string]string{corev1.LabelHostname: s.node},
				Containers: []corev1.Container{{
					Name: "main", Image: cluster.TestServerImage, ImagePullPolicy: corev1.PullNever, Args: s.args,
				}},
				RestartPolicy:                 corev1.RestartPolicyNever,
				TerminationGracePeriodSeconds: new(int64),
			},
		}
		if _, err := l.clients.CoreV1().Pods(trafficNS).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create pod %s: %v", s.name, err)
		}
	}
	out := map[string]*corev1.Pod{}
	testenv.Eventually(t, 2*time.Minute, 250*time.Millisecond, func() error {
		for _, s := range specs {
			p, err := l.clients.CoreV1().Pods(trafficNS).Get(ctx, s.name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
				return fmt.Errorf("pod %s: %s on %q", s.name, p.Status.Phase, p.Spec.NodeName)
			}
			out[s.name] = p
		}
		return nil
	})
	return out
}

// clientLog is what a probe or stream client printed so far.
type clientLog struct {
	// oks are the times of the successful exchanges, in order.
	oks []time.Time
	// fails are the times of the failed attempts (probe), in order.
	fails []time.Time
	// connected counts the stream's connections; broken is its last word.
	connected int
	broken    string
}

// readClientLog reads a client pod's whole log through the API server.
func readClientLog(ctx context.Context, l *testLab, pod string) (clientLog, error) {
	out, err := l.clients.CoreV1().Pods(trafficNS).GetLogs(pod, &corev1.PodLogOptions{}).DoRaw(ctx)
	if err != nil {
		return clientLog{}, fmt.Errorf("logs of %s: %w", pod, err)
	}
	var cl clientLog
	for line := range strings.Lines(string(out)) {
		line = strings.TrimSpace(line)
		stamp := func() (time.Time, error) {
			_, after, found := strings.Cut(line[max(0, strings.LastIndex(line, " t=")):], " t=")
			ns, err := strconv.ParseInt(after, 10, 64)
			if !found || err != nil {
				return time.Time{}, fmt.Errorf("%s: line %q: no time", pod, line)
			}
			return time.Unix(0, ns), nil
		}
		switch {
		case strings.HasPrefix(line, "ok "), strings.HasPrefix(line, "stream ok "):
			at, err := stamp()
			if err != nil {
				return clientLog{}, err
			}
			cl.oks = append(cl.oks, at)
		case strings.HasPrefix(line, "fail "):
			at, err := stamp()
			if err != nil {
				return clientLog{}, err
			}
			cl.fails = append(cl.fails, at)
		case strings.HasPrefix(line, "connected "):
			cl.connected++
		case strings.Contains(line, "stream broken"):
			cl.broken = line
		}
	}
	return cl, nil
}

// window is what a client saw between from and to: its longest time
// without a successful exchange (from the last success before from to the
// first after to, at most), and its failed attempts between the last
// success before from and the first after to.
func (cl clientLog) window(from, to time.Time) (gap time.Duration, fails int) {
	var last, end time.Time
	for _, ok := range cl.oks {
		if !ok.Before(from) && !last.IsZero() {
			gap = max(gap, ok.Sub(last))
		}
		last = ok
		if ok.After(to) {
			end = ok
			break
		}
	}
	begin := from
	if i := slices.IndexFunc(cl.oks, func(ok time.Time) bool { return !ok.Before(from) }); i > 0 {
		begin = cl.oks[i-1]
	}
	for _, f := range cl.fails {
		if f.After(begin) && (end.IsZero() || f.Before(end)) {
			fails++
		}
	}
	return gap, fails
}

// attempts counts the failed attempts between from and to.
func (cl clientLog) attempts(from, to time.Time) int {
	n := 0
	for _, f := range cl.fails {
		if !f.Before(from) && !f.After(to) {
			n++
		}
	}
	return n
}

// underlayCapture watches every node's port of the hub's bridge, which all
// traffic between nodes crosses, and classifies the frames.
type underlayCapture struct {
	caps map[string]*capture.Capture
}

// startUnderlayCapture starts capturing on the hub's port of each node.
func startUnderlayCapture(t *testing.T, l *testLab) *underlayCapture {
	t.Helper()
	hub := &netns.Netns{Name: filepath.Base(l.HubNetnsPath())}
	uc := &underlayCapture{caps: map[string]*capture.Capture{}}
	for _, nd := range l.Nodes {
		port := fmt.Sprintf("n%d", nd.Index)
		if err := hub.Do(func() error {
			c, err := capture.Start(port, capture.Options{
				Marker:        probeMarker,
				WireGuardPort: uint16(config.Default().WireGuardPort),
				PodRange:      cluster.ClusterCIDR,
			})
			uc.caps[nd.Name] = c
			return err
		}); err != nil {
			t.Fatalf("capture on the hub's port %s of %s: %v", port, nd.Name, err)
		}
	}
	t.Cleanup(func() { uc.stop() })
	return uc
}

// stop ends the captures and returns what each saw, by node.
func (uc *underlayCapture) stop() map[string]capture.Summary {
	out := map[string]capture.Summary{}
	for name, c := range uc.caps {
		out[name] = c.Stop()
		delete(uc.caps, name)
	}
	return out
}

// checkEncrypted fails t unless every node's port carried WireGuard and no
// pod frame or probe payload in the clear.
func checkEncrypted(t *testing.T, seen map[string]capture.Summary, during string) {
	t.Helper()
	for node, s := range seen {
		t.Logf("underlay at %s %s: %d frames, %d WireGuard, %d plaintext pod frames, %d with the probes' payload", node, during, s.Frames, s.WireGuard, s.PlainPod, s.Marker)
		if s.PlainPod != 0 || s.Marker != 0 {
			t.Errorf("underlay at %s %s: %d plaintext pod frames, %d frames with the probes' payload in the clear; want 0", node, during, s.PlainPod, s.Marker)
		}
		if s.WireGuard == 0 {
			t.Errorf("underlay at %s %s: no WireGuard frames; the cross-node clients' traffic should be there", node, during)
		}
	}
}
