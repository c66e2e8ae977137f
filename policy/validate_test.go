package policy

import (
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"sigs.k8s.io/yaml"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
)

// fieldPaths returns the distinct field paths of errs, sorted.
func fieldPaths(errs field.ErrorList) []string {
	var out []string
	for _, e := range errs {
		if !slices.Contains(out, e.Field) {
			out = append(out, e.Field)
		}
	}
	slices.Sort(out)
	return out
}

// npSpec builds a NetworkPolicy in namespace x from the YAML of its spec,
// so cases read like the manifests users write.
func npSpec(t *testing.T, spec string) *networkingv1.NetworkPolicy {
	t.Helper()
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "x"}}
	if err := yaml.UnmarshalStrict([]byte(spec), &np.Spec); err != nil {
		t.Fatalf("bad test spec: %v", err)
	}
	return np
}

func mpSpec(t *testing.T, spec string) *v1alpha1.MeshPolicy {
	t.Helper()
	mp := &v1alpha1.MeshPolicy{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "x"}}
	if err := yaml.UnmarshalStrict([]byte(spec), &mp.Spec); err != nil {
		t.Fatalf("bad test spec: %v", err)
	}
	return mp
}

func TestValidateNetworkPolicy(t *testing.T) {
	for _, tc := range []struct {
		name string
		spec string
		// want is the field paths of the errors; none for a valid policy.
		want []string
	}{
		{name: "deny all", spec: `podSelector: {}`},
		{name: "full", spec: `
podSelector: {matchLabels: {app: web}}
policyTypes: [Ingress, Egress]
ingress:
- from:
  - podSelector: {matchExpressions: [{key: app, operator: In, values: [a, b]}]}
    namespaceSelector: {matchLabels: {team: x}}
  - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
  - ipBlock: {cidr: "2001:db8::/32"}
  ports:
  - {port: 80}
  - {port: http, protocol: UDP}
  - {port: 1000, endPort: 2000, protocol: SCTP}
  - {protocol: TCP}
egress:
- to: [{namespaceSelector: {}}]
`},
		{name: "bad protocol", spec: `{podSelector: {}, ingress: [{ports: [{protocol: ICMP}]}]}`,
			want: []string{"spec.ingress[0].ports[0].protocol"}},
		{name: "port 0", spec: `{podSelector: {}, ingress: [{ports: [{port: 0}]}]}`,
			want: []string{"spec.ingress[0].ports[0].port"}},
		{name: "port too big", spec: `{podSelector: {}, egress: [{ports: [{port: 65536}]}]}`,
			want: []string{"spec.egress[0].ports[0].port"}},
		{name: "endPort below port", spec: `{podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}`,
			want: []string{"spec.ingress[0].ports[0].endPort"}},
		{name: "endPort out of range", spec: `{podSelector: {}, ingress: [{ports: [{port: 90, endPort: 70000}]}]}`,
			want: []string{"spec.ingress[0].ports[0].endPort"}},
		{name: "endPort with named port", spec: `{podSelector: {}, ingress: [{ports: [{port: http, endPort: 80}]}]}`,
			want: []string{"spec.ingress[0].ports[0].endPort"}},
		{name: "endPort without port", spec: `{podSelector: {}, ingress: [{ports: [{endPort: 80}]}]}`,
			want: []string{"spec.ingress[0].ports[0].endPort"}},
		{name: "named port syntax", spec: `{podSelector: {}, ingress: [{ports: [{port: "-http"}]}]}`,
			want: []string{"spec.ingress[0].ports[0].port"}},
		{name: "numeric string port", spec: `{podSelector: {}, ingress: [{ports: [{port: "80"}]}]}`,
			want: []string{"spec.ingress[0].ports[0].port"}},
		{name: "empty peer", spec: `{podSelector: {}, ingress: [{from: [{}]}]}`,
			want: []string{"spec.ingress[0].from[0]"}},
		{name: "ipBlock with selector", spec: `{podSelector: {}, egress: [{to: [{podSelector: {}, ipBlock: {cidr: 10.0.0.0/8}}]}]}`,
			want: []string{"spec.egress[0].to[0]"}},
		{name: "bad cidr", spec: `{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}`,
			want: []string{"spec.ingress[0].from[0].ipBlock.cidr"}},
		{name: "cidr with host bits", spec: `{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.1/8}}]}]}`,
			want: []string{"spec.ingress[0].from[0].ipBlock.cidr"}},
		{name: "cidr with leading zero", spec: `{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 010.0.0.0/8}}]}]}`,
			want: []string{"spec.ingress[0].from[0].ipBlock.cidr"}},
		{name: "empty cidr", spec: `{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: ""}}]}]}`,
			want: []string{"spec.ingress[0].from[0].ipBlock.cidr"}},
		{name: "except outside", spec: `{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/16, 11.0.0.0/16]}}]}]}`,
			want: []string{"spec.ingress[0].from[0].ipBlock.except[1]"}},
		{name: "except equal", spec: `{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]}`,
			want: []string{"spec.ingress[0].from[0].ipBlock.except[0]"}},
		{name: "except other family", spec: `{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: ["2001:db8::/64"]}}]}]}`,
			want: []string{"spec.ingress[0].from[0].ipBlock.except[0]"}},
		{name: "bad policy type", spec: `{podSelector: {}, policyTypes: [Ingress, ingress]}`,
			want: []string{"spec.policyTypes[1]"}},
		{name: "three policy types", spec: `{podSelector: {}, policyTypes: [Ingress, Egress, Ingress]}`,
			want: []string{"spec.policyTypes"}},
		{name: "bad selector operator", spec: `{podSelector: {matchExpressions: [{key: a, operator: Is, values: [b]}]}}`,
			want: []string{"spec.podSelector.matchExpressions[0].operator"}},
		{name: "In without values", spec: `{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: a, operator: In}]}}]}]}`,
			want: []string{"spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values"}},
		{name: "bad label value", spec: `{podSelector: {matchLabels: {app: "a b"}}}`,
			want: []string{"spec.podSelector.matchLabels"}},
		{name: "bad label key", spec: `{podSelector: {}, egress: [{to: [{podSelector: {matchLabels: {"-a": b}}}]}]}`,
			want: []string{"spec.egress[0].to[0].podSelector.matchLabels"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			errs := ValidateNetworkPolicy(npSpec(t, tc.spec))
			if got := fieldPaths(errs); !slices.Equal(got, tc.want) {
				t.Errorf("error fields = %v; want %v\nerrors: %v", got, tc.want, errs)
			}
		})
	}
}

