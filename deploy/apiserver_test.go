package deploy

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/utils/ptr"

	"github.com/veilmesh/veil/api/client/clientset/versioned"
	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/deploy/chart"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/tests/testenv"
)

// agentUser is who the agent is to the API server: its ServiceAccount.
const agentUser = "system:serviceaccount:" + Namespace + ":" + ServiceAccountName

var agentGroups = []string{"system:serviceaccounts", "system:serviceaccounts:" + Namespace, "system:authenticated"}

func requireControlPlane(t *testing.T) {
	t.Helper()
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("skipped under -short: starts etcd and kube-apiserver, built from source on the first run (several minutes)")
	}
}

// applier applies objects with server-side apply through the dynamic
// client, as `kubectl apply --server-side --force-conflicts` does.
type applier struct {
	cfg *rest.Config
	dyn dynamic.Interface
	dc  discovery.DiscoveryInterface
}

func (a *applier) apply(ctx context.Context, objs []*unstructured.Unstructured) error {
	groups, err := restmapper.GetAPIGroupResources(a.dc)
	if err != nil {
		return fmt.Errorf("discover API resources: %w", err)
	}
	mapper := restmapper.NewDiscoveryRESTMapper(groups)
	for _, o := range objs {
		gvk := o.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return fmt.Errorf("map %s: %w", key(o), err)
		}
		data, err := json.Marshal(o.Object)
		if err != nil {
			return fmt.Errorf("encode %s: %w", key(o), err)
		}
		var ri dynamic.ResourceInterface = a.dyn.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			ri = a.dyn.Resource(m.Resource).Namespace(o.GetNamespace())
		} else if o.GetNamespace() != "" {
			return fmt.Errorf("%s: cluster-scoped object with a namespace", key(o))
		}
		if _, err := ri.Patch(ctx, o.GetName(), types.ApplyPatchType, data, metav1.PatchOptions{
			FieldManager: "veil-test",
			Force:        ptr.To(true),
		}); err != nil {
			return fmt.Errorf("server-side apply %s: %w", key(o), err)
		}
	}
	return nil
}

func crdObjects(t *testing.T) []*unstructured.Unstructured {
	t.Helper()
	paths, err := filepath.Glob("crds/*.yaml")
	if err != nil || len(paths) == 0 {
		t.Fatalf("deploy/crds: %v (%d files)", err, len(paths))
	}
	var out []*unstructured.Unstructured
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := DecodeObjects(data)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		out = append(out, objs...)
	}
	return out
}

