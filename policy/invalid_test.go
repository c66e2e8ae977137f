package policy

import (
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
)

// An invalid policy is reported with the offending field and skipped: it
// neither opens nor closes anything, as if the API server had rejected it.
func TestInvalidPoliciesAreReportedAndSkipped(t *testing.T) {
	tcp, icmp := corev1.ProtocolTCP, corev1.Protocol("ICMP")
	named := intstr.FromString("http")
	badName := intstr.FromString("80")
	zero := intstr.FromInt32(0)
	end := int32(90)
	badEnd := int32(70)
	p80 := intstr.FromInt32(80)
	unknown := v1alpha1.Entity("galaxy")
	typ := int32(300)
	netpols := []struct {
		name, field string
		spec        networkingv1.NetworkPolicySpec
	}{
		{"bad operator", "spec.podSelector", networkingv1.NetworkPolicySpec{PodSelector: *matchExpr("app", "Maybe", "x")}},
		{"In without values", "spec.ingress[0].from[0].podSelector", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: matchExpr("app", metav1.LabelSelectorOpIn)}}}}}},
		{"bad cidr", "spec.ingress[0].from[0].ipBlock.cidr", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{ipBlock("10.0.0.0/33")}}}}},
		{"except outside cidr", "spec.ingress[0].from[0].ipBlock.except[0]", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{ipBlock("10.0.0.0/16", "10.1.0.0/24")}}}}},
		{"except equal to cidr", "spec.ingress[0].from[0].ipBlock.except[0]", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{ipBlock("10.0.0.0/16", "10.0.0.0/16")}}}}},
		{"ipBlock with selector", "spec.ingress[0].from[0]", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/8"}, PodSelector: &metav1.LabelSelector{}}}}}}},
		{"empty peer", "spec.egress[0].to[0]", networkingv1.NetworkPolicySpec{Egress: []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{}}}}}},
		{"bad protocol", "spec.ingress[0].ports[0].protocol", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Protocol: &icmp}}}}}},
		{"port 0", "spec.ingress[0].ports[0].port", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &zero}}}}}},
		{"numeric string port", "spec.ingress[0].ports[0].port", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: &badName}}}}}},
		{"endPort with named port", "spec.ingress[0].ports[0].endPort", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: &named, EndPort: &end}}}}}},
		{"endPort without port", "spec.ingress[0].ports[0].endPort", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{EndPort: &end}}}}}},
		{"endPort below port", "spec.ingress[0].ports[0].endPort", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: &p80, EndPort: &badEnd}}}}}},
		{"bad policyType", "spec.policyTypes[0]", networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{"Sideways"}}},
	}
	for _, tt := range netpols {
		t.Run(tt.name, func(t *testing.T) {
			in := e2eInput()
			p := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "bad"}, Spec: tt.spec}
			in.NetworkPolicies = []*networkingv1.NetworkPolicy{p}
			c, err := Compile(in, Options{})
			if err != nil {
				t.Fatal(err)
			}
			checkSkipped(t, c, PolicyRef{KindNetworkPolicy, "x", "bad"}, tt.field)
			if len(ValidateNetworkPolicy(p)) == 0 {
				t.Errorf("ValidateNetworkPolicy accepts a policy the compiler skips")
			}
		})
	}
	meshes := []struct {
		name, field string
		rules       v1alpha1.PolicyRules
	}{
		{"two peer forms", "spec.ingress[0].from[0]", v1alpha1.PolicyRules{Ingress: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{{Entity: ptr(v1alpha1.EntityWorld), CIDR: &v1alpha1.CIDRPeer{CIDR: "10.0.0.0/8"}}}}}}},
		{"no peer form", "spec.ingressDeny[0].from[0]", v1alpha1.PolicyRules{IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{{}}}}}},
		{"unknown entity", "spec.egress[0].to[0].entity", v1alpha1.PolicyRules{Egress: []v1alpha1.EgressRule{{To: []v1alpha1.Peer{{Entity: &unknown}}}}}},
		{"bad cidr", "spec.egressDeny[0].to[0].cidr.cidr", v1alpha1.PolicyRules{EgressDeny: []v1alpha1.EgressRule{{To: []v1alpha1.Peer{cidrPeer("nope")}}}}},
		{"bad mode", "spec.mode", v1alpha1.PolicyRules{Mode: "maybe"}},
		{"icmp with port", "spec.ingress[0].ports[0].port", v1alpha1.PolicyRules{Ingress: []v1alpha1.IngressRule{{Ports: []v1alpha1.PortRule{{Protocol: v1alpha1.ProtocolICMP, Port: &p80}}}}}},
		{"icmp type out of range", "spec.ingress[0].ports[0].icmpType", v1alpha1.PolicyRules{Ingress: []v1alpha1.IngressRule{{Ports: []v1alpha1.PortRule{{Protocol: v1alpha1.ProtocolICMP, ICMPType: &typ}}}}}},
		{"icmp code without type", "spec.ingress[0].ports[0].icmpCode", v1alpha1.PolicyRules{Ingress: []v1alpha1.IngressRule{{Ports: []v1alpha1.PortRule{{Protocol: v1alpha1.ProtocolICMP, ICMPCode: ptr(int32(1))}}}}}},
		{"icmpType on TCP", "spec.ingress[0].ports[0].icmpType", v1alpha1.PolicyRules{Ingress: []v1alpha1.IngressRule{{Ports: []v1alpha1.PortRule{{Protocol: v1alpha1.ProtocolTCP, ICMPType: ptr(int32(1))}}}}}},
		{"bad protocol", "spec.ingress[0].ports[0].protocol", v1alpha1.PolicyRules{Ingress: []v1alpha1.IngressRule{{Ports: []v1alpha1.PortRule{{Protocol: "GRE"}}}}}},
	}
	for _, tt := range meshes {
		t.Run("MeshPolicy "+tt.name, func(t *testing.T) {
			in := e2eInput()
			in.MeshPolicies = []*v1alpha1.MeshPolicy{mp("x", "bad", &metav1.LabelSelector{}, tt.rules)}
			if len(ValidateMeshPolicy(in.MeshPolicies[0])) == 0 {
				t.Errorf("ValidateMeshPolicy accepts a policy the compiler skips")
			}
			c, err := Compile(in, Options{})
			if err != nil {
				t.Fatal(err)
			}
			checkSkipped(t, c, PolicyRef{KindMeshPolicy, "x", "bad"}, tt.field)
		})
	}
	t.Run("ClusterMeshPolicy bad namespaceSelector", func(t *testing.T) {
		in := e2eInput()
		in.ClusterMeshPolicies = []*v1alpha1.ClusterMeshPolicy{cmpol("bad", matchExpr("team", metav1.LabelSelectorOpExists, "x"), nil, v1alpha1.PolicyRules{Ingress: []v1alpha1.IngressRule{}})}
		c, err := Compile(in, Options{})
		if err != nil {
			t.Fatal(err)
		}
		checkSkipped(t, c, PolicyRef{Kind: KindClusterMeshPolicy, Name: "bad"}, "spec.namespaceSelector")
	})
}