func TestValidateNetworkPolicyMeta(t *testing.T) {
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "Bad_Name"}}
	got := fieldPaths(ValidateNetworkPolicy(np))
	want := []string{"metadata.name", "metadata.namespace"}
	if !slices.Equal(got, want) {
		t.Errorf("error fields = %v; want %v", got, want)
	}
}

func TestValidateMeshPolicy(t *testing.T) {
	for _, tc := range []struct {
		name string
		spec string
		want []string
	}{
		{name: "minimal", spec: `podSelector: {}`},
		{name: "full", spec: `
podSelector: {matchLabels: {app: web}}
mode: audit
defaultDeny: {ingress: false}
ingress:
- from:
  - podSelector: {matchLabels: {app: a}}
  - podSelector: {}
    namespaceSelector: {matchLabels: {team: x}}
  - entity: world
  - cidr: {cidr: 10.0.0.1/8, except: [10.0.0.0/8, 10.1.0.0/16]}
  ports:
  - {port: 80}
  - {port: http, protocol: UDP}
  - {port: 1000, endPort: 2000, protocol: SCTP}
  - {protocol: ICMP, icmpType: 8, icmpCode: 0}
  - {protocol: ICMP}
ingressDeny:
- from: [{entity: remote-node}]
egress:
- to: [{entity: cluster}, {entity: all}, {entity: host}]
egressDeny:
- to: [{cidr: {cidr: "2001:db8::/32"}}]
  ports: [{port: 443, endPort: 443}]
`},
		{name: "bad mode", spec: `{podSelector: {}, mode: dryrun}`, want: []string{"spec.mode"}},
		{name: "no peer form", spec: `{podSelector: {}, ingress: [{from: [{}]}]}`, want: []string{"spec.ingress[0].from[0]"}},
		{name: "two peer forms", spec: `{podSelector: {}, egress: [{to: [{entity: world, cidr: {cidr: 10.0.0.0/8}}]}]}`,
			want: []string{"spec.egress[0].to[0]"}},
		{name: "selector and entity", spec: `{podSelector: {}, ingressDeny: [{from: [{namespaceSelector: {}, entity: host}]}]}`,
			want: []string{"spec.ingressDeny[0].from[0]"}},
		{name: "bad entity", spec: `{podSelector: {}, ingress: [{from: [{entity: internet}]}]}`,
			want: []string{"spec.ingress[0].from[0].entity"}},
		{name: "bad cidr", spec: `{podSelector: {}, egressDeny: [{to: [{cidr: {cidr: 10.0.0/8}}]}]}`,
			want: []string{"spec.egressDeny[0].to[0].cidr.cidr"}},
		{name: "mapped cidr", spec: `{podSelector: {}, egressDeny: [{to: [{cidr: {cidr: "::ffff:10.0.0.0/104"}}]}]}`,
			want: []string{"spec.egressDeny[0].to[0].cidr.cidr"}},
		{name: "except outside", spec: `{podSelector: {}, egress: [{to: [{cidr: {cidr: 10.0.0.0/16, except: [10.0.0.0/8]}}]}]}`,
			want: []string{"spec.egress[0].to[0].cidr.except[0]"}},
		{name: "except invalid", spec: `{podSelector: {}, egress: [{to: [{cidr: {cidr: 10.0.0.0/16, except: [nope]}}]}]}`,
			want: []string{"spec.egress[0].to[0].cidr.except[0]"}},
		{name: "bad protocol", spec: `{podSelector: {}, ingress: [{ports: [{protocol: GRE}]}]}`,
			want: []string{"spec.ingress[0].ports[0].protocol"}},
		{name: "endPort below port", spec: `{podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}`,
			want: []string{"spec.ingress[0].ports[0].endPort"}},
		{name: "endPort without port", spec: `{podSelector: {}, ingress: [{ports: [{endPort: 80}]}]}`,
			want: []string{"spec.ingress[0].ports[0].endPort"}},
		{name: "endPort with named port", spec: `{podSelector: {}, ingress: [{ports: [{port: http, endPort: 80}]}]}`,
			want: []string{"spec.ingress[0].ports[0].endPort"}},
		{name: "endPort 0", spec: `{podSelector: {}, ingress: [{ports: [{port: 1, endPort: 0}]}]}`,
			want: []string{"spec.ingress[0].ports[0].endPort"}},
		{name: "port out of range", spec: `{podSelector: {}, ingress: [{ports: [{port: 70000}]}]}`,
			want: []string{"spec.ingress[0].ports[0].port"}},
		{name: "named port syntax", spec: `{podSelector: {}, ingress: [{ports: [{port: "too-long-port-name"}]}]}`,
			want: []string{"spec.ingress[0].ports[0].port"}},
		{name: "ICMP with port", spec: `{podSelector: {}, ingress: [{ports: [{protocol: ICMP, port: 8}]}]}`,
			want: []string{"spec.ingress[0].ports[0].port"}},
		{name: "TCP with icmpType", spec: `{podSelector: {}, ingress: [{ports: [{protocol: TCP, icmpType: 8}]}]}`,
			want: []string{"spec.ingress[0].ports[0].icmpType"}},
		{name: "default protocol with icmpCode", spec: `{podSelector: {}, ingress: [{ports: [{icmpCode: 0}]}]}`,
			want: []string{"spec.ingress[0].ports[0].icmpCode", "spec.ingress[0].ports[0].icmpType"}},
		{name: "icmpCode without type", spec: `{podSelector: {}, egress: [{ports: [{protocol: ICMP, icmpCode: 1}]}]}`,
			want: []string{"spec.egress[0].ports[0].icmpType"}},
		{name: "icmpType out of range", spec: `{podSelector: {}, egress: [{ports: [{protocol: ICMP, icmpType: 256}]}]}`,
			want: []string{"spec.egress[0].ports[0].icmpType"}},
		{name: "bad selector", spec: `{podSelector: {}, egress: [{to: [{podSelector: {matchExpressions: [{key: a, operator: Exists, values: [b]}]}}]}]}`,
			want: []string{"spec.egress[0].to[0].podSelector.matchExpressions[0].values"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			errs := ValidateMeshPolicy(mpSpec(t, tc.spec))
			if got := fieldPaths(errs); !slices.Equal(got, tc.want) {
				t.Errorf("error fields = %v; want %v\nerrors: %v", got, tc.want, errs)
			}
		})
	}
}