// TestPrivilegedManifestsApply applies the CRDs and the plain manifests,
// then the chart rendered with other values, to a real API server with
// server-side apply, and checks that the API server accepted and stored
// them; then it checks the agent's RBAC with the API server's own
// authorizer.
func TestPrivilegedManifestsApply(t *testing.T) {
	requireControlPlane(t)
	cp := controlplane.StartForTest(t, controlplane.Options{SkipCRDs: true})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	kube := kubernetes.NewForConfigOrDie(cp.Config)
	a := &applier{cfg: cp.Config, dyn: dynamic.NewForConfigOrDie(cp.Config), dc: kube.Discovery()}

	crds := crdObjects(t)
	if err := a.apply(ctx, crds); err != nil {
		t.Fatalf("CRDs: %v", err)
	}
	for _, c := range crds {
		if err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
			u, err := a.dyn.Resource(apiextensionsv1.SchemeGroupVersion.WithResource("customresourcedefinitions")).Get(ctx, c.GetName(), metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			var crd apiextensionsv1.CustomResourceDefinition
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &crd); err != nil {
				return false, err
			}
			for _, cond := range crd.Status.Conditions {
				if cond.Type == apiextensionsv1.Established && cond.Status == apiextensionsv1.ConditionTrue {
					return true, nil
				}
			}
			return false, nil
		}); err != nil {
			t.Fatalf("CRD %s not established: %v", c.GetName(), err)
		}
	}

	objs, err := Objects()
	if err != nil {
		t.Fatal(err)
	}
	if err := a.apply(ctx, objs); err != nil {
		t.Fatalf("deploy/manifests: %v", err)
	}
	// Applying again changes nothing and conflicts with nothing.
	if err := a.apply(ctx, objs); err != nil {
		t.Fatalf("deploy/manifests, second apply: %v", err)
	}

	stored, err := kube.AppsV1().DaemonSets(Namespace).Get(ctx, DaemonSetName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get DaemonSet: %v", err)
	}
	want, err := AgentDaemonSet()
	if err != nil {
		t.Fatal(err)
	}
	gotSC := stored.Spec.Template.Spec.Containers[0].SecurityContext
	if gotSC == nil || gotSC.Capabilities == nil || len(gotSC.Capabilities.Add) != len(want.Spec.Template.Spec.Containers[0].SecurityContext.Capabilities.Add) {
		t.Errorf("stored agent security context %+v lost capabilities", gotSC)
	}
	if us := stored.Spec.UpdateStrategy.RollingUpdate; us == nil || us.MaxSurge.String() != "0" || us.MaxUnavailable.String() != "1" {
		t.Errorf("stored update strategy %+v", stored.Spec.UpdateStrategy)
	}

	// Why bpffs is mounted HostToContainer: the API server refuses
	// Bidirectional propagation in a container that is not privileged.
	bidi := want.DeepCopy()
	bidi.Name = "bidirectional"
	for i, m := range bidi.Spec.Template.Spec.Containers[0].VolumeMounts {
		if m.MountPath == "/sys/fs/bpf" {
			bidi.Spec.Template.Spec.Containers[0].VolumeMounts[i].MountPropagation = ptr.To(corev1.MountPropagationBidirectional)
		}
	}
	_, err = kube.AppsV1().DaemonSets(Namespace).Create(ctx, bidi, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "Bidirectional") {
		t.Errorf("dry-run DaemonSet with a Bidirectional bpffs mount: err %v; want invalid (privileged only)", err)
	} else {
		t.Logf("API server on a Bidirectional bpffs mount: %v", err)
	}

	// The chart with non-default values, applied over the manifests, is
	// accepted too.
	files, err := chart.Render(chartDir, Namespace, map[string]any{
		"encryption": map[string]any{"strictMode": true, "keyRotationInterval": "24h"},
		"mtu":        1380,
		"cgroupRoot": "",
		"resources":  map[string]any{"requests": map[string]any{"cpu": "50m", "memory": "64Mi"}, "limits": map[string]any{"memory": "512Mi"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	var chartObjs []*unstructured.Unstructured
	for _, f := range files {
		o, err := DecodeObjects([]byte(f.Content))
		if err != nil {
			t.Fatal(err)
		}
		chartObjs = append(chartObjs, o...)
	}
	if err := a.apply(ctx, chartObjs); err != nil {
		t.Fatalf("chart with non-default values: %v", err)
	}
	cm, err := kube.CoreV1().ConfigMaps(Namespace).Get(ctx, ConfigMapName, metav1.GetOptions{})
	if err != nil || cm.Data["strict-mode"] != "true" || cm.Data["mtu"] != "1380" {
		t.Errorf("ConfigMap after the chart's apply: %v, %v", cm.Data, err)
	}

	t.Run("rbac", func(t *testing.T) { checkAgentRBAC(ctx, t, kube) })
	t.Run("as agent", func(t *testing.T) { checkAsAgent(ctx, t, cp, kube) })
}

// checkAgentRBAC asks the API server's authorizer (SubjectAccessReview)
// whether the agent's ServiceAccount may do each thing.
func checkAgentRBAC(ctx context.Context, t *testing.T, kube kubernetes.Interface) {
	type access struct {
		verb, group, resource, subresource, namespace, name string
	}
	can := []access{
		{verb: "get", resource: "pods"}, {verb: "list", resource: "pods"}, {verb: "watch", resource: "pods"},
		{verb: "get", resource: "pods", namespace: "default", name: "a"},
		{verb: "list", resource: "namespaces"}, {verb: "watch", resource: "namespaces"}, {verb: "get", resource: "namespaces", name: "default"},
		{verb: "list", resource: "nodes"}, {verb: "watch", resource: "nodes"}, {verb: "get", resource: "nodes", name: "node-1"},
		{verb: "patch", resource: "nodes", name: "node-1"},
		{verb: "create", resource: "events", namespace: "default"}, {verb: "patch", resource: "events", namespace: "default", name: "e"},
		{verb: "list", group: "networking.k8s.io", resource: "networkpolicies"},
		{verb: "watch", group: "networking.k8s.io", resource: "networkpolicies"},
		{verb: "list", resource: "services"}, {verb: "watch", resource: "services"},
		{verb: "list", group: "discovery.k8s.io", resource: "endpointslices"},
		{verb: "watch", group: "discovery.k8s.io", resource: "endpointslices"},
		{verb: "list", group: "policy.veil.dev", resource: "meshpolicies"},
		{verb: "watch", group: "policy.veil.dev", resource: "meshpolicies"},
		{verb: "list", group: "policy.veil.dev", resource: "clustermeshpolicies"},
		{verb: "watch", group: "policy.veil.dev", resource: "clustermeshpolicies"},
		{verb: "update", group: "policy.veil.dev", resource: "meshpolicies", subresource: "status", namespace: "default", name: "p"},
		{verb: "update", group: "policy.veil.dev", resource: "clustermeshpolicies", subresource: "status", name: "p"},
		{verb: "get", group: "mesh.veil.dev", resource: "meshnodes", name: "node-1"},
		{verb: "list", group: "mesh.veil.dev", resource: "meshnodes"},
		{verb: "watch", group: "mesh.veil.dev", resource: "meshnodes"},
		{verb: "create", group: "mesh.veil.dev", resource: "meshnodes"},
		{verb: "update", group: "mesh.veil.dev", resource: "meshnodes", name: "node-1"},
		{verb: "get", group: "mesh.veil.dev", resource: "meshnodes", subresource: "status", name: "node-1"},
		{verb: "update", group: "mesh.veil.dev", resource: "meshnodes", subresource: "status", name: "node-1"},
	}
	cannot := []access{
		{verb: "delete", resource: "pods", namespace: "default", name: "a"},
		{verb: "create", resource: "pods", namespace: "default"},
		{verb: "patch", resource: "pods", namespace: "default", name: "a"},
		{verb: "create", resource: "pods", subresource: "exec", namespace: "default", name: "a"},
		{verb: "get", resource: "secrets", namespace: "default", name: "s"},
		{verb: "list", resource: "secrets"},
		{verb: "get", resource: "configmaps", namespace: Namespace, name: ConfigMapName},
		{verb: "create", resource: "serviceaccounts", subresource: "token", namespace: "default", name: "default"},
		{verb: "update", resource: "nodes", name: "node-1"},
		{verb: "delete", resource: "nodes", name: "node-1"},
		{verb: "patch", resource: "nodes", subresource: "status", name: "node-1"},
		{verb: "delete", resource: "namespaces", name: "default"},
		{verb: "create", group: "networking.k8s.io", resource: "networkpolicies", namespace: "default"},
		{verb: "delete", group: "networking.k8s.io", resource: "networkpolicies", namespace: "default", name: "p"},
		{verb: "update", resource: "services", namespace: "default", name: "s"},
		{verb: "create", group: "discovery.k8s.io", resource: "endpointslices", namespace: "default"},
		{verb: "update", group: "policy.veil.dev", resource: "meshpolicies", namespace: "default", name: "p"},
		{verb: "patch", group: "policy.veil.dev", resource: "meshpolicies", namespace: "default", name: "p"},
		{verb: "create", group: "policy.veil.dev", resource: "meshpolicies", namespace: "default"},
		{verb: "update", group: "policy.veil.dev", resource: "clustermeshpolicies", name: "p"},
		{verb: "patch", group: "policy.veil.dev", resource: "meshpolicies", subresource: "status", namespace: "default", name: "p"},
		{verb: "delete", group: "mesh.veil.dev", resource: "meshnodes", name: "node-1"},
		{verb: "patch", group: "apps", resource: "deployments", namespace: "default", name: "d"},
		{verb: "patch", group: "apps", resource: "daemonsets", namespace: Namespace, name: DaemonSetName},
		{verb: "create", group: "rbac.authorization.k8s.io", resource: "clusterrolebindings"},
		{verb: "escalate", group: "rbac.authorization.k8s.io", resource: "clusterroles", name: "veil-agent"},
		{verb: "impersonate", resource: "users", name: "admin"},
		{verb: "create", group: "apiextensions.k8s.io", resource: "customresourcedefinitions"},
	}
	check := func(a access, want bool) {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User:   agentUser,
			Groups: agentGroups,
			ResourceAttributes: &authorizationv1.ResourceAttributes{
				Verb: a.verb, Group: a.group, Resource: a.resource, Subresource: a.subresource,
				Namespace: a.namespace, Name: a.name,
			},
		}}
		got, err := kube.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("SubjectAccessReview %+v: %v", a, err)
		}
		if got.Status.Allowed != want {
			t.Errorf("agent can %+v: %v; want %v (%s)", a, got.Status.Allowed, want, got.Status.Reason)
		}
	}
	for _, a := range can {
		check(a, true)
	}
	for _, a := range cannot {
		check(a, false)
	}
}

