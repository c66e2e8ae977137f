package scale

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/veilmesh/veil/api/annotations"
	"github.com/veilmesh/veil/api/client/clientset/versioned"
	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/tests/scaleshape"
)

// The cluster's shape: what stays fixed while the pod count grows.
const (
	namespaces    = 500
	netpols       = 1000 // two per namespace
	meshPolicies  = 100  // one in each of the first 100 namespaces
	podsPerNode   = 30
	appsPerNS     = 10
	parallelism   = 48
	localNode     = "scale-node-0"
	localNodeIP   = "172.16.0.1"
	clusterCIDR   = scaleshape.ClusterCIDR
	statefulEvery = 20 // every 20th pod is a StatefulSet member: a unique label
)

func nsName(i int) string { return fmt.Sprintf("team-%03d", i) }

// podSpot says where pod k of the cluster lives: its namespace, node and
// slot on the node. Pods are dealt round-robin over namespaces and filled
// node by node, so every size is a prefix of the next.
type podSpot struct {
	k, ns, node, slot int
}

func spot(k int) podSpot {
	return podSpot{k: k, ns: k % namespaces, node: k / podsPerNode, slot: k % podsPerNode}
}

func (s podSpot) name() string { return fmt.Sprintf("pod-%06d", s.k) }

// app is the deployment a pod belongs to within its namespace; the first
// pods (the local node's) span every tier.
func (s podSpot) app() int { return (s.k/namespaces + s.k) % appsPerNS }

func nodesFor(pods int) int { return (pods + podsPerNode - 1) / podsPerNode }

var lastApplied = strings.Repeat(`{"apiVersion":"v1","kind":"Pod","metadata":{"labels":{"app":"x"}},"spec":{"containers":[{"image":"registry.example/app:1.2.3","name":"app"}]}}`, 6)

func randomKey() string {
	var k [32]byte
	_, _ = rand.Read(k[:])
	return base64.StdEncoding.EncodeToString(k[:])
}

func nodeObject(i int) *corev1.Node {
	cidr, ip := scaleshape.PodCIDR(i).String(), scaleshape.NodeIP(i)
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: scaleshape.NodeName(i),
			Labels: map[string]string{
				"kubernetes.io/hostname": scaleshape.NodeName(i), "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
				"topology.kubernetes.io/zone": fmt.Sprintf("zone-%d", i%3), "node.kubernetes.io/instance-type": "m5.xlarge",
			},
			Annotations: map[string]string{
				annotations.WireGuardPublicKey:                           randomKey(),
				annotations.WireGuardEndpoint:                            netip.AddrPortFrom(ip, 51820).String(),
				annotations.WireGuardPodCIDRs:                            cidr,
				"node.alpha.kubernetes.io/ttl":                           "0",
				"volumes.kubernetes.io/controller-managed-attach-detach": "true",
			},
		},
		Spec: corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}},
	}
}

func nodeStatus(i int) corev1.NodeStatus {
	return corev1.NodeStatus{
		Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: scaleshape.NodeIP(i).String()}, {Type: corev1.NodeHostName, Address: scaleshape.NodeName(i)}},
		Capacity: corev1.ResourceList{
			corev1.ResourceCPU: resource.MustParse("4"), corev1.ResourceMemory: resource.MustParse("16Gi"), corev1.ResourcePods: resource.MustParse("110"),
		},
		Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}},
		NodeInfo:   corev1.NodeSystemInfo{KubeletVersion: "v1.33.0", ContainerRuntimeVersion: "containerd://2.0.0", OSImage: "Debian GNU/Linux 13", KernelVersion: "6.18.0"},
		Images:     []corev1.ContainerImage{{Names: []string{"registry.example/app:1.2.3"}, SizeBytes: 123456789}},
	}
}

func namespaceObject(i int) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: nsName(i), Labels: map[string]string{
		"team": fmt.Sprintf("t%02d", i%20), "env": []string{"prod", "staging", "dev"}[i%3],
	}}}
}

