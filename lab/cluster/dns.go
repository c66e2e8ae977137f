package cluster

import (
	"context"
	"fmt"
	"strconv"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
)

// DNSNamespace and DNSService name the cluster DNS's Service, as in every
// Kubernetes distribution: kube-system/kube-dns at DNSServiceIP.
const (
	DNSNamespace = "kube-system"
	DNSService   = "kube-dns"
	dnsName      = "coredns"
)

// corefile serves cluster.local and the reverse zones from the API server.
// There is no forward: a lab has no route out, so other names fail fast.
const corefile = `.:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
    cache 30
    loadbalance
}
`

// dnsObjects are the cluster DNS: CoreDNS's ServiceAccount and RBAC, its
// Corefile, a Deployment and Service kube-dns at DNSServiceIP. apiHost,
// when set, is the API server's address for CoreDNS (a cluster without
// kube-proxy has no translation of the kubernetes Service's cluster IP
// until Veil loads its own).
func dnsObjects(apiHost string, apiPort int) (*corev1.ServiceAccount, *rbacv1.ClusterRole, *rbacv1.ClusterRoleBinding, *corev1.ConfigMap, *appsv1.Deployment, *corev1.Service) {
	labels := map[string]string{"k8s-app": DNSService}
	meta := metav1.ObjectMeta{Namespace: DNSNamespace, Name: dnsName, Labels: labels}
	sa := &corev1.ServiceAccount{ObjectMeta: meta}
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "system:coredns"},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"endpoints", "services", "pods", "namespaces"}, Verbs: []string{"list", "watch"}},
			{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},
		},
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "system:coredns"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: DNSNamespace, Name: dnsName}},
	}
	cm := &corev1.ConfigMap{ObjectMeta: meta, Data: map[string]string{"Corefile": corefile}}
	var env []corev1.EnvVar
	if apiHost != "" {
		env = []corev1.EnvVar{
			{Name: "KUBERNETES_SERVICE_HOST", Value: apiHost},
			{Name: "KUBERNETES_SERVICE_PORT", Value: strconv.Itoa(apiPort)},
		}
	}
	dep := &appsv1.Deployment{
		ObjectMeta: meta,
		Spec: appsv1.DeploymentSpec{
			Replicas: new(int32(1)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					ServiceAccountName: dnsName,
					PriorityClassName:  "system-cluster-critical",
					DNSPolicy:          corev1.DNSDefault,
					Tolerations:        []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
					Containers: []corev1.Container{{
						Name:            dnsName,
						Image:           CoreDNSImage,
						ImagePullPolicy: corev1.PullNever,
						Args:            []string{"-conf", "/etc/coredns/Corefile"},
						Env:             env,
						Ports: []corev1.ContainerPort{
							{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP},
							{Name: "dns-tcp", ContainerPort: 53, Protocol: corev1.ProtocolTCP},
						},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(8181)}},
							PeriodSeconds: 1,
						},
						LivenessProbe: &corev1.Probe{
							ProbeHandler:        corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/health", Port: intstr.FromInt32(8080)}},
							InitialDelaySeconds: 10,
							PeriodSeconds:       10,
						},
						VolumeMounts: []corev1.VolumeMount{{Name: "config", MountPath: "/etc/coredns", ReadOnly: true}},
					}},
					Volumes: []corev1.Volume{{Name: "config", VolumeSource: corev1.VolumeSource{
						ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: dnsName}},
					}}},
				},
			},
		},
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: DNSNamespace, Name: DNSService, Labels: labels},
		Spec: corev1.ServiceSpec{
			Selector:  labels,
			ClusterIP: DNSServiceIP.String(),
			Ports: []corev1.ServicePort{
				{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP, TargetPort: intstr.FromInt32(53)},
				{Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(53)},
			},
		},
	}
	return sa, role, binding, cm, dep, svc
}

// InstallDNS deploys the cluster DNS (CoreDNS in kube-system behind
// Service kube-dns at DNSServiceIP, where the kubelets point pods) and
// waits until it is ready. It needs a CNI (InstallVeil) and the CoreDNS
// image, which Start imports when the binaries have CoreDNS.
func (c *Cluster) InstallDNS(ctx context.Context) error {
	if c.bins.CoreDNS == "" {
		return fmt.Errorf("install cluster DNS: no CoreDNS binary (controlplane.ClusterBinaries.CoreDNS; make controlplane builds it)")
	}
	clients, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("create client: %w", err)
	}
	apiHost := ""
	if c.KubeProxy == KubeProxyNone {
		apiHost = HubIP.String()
	}
	sa, role, binding, cm, dep, svc := dnsObjects(apiHost, apiPort)
	create := metav1.CreateOptions{FieldManager: "veil-lab"}
	steps := []struct {
		what string
		do   func() error
	}{
		{"ServiceAccount", func() error {
			_, err := clients.CoreV1().ServiceAccounts(DNSNamespace).Create(ctx, sa, create)
			return err
		}},
		{"ClusterRole", func() error { _, err := clients.RbacV1().ClusterRoles().Create(ctx, role, create); return err }},
		{"ClusterRoleBinding", func() error {
			_, err := clients.RbacV1().ClusterRoleBindings().Create(ctx, binding, create)
			return err
		}},
		{"ConfigMap", func() error { _, err := clients.CoreV1().ConfigMaps(DNSNamespace).Create(ctx, cm, create); return err }},
		{"Service", func() error { _, err := clients.CoreV1().Services(DNSNamespace).Create(ctx, svc, create); return err }},
		{"Deployment", func() error {
			_, err := clients.AppsV1().Deployments(DNSNamespace).Create(ctx, dep, create)
			return err
		}},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			return fmt.Errorf("install cluster DNS: create %s: %w", s.what, err)
		}
	}
	if err := waitDeploymentsReady(ctx, clients, DNSNamespace, dnsName); err != nil {
		return fmt.Errorf("install cluster DNS: %w", err)
	}
	c.log.Info("cluster DNS ready", "service", DNSNamespace+"/"+DNSService, "ip", DNSServiceIP)
	return nil
}