// checkAsAgent makes real calls with the agent's identity: what the agent
// does works, and a sample of what it must not do is forbidden.
func checkAsAgent(ctx context.Context, t *testing.T, cp *controlplane.ControlPlane, admin kubernetes.Interface) {
	if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create node: %v", err)
	}
	// As the agent's bound token on node-1 says: the admission policy
	// refuses the agent's credential without the node name.
	agent := as(t, cp, "node-1", agentUser, agentGroups...)

	if _, err := agent.CoreV1().Pods("").List(ctx, metav1.ListOptions{}); err != nil {
		t.Errorf("agent lists pods: %v", err)
	}
	patch := []byte(`{"metadata":{"annotations":{"wireguard.veil.dev/public-key":"test"}}}`)
	if _, err := agent.CoreV1().Nodes().Patch(ctx, "node-1", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Errorf("agent patches its node's annotations: %v", err)
	}
	if _, err := agent.CoreV1().Secrets("default").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("agent lists secrets: err %v; want forbidden", err)
	}
	if err := agent.CoreV1().Nodes().Delete(ctx, "node-1", metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("agent deletes a node: err %v; want forbidden", err)
	}
	ssar, err := agent.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, &authorizationv1.SelfSubjectAccessReview{
		Spec: authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &authorizationv1.ResourceAttributes{
			Verb: "update", Group: "policy.veil.dev", Resource: "meshpolicies", Subresource: "status", Namespace: "default",
		}},
	}, metav1.CreateOptions{})
	if err != nil || !ssar.Status.Allowed {
		t.Errorf("agent's own can-i update meshpolicies/status: %+v, %v; want allowed", ssar, err)
	}
}

