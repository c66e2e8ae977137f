package controlplane_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/veilmesh/veil/api/client/clientset/versioned"
	"github.com/veilmesh/veil/api/client/informers/externalversions"
	v1alpha1 "github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/tests/testenv"
)

// subnets returns n CIDRs from a format with one %d, counting from 0.
func subnets(format string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf(format, i)
	}
	return out
}

// requireControlPlane skips tests that need a real API server unless the
// machine may run one.
func requireControlPlane(t *testing.T) {
	t.Helper()
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("skipped under -short: starts etcd and kube-apiserver, built from source on the first run (several minutes)")
	}
}

// TestPrivilegedCRDValidation checks the OpenAPI and CEL validation of the
// MeshPolicy and ClusterMeshPolicy CRDs in deploy/crds against a real API
// server, then the generated clientset, informers and listers and the status
// subresource.
func TestPrivilegedCRDValidation(t *testing.T) {
	requireControlPlane(t)
	cp := controlplane.StartForTest(t, controlplane.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	const ns = "crd-validation"
	kube := kubernetes.NewForConfigOrDie(cp.Config)
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	policies := versioned.NewForConfigOrDie(cp.Config).PolicyV1alpha1()

	// create submits rules as a MeshPolicy or a ClusterMeshPolicy, which
	// share PolicyRules and so every rule below.
	type kind struct {
		name   string
		create func(name string, rules v1alpha1.PolicyRules) (v1alpha1.PolicyRules, error)
	}
	kinds := []kind{
		{"MeshPolicy", func(name string, rules v1alpha1.PolicyRules) (v1alpha1.PolicyRules, error) {
			got, err := policies.MeshPolicies(ns).Create(ctx, &v1alpha1.MeshPolicy{
				ObjectMeta: metav1.ObjectMeta{Name: name},
				Spec:       v1alpha1.MeshPolicySpec{PolicyRules: rules},
			}, metav1.CreateOptions{})
			if err != nil {
				return v1alpha1.PolicyRules{}, err
			}
			return got.Spec.PolicyRules, nil
		}},
		{"ClusterMeshPolicy", func(name string, rules v1alpha1.PolicyRules) (v1alpha1.PolicyRules, error) {
			got, err := policies.ClusterMeshPolicies().Create(ctx, &v1alpha1.ClusterMeshPolicy{
				ObjectMeta: metav1.ObjectMeta{Name: name},
				Spec: v1alpha1.ClusterMeshPolicySpec{
					NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "a"}},
					PolicyRules:       rules,
				},
			}, metav1.CreateOptions{})
			if err != nil {
				return v1alpha1.PolicyRules{}, err
			}
			return got.Spec.PolicyRules, nil
		}},
	}

	t.Run("valid", func(t *testing.T) {
		valid := []struct {
			name  string
			rules v1alpha1.PolicyRules
			check func(t *testing.T, got v1alpha1.PolicyRules)
		}{
			{"defaults", v1alpha1.PolicyRules{
				Ingress: []v1alpha1.IngressRule{{Ports: []v1alpha1.PortRule{{Port: ptr.To(intstr.FromInt32(80))}}}},
			}, func(t *testing.T, got v1alpha1.PolicyRules) {
				if got.Mode != v1alpha1.ModeEnforce {
					t.Errorf("mode = %q; want the default %q", got.Mode, v1alpha1.ModeEnforce)
				}
				if p := got.Ingress[0].Ports[0].Protocol; p != v1alpha1.ProtocolTCP {
					t.Errorf("protocol = %q; want the default %q", p, v1alpha1.ProtocolTCP)
				}
			}},
			{"every-form", v1alpha1.PolicyRules{
				Mode: v1alpha1.ModeAudit,
				Ingress: []v1alpha1.IngressRule{{
					From: []v1alpha1.Peer{
						{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}},
						{PodSelector: &metav1.LabelSelector{}, NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"env": "prod"}}},
						{Entity: ptr.To(v1alpha1.EntityHost)},
						{CIDR: &v1alpha1.CIDRPeer{CIDR: "10.0.0.0/8", Except: []string{"10.1.0.0/16", "10.2.3.0/24"}}},
						{CIDR: &v1alpha1.CIDRPeer{CIDR: "fd00::/64", Except: []string{"fd00::/96"}}},
						// The longest values the bounds allow.
						{CIDR: &v1alpha1.CIDRPeer{CIDR: "10.0.0.0/8", Except: subnets("10.%d.0.0/16", 16)}},
						{CIDR: &v1alpha1.CIDRPeer{CIDR: "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.0/120"}},
					},
					Ports: []v1alpha1.PortRule{
						{Protocol: v1alpha1.ProtocolTCP, Port: ptr.To(intstr.FromInt32(8000)), EndPort: ptr.To[int32](8080)},
						{Protocol: v1alpha1.ProtocolUDP, Port: ptr.To(intstr.FromString("dns"))},
						{Protocol: v1alpha1.ProtocolSCTP},
						{Protocol: v1alpha1.ProtocolICMP, ICMPType: ptr.To[int32](8), ICMPCode: ptr.To[int32](0)},
						{Protocol: v1alpha1.ProtocolICMP},
					},
				}},
				IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{{Entity: ptr.To(v1alpha1.EntityWorld)}}}},
				Egress:      []v1alpha1.EgressRule{{To: []v1alpha1.Peer{{Entity: ptr.To(v1alpha1.EntityCluster)}}}},
				EgressDeny: []v1alpha1.EgressRule{{
					To:    []v1alpha1.Peer{{CIDR: &v1alpha1.CIDRPeer{CIDR: "169.254.169.254/32"}}},
					Ports: []v1alpha1.PortRule{{Port: ptr.To(intstr.FromInt32(80)), EndPort: ptr.To[int32](80)}},
				}},
				DefaultDeny: &v1alpha1.DefaultDeny{Ingress: ptr.To(false), Egress: ptr.To(true)},
			}, func(t *testing.T, got v1alpha1.PolicyRules) {
				if n := len(got.Ingress[0].From); n != 7 {
					t.Errorf("ingress[0].from has %d peers; want 7", n)
				}
				if got.Mode != v1alpha1.ModeAudit {
					t.Errorf("mode = %q; want %q", got.Mode, v1alpha1.ModeAudit)
				}
			}},
		}
		for _, k := range kinds {
			for _, tc := range valid {
				t.Run(k.name+"/"+tc.name, func(t *testing.T) {
					got, err := k.create("valid-"+tc.name, tc.rules)
					if err != nil {
						t.Fatalf("create: %v", err)
					}
					tc.check(t, got)
				})
			}
		}
	})

	t.Run("invalid", func(t *testing.T) {
		ingressPorts := func(ports ...v1alpha1.PortRule) v1alpha1.PolicyRules {
			return v1alpha1.PolicyRules{Ingress: []v1alpha1.IngressRule{{Ports: ports}}}
		}
		egressTo := func(peers ...v1alpha1.Peer) v1alpha1.PolicyRules {
			return v1alpha1.PolicyRules{EgressDeny: []v1alpha1.EgressRule{{To: peers}}}
		}
		port := func(p intstr.IntOrString) *intstr.IntOrString { return &p }
		invalid := []struct {
			name  string
			rules v1alpha1.PolicyRules
			// field and message must both appear in the API server's error.
			field, message string
		}{
			{"endport-below-port",
				ingressPorts(v1alpha1.PortRule{Port: port(intstr.FromInt32(8080)), EndPort: ptr.To[int32](80)}),
				"spec.ingress[0].ports[0].endPort", "endPort must be greater than or equal to port"},
			{"endport-named-port",
				ingressPorts(v1alpha1.PortRule{Port: port(intstr.FromString("http")), EndPort: ptr.To[int32](90)}),
				"spec.ingress[0].ports[0].endPort", "endPort needs a numeric port"},
			{"endport-without-port",
				ingressPorts(v1alpha1.PortRule{EndPort: ptr.To[int32](90)}),
				"spec.ingress[0].ports[0].endPort", "endPort needs a numeric port"},
			{"port-out-of-range",
				ingressPorts(v1alpha1.PortRule{Port: port(intstr.FromInt32(70000))}),
				"spec.ingress[0].ports[0].port", "port must be a number from 1 to 65535 or a port name"},
			{"port-name-invalid",
				ingressPorts(v1alpha1.PortRule{Port: port(intstr.FromString("Not_A-Name"))}),
				"spec.ingress[0].ports[0].port", "port must be a number from 1 to 65535 or a port name"},
			{"bad-protocol",
				ingressPorts(v1alpha1.PortRule{Protocol: "HTTP"}),
				"spec.ingress[0].ports[0].protocol", `Unsupported value: "HTTP"`},
			{"ports-with-icmp",
				ingressPorts(v1alpha1.PortRule{Protocol: v1alpha1.ProtocolICMP, Port: port(intstr.FromInt32(80))}),
				"spec.ingress[0].ports[0]", "ICMP rules take icmpType/icmpCode, other protocols take port/endPort"},
			{"icmp-type-with-tcp",
				ingressPorts(v1alpha1.PortRule{Protocol: v1alpha1.ProtocolTCP, ICMPType: ptr.To[int32](8)}),
				"spec.ingress[0].ports[0]", "ICMP rules take icmpType/icmpCode, other protocols take port/endPort"},
			{"icmp-code-without-type",
				ingressPorts(v1alpha1.PortRule{Protocol: v1alpha1.ProtocolICMP, ICMPCode: ptr.To[int32](0)}),
				"spec.ingress[0].ports[0].icmpCode", "icmpCode needs icmpType"},
			{"icmp-type-out-of-range",
				ingressPorts(v1alpha1.PortRule{Protocol: v1alpha1.ProtocolICMP, ICMPType: ptr.To[int32](256)}),
				"spec.ingress[0].ports[0].icmpType", "should be less than or equal to 255"},
			{"invalid-cidr",
				egressTo(v1alpha1.Peer{CIDR: &v1alpha1.CIDRPeer{CIDR: "10.0.0.0/33"}}),
				"spec.egressDeny[0].to[0].cidr.cidr", "cidr must be a valid CIDR such as 10.0.0.0/8"},
			{"invalid-cidr-with-except",
				egressTo(v1alpha1.Peer{CIDR: &v1alpha1.CIDRPeer{CIDR: "not-a-cidr", Except: []string{"10.0.0.0/16"}}}),
				"spec.egressDeny[0].to[0].cidr.cidr", "cidr must be a valid CIDR such as 10.0.0.0/8"},
			{"except-outside-cidr",
				egressTo(v1alpha1.Peer{CIDR: &v1alpha1.CIDRPeer{CIDR: "10.0.0.0/8", Except: []string{"192.168.0.0/16"}}}),
				"spec.egressDeny[0].to[0].cidr.except", "every except entry must be a valid CIDR inside cidr"},
			{"except-not-a-cidr",
				egressTo(v1alpha1.Peer{CIDR: &v1alpha1.CIDRPeer{CIDR: "10.0.0.0/8", Except: []string{"10.1.0.0"}}}),
				"spec.egressDeny[0].to[0].cidr.except", "every except entry must be a valid CIDR inside cidr"},
			{"too-many-excepts",
				egressTo(v1alpha1.Peer{CIDR: &v1alpha1.CIDRPeer{CIDR: "10.0.0.0/8", Except: subnets("10.%d.0.0/16", 17)}}),
				"spec.egressDeny[0].to[0].cidr.except", "must have at most 16 items"},
			{"too-many-rules",
				v1alpha1.PolicyRules{Ingress: make([]v1alpha1.IngressRule, 33)},
				"spec.ingress", "must have at most 32 items"},
			{"peer-entity-and-cidr",
				egressTo(v1alpha1.Peer{Entity: ptr.To(v1alpha1.EntityWorld), CIDR: &v1alpha1.CIDRPeer{CIDR: "10.0.0.0/8"}}),
				"spec.egressDeny[0].to[0]", "a peer needs exactly one of podSelector/namespaceSelector, entity or cidr"},
			{"peer-selector-and-entity",
				egressTo(v1alpha1.Peer{PodSelector: &metav1.LabelSelector{}, Entity: ptr.To(v1alpha1.EntityHost)}),
				"spec.egressDeny[0].to[0]", "a peer needs exactly one of podSelector/namespaceSelector, entity or cidr"},
			{"peer-empty",
				egressTo(v1alpha1.Peer{}),
				"spec.egressDeny[0].to[0]", "a peer needs exactly one of podSelector/namespaceSelector, entity or cidr"},
			{"bad-entity",
				egressTo(v1alpha1.Peer{Entity: ptr.To(v1alpha1.Entity("internet"))}),
				"spec.egressDeny[0].to[0].entity", `Unsupported value: "internet"`},
			{"bad-mode",
				v1alpha1.PolicyRules{Mode: "dry-run"},
				"spec.mode", `Unsupported value: "dry-run"`},
		}
		for _, k := range kinds {
			for _, tc := range invalid {
				t.Run(k.name+"/"+tc.name, func(t *testing.T) {
					_, err := k.create("invalid-"+tc.name, tc.rules)
					if err == nil {
						t.Fatalf("create succeeded; want it rejected with %q at %s", tc.message, tc.field)
					}
					if !apierrors.IsInvalid(err) {
						t.Fatalf("create: got %v; want an Invalid error", err)
					}
					msg := err.Error()
					t.Logf("rejected: %s", msg)
					if !strings.Contains(msg, tc.field+":") || !strings.Contains(msg, tc.message) {
						t.Errorf("create: got %q; want %q at %s", msg, tc.message, tc.field)
					}
				})
			}
		}
	})

	t.Run("informer-and-status", func(t *testing.T) {
		factory := externalversions.NewSharedInformerFactory(versioned.NewForConfigOrDie(cp.Config), 0)
		meshLister := factory.Policy().V1alpha1().MeshPolicies().Lister()
		clusterLister := factory.Policy().V1alpha1().ClusterMeshPolicies().Lister()
		stop := make(chan struct{})
		defer func() {
			close(stop)
			factory.Shutdown()
		}()
		factory.Start(stop)
		for typ, ok := range factory.WaitForCacheSync(stop) {
			if !ok {
				t.Fatalf("informer cache for %v did not sync", typ)
			}
		}

		rules := v1alpha1.PolicyRules{Ingress: []v1alpha1.IngressRule{{
			From: []v1alpha1.Peer{{Entity: ptr.To(v1alpha1.EntityRemoteNode)}},
		}}}
		mp, err := policies.MeshPolicies(ns).Create(ctx, &v1alpha1.MeshPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: "watched"},
			Spec:       v1alpha1.MeshPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}}, PolicyRules: rules},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create MeshPolicy: %v", err)
		}
		cmp, err := policies.ClusterMeshPolicies().Create(ctx, &v1alpha1.ClusterMeshPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: "watched"},
			Spec:       v1alpha1.ClusterMeshPolicySpec{PolicyRules: rules},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create ClusterMeshPolicy: %v", err)
		}

		var cached *v1alpha1.MeshPolicy
		if err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
			cached, err = meshLister.MeshPolicies(ns).Get("watched")
			return err == nil && cached.ResourceVersion == mp.ResourceVersion, nil
		}); err != nil {
			t.Fatalf("MeshPolicy %s/watched at resourceVersion %s never reached the lister: %v", ns, mp.ResourceVersion, err)
		}
		if sel := cached.Spec.PodSelector.MatchLabels["app"]; sel != "db" {
			t.Errorf("lister: podSelector app=%q; want db", sel)
		}
		if e := cached.Spec.Ingress[0].From[0].Entity; e == nil || *e != v1alpha1.EntityRemoteNode {
			t.Errorf("lister: ingress[0].from[0].entity = %v; want %s", e, v1alpha1.EntityRemoteNode)
		}
		if err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
			got, err := clusterLister.Get("watched")
			return err == nil && got.ResourceVersion == cmp.ResourceVersion, nil
		}); err != nil {
			t.Fatalf("ClusterMeshPolicy watched at resourceVersion %s never reached the lister: %v", cmp.ResourceVersion, err)
		}

		// The agent writes status through the status subresource: it must
		// persist there, while spec changes in the same request are
		// ignored, and a main-resource update must not touch status.
		withStatus := cached.DeepCopy()
		withStatus.Status.ObservedGeneration = withStatus.Generation
		meta.SetStatusCondition(&withStatus.Status.Conditions, metav1.Condition{
			Type:               v1alpha1.ConditionAccepted,
			Status:             metav1.ConditionTrue,
			Reason:             "Compiled",
			Message:            "compiled into 1 map entry",
			ObservedGeneration: withStatus.Generation,
		})
		withStatus.Spec.Mode = v1alpha1.ModeAudit
		updated, err := policies.MeshPolicies(ns).UpdateStatus(ctx, withStatus, metav1.UpdateOptions{})
		if err != nil {
			t.Fatalf("update status: %v", err)
		}
		if c := meta.FindStatusCondition(updated.Status.Conditions, v1alpha1.ConditionAccepted); c == nil || c.Status != metav1.ConditionTrue || c.Reason != "Compiled" {
			t.Errorf("after UpdateStatus: Accepted condition = %+v; want True/Compiled", c)
		}
		if updated.Status.ObservedGeneration != cached.Generation {
			t.Errorf("after UpdateStatus: observedGeneration = %d; want %d", updated.Status.ObservedGeneration, cached.Generation)
		}
		if updated.Spec.Mode != v1alpha1.ModeEnforce {
			t.Errorf("UpdateStatus changed spec.mode to %q; the status subresource must ignore spec", updated.Spec.Mode)
		}

		noStatus := updated.DeepCopy()
		noStatus.Status = v1alpha1.PolicyStatus{}
		noStatus.Spec.Mode = v1alpha1.ModeAudit
		updated, err = policies.MeshPolicies(ns).Update(ctx, noStatus, metav1.UpdateOptions{})
		if err != nil {
			t.Fatalf("update spec: %v", err)
		}
		if updated.Spec.Mode != v1alpha1.ModeAudit {
			t.Errorf("after Update: spec.mode = %q; want %q", updated.Spec.Mode, v1alpha1.ModeAudit)
		}
		if meta.FindStatusCondition(updated.Status.Conditions, v1alpha1.ConditionAccepted) == nil {
			t.Errorf("Update cleared status; the main resource must ignore status")
		}
		if updated.Generation != cached.Generation+1 {
			t.Errorf("after a spec change: generation = %d; want %d", updated.Generation, cached.Generation+1)
		}

		if err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
			got, err := meshLister.MeshPolicies(ns).Get("watched")
			return err == nil && got.ResourceVersion == updated.ResourceVersion &&
				meta.IsStatusConditionTrue(got.Status.Conditions, v1alpha1.ConditionAccepted), nil
		}); err != nil {
			t.Fatalf("the status update never reached the lister: %v", err)
		}
	})
}