func TestValidateMeshPolicyLimits(t *testing.T) {
	mp := mpSpec(t, `podSelector: {}`)
	peers := make([]v1alpha1.Peer, maxRulePeers+1)
	for i := range peers {
		peers[i].Entity = new(v1alpha1.EntityWorld)
	}
	excepts := make([]string, maxCIDRExcepts+1)
	for i := range excepts {
		excepts[i] = "10.0.0.0/24"
	}
	mp.Spec.Ingress = []v1alpha1.IngressRule{{From: peers}}
	mp.Spec.Egress = []v1alpha1.EgressRule{{To: []v1alpha1.Peer{{CIDR: &v1alpha1.CIDRPeer{CIDR: "10.0.0.0/8", Except: excepts}}}}}
	errs := ValidateMeshPolicy(mp)
	want := []string{"spec.egress[0].to[0].cidr.except", "spec.ingress[0].from"}
	if got := fieldPaths(errs); !slices.Equal(got, want) {
		t.Errorf("error fields = %v; want %v\nerrors: %v", got, want, errs)
	}
}

func TestValidateClusterMeshPolicy(t *testing.T) {
	cmp := &v1alpha1.ClusterMeshPolicy{ObjectMeta: metav1.ObjectMeta{Name: "c"}}
	cmp.Spec.NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"a": "b c"}}
	cmp.Spec.Mode = "Enforce"
	want := []string{"spec.mode", "spec.namespaceSelector.matchLabels"}
	if got := fieldPaths(ValidateClusterMeshPolicy(cmp)); !slices.Equal(got, want) {
		t.Errorf("error fields = %v; want %v", got, want)
	}
}

