package realcluster

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/veilmesh/veil/api/annotations"
	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/tests/testenv"
)

// rolloutPrefix names TestPrivilegedRollout's cluster.
const rolloutPrefix = "vrcroll"

// agentSelector selects the agents' pods.
const agentSelector = "app.kubernetes.io/name=veil-agent"

// TestPrivilegedRollout restarts the agent DaemonSet as `kubectl rollout
// restart ds/veil-agent` does (a new pod template annotation) on a 2-node
// cluster in strict mode while clients on both nodes loop, same node and
// across, and proves:
//
//   - established connections survive: a TCP connection per node and
//     direction opened before the rollout keeps exchanging lines after it,
//     on the same connection, with TCP retransmitting across the gap while
//     an agent restarts (each echo may take up to 60 s);
//   - enforcement never lapses: clients of a denied pair, same node and
//     across, dial every ~1.1 s throughout and never get through;
//   - strict mode holds: the underlay (every node's port of the hub's
//     bridge) carries no pod frame and no client payload in the clear for
//     the whole rollout;
//   - the agents come back with the same WireGuard keys and adopt the
//     pinned maps and links (the same kernel objects by id).
//
// It logs the rollout's time, and per client the longest gap without a
// successful exchange and the failed attempts.
func TestPrivilegedRollout(t *testing.T) {
	requireCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	l := startLab(t, ctx, labSpec{Up: true, UpOptions: cluster.UpOptions{
		Options:    cluster.Options{Prefix: rolloutPrefix, Nodes: 2},
		StrictMode: true, NoDNS: true, NoDemo: true,
	}})
	setupTraffic(t, ctx, l)
	nodes := []string{cluster.NodeName(1), cluster.NodeName(2)}
	servers := runPods(t, ctx, l, serverPod(nodes[0]), serverPod(nodes[1]))
	var clients []podSpec
	for i, node := range nodes {
		same, other := servers["server-"+node], servers["server-"+nodes[1-i]]
		for _, c := range []struct {
			kind, role, mode string
			target           *corev1.Pod
		}{
			{"allowed", "allowed", "probe", nil},
			{"denied", "denied", "probe", nil},
			{"stream", "allowed", "stream", nil},
		} {
			clients = append(clients,
				clientPod(fmt.Sprintf("%s-%s-same", c.kind, node), node, c.role, c.mode, same),
				clientPod(fmt.Sprintf("%s-%s-cross", c.kind, node), node, c.role, c.mode, other))
		}
	}
	runPods(t, ctx, l, clients...)
	// Steady state: every allowed pair and stream exchanges, every denied
	// pair has been refused.
	testenv.Eventually(t, time.Minute, time.Second, func() error {
		for _, c := range clients {
			cl, err := readClientLog(ctx, l, c.name)
			if err != nil {
				return err
			}
			if strings.HasPrefix(c.name, "denied") {
				if len(cl.fails) == 0 {
					return fmt.Errorf("%s: not refused yet", c.name)
				}
			} else if len(cl.oks) == 0 {
				return fmt.Errorf("%s: no exchange yet", c.name)
			}
		}
		return nil
	})

	keys := publicKeys(t, ctx, l)
	pins := map[string]map[string]string{}
	for _, nd := range l.Nodes {
		pins[nd.Name] = pinnedObjects(t, ctx, nd)
	}
	oldAgents := agentPods(t, ctx, l)
	underlay := startUnderlayCapture(t, l)

	began := time.Now()
	restartDaemonSet(t, ctx, l)
	waitRolledOut(t, ctx, l, oldAgents)
	done := time.Now()
	t.Logf("rollout restart of ds/%s on %d nodes: %s", deploy.DaemonSetName, len(l.Nodes), done.Sub(began).Round(time.Millisecond))
	// Established connections must keep exchanging after the rollout,
	// and the capture covers the agents' first seconds too.
	time.Sleep(5 * time.Second)
	checkEncrypted(t, underlay.stop(), "during the rollout")

	for _, c := range clients {
		cl, err := readClientLog(ctx, l, c.name)
		if err != nil {
			t.Fatal(err)
		}
		gap, fails := cl.window(began, done)
		switch kind, _, _ := strings.Cut(c.name, "-"); kind {
		case "denied":
			if len(cl.oks) != 0 {
				t.Errorf("%s: a denied client got through %d times (first at %s, rollout %s–%s)", c.name, len(cl.oks), cl.oks[0].Format(time.StampMilli), began.Format(time.StampMilli), done.Format(time.StampMilli))
			}
			t.Logf("%s: refused %d times during the rollout (%d in all), never through", c.name, cl.attempts(began, done), len(cl.fails))
		case "allowed":
			if n := len(cl.oks); n == 0 || !cl.oks[n-1].After(done) {
				t.Errorf("%s: no successful connection after the rollout", c.name)
			}
			t.Logf("%s: longest gap %s, %d failed connects during the rollout", c.name, gap.Round(time.Millisecond), fails)
		case "stream":
			p, err := l.clients.CoreV1().Pods(trafficNS).Get(ctx, c.name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if cl.broken != "" || cl.connected != 1 || p.Status.Phase != corev1.PodRunning {
				t.Errorf("%s: the established connection did not survive: %d connections, %q, pod %s", c.name, cl.connected, cl.broken, p.Status.Phase)
			} else if n := len(cl.oks); n == 0 || !cl.oks[n-1].After(done) {
				t.Errorf("%s: the connection stopped exchanging before the rollout ended (%d echoes)", c.name, n)
			}
			t.Logf("%s: one connection, longest stall %s", c.name, gap.Round(time.Millisecond))
		}
	}

	if after := publicKeys(t, ctx, l); !maps.Equal(keys, after) {
		t.Errorf("WireGuard public keys changed over the rollout: %v, then %v", keys, after)
	}
	// The maps (conntrack, policy, ipcache, endpoints...) and the links
	// that attach programs to the node's devices and cgroup are adopted:
	// the same kernel objects. The programs may be new (a new image brings
	// new ones; they replace the old atomically in the same links), and so
	// is the link on the userspace WireGuard device, which ended with the
	// old agent's process.
	for _, nd := range l.Nodes {
		after := pinnedObjects(t, ctx, nd)
		adopted := 0
		for _, path := range slices.Sorted(maps.Keys(pins[nd.Name])) {
			was := pins[nd.Name][path]
			if strings.HasPrefix(was, "prog ") || strings.Contains(path, "/tunnel_") {
				continue
			}
			if after[path] != was {
				t.Errorf("%s: pinned %s was %s before the rollout, %q after: the new agent replaced it instead of adopting it", nd.Name, path, was, after[path])
				continue
			}
			adopted++
		}
		t.Logf("%s: %d of %d pins adopted by the new agent (maps and links)", nd.Name, adopted, len(pins[nd.Name]))
	}
}

// restartDaemonSet does what `kubectl rollout restart` does: a new
// restartedAt annotation on the pod template.
func restartDaemonSet(t *testing.T, ctx context.Context, l *testLab) {
	t.Helper()
	patch := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":%q}}}}}`, time.Now().Format(time.RFC3339))
	if _, err := l.clients.AppsV1().DaemonSets(deploy.Namespace).Patch(ctx, deploy.DaemonSetName, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatalf("rollout restart ds/%s: %v", deploy.DaemonSetName, err)
	}
}

// waitRolledOut waits as `kubectl rollout status` does (every scheduled
// agent updated and available) and until none of old's pods is left.
func waitRolledOut(t *testing.T, ctx context.Context, l *testLab, old map[string]string) {
	t.Helper()
	testenv.Eventually(t, 4*time.Minute, 250*time.Millisecond, func() error {
		ds, err := l.clients.AppsV1().DaemonSets(deploy.Namespace).Get(ctx, deploy.DaemonSetName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		st := ds.Status
		if st.ObservedGeneration < ds.Generation || st.UpdatedNumberScheduled != st.DesiredNumberScheduled || st.NumberAvailable != st.DesiredNumberScheduled {
			return fmt.Errorf("ds/%s: %d of %d updated, %d available", ds.Name, st.UpdatedNumberScheduled, st.DesiredNumberScheduled, st.NumberAvailable)
		}
		for node, uid := range agentPods(t, ctx, l) {
			if old[node] == uid {
				return fmt.Errorf("the agent on %s is still the old pod", node)
			}
		}
		return nil
	})
}

// agentPods returns the UID of each node's agent pod.
func agentPods(t *testing.T, ctx context.Context, l *testLab) map[string]string {
	t.Helper()
	pods, err := l.clients.CoreV1().Pods(deploy.Namespace).List(ctx, metav1.ListOptions{LabelSelector: agentSelector})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			out[p.Spec.NodeName] = string(p.UID)
		}
	}
	return out
}

