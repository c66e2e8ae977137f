package cluster

import (
	"context"
	"fmt"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/veilmesh/veil/api/client/clientset/versioned"
	policyv1alpha1 "github.com/veilmesh/veil/api/policy/v1alpha1"
)

// The demo is what `meshctl lab up` runs on a fresh lab, as real objects
// applied through the API: three Deployments of the test server in two
// namespaces, a Service for each, and a policy of each kind.

// DemoApp is one of the demo's Deployments (and its Service, of the same
// name).
type DemoApp struct {
	Namespace, Name string
	// Node is where its pod is placed (a nodeSelector on
	// kubernetes.io/hostname).
	Node string
}

// DemoApps are the demo's Deployments on a lab of nodes nodes:
// demo/frontend and other/client on node-1, demo/backend on node-2 (node-1
// when alone).
func DemoApps(nodes int) []DemoApp {
	backendNode := NodeName(2)
	if nodes < 2 {
		backendNode = NodeName(1)
	}
	return []DemoApp{
		{Namespace: "demo", Name: "frontend", Node: NodeName(1)},
		{Namespace: "demo", Name: "backend", Node: backendNode},
		{Namespace: "other", Name: "client", Node: NodeName(1)},
	}
}

// DemoPorts are what every demo pod serves: an echo server on 80/TCP and
// 81/UDP.
func DemoPorts() []corev1.ContainerPort {
	return []corev1.ContainerPort{
		{Name: "echo-tcp", ContainerPort: 80, Protocol: corev1.ProtocolTCP},
		{Name: "echo-udp", ContainerPort: 81, Protocol: corev1.ProtocolUDP},
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

func demoDeployment(app DemoApp) *appsv1.Deployment {
	labels := map[string]string{"app": app.Name}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: app.Namespace, Name: app.Name, Labels: labels},
		Spec: appsv1.DeploymentSpec{
			Replicas: new(int32(1)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					NodeSelector: map[string]string{corev1.LabelHostname: app.Node},
					Containers: []corev1.Container{{
						Name:            app.Name,
						Image:           TestServerImage,
						ImagePullPolicy: corev1.PullNever,
						Args:            []string{"serve", "tcp/:80", "udp/:81"},
						Ports:           DemoPorts(),
					}},
					TerminationGracePeriodSeconds: new(int64(1)),
				},
			},
		},
	}
}

func demoService(app DemoApp) *corev1.Service {
	var ports []corev1.ServicePort
	for _, p := range DemoPorts() {
		ports = append(ports, corev1.ServicePort{Name: p.Name, Port: p.ContainerPort, Protocol: p.Protocol, TargetPort: intstr.FromInt32(p.ContainerPort)})
	}
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: app.Namespace, Name: app.Name},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": app.Name}, Ports: ports},
	}
}

func demoPolicies() (*networkingv1.NetworkPolicy, *policyv1alpha1.MeshPolicy) {
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
	mp := &policyv1alpha1.MeshPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "audit-other"},
		Spec: policyv1alpha1.MeshPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "frontend"}},
			PolicyRules: policyv1alpha1.PolicyRules{
				Mode: policyv1alpha1.ModeAudit,
				IngressDeny: []policyv1alpha1.IngressRule{{From: []policyv1alpha1.Peer{{
					NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{corev1.LabelMetadataName: "other"}},
				}}}},
			},
		},
	}
	return np, mp
}