// admissionSetup starts a control plane with Veil's manifests applied and
// Nodes node-1 and node-2, and returns its admin client.
func admissionSetup(t *testing.T) (*controlplane.ControlPlane, kubernetes.Interface, context.Context) {
	t.Helper()
	requireControlPlane(t)
	cp := controlplane.StartForTest(t, controlplane.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	admin := kubernetes.NewForConfigOrDie(cp.Config)
	objs, err := Objects()
	if err != nil {
		t.Fatal(err)
	}
	a := &applier{cfg: cp.Config, dyn: dynamic.NewForConfigOrDie(cp.Config), dc: admin.Discovery()}
	if err := a.apply(ctx, objs); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"node-1", "node-2"} {
		if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{
			Name: n, Labels: map[string]string{"zone": "a"}, Annotations: map[string]string{"other": "x"},
		}}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create node: %v", err)
		}
	}
	return cp, admin, ctx
}

// as is a client acting as user with groups and, when node is set, the
// node name a bound ServiceAccount token of a pod on that node carries.
func as(t *testing.T, cp *controlplane.ControlPlane, node, user string, groups ...string) kubernetes.Interface {
	t.Helper()
	cfg := rest.CopyConfig(cp.Config)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: groups}
	if node != "" {
		cfg.Impersonate.Extra = map[string][]string{"authentication.kubernetes.io/node-name": {node}}
	}
	return kubernetes.NewForConfigOrDie(cfg)
}

