package lab

import (
	"context"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/lab/netns"
)

// The demo is what `meshctl lab up` runs on a fresh lab: pods in two
// namespaces across the nodes, and a policy of each kind.

// DemoPorts are what every demo pod serves: an echo server on 80/TCP and
// 81/UDP.
func DemoPorts() []corev1.ContainerPort {
	return []corev1.ContainerPort{
		{Name: "http", ContainerPort: 80, Protocol: corev1.ProtocolTCP},
		{Name: "udp", ContainerPort: 81, Protocol: corev1.ProtocolUDP},
	}
}

// DemoPods are the demo's pods on a lab of nodes nodes: demo/frontend and
// other/client on node-1, demo/backend on node-2 (node-1 when alone).
func DemoPods(nodes int) []PodSpec {
	backendNode := "node-2"
	if nodes < 2 {
		backendNode = "node-1"
	}
	return []PodSpec{
		{Namespace: "demo", Name: "frontend", Node: "node-1", Labels: map[string]string{"app": "frontend"}, Ports: DemoPorts()},
		{Namespace: "demo", Name: "backend", Node: backendNode, Labels: map[string]string{"app": "backend"}, Ports: DemoPorts()},
		{Namespace: "other", Name: "client", Node: "node-1", Labels: map[string]string{"app": "client"}, Ports: DemoPorts()},
	}
}

// DemoPolicy says in words what one of the demo's policies does.
type DemoPolicy struct {
	Kind, Name string
	Says       string
}

// DemoPolicies describe the demo's policies.
func DemoPolicies() []DemoPolicy {
	return []DemoPolicy{
		{Kind: "NetworkPolicy", Name: "demo/backend-allow-frontend", Says: "demo/backend accepts only demo/frontend, only on 80/TCP"},
		{Kind: "MeshPolicy", Name: "demo/audit-other", Says: "audit mode: flows from namespace other to demo/frontend are reported as would-be denied, not dropped"},
	}
}

func demoObjects() (*networkingv1.NetworkPolicy, *v1alpha1.MeshPolicy) {
	port := intstr.FromInt32(80)
	tcp := corev1.ProtocolTCP
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "backend-allow-frontend"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "backend"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "frontend"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}},
			}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
		},
	}
	mp := &v1alpha1.MeshPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "audit-other"},
		Spec: v1alpha1.MeshPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "frontend"}},
			PolicyRules: v1alpha1.PolicyRules{
				Mode: v1alpha1.ModeAudit,
				IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{{
					NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": "other"}},
				}}}},
			},
		},
	}
	return np, mp
}

// StartDemo launches the demo's pods and policies and waits until the
// datapath enforces them: demo/frontend reaches demo/backend on 80/TCP,
// other/client does not.
func (l *Lab) StartDemo(ctx context.Context) error {
	for _, ns := range []string{"demo", "other"} {
		if err := l.EnsureNamespace(ctx, ns, nil); err != nil {
			return fmt.Errorf("demo namespace %s: %w", ns, err)
		}
	}
	pods := map[string]*Pod{}
	for _, spec := range DemoPods(len(l.Nodes)) {
		p, err := l.AddPod(ctx, spec)
		if err != nil {
			return fmt.Errorf("demo pod %s/%s: %w", spec.Namespace, spec.Name, err)
		}
		pods[p.Key()] = p
	}
	np, mp := demoObjects()
	if _, err := l.Kube.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create demo NetworkPolicy %s/%s: %w", np.Namespace, np.Name, err)
	}
	if _, err := l.Veil.PolicyV1alpha1().MeshPolicies(mp.Namespace).Create(ctx, mp, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create demo MeshPolicy %s/%s: %w", mp.Namespace, mp.Name, err)
	}
	backend := pods["demo/backend"]
	for _, c := range []struct {
		from  *Pod
		allow bool
	}{{pods["demo/frontend"], true}, {pods["other/client"], false}} {
		if err := waitReach(ctx, c.from, backend, 80, c.allow, 60*time.Second); err != nil {
			return fmt.Errorf("demo policy not enforced: %w", err)
		}
	}
	return l.waitMeshNodes(ctx, 60*time.Second)
}

// waitMeshNodes waits until every agent has published its encryption state
// with a peer for every other node, which is what 'meshctl encryption
// status' and 'audit encryption' read.
func (l *Lab) waitMeshNodes(ctx context.Context, within time.Duration) error {
	deadline := time.Now().Add(within)
	for _, n := range l.Nodes {
		for {
			mn, err := l.Veil.MeshV1alpha1().MeshNodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err == nil && (mn.Status.Encryption.Mode == "disabled" || int(mn.Status.Encryption.PeerCount) == len(l.Nodes)-1) {
				break
			}
			if err == nil {
				err = fmt.Errorf("encryption %q with %d of %d peers", mn.Status.Encryption.Mode, mn.Status.Encryption.PeerCount, len(l.Nodes)-1)
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				return fmt.Errorf("MeshNode %s not published within %s: %w", n.Name, within, err)
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
	return nil
}

// waitReach polls until from reaches (or not) to on TCP port.
func waitReach(ctx context.Context, from, to *Pod, port int, allow bool, within time.Duration) error {
	deadline := time.Now().Add(within)
	addr := fmt.Sprintf("%s:%d", to.IP, port)
	for {
		err := netns.TCPEcho(from.Netns, addr, 700*time.Millisecond)
		if (err == nil) == allow {
			return nil
		}
		if err == nil {
			err = errors.New("reachable")
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s -> %s (%s): want allowed=%v within %s: %w", from.Key(), to.Key(), addr, allow, within, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
