package realcluster

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/veilmesh/veil/lab/cluster"
)

// TestPrivilegedClusterIPRemoteBackendThroughKubeProxy is issue 14 on a
// real cluster: Veil's socket hooks off (the chart's cgroupRoot empty), so
// kube-proxy (iptables) translates a pod's connection to a ClusterIP whose
// only backend runs on the other node. The backend's replies come out of the
// tunnel with the backend's address; Veil must hand them to the client
// node's stack, where netfilter turns them back into the ClusterIP's, and
// the client must reach the Service. Without that, the SYN-ACK went
// straight into the pod, whose socket never talked to the backend.
//
// Once in strict and once in permissive mode: in both the host routes the
// peers' pod CIDRs into the tunnel, so kube-proxy's translated leg reaches
// the other node (the lab's underlay has no route to pod CIDRs, and a
// tunnelled node's pod addresses are believed only out of the tunnel).
func TestPrivilegedClusterIPRemoteBackendThroughKubeProxy(t *testing.T) {
	requireCluster(t)
	for _, strict := range []bool{true, false} {
		name := "permissive"
		if strict {
			name = "strict"
		}
		t.Run(name, func(t *testing.T) { testClusterIPRemoteBackendThroughKubeProxy(t, strict) })
	}
}

func testClusterIPRemoteBackendThroughKubeProxy(t *testing.T, strict bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	c := startLab(t, ctx, labSpec{UpOptions: cluster.UpOptions{Options: cluster.Options{
		Prefix: "vrcstack", Nodes: 2, KubeProxy: cluster.KubeProxyIPTables,
	}}})
	values := cluster.LabValues()
	if values["cgroupRoot"] != "" {
		t.Fatalf("lab values have cgroupRoot %q; this test needs the socket hooks off", values["cgroupRoot"])
	}
	// The backend's replies come out of the tunnel.
	values["encryption"] = map[string]any{"strictMode": strict}
	c.installVeil(ctx, values)
	c.waitServiceAccount(ctx, "default")

	server := createPod(t, ctx, c.clients, "server", []string{"serve", ":8080"})
	svc, err := c.clients.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "server", Namespace: "default"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "server"},
			Ports:    []corev1.ServicePort{{Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service: %v", err)
	}
	client := createPod(t, ctx, c.clients, "client", []string{"probe", svc.Spec.ClusterIP + ":80"})
	if server.Spec.NodeName == client.Spec.NodeName {
		t.Fatalf("scheduler put both pods on %s despite the anti-affinity", server.Spec.NodeName)
	}
	t.Logf("client on %s probes ClusterIP %s:80; its only backend %s runs on %s",
		client.Spec.NodeName, svc.Spec.ClusterIP, server.Status.PodIP, server.Spec.NodeName)
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		dctx, dcancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer dcancel()
		for _, nd := range c.Nodes {
			for _, argv := range [][]string{
				{"sh", "-c", "iptables-save -c | grep -E 'FORWARD|KUBE-SEP|KUBE-SVC|MASQ|DROP' | head -40"},
				{"conntrack", "-L"},
				{"ip", "route"},
				{"sh", "-c", "sysctl -a 2>/dev/null | grep -E 'rp_filter|ip_forward'"},
				{"nstat", "-az", "TcpExtIPReversePathFilter", "IpExtInNoRoutes", "IpInAddrErrors"},
				{"bpftool", "map", "dump", "pinned", "/sys/fs/bpf/veil/veil_stack_clients"},
				{"sh", "-c", "bpftool map dump pinned /sys/fs/bpf/veil/veil_ct | head -60"},
				{"sh", "-c", "bpftool map dump pinned /sys/fs/bpf/veil/veil_metrics | grep -B1 -A3 -E 'packets.: [1-9]' | head -80"},
			} {
				out, err := nd.Run(dctx, argv...)
				t.Logf("diagnostics of %s, %v: err=%v\n%s", nd.Name, argv, err, out)
			}
		}
	})
	waitProbe(t, ctx, c.clients, "ok")
	c.down()
}
