package manifest

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// find returns the problems whose field is fieldPath.
func find(ps Problems, fieldPath string) []Problem {
	var out []Problem
	for _, p := range ps {
		if p.Field == fieldPath {
			out = append(out, p)
		}
	}
	return out
}

// want1 asserts that exactly one problem is filed at fieldPath, with the
// given severity, object, line and a message containing msg.
func want1(t *testing.T, ps Problems, sev Severity, object, fieldPath string, line int, msg string) {
	t.Helper()
	got := find(ps, fieldPath)
	if len(got) != 1 {
		t.Fatalf("problems at %q = %v; want one\nall: %v", fieldPath, got, ps)
	}
	p := got[0]
	if p.Severity != sev || p.Object != object || p.Line != line || !strings.Contains(p.Message, msg) {
		t.Errorf("problem = %+v; want %s about %s at line %d containing %q", p, sev, object, line, msg)
	}
}

func TestLoadDirectory(t *testing.T) {
	s, err := Load("testdata/dir")
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Namespaces) != 1 || len(s.Pods) != 1 || len(s.NetworkPolicies) != 1 {
		t.Fatalf("loaded %d namespaces, %d pods, %d network policies; want 1 each", len(s.Namespaces), len(s.Pods), len(s.NetworkPolicies))
	}
	if got := s.Namespaces[0].Labels[NamespaceNameLabel]; got != "prod" {
		t.Errorf("namespace label %s = %q; want prod, as the API server sets it", NamespaceNameLabel, got)
	}
	// The PodList item has no kind or apiVersion of its own.
	if p := s.Pods[0]; p.Name != "web" || p.Status.PodIP != "10.1.0.1" || p.Spec.Containers[0].Ports[0].Name != "http" {
		t.Errorf("pod = %s/%s %s", p.Namespace, p.Name, p.Status.PodIP)
	}
	o, ok := s.Origin(Ref{Kind: KindNetworkPolicy, Namespace: "prod", Name: "deny"})
	if !ok || o.File != filepath.Join("testdata", "dir", "sub", "pods.json") || o.Document != 2 || o.Line != 6 {
		t.Errorf("origin of the NetworkPolicy = %+v, %v; want pods.json document 2 line 6", o, ok)
	}
	// ignored.txt is not read; the Deployment is read and ignored.
	if len(s.Problems) != 1 {
		t.Fatalf("problems = %v; want only the Deployment warning", s.Problems)
	}
	want1(t, s.Problems, SeverityWarning, "Deployment prod/web", "", 1, "ignored")
}

