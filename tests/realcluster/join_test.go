package realcluster

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/tests/testenv"
)

// joinPrefix names TestPrivilegedNodeJoin's cluster.
const joinPrefix = "vrcjoin"

// TestPrivilegedNodeJoin adds a third node to a running 2-node cluster in
// strict mode (cluster.AddNode) and proves that it joins the mesh: it
// registers and gets a pod CIDR, the DaemonSet puts an agent on it, its
// WireGuard peers with both others (and they with it), its pods reach and
// are reached by the other nodes' pods through the tunnel, with nothing in
// the clear on the underlay, and the policy holds for them both ways. It
// logs the time from AddNode to the new node's first allowed connection.
func TestPrivilegedNodeJoin(t *testing.T) {
	requireCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	l := startLab(t, ctx, labSpec{Up: true, UpOptions: cluster.UpOptions{
		Options:    cluster.Options{Prefix: joinPrefix, Nodes: 2},
		StrictMode: true, NoDNS: true, NoDemo: true,
	}})
	setupTraffic(t, ctx, l)
	node1, node2, node3 := cluster.NodeName(1), cluster.NodeName(2), cluster.NodeName(3)
	servers := runPods(t, ctx, l, serverPod(node1))

	began := time.Now()
	nd, err := l.AddNode(ctx)
	if err != nil {
		t.Fatalf("add node: %v", err)
	}
	registered := time.Since(began)
	if nd.Name != node3 || !cluster.ClusterCIDR.Contains(nd.PodCIDR.Addr()) {
		t.Fatalf("added node %s with pod CIDR %s; want %s within %s", nd.Name, nd.PodCIDR, node3, cluster.ClusterCIDR)
	}
	underlay := startUnderlayCapture(t, l)
	// The new node's pods wait for its agent (the CNI) to come; the probe
	// logs its first success.
	newPods := runPods(t, ctx, l,
		serverPod(node3),
		clientPod("allowed-"+node3+"-cross", node3, "allowed", "probe", servers["server-"+node1]),
		clientPod("denied-"+node3+"-cross", node3, "denied", "probe", servers["server-"+node1]))
	running := time.Since(began)
	var first time.Time
	testenv.Eventually(t, 2*time.Minute, 250*time.Millisecond, func() error {
		cl, err := readClientLog(ctx, l, "allowed-"+node3+"-cross")
		if err != nil {
			return err
		}
		if len(cl.oks) == 0 {
			return fmt.Errorf("the new node's allowed client: no connection yet (%d failed)", len(cl.fails))
		}
		first = cl.oks[0]
		return nil
	})
	t.Logf("node join: AddNode → registered with pod CIDR %s %s, → its first pods Running %s, → first allowed connection to %s (encrypted) %s",
		nd.PodCIDR, registered.Round(time.Millisecond), running.Round(time.Millisecond), node1, first.Sub(began).Round(time.Millisecond))

	// Reached from the other nodes: their clients to the new node's server.
	runPods(t, ctx, l,
		clientPod("allowed-"+node1+"-to-new", node1, "allowed", "probe", newPods["server-"+node3]),
		clientPod("allowed-"+node2+"-to-new", node2, "allowed", "probe", newPods["server-"+node3]),
		clientPod("denied-"+node1+"-to-new", node1, "denied", "probe", newPods["server-"+node3]))
	testenv.Eventually(t, time.Minute, 500*time.Millisecond, func() error {
		for _, name := range []string{"allowed-" + node1 + "-to-new", "allowed-" + node2 + "-to-new"} {
			cl, err := readClientLog(ctx, l, name)
			if err != nil {
				return err
			}
			if len(cl.oks) == 0 {
				return fmt.Errorf("%s to the new node's server: no connection yet (%d failed)", name, len(cl.fails))
			}
		}
		return nil
	})
	if err := l.WaitDaemonSetReady(ctx, deploy.Namespace, deploy.DaemonSetName); err != nil {
		t.Fatal(err)
	}
	// Every node's MeshNode lists the two others as peers.
	if err := l.WaitMeshNodes(ctx); err != nil {
		t.Fatal(err)
	}
	// The new node's device moved bytes with both peers.
	out, err := nd.Run(ctx, "wg", "show", "veil-wg0", "transfer")
	if err != nil {
		t.Fatalf("wg show on %s: %v", nd.Name, err)
	}
	peers := 0
	for line := range strings.Lines(out) {
		if f := strings.Fields(line); len(f) == 3 && f[1] != "0" && f[2] != "0" {
			peers++
		}
	}
	t.Logf("wg show veil-wg0 transfer on %s:\n%s", nd.Name, out)
	if peers != 2 {
		t.Errorf("WireGuard on %s: %d peers with bytes both ways; want both other nodes' tunnels in use", nd.Name, peers)
	}
	checkEncrypted(t, underlay.stop(), "while "+node3+" joined")
	for _, name := range []string{"denied-" + node3 + "-cross", "denied-" + node1 + "-to-new"} {
		cl, err := readClientLog(ctx, l, name)
		if err != nil {
			t.Fatal(err)
		}
		if len(cl.oks) != 0 {
			t.Errorf("%s: a denied client got through %d times", name, len(cl.oks))
		}
		if len(cl.fails) == 0 {
			t.Errorf("%s: never tried", name)
		}
	}
	agent, err := l.clients.CoreV1().Pods(deploy.Namespace).List(ctx, metav1.ListOptions{LabelSelector: agentSelector, FieldSelector: "spec.nodeName=" + node3})
	if err != nil {
		t.Fatal(err)
	}
	if len(agent.Items) != 1 || agent.Items[0].Status.Phase != corev1.PodRunning {
		t.Errorf("agents on %s: %d; want one running", node3, len(agent.Items))
	}
}