// TestPrivilegedNodePatchPolicy checks the admission policy on Nodes: only
// a node's own agent (a bound token naming that node) may write its
// wireguard.veil.dev/* annotations, and the agent nothing else.
func TestPrivilegedNodePatchPolicy(t *testing.T) {
	cp, admin, ctx := admissionSetup(t)

	agent := as(t, cp, "node-1", agentUser, agentGroups...)
	agentOnNode2 := as(t, cp, "node-2", agentUser, agentGroups...)
	// Other identities with every right RBAC can give, so that what
	// refuses them is the admission policy.
	otherSA := as(t, cp, "node-1", "system:serviceaccount:default:other", "system:serviceaccounts", "system:masters", "system:authenticated")
	// The agent with a credential that does not say where it runs.
	certCfg, err := cp.UserConfig(agentUser, agentGroups...)
	if err != nil {
		t.Fatal(err)
	}
	unbound := kubernetes.NewForConfigOrDie(certCfg)
	patch := func(c kubernetes.Interface, node, p string) error {
		_, err := c.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, []byte(p), metav1.PatchOptions{})
		return err
	}
	const wgAnn = `{"metadata":{"annotations":{"wireguard.veil.dev/public-key":"k"}}}`
	const onlyOwn = "only the node's own Veil agent"

	// The policy takes effect once the API server has loaded it.
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
		return patch(agent, "node-2", wgAnn) != nil, nil
	}); err != nil {
		t.Fatalf("the agent on node-1 can still patch node-2: %v", err)
	}
	for _, tc := range []struct {
		name    string
		client  kubernetes.Interface
		node    string
		patch   string
		wantErr string
	}{
		{"own node, wireguard annotation", agent, "node-1", wgAnn, ""},
		{"own node, remove wireguard annotation", agent, "node-1", `{"metadata":{"annotations":{"wireguard.veil.dev/public-key":null}}}`, ""},
		{"own node, wireguard annotation again", agent, "node-1", wgAnn, ""},
		{"other node", agent, "node-2", `{"metadata":{"annotations":{"wireguard.veil.dev/public-key":"from-node-1"}}}`, onlyOwn},
		{"agent on node-2, node-1's annotation", agentOnNode2, "node-1", `{"metadata":{"annotations":{"wireguard.veil.dev/public-key":"forged"}}}`, onlyOwn},
		{"agent on node-2, remove node-1's annotation", agentOnNode2, "node-1", `{"metadata":{"annotations":{"wireguard.veil.dev/public-key":null}}}`, onlyOwn},
		{"agent on node-2, node-1's label", agentOnNode2, "node-1", `{"metadata":{"labels":{"zone":"b"}}}`, "only the Node it runs on"},
		{"other annotation", agent, "node-1", `{"metadata":{"annotations":{"other":"y"}}}`, "only wireguard.veil.dev/* annotations"},
		{"remove other annotation", agent, "node-1", `{"metadata":{"annotations":{"other":null}}}`, "only wireguard.veil.dev/* annotations"},
		{"label", agent, "node-1", `{"metadata":{"labels":{"zone":"b"}}}`, "labels or spec"},
		{"taint", agent, "node-1", `{"spec":{"taints":[{"key":"k","effect":"NoSchedule"}]}}`, "labels or spec"},
		{"unschedulable", agent, "node-1", `{"spec":{"unschedulable":true}}`, "labels or spec"},
		{"unbound credential, wireguard annotation", unbound, "node-2", `{"metadata":{"annotations":{"wireguard.veil.dev/public-key":"unbound"}}}`, onlyOwn},
		{"unbound credential, label", unbound, "node-2", `{"metadata":{"labels":{"zone":"b"}}}`, "does not name its node"},
		{"other service account on node-1, wireguard annotation", otherSA, "node-1", `{"metadata":{"annotations":{"wireguard.veil.dev/endpoint":"10.0.0.9:51871"}}}`, onlyOwn},
		{"other service account, label", otherSA, "node-1", `{"metadata":{"labels":{"zone":"d"}}}`, ""},
		{"admin, wireguard annotation", admin, "node-1", `{"metadata":{"annotations":{"wireguard.veil.dev/public-key":"admin"}}}`, onlyOwn},
		{"admin, remove wireguard annotation", admin, "node-1", `{"metadata":{"annotations":{"wireguard.veil.dev/public-key":null}}}`, onlyOwn},
		{"admin, label", admin, "node-2", `{"metadata":{"labels":{"zone":"c"}}}`, ""},
		{"admin, other annotation", admin, "node-1", `{"metadata":{"annotations":{"other":"z"}}}`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := patch(tc.client, tc.node, tc.patch)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("patch %s %s: %v", tc.node, tc.patch, err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("patch %s %s: err %v; want one containing %q", tc.node, tc.patch, err, tc.wantErr)
			}
		})
	}

	// Control-plane writers that leave the annotations alone keep working:
	// a status update (as kubelet sends) and a Node created without them.
	n, err := admin.CoreV1().Nodes().Get(ctx, "node-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n.Annotations["wireguard.veil.dev/public-key"] != "k" {
		t.Errorf("node-1's key annotation %q after the refused writes; want the agent's %q", n.Annotations["wireguard.veil.dev/public-key"], "k")
	}
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now()}}
	if _, err := admin.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Errorf("status update of a Node with the agent's annotations: %v", err)
	}
	if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-3"}}, metav1.CreateOptions{}); err != nil {
		t.Errorf("create a Node: %v", err)
	}
	_, err = admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name: "node-4", Annotations: map[string]string{"wireguard.veil.dev/public-key": "pre-seeded"},
	}}, metav1.CreateOptions{})
	if err == nil || !strings.Contains(err.Error(), onlyOwn) {
		t.Errorf("create a Node with a wireguard annotation: err %v; want refused", err)
	}
}