func TestLoadStrictFields(t *testing.T) {
	s, err := Load("testdata/typo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want1(t, s.Problems, SeverityError, "NetworkPolicy dev/typo", "spec.ingress[0].ports[0].prot", 17, "unknown field")
	want1(t, s.Problems, SeverityError, "MeshPolicy dev/typed", "spec.ingress[0].ports[0].endPort", 30, "must be of type integer, not string")
	want1(t, s.Problems, SeverityWarning, "Pod dev/ok", "metadata.namespace", 5, `namespace "dev" is not defined`)
	for _, p := range s.Problems {
		if p.File != "testdata/typo.yaml" {
			t.Errorf("problem %v does not name the file", p)
		}
	}
	if len(s.Namespaces) != 1 || s.Namespaces[0].Name != "dev" || s.Namespaces[0].Labels[NamespaceNameLabel] != "dev" {
		t.Errorf("implicit namespace = %v", s.Namespaces)
	}
}

func TestLoadNestedLists(t *testing.T) {
	s, err := Load("testdata/list.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(s.MeshPolicies) != 1 || s.MeshPolicies[0].Spec.Mode != "audit" || len(s.Pods) != 1 {
		t.Fatalf("mesh policies %v, pods %d", s.MeshPolicies, len(s.Pods))
	}
	want1(t, s.Problems, SeverityError, "Pod shop/cart", "spec.containers[0].prts", 26, "unknown field")
	o, _ := s.Origin(Ref{Kind: KindMeshPolicy, Namespace: "shop", Name: "audit-all"})
	if o.Line != 11 {
		t.Errorf("MeshPolicy origin line = %d; want 11, where the item starts", o.Line)
	}
	if len(s.Problems) != 1 {
		t.Errorf("problems = %v; want one", s.Problems)
	}
}

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		// check looks at the set.
		check func(t *testing.T, s *Set)
	}{
		{"empty documents", "# nothing\n---\n\n---\n", func(t *testing.T, s *Set) {
			if len(s.Problems) != 0 {
				t.Errorf("problems = %v", s.Problems)
			}
		}},
		{"missing kind", "apiVersion: v1\nmetadata: {name: a}\n", func(t *testing.T, s *Set) {
			want1(t, s.Problems, SeverityError, "object a", "kind", 1, "required")
		}},
		{"missing apiVersion", "kind: Pod\nmetadata: {name: a}\n", func(t *testing.T, s *Set) {
			want1(t, s.Problems, SeverityError, "Pod a", "apiVersion", 1, "required")
		}},
		{"invalid YAML in second document", "kind: Namespace\napiVersion: v1\nmetadata: {name: a}\n---\nkind: [\n", func(t *testing.T, s *Set) {
			if len(s.Problems) != 1 || s.Problems[0].Document != 2 || s.Problems[0].Line < 5 || !strings.Contains(s.Problems[0].Message, "invalid YAML") {
				t.Errorf("problems = %v; want invalid YAML in document 2 at line ≥ 5", s.Problems)
			}
		}},
		{"duplicate YAML key", "kind: Namespace\napiVersion: v1\nmetadata: {name: a}\nkind: Pod\n", func(t *testing.T, s *Set) {
			if len(s.Problems) != 1 || !strings.Contains(s.Problems[0].Message, "already set") || s.Problems[0].Line != 4 {
				t.Errorf("problems = %v; want a duplicate key at line 4", s.Problems)
			}
		}},
		{"duplicate object", "kind: Namespace\napiVersion: v1\nmetadata: {name: a}\n---\nkind: Namespace\napiVersion: v1\nmetadata: {name: a}\n", func(t *testing.T, s *Set) {
			want1(t, s.Problems, SeverityError, "Namespace a", "", 5, "defined twice; first at x.yaml:1")
		}},
		{"JSON stream", "{\"kind\": \"Namespace\", \"apiVersion\": \"v1\", \"metadata\": {\"name\": \"a\"}}\n\n{\"kind\": \"Namespace\", \"apiVersion\": \"v1\",\n \"metadata\": {\"name\": \"b\", \"lables\": {}}}\n", func(t *testing.T, s *Set) {
			if len(s.Namespaces) != 2 {
				t.Errorf("namespaces = %d; want 2", len(s.Namespaces))
			}
			want1(t, s.Problems, SeverityError, "Namespace b", "metadata.lables", 4, "unknown field")
		}},
		{"JSON syntax error", "{\"kind\": \"Namespace\",\n \"apiVersion\": v1}\n", func(t *testing.T, s *Set) {
			if len(s.Problems) != 1 || s.Problems[0].Line != 2 || !strings.Contains(s.Problems[0].Message, "invalid JSON") {
				t.Errorf("problems = %v; want invalid JSON at line 2", s.Problems)
			}
		}},
		{"not an object", "- a\n- b\n", func(t *testing.T, s *Set) {
			if len(s.Problems) != 1 || !strings.Contains(s.Problems[0].Message, "must be an object") {
				t.Errorf("problems = %v", s.Problems)
			}
		}},
		{"list item not an object", "apiVersion: v1\nkind: List\nitems: [3]\n", func(t *testing.T, s *Set) {
			want1(t, s.Problems, SeverityError, "List (unnamed)", "items[0]", 1, "must be an object")
		}},
		{"unsupported apiVersion", "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\n", func(t *testing.T, s *Set) {
			want1(t, s.Problems, SeverityWarning, "NetworkPolicy x/a", "apiVersion", 1, "want networking.k8s.io/v1")
			if len(s.NetworkPolicies) != 0 {
				t.Error("an unsupported NetworkPolicy was kept")
			}
		}},
		{"cluster-scoped with namespace", "apiVersion: policy.veil.dev/v1alpha1\nkind: ClusterMeshPolicy\nmetadata: {name: c, namespace: x}\nspec: {podSelector: {}}\n", func(t *testing.T, s *Set) {
			want1(t, s.Problems, SeverityWarning, "ClusterMeshPolicy c", "metadata.namespace", 3, "cluster-scoped")
			if len(s.ClusterMeshPolicies) != 1 || s.ClusterMeshPolicies[0].Namespace != "" {
				t.Errorf("cluster mesh policies = %v", s.ClusterMeshPolicies)
			}
		}},
		{"mesh policy without podSelector", "apiVersion: policy.veil.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: m, namespace: x}\nspec:\n  mode: audit\n", func(t *testing.T, s *Set) {
			want1(t, s.Problems, SeverityError, "MeshPolicy x/m", "spec.podSelector", 4, "required")
		}},
		{"mesh policy without spec", "apiVersion: policy.veil.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: m, namespace: x}\n", func(t *testing.T, s *Set) {
			want1(t, s.Problems, SeverityError, "MeshPolicy x/m", "spec", 1, "required")
		}},
		{"boolean label", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels:\n    enabled: yes\n", func(t *testing.T, s *Set) {
			// encoding/json names the map, not the key.
			want1(t, s.Problems, SeverityError, "Namespace a", "metadata.labels", 5, "quote the value")
		}},
		{"default namespace", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", func(t *testing.T, s *Set) {
			if len(s.Pods) != 1 || s.Pods[0].Namespace != "default" {
				t.Errorf("pods = %v", s.Pods)
			}
			want1(t, s.Problems, SeverityWarning, "Pod default/p", "metadata.namespace", 3, `namespace "default"`)
		}},
		{"pod IPs", "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: default}, status: {podIP: 10.0.0.1}}\n- {apiVersion: v1, kind: Pod, metadata: {name: b, namespace: default}, status: {podIP: 10.0.0.1}}\n- {apiVersion: v1, kind: Pod, metadata: {name: c, namespace: default}, status: {podIP: 10.0.0.256}}\n", func(t *testing.T, s *Set) {
			ps := find(s.Problems, "status.podIP")
			if len(ps) != 2 || ps[0].Object != "Pod default/b" || ps[0].Severity != SeverityWarning || ps[1].Object != "Pod default/c" || ps[1].Severity != SeverityError {
				t.Errorf("podIP problems = %v; want a warning for b (same IP as a) and an error for c", ps)
			}
		}},
		{"separator with comment", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n--- # next\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n", func(t *testing.T, s *Set) {
			if len(s.Namespaces) != 2 || len(s.Problems) != 0 {
				t.Errorf("namespaces = %d, problems = %v", len(s.Namespaces), s.Problems)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.check(t, Parse("x.yaml", []byte(tc.in)))
		})
	}
}