func checkSkipped(t *testing.T, c *Compiler, ref PolicyRef, field string) {
	t.Helper()
	errs := c.Invalid()
	if len(errs) != 1 || errs[0].Policy != ref || errs[0].Field != field {
		t.Fatalf("Invalid() = %v; want one error for %s at %s", errs, ref, field)
	}
	var perr *PolicyError
	if !errors.As(error(errs[0]), &perr) || !strings.Contains(perr.Error(), field) {
		t.Errorf("error %q does not name %s", errs[0], field)
	}
	if c.PolicyError(ref) == nil {
		t.Errorf("PolicyError(%s) = nil", ref)
	}
	checkReach(t, c, tcp80, newReach(true))
	if len(c.Rules()) != 0 {
		t.Errorf("skipped policy left rules: %v", c.Rules())
	}
}

// A policy that turns invalid loses its previous version; fixing it brings
// it back.
func TestPolicyTurningInvalid(t *testing.T) {
	c := mustCompile(t, e2eInput())
	good := np("x", "p", matchLabels("pod", "a"), nil)
	if ch := c.UpsertNetworkPolicy(good); len(ch.Endpoints) != 1 || ch.Endpoints[0] != (EndpointID{"x", "a"}) {
		t.Fatalf("changes %+v; want x/a", ch)
	}
	checkReach(t, c, tcp80, newReach(true).set("*/*", "x/a", false))
	bad := good.DeepCopy()
	bad.Spec.PodSelector = *matchExpr("pod", "Bogus")
	ch := c.UpsertNetworkPolicy(bad)
	if len(ch.Endpoints) != 1 || c.PolicyError(PolicyRef{KindNetworkPolicy, "x", "p"}) == nil {
		t.Fatalf("changes %+v, error %v", ch, c.PolicyError(PolicyRef{KindNetworkPolicy, "x", "p"}))
	}
	checkReach(t, c, tcp80, newReach(true))
	c.UpsertNetworkPolicy(good)
	if len(c.Invalid()) != 0 {
		t.Fatalf("still invalid: %v", c.Invalid())
	}
	checkReach(t, c, tcp80, newReach(true).set("*/*", "x/a", false))
	if ch := c.DeleteNetworkPolicy("x", "p"); len(ch.Endpoints) != 1 {
		t.Fatalf("delete changes %+v", ch)
	}
	checkReach(t, c, tcp80, newReach(true))
}