// TestPrivilegedMeshNodeWritePolicy checks that a MeshNode, which the
// audit believes, is written only by its own node's agent.
func TestPrivilegedMeshNodeWritePolicy(t *testing.T) {
	cp, _, ctx := admissionSetup(t)
	veilFor := func(node, user string, groups ...string) versioned.Interface {
		cfg := rest.CopyConfig(cp.Config)
		cfg.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: groups}
		if node != "" {
			cfg.Impersonate.Extra = map[string][]string{"authentication.kubernetes.io/node-name": {node}}
		}
		return versioned.NewForConfigOrDie(cfg)
	}
	admin := versioned.NewForConfigOrDie(cp.Config)
	agent1 := veilFor("node-1", agentUser, agentGroups...)
	agent2 := veilFor("node-2", agentUser, agentGroups...)
	certCfg, err := cp.UserConfig(agentUser, agentGroups...)
	if err != nil {
		t.Fatal(err)
	}
	unbound := versioned.NewForConfigOrDie(certCfg)
	otherSA := veilFor("node-1", "system:serviceaccount:default:other", "system:serviceaccounts", "system:masters", "system:authenticated")

	create := func(c versioned.Interface, name string) error {
		_, err := c.MeshV1alpha1().MeshNodes().Create(ctx, &meshv1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
		return err
	}
	writeStatus := func(c versioned.Interface, name, key string) error {
		mn, err := admin.MeshV1alpha1().MeshNodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		mn.Status.Encryption.PublicKey = key
		_, err = c.MeshV1alpha1().MeshNodes().UpdateStatus(ctx, mn, metav1.UpdateOptions{})
		return err
	}
	// The policy takes effect once the API server has loaded it.
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
		err := create(agent2, "node-1")
		if err == nil {
			return false, admin.MeshV1alpha1().MeshNodes().Delete(ctx, "node-1", metav1.DeleteOptions{})
		}
		return true, nil
	}); err != nil {
		t.Fatalf("the agent on node-2 can still create node-1's MeshNode: %v", err)
	}
	const ownOnly = "may write only the MeshNode of the node it runs on"
	const statusOwnOnly = "only the node's own Veil agent may write a MeshNode's status"
	for _, tc := range []struct {
		name    string
		do      func() error
		wantErr string
	}{
		{"agent creates its node's MeshNode", func() error { return create(agent1, "node-1") }, ""},
		{"agent writes its node's status", func() error { return writeStatus(agent1, "node-1", "mine") }, ""},
		{"agent creates another node's MeshNode", func() error { return create(agent1, "node-2") }, ownOnly},
		{"agent on node-2 writes node-1's status", func() error { return writeStatus(agent2, "node-1", "forged") }, ownOnly},
		{"agent without a node name writes node-1's status", func() error { return writeStatus(unbound, "node-1", "forged") }, ownOnly},
		{"other service account on node-1 writes its status", func() error { return writeStatus(otherSA, "node-1", "forged") }, statusOwnOnly},
		{"admin writes node-1's status", func() error { return writeStatus(admin, "node-1", "forged") }, statusOwnOnly},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.do()
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatal(err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("err %v; want one containing %q", err, tc.wantErr)
			}
		})
	}
	mn, err := admin.MeshV1alpha1().MeshNodes().Get(ctx, "node-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := mn.Status.Encryption.PublicKey; got != "mine" {
		t.Errorf("node-1's MeshNode says key %q; want its agent's %q", got, "mine")
	}
}