func TestLoadErrors(t *testing.T) {
	if _, err := Load(); err == nil {
		t.Error("Load() without paths succeeded")
	}
	if _, err := Load("testdata/nope.yaml"); err == nil || !strings.Contains(err.Error(), "nope.yaml") {
		t.Errorf("Load(missing file) = %v; want an error naming it", err)
	}
	empty := t.TempDir()
	if err := os.WriteFile(filepath.Join(empty, "README"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(empty); err == nil || !strings.Contains(err.Error(), "no .yaml") {
		t.Errorf("Load(dir without manifests) = %v; want an error", err)
	}
}

func TestLoadStdin(t *testing.T) {
	s, err := Loader{Stdin: strings.NewReader("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")}.Load("-")
	if err != nil {
		t.Fatal(err)
	}
	o, ok := s.Origin(Ref{Kind: KindNamespace, Name: "a"})
	if !ok || o.File != "<stdin>" {
		t.Errorf("origin = %+v, %v", o, ok)
	}
}

func TestProblemLocatesFields(t *testing.T) {
	s, err := Load("testdata/list.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ref := Ref{Kind: KindMeshPolicy, Namespace: "shop", Name: "audit-all"}
	for _, tc := range []struct {
		field string
		line  int
	}{
		{"spec.mode", 16},
		{"spec.podSelector", 15},
		{"spec.ingress[0]", 14}, // absent: the deepest present part
		{"", 11},
	} {
		if p := s.Problem(SeverityError, ref, tc.field, "m"); p.Line != tc.line || p.File != "testdata/list.yaml" {
			t.Errorf("Problem at %q: %s:%d; want line %d", tc.field, p.File, p.Line, tc.line)
		}
	}
	if p := s.Problem(SeverityWarning, Ref{Kind: KindNamespace, Name: "implicit"}, "", "m"); p.File != "" || p.Object != "Namespace implicit" {
		t.Errorf("Problem for an object without origin = %+v", p)
	}
}

func TestSplitFieldPath(t *testing.T) {
	got := splitFieldPath("spec.ingress[0].from[1].podSelector.matchLabels[app.kubernetes.io/name]")
	want := []string{"spec", "ingress", "0", "from", "1", "podSelector", "matchLabels", "app.kubernetes.io/name"}
	if !slices.Equal(got, want) {
		t.Errorf("splitFieldPath = %q; want %q", got, want)
	}
}