// podLabels give realistic diversity: ten apps per namespace, each in one
// of three tiers and two versions, a template hash per deployment, and
// every 20th pod a StatefulSet member with a unique pod-name label.
func podLabels(s podSpot, version int) map[string]string {
	ls := map[string]string{
		"app":               fmt.Sprintf("a%d", s.app()),
		"tier":              []string{"web", "api", "db"}[s.app()%3],
		"version":           fmt.Sprintf("v%d", version),
		"pod-template-hash": fmt.Sprintf("%08x", s.ns*appsPerNS+s.app()),
	}
	if s.k%statefulEvery == 0 {
		ls["statefulset.kubernetes.io/pod-name"] = s.name()
	}
	return ls
}

func podObject(s podSpot) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: nsName(s.ns), Name: s.name(), Labels: podLabels(s, 1),
			Annotations: map[string]string{
				"kubectl.kubernetes.io/last-applied-configuration": lastApplied,
				"prometheus.io/scrape":                             "true", "prometheus.io/port": "9090",
			},
		},
		Spec: corev1.PodSpec{
			NodeName: scaleshape.NodeName(s.node), ServiceAccountName: "default",
			Containers: []corev1.Container{{
				Name: "app", Image: "registry.example/app:1.2.3",
				Args:  []string{"--listen=:8080", "--metrics=:9090", "--log-level=info"},
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "metrics", ContainerPort: 9090}},
				Env: []corev1.EnvVar{
					{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
					{Name: "GOMAXPROCS", Value: "2"}, {Name: "REGION", Value: "eu-west-1"},
				},
				Resources: corev1.ResourceRequirements{
					Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("128Mi")},
					Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")},
				},
				ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromString("http")}}, PeriodSeconds: 5},
				VolumeMounts:   []corev1.VolumeMount{{Name: "config", MountPath: "/etc/app"}},
			}},
			Volumes:     []corev1.Volume{{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "app-config"}}}}},
			Tolerations: []corev1.Toleration{{Key: "node.kubernetes.io/not-ready", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute}},
		},
	}
}

func podStatus(s podSpot) corev1.PodStatus {
	ip := scaleshape.PodIP(s.node, s.slot).String()
	now := metav1.Now()
	return corev1.PodStatus{
		Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}, HostIP: scaleshape.NodeIP(s.node).String(),
		StartTime: &now, QOSClass: corev1.PodQOSBurstable,
		Conditions: []corev1.PodCondition{
			{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.ContainersReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
		},
		ContainerStatuses: []corev1.ContainerStatus{{
			Name: "app", Ready: true, Image: "registry.example/app:1.2.3", ImageID: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
			ContainerID: "containerd://" + strings.Repeat("ab", 32), State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		}},
	}
}

func port(p int) *intstr.IntOrString { v := intstr.FromInt32(int32(p)); return &v }

// networkPolicies of namespace i: a default deny of ingress, and an allow
// from the namespace's own web tier and from one other team's namespaces.
func networkPolicies(i int) []*networkingv1.NetworkPolicy {
	tcp := corev1.ProtocolTCP
	return []*networkingv1.NetworkPolicy{
		{
			ObjectMeta: metav1.ObjectMeta{Namespace: nsName(i), Name: "default-deny"},
			Spec:       networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}},
		},
		{
			ObjectMeta: metav1.ObjectMeta{Namespace: nsName(i), Name: "allow-api"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": "api"}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From: []networkingv1.NetworkPolicyPeer{
						{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"tier": "web"}}},
						{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": fmt.Sprintf("t%02d", (i+1)%20)}}},
					},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: port(8080)}, {Protocol: &tcp, Port: ptr(intstr.FromString("metrics"))}},
				}},
			},
		},
	}
}

func ptr[T any](v T) *T { return &v }