// StartDemo applies the demo's namespaces, Deployments, Services and
// policies, and waits until its pods run and the datapath enforces the
// NetworkPolicy: demo/frontend reaches demo/backend on 80/TCP, other/client
// does not (probed from inside the pods, through the API server's exec).
func (c *Cluster) StartDemo(ctx context.Context) error {
	clients, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("create client: %w", err)
	}
	veil, err := versioned.NewForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("create client: %w", err)
	}
	create := metav1.CreateOptions{FieldManager: "veil-lab"}
	for _, ns := range []string{"demo", "other"} {
		if _, err := clients.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, create); err != nil {
			return fmt.Errorf("demo: create namespace %s: %w", ns, err)
		}
		// Pods are refused until the controller manager made the
		// namespace's default ServiceAccount.
		if err := waitFor(ctx, nil, "ServiceAccount "+ns+"/default", func(ctx context.Context) error {
			_, err := clients.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
			return err
		}); err != nil {
			return fmt.Errorf("demo: %w", err)
		}
	}
	apps := DemoApps(len(c.Nodes))
	for _, app := range apps {
		if _, err := clients.CoreV1().Services(app.Namespace).Create(ctx, demoService(app), create); err != nil {
			return fmt.Errorf("demo: create Service %s/%s: %w", app.Namespace, app.Name, err)
		}
		if _, err := clients.AppsV1().Deployments(app.Namespace).Create(ctx, demoDeployment(app), create); err != nil {
			return fmt.Errorf("demo: create Deployment %s/%s: %w", app.Namespace, app.Name, err)
		}
	}
	np, mp := demoPolicies()
	if _, err := clients.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, create); err != nil {
		return fmt.Errorf("demo: create NetworkPolicy %s/%s: %w", np.Namespace, np.Name, err)
	}
	if _, err := veil.PolicyV1alpha1().MeshPolicies(mp.Namespace).Create(ctx, mp, create); err != nil {
		return fmt.Errorf("demo: create MeshPolicy %s/%s: %w", mp.Namespace, mp.Name, err)
	}
	for _, app := range apps {
		if err := waitDeploymentsReady(ctx, clients, app.Namespace, app.Name); err != nil {
			return fmt.Errorf("demo: %w", err)
		}
	}
	backend, err := c.AppPod(ctx, "demo", "backend")
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	target := backend.Status.PodIP + ":80"
	for _, from := range []struct {
		ns, app string
		allow   bool
	}{{"demo", "frontend", true}, {"other", "client", false}} {
		pod, err := c.AppPod(ctx, from.ns, from.app)
		if err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		what := fmt.Sprintf("%s/%s -> demo/backend (%s) allowed=%v", from.ns, from.app, target, from.allow)
		if err := waitFor(ctx, nil, what, func(ctx context.Context) error {
			res, err := c.Exec(ctx, from.ns, pod.Name, []string{"/client", "connect", "-timeout", "700ms", target}, nil)
			if err != nil {
				return err
			}
			if (res.ExitCode == 0) != from.allow {
				return fmt.Errorf("client exit %d: %s%s", res.ExitCode, res.Stdout, res.Stderr)
			}
			return nil
		}); err != nil {
			return fmt.Errorf("demo policy not enforced: %w", err)
		}
	}
	return nil
}

// AppPod returns the running pod of a Deployment whose pods carry
// app=name in namespace ns (the demo's and the tests' convention).
func (c *Cluster) AppPod(ctx context.Context, ns, name string) (*corev1.Pod, error) {
	return c.AppPodBySelector(ctx, ns, labels.Set{"app": name}.String())
}

// waitDeploymentsReady waits until Deployment ns/name has all its
// replicas updated and ready.
func waitDeploymentsReady(ctx context.Context, clients kubernetes.Interface, ns, name string) error {
	return waitFor(ctx, nil, "Deployment "+ns+"/"+name+" ready", func(ctx context.Context) error {
		d, err := clients.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		want := int32(1)
		if d.Spec.Replicas != nil {
			want = *d.Spec.Replicas
		}
		if d.Status.ObservedGeneration < d.Generation || d.Status.UpdatedReplicas != want || d.Status.ReadyReplicas != want {
			return fmt.Errorf("%d of %d replicas ready", d.Status.ReadyReplicas, want)
		}
		return nil
	})
}

// WaitDaemonSetReady waits until DaemonSet ns/name runs a ready pod on
// every node.
func (c *Cluster) WaitDaemonSetReady(ctx context.Context, ns, name string) error {
	clients, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("create client: %w", err)
	}
	return waitFor(ctx, nil, "DaemonSet "+ns+"/"+name+" ready on every node", func(ctx context.Context) error {
		ds, err := clients.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if int(ds.Status.NumberReady) != len(c.Nodes) {
			return fmt.Errorf("%d of %d ready", ds.Status.NumberReady, len(c.Nodes))
		}
		return nil
	})
}

// WaitMeshNodes waits until every node's agent has published its MeshNode
// with a WireGuard peer for every other node (what 'meshctl encryption
// status' and 'audit encryption' read), or with encryption disabled.
func (c *Cluster) WaitMeshNodes(ctx context.Context) error {
	veil, err := versioned.NewForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("create client: %w", err)
	}
	for _, nd := range c.Nodes {
		if err := waitFor(ctx, nil, "MeshNode "+nd.Name+" published", func(ctx context.Context) error {
			mn, err := veil.MeshV1alpha1().MeshNodes().Get(ctx, nd.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if mn.Status.Encryption.Mode == "disabled" || int(mn.Status.Encryption.PeerCount) == len(c.Nodes)-1 {
				return nil
			}
			return fmt.Errorf("encryption %q with %d of %d peers", mn.Status.Encryption.Mode, mn.Status.Encryption.PeerCount, len(c.Nodes)-1)
		}); err != nil {
			return err
		}
	}
	return nil
}

// AppPodBySelector returns a running pod in ns matching the label
// selector.
func (c *Cluster) AppPodBySelector(ctx context.Context, ns, selector string) (*corev1.Pod, error) {
	clients, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return nil, fmt.Errorf("create client: %w", err)
	}
	pods, err := clients.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return nil, fmt.Errorf("list pods %s in %s: %w", selector, ns, err)
	}
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.Status.Phase == corev1.PodRunning && p.DeletionTimestamp == nil && p.Status.PodIP != "" {
			return p, nil
		}
	}
	return nil, fmt.Errorf("no running pod %s in %s (%d pods)", selector, ns, len(pods.Items))
}