func TestValidatePod(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "a", Namespace: "x"}}
	pod.Spec.Containers = []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{
		{Name: "http", ContainerPort: 80},
		{Name: "http", ContainerPort: 81},
		{Name: "Bad_Name", ContainerPort: 82},
		{ContainerPort: 0},
		{ContainerPort: 83, Protocol: "ICMP"},
	}}}
	want := []string{
		"spec.containers[0].ports[1].name",
		"spec.containers[0].ports[2].name",
		"spec.containers[0].ports[3].containerPort",
		"spec.containers[0].ports[4].protocol",
	}
	if got := fieldPaths(ValidatePod(pod)); !slices.Equal(got, want) {
		t.Errorf("error fields = %v; want %v", got, want)
	}
}

func TestLintPod(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "a", Namespace: "x"}}
	pod.Spec.Containers = []corev1.Container{
		{Name: "c1", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80}, {Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP}}},
		{Name: "c2", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}, {Name: "dns", ContainerPort: 53}}},
	}
	ws := LintPod(pod)
	if len(ws) != 1 || ws[0].Field.String() != "spec.containers[1].ports[0].name" {
		t.Errorf("warnings = %v; want one at spec.containers[1].ports[0].name", ws)
	}
}

// lintInventory is the e2e layout: namespaces x and y, pods a and b in each,
// labelled pod=<name>, pods a serving a port named "http".
func lintInventory() *Inventory {
	var nss []*corev1.Namespace
	var pods []*corev1.Pod
	for _, ns := range []string{"x", "y"} {
		nss = append(nss, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"ns": ns}}})
		for _, name := range []string{"a", "b"} {
			p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"pod": name}}}
			if name == "a" {
				p.Spec.Containers = []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80}}}}
			}
			pods = append(pods, p)
		}
	}
	return NewInventory(nss, pods)
}

func warningFields(ws []Warning) []string {
	var out []string
	for _, w := range ws {
		out = append(out, w.Field.String())
	}
	slices.Sort(out)
	return out
}

