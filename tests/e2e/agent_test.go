package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/policy"
)

var web = []corev1.ContainerPort{{Name: "http", ContainerPort: 80, Protocol: corev1.ProtocolTCP}, {Name: "alt", ContainerPort: 81, Protocol: corev1.ProtocolTCP}}

// liveTrace asks the source pod's agent to explain a flow.
func (e *env) liveTrace(t *testing.T, from, to *pod, port int) policy.TraceResult {
	t.Helper()
	resp := call(t, e.agentOf(t, from.Node), "trace", func(ctx context.Context, c *agentclient.Conn) (*agentv1.TraceResponse, error) {
		return c.Client.Trace(ctx, &agentv1.TraceRequest{From: from.Key(), To: to.Key(), Port: fmt.Sprintf("%d/TCP", port)})
	})
	var tr policy.TraceResult
	if err := json.Unmarshal(resp.ResultJson, &tr); err != nil {
		t.Fatal(err)
	}
	return tr
}

// expect waits until from->to:port reaches (or not) and checks the live
// trace agrees.
func (e *env) expect(t *testing.T, from, to *pod, port int, allowed bool) {
	t.Helper()
	eventually(t, fmt.Sprintf("%s -> %s:%d allowed=%v", from.Key(), to.Key(), port, allowed), 20*time.Second, func() error {
		err := reach(from, to, port)
		if err != nil && !isDenied(err) {
			return err
		}
		if (err == nil) != allowed {
			return fmt.Errorf("reachable=%v (%v)", err == nil, err)
		}
		return nil
	})
	if tr := e.liveTrace(t, from, to, port); tr.Allowed != allowed {
		t.Errorf("trace %s -> %s:%d says allowed=%v, datapath says %v", from.Key(), to.Key(), port, tr.Allowed, allowed)
	}
}

func TestPrivilegedAgentPolicyOnTwoNodes(t *testing.T) {
	e := sharedEnv(t)
	ctx := context.Background()
	x := e.namespace(t, "pol-x", nil)
	y := e.namespace(t, "pol-y", nil)
	pods := e.addPods(t,
		podSpec{Namespace: x, Name: "a", Node: "node-1", Labels: map[string]string{"app": "a"}, Ports: web},
		podSpec{Namespace: x, Name: "b", Node: "node-1", Labels: map[string]string{"app": "b"}, Ports: web},
		podSpec{Namespace: y, Name: "c", Node: "node-2", Labels: map[string]string{"app": "c"}, Ports: web},
	)
	a, b, c := pods[0], pods[1], pods[2]
	for _, pair := range [][2]*pod{{a, b}, {b, a}, {a, c}, {c, a}, {b, c}, {c, b}} {
		e.expect(t, pair[0], pair[1], 80, true)
	}

	// NetworkPolicy: b accepts only a, only on 80.
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: x, Name: "b-from-a"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromString("http"))}},
			}},
		},
	}
	if _, err := e.kube.NetworkingV1().NetworkPolicies(x).Create(ctx, np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.expect(t, a, b, 80, true)
	e.expect(t, a, b, 81, false)
	e.expect(t, c, b, 80, false) // across nodes: node-1 polices node-2's pod by identity
	e.expect(t, b, a, 80, true)

	// MeshPolicy: c refuses everything from namespace x, whatever allows it.
	mp := &v1alpha1.MeshPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: y, Name: "no-x"},
		Spec: v1alpha1.MeshPolicySpec{PolicyRules: v1alpha1.PolicyRules{
			IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{corev1.LabelMetadataName: x}}}}}},
		}},
	}
	if _, err := e.veil.PolicyV1alpha1().MeshPolicies(y).Create(ctx, mp, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.expect(t, a, c, 80, false)
	e.expect(t, b, c, 81, false)
	e.expect(t, c, a, 80, true)
	eventually(t, "MeshPolicy no-x Accepted=True", 15*time.Second, func() error {
		got, err := e.veil.PolicyV1alpha1().MeshPolicies(y).Get(ctx, "no-x", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if !meta.IsStatusConditionTrue(got.Status.Conditions, v1alpha1.ConditionAccepted) {
			return fmt.Errorf("conditions %+v", got.Status.Conditions)
		}
		return nil
	})

	// Relabelling a pod changes enforcement: a stops being "app=a".
	pa, err := e.kube.CoreV1().Pods(x).Get(ctx, "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pa.Labels["app"] = "z"
	if _, err := e.kube.CoreV1().Pods(x).Update(ctx, pa, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.expect(t, a, b, 80, false)

	// Relabelling a namespace: y's MeshPolicy now names namespaces by a label.
	mp2 := mp.DeepCopy()
	mp2.Name = "no-team-red"
	mp2.ResourceVersion = ""
	mp2.Spec.IngressDeny[0].From[0].NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"team": "red"}}
	if err := e.veil.PolicyV1alpha1().MeshPolicies(y).Delete(ctx, "no-x", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.veil.PolicyV1alpha1().MeshPolicies(y).Create(ctx, mp2, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.expect(t, a, c, 80, true)
	e.labelNamespace(t, x, map[string]string{"team": "red"})
	e.expect(t, a, c, 80, false)
}