// publicKeys returns each node's published WireGuard public key.
func publicKeys(t *testing.T, ctx context.Context, l *testLab) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, nd := range l.Nodes {
		n, err := l.clients.CoreV1().Nodes().Get(ctx, nd.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		out[nd.Name] = n.Annotations[annotations.WireGuardPublicKey]
		if out[nd.Name] == "" {
			t.Fatalf("node %s has no %s", nd.Name, annotations.WireGuardPublicKey)
		}
	}
	return out
}

// pinnedObjects returns, for every pin below the agents' bpffs root on
// node, the kind and id of the kernel object it holds ("map 12"): the same
// id after a restart is the same object, adopted.
func pinnedObjects(t *testing.T, ctx context.Context, nd *cluster.Node) map[string]string {
	t.Helper()
	const script = `for f in $(find "$1" -type f | sort); do
	for kind in map prog link; do
		if out=$(bpftool -j $kind show pinned "$f" 2>/dev/null); then echo "$f $kind $out"; break; fi
	done
done`
	out, err := nd.Run(ctx, "sh", "-c", script, "sh", "/sys/fs/bpf/veil")
	if err != nil {
		t.Fatalf("list pins on %s: %v", nd.Name, err)
	}
	pins := map[string]string{}
	for line := range strings.Lines(out) {
		path, rest, _ := strings.Cut(strings.TrimSpace(line), " ")
		kind, js, _ := strings.Cut(rest, " ")
		var obj struct {
			ID int `json:"id"`
		}
		if err := json.Unmarshal([]byte(js), &obj); err != nil {
			t.Fatalf("%s: bpftool %s show pinned %s: %q: %v", nd.Name, kind, path, js, err)
		}
		pins[path] = fmt.Sprintf("%s %d", kind, obj.ID)
	}
	if len(pins) == 0 {
		t.Fatalf("%s: nothing pinned below /sys/fs/bpf/veil", nd.Name)
	}
	return pins
}