func TestLintNetworkPolicy(t *testing.T) {
	inv := lintInventory()
	for _, tc := range []struct {
		name string
		spec string
		want []string
	}{
		{name: "all match", spec: `
podSelector: {matchLabels: {pod: a}}
ingress:
- from: [{podSelector: {matchLabels: {pod: b}}}, {namespaceSelector: {matchLabels: {ns: "y"}}}, {ipBlock: {cidr: 10.0.0.0/8}}]
  ports: [{port: http}, {port: 81}]
egress:
- to: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: a}}}]
  ports: [{port: http}]
`},
		{name: "target selects nothing", spec: `podSelector: {matchLabels: {pod: z}}`, want: []string{"spec.podSelector"}},
		{name: "peer selects nothing", spec: `{podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {pod: z}}}]}]}`,
			want: []string{"spec.ingress[0].from[0]"}},
		{name: "peer in other namespace only", spec: `{podSelector: {}, egress: [{to: [{podSelector: {matchLabels: {ns: "y"}}}]}]}`,
			want: []string{"spec.egress[0].to[0]"}},
		{name: "namespace selector matches nothing", spec: `{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: q}}}]}]}`,
			want: []string{"spec.ingress[0].from[0].namespaceSelector"}},
		{name: "named port no target has", spec: `{podSelector: {matchLabels: {pod: b}}, ingress: [{ports: [{port: http}]}]}`,
			want: []string{"spec.ingress[0].ports[0].port"}},
		{name: "named port for another protocol", spec: `{podSelector: {}, ingress: [{ports: [{port: http, protocol: UDP}]}]}`,
			want: []string{"spec.ingress[0].ports[0].port"}},
		{name: "rules outside policyTypes", spec: `{podSelector: {}, policyTypes: [Ingress], ingress: [{}], egress: [{}]}`,
			want: []string{"spec.egress"}},
		{name: "egress named port no destination has", spec: `{podSelector: {}, egress: [{to: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: http}]}]}`,
			want: []string{"spec.egress[0].ports[0].port"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ws := inv.LintNetworkPolicy(npSpec(t, tc.spec))
			if got := warningFields(ws); !slices.Equal(got, tc.want) {
				t.Errorf("warning fields = %v; want %v\nwarnings: %v", got, tc.want, ws)
			}
		})
	}
}

func TestLintMeshPolicies(t *testing.T) {
	inv := lintInventory()
	mp := mpSpec(t, `
podSelector: {}
ingress:
- from: [{entity: world}, {cidr: {cidr: 10.0.0.1/8}}, {namespaceSelector: {matchLabels: {ns: "y"}}, podSelector: {matchLabels: {pod: c}}}]
egressDeny:
- to: [{podSelector: {matchLabels: {pod: a}}}]
  ports: [{port: https}, {protocol: ICMP, icmpType: 8}]
`)
	want := []string{"spec.egressDeny[0].ports[0].port", "spec.ingress[0].from[1].cidr.cidr", "spec.ingress[0].from[2]"}
	if got := warningFields(inv.LintMeshPolicy(mp)); !slices.Equal(got, want) {
		t.Errorf("warning fields = %v; want %v", got, want)
	}

	cmp := &v1alpha1.ClusterMeshPolicy{ObjectMeta: metav1.ObjectMeta{Name: "c"}}
	cmp.Spec.NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"ns": "q"}}
	ws := inv.LintClusterMeshPolicy(cmp)
	if got := warningFields(ws); !slices.Equal(got, []string{"spec.namespaceSelector"}) {
		t.Errorf("warning fields = %v; want [spec.namespaceSelector]", got)
	}
	cmp.Spec.NamespaceSelector = nil
	cmp.Spec.PodSelector = metav1.LabelSelector{MatchLabels: map[string]string{"pod": "q"}}
	cmp.Spec.Ingress = []v1alpha1.IngressRule{{From: []v1alpha1.Peer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"pod": "b"}}}}}}
	ws = inv.LintClusterMeshPolicy(cmp)
	if got := warningFields(ws); !slices.Equal(got, []string{"spec.podSelector"}) {
		t.Errorf("warning fields = %v; want [spec.podSelector]", got)
	}
	for _, w := range ws {
		if !strings.Contains(w.Message, "no pod") {
			t.Errorf("warning %q does not say it selects no pod", w)
		}
	}
}

func TestValidateNetworkPolicyPortValues(t *testing.T) {
	// The messages carry the offending value, as the API server's do.
	np := npSpec(t, `{podSelector: {}}`)
	np.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: new(intstr.FromInt32(70000))}}}}
	errs := ValidateNetworkPolicy(np)
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "70000") {
		t.Errorf("errors = %v; want one naming 70000", errs)
	}
}