// meshPolicy of namespace i denies SSH from dev namespaces to its db tier.
func meshPolicy(i int) *v1alpha1.MeshPolicy {
	return &v1alpha1.MeshPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: nsName(i), Name: "deny-dev-ssh"},
		Spec: v1alpha1.MeshPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": "db"}},
			PolicyRules: v1alpha1.PolicyRules{IngressDeny: []v1alpha1.IngressRule{{
				From:  []v1alpha1.Peer{{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"env": "dev"}}}},
				Ports: []v1alpha1.PortRule{{Protocol: v1alpha1.Protocol("TCP"), Port: port(22)}},
			}}},
		},
	}
}

// bulk runs fn for every i in [from, to) with bounded parallelism,
// reporting progress every 10 s; an object that already exists counts as
// created.
func bulk(ctx context.Context, what string, from, to int, logf func(string, ...any), fn func(context.Context, int) error) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(parallelism)
	var done atomic.Int64
	start := time.Now()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		t := time.NewTicker(10 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				logf("creating %s: %d/%d after %s", what, done.Load(), to-from, time.Since(start).Round(time.Second))
			}
		}
	}()
	for i := from; i < to; i++ {
		g.Go(func() error {
			if err := fn(gctx, i); err != nil && !apierrors.IsAlreadyExists(err) {
				return fmt.Errorf("create %s %d: %w", what, i, err)
			}
			done.Add(1)
			return nil
		})
	}
	return g.Wait()
}

// populator grows the cluster in the API server.
type populator struct {
	kube  kubernetes.Interface
	veil  versioned.Interface
	logf  func(string, ...any)
	nodes int
	pods  int
}

// policies creates the namespaces and the policies, once.
func (p *populator) policies(ctx context.Context) error {
	if err := bulk(ctx, "namespaces", 0, namespaces, p.logf, func(ctx context.Context, i int) error {
		_, err := p.kube.CoreV1().Namespaces().Create(ctx, namespaceObject(i), metav1.CreateOptions{})
		return err
	}); err != nil {
		return err
	}
	if err := bulk(ctx, "NetworkPolicies", 0, namespaces, p.logf, func(ctx context.Context, i int) error {
		for _, np := range networkPolicies(i) {
			if _, err := p.kube.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
				return err
			}
		}
		return nil
	}); err != nil {
		return err
	}
	return bulk(ctx, "MeshPolicies", 0, meshPolicies, p.logf, func(ctx context.Context, i int) error {
		mp := meshPolicy(i)
		_, err := p.veil.PolicyV1alpha1().MeshPolicies(mp.Namespace).Create(ctx, mp, metav1.CreateOptions{})
		return err
	})
}

// grow brings the cluster to pods Pods on the Nodes they need.
func (p *populator) grow(ctx context.Context, pods int) error {
	nodes := nodesFor(pods)
	if err := bulk(ctx, "nodes", p.nodes, nodes, p.logf, func(ctx context.Context, i int) error {
		n, err := p.kube.CoreV1().Nodes().Create(ctx, nodeObject(i), metav1.CreateOptions{})
		if err != nil {
			return err
		}
		n.Status = nodeStatus(i)
		_, err = p.kube.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
		return err
	}); err != nil {
		return err
	}
	p.nodes = nodes
	if err := bulk(ctx, "pods", p.pods, pods, p.logf, func(ctx context.Context, k int) error {
		s := spot(k)
		pod, err := p.kube.CoreV1().Pods(nsName(s.ns)).Create(ctx, podObject(s), metav1.CreateOptions{})
		if err != nil {
			return err
		}
		pod.Status = podStatus(s)
		_, err = p.kube.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
		return err
	}); err != nil {
		return err
	}
	p.pods = pods
	return nil
}

// relabel gives pod k a new version label.
func (p *populator) relabel(ctx context.Context, k, version int) error {
	s := spot(k)
	patch := fmt.Sprintf(`{"metadata":{"labels":{"version":"v%d"}}}`, version)
	_, err := p.kube.CoreV1().Pods(nsName(s.ns)).Patch(ctx, s.name(), types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	if err != nil {
		return fmt.Errorf("relabel pod %s: %w", s.name(), err)
	}
	return nil
}
