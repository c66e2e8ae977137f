package deploy

import (
	"slices"
	"testing"

	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
)

// TestMeshctlRoles checks the roles meshctl users are bound to: reads of
// Veil's objects cluster-wide, and exec only into the agents' namespace;
// bindings only for the users and groups the values name.
func TestMeshctlRoles(t *testing.T) {
	objs := renderObjects(t, nil)
	var role rbacv1.Role
	convert(t, objs["rbac.authorization.k8s.io/v1/Role veil-system/veil-meshctl"], &role)
	if !grants(role.Rules, "", "pods/exec", "create") || !grants(role.Rules, "", "pods", "list") {
		t.Errorf("Role veil-meshctl rules %+v; want list pods and create pods/exec", role.Rules)
	}
	var cr rbacv1.ClusterRole
	convert(t, objs["rbac.authorization.k8s.io/v1/ClusterRole /veil-meshctl"], &cr)
	for _, want := range [][3]string{{"", "nodes", "list"}, {"", "pods", "list"}, {"mesh.veil.dev", "meshnodes", "list"}, {"policy.veil.dev", "meshpolicies", "list"}} {
		if !grants(cr.Rules, want[0], want[1], want[2]) {
			t.Errorf("ClusterRole veil-meshctl does not grant %s %s/%s", want[2], want[0], want[1])
		}
	}
	for _, r := range cr.Rules {
		if slices.ContainsFunc(r.Resources, func(s string) bool { return s == "pods/exec" || s == "*" }) || slices.Contains(r.Verbs, "create") {
			t.Errorf("ClusterRole veil-meshctl grants %+v: exec or writes anywhere in the cluster", r)
		}
	}
	for k := range objs {
		if k == "rbac.authorization.k8s.io/v1/ClusterRoleBinding /veil-meshctl" || k == "rbac.authorization.k8s.io/v1/RoleBinding veil-system/veil-meshctl" {
			t.Errorf("%s rendered with no meshctl users or groups", k)
		}
	}

	objs = renderObjects(t, map[string]any{"meshctl": map[string]any{"users": []any{"alice"}, "groups": []any{"sre"}}})
	want := []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: "alice"}, {APIGroup: rbacv1.GroupName, Kind: rbacv1.GroupKind, Name: "sre"}}
	var crb rbacv1.ClusterRoleBinding
	convert(t, objs["rbac.authorization.k8s.io/v1/ClusterRoleBinding /veil-meshctl"], &crb)
	var rb rbacv1.RoleBinding
	convert(t, objs["rbac.authorization.k8s.io/v1/RoleBinding veil-system/veil-meshctl"], &rb)
	if !slices.Equal(crb.Subjects, want) || crb.RoleRef.Name != "veil-meshctl" || crb.RoleRef.Kind != "ClusterRole" {
		t.Errorf("ClusterRoleBinding veil-meshctl = %+v, %+v; want %+v to the ClusterRole", crb.RoleRef, crb.Subjects, want)
	}
	if !slices.Equal(rb.Subjects, want) || rb.RoleRef.Name != "veil-meshctl" || rb.RoleRef.Kind != "Role" {
		t.Errorf("RoleBinding veil-meshctl = %+v, %+v; want %+v to the Role", rb.RoleRef, rb.Subjects, want)
	}
}

func convert(t *testing.T, u *unstructured.Unstructured, into any) {
	t.Helper()
	if u == nil {
		t.Fatalf("object not rendered")
	}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(u.Object, into, true); err != nil {
		t.Fatalf("%s: %v", key(u), err)
	}
}

func grants(rules []rbacv1.PolicyRule, group, resource, verb string) bool {
	return slices.ContainsFunc(rules, func(r rbacv1.PolicyRule) bool {
		return slices.Contains(r.APIGroups, group) && slices.Contains(r.Resources, resource) && slices.Contains(r.Verbs, verb)
	})
}