// TestPrivilegedAdmissionWithBoundTokens runs the admission policies with
// the credentials agents really have: tokens bound to an agent Pod on a
// node, which the API server issues with the node's name in them. The token
// of node-2's agent cannot write node-1's annotations or MeshNode status; a
// token bound to nothing cannot write either; node-1's agent can.
func TestPrivilegedAdmissionWithBoundTokens(t *testing.T) {
	cp, admin, ctx := admissionSetup(t)
	token := func(node string) string {
		t.Helper()
		req := &authenticationv1.TokenRequest{}
		if node != "" {
			pod, err := admin.CoreV1().Pods(Namespace).Create(ctx, &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: "agent-" + node},
				Spec: corev1.PodSpec{
					NodeName: node, ServiceAccountName: ServiceAccountName,
					Containers: []corev1.Container{{Name: "agent", Image: "veil-agent"}},
				},
			}, metav1.CreateOptions{})
			if err != nil {
				t.Fatalf("create agent pod on %s: %v", node, err)
			}
			req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
		}
		tr, err := admin.CoreV1().ServiceAccounts(Namespace).CreateToken(ctx, ServiceAccountName, req, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("token for the agent on %q: %v", node, err)
		}
		return tr.Status.Token
	}
	config := func(tok string) *rest.Config {
		return &rest.Config{Host: cp.Server, BearerToken: tok, TLSClientConfig: rest.TLSClientConfig{CAData: cp.Config.CAData}}
	}
	tok1, tok2, unbound := token("node-1"), token("node-2"), token("")

	review, err := kubernetes.NewForConfigOrDie(config(tok1)).AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("authenticate with node-1's agent token: %v", err)
	}
	if got := review.Status.UserInfo.Extra["authentication.kubernetes.io/node-name"]; len(got) != 1 || got[0] != "node-1" {
		t.Fatalf("the bound token's node name %v; want [node-1] (user %+v)", got, review.Status.UserInfo)
	}

	patch := func(tok, node, value string) error {
		p := fmt.Sprintf(`{"metadata":{"annotations":{"wireguard.veil.dev/public-key":%q}}}`, value)
		_, err := kubernetes.NewForConfigOrDie(config(tok)).CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, []byte(p), metav1.PatchOptions{})
		return err
	}
	const onlyOwn = "only the node's own Veil agent"
	// The policy takes effect once the API server has loaded it.
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
		return patch(tok2, "node-1", "probe") != nil, nil
	}); err != nil {
		t.Fatalf("node-2's agent can still patch node-1: %v", err)
	}
	if err := patch(tok1, "node-1", "mine"); err != nil {
		t.Errorf("node-1's agent publishes its key: %v", err)
	}
	if err := patch(tok2, "node-1", "forged"); err == nil || !strings.Contains(err.Error(), onlyOwn) {
		t.Errorf("node-2's agent token on node-1: err %v; want refused", err)
	}
	if err := patch(unbound, "node-1", "forged"); err == nil || !strings.Contains(err.Error(), onlyOwn) {
		t.Errorf("an agent token bound to no pod on node-1: err %v; want refused", err)
	}

	veil := func(tok string) versioned.Interface { return versioned.NewForConfigOrDie(config(tok)) }
	mn, err := veil(tok1).MeshV1alpha1().MeshNodes().Create(ctx, &meshv1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("node-1's agent creates its MeshNode: %v", err)
	}
	mn.Status.Encryption.PublicKey = "mine"
	if mn, err = veil(tok1).MeshV1alpha1().MeshNodes().UpdateStatus(ctx, mn, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("node-1's agent writes its MeshNode status: %v", err)
	}
	for name, tok := range map[string]string{"node-2's agent": tok2, "an unbound agent token": unbound} {
		forged := mn.DeepCopy()
		forged.Status.Encryption.PublicKey = "forged"
		if _, err := veil(tok).MeshV1alpha1().MeshNodes().UpdateStatus(ctx, forged, metav1.UpdateOptions{}); err == nil || !strings.Contains(err.Error(), "may write only the MeshNode of the node it runs on") {
			t.Errorf("%s writes node-1's MeshNode status: err %v; want refused", name, err)
		}
	}
}
