package deploy

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/veilmesh/veil/deploy/chart"
)

const chartDir = "helm/veil"

// key names an object for comparisons.
func key(o *unstructured.Unstructured) string {
	return fmt.Sprintf("%s/%s %s/%s", o.GetAPIVersion(), o.GetKind(), o.GetNamespace(), o.GetName())
}

func renderObjects(t *testing.T, values map[string]any) map[string]*unstructured.Unstructured {
	t.Helper()
	files, err := chart.Render(chartDir, Namespace, values)
	if err != nil {
		t.Fatalf("render chart: %v", err)
	}
	out := map[string]*unstructured.Unstructured{}
	for _, f := range files {
		objs, err := DecodeObjects([]byte(f.Content))
		if err != nil {
			t.Fatalf("rendered %s: %v", f.Name, err)
		}
		for _, o := range objs {
			if _, dup := out[key(o)]; dup {
				t.Fatalf("chart renders %s twice", key(o))
			}
			out[key(o)] = o
		}
	}
	return out
}

// TestChartMatchesManifests renders the chart as `make manifests` does and
// compares every object with deploy/manifests after decoding both, so that
// `helm install` and `kubectl apply -f` install the same thing.
func TestChartMatchesManifests(t *testing.T) {
	got := renderObjects(t, map[string]any{"namespace": map[string]any{"create": true}})
	objs, err := Objects()
	if err != nil {
		t.Fatalf("manifests: %v", err)
	}
	want := map[string]*unstructured.Unstructured{}
	for _, o := range objs {
		want[key(o)] = o
	}
	if len(want) == 0 {
		t.Fatal("no objects in deploy/manifests")
	}
	for k, w := range want {
		g, ok := got[k]
		if !ok {
			t.Errorf("%s is in deploy/manifests but the chart does not render it (run make manifests)", k)
			continue
		}
		if d := cmp.Diff(w.Object, g.Object); d != "" {
			t.Errorf("%s differs between deploy/manifests and the chart (-manifests +chart; run make manifests):\n%s", k, d)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("the chart renders %s, which deploy/manifests lacks (run make manifests)", k)
		}
	}
}

// TestChartCRDs checks that the chart ships the CRDs of deploy/crds.
func TestChartCRDs(t *testing.T) {
	src, err := filepath.Glob("crds/*.yaml")
	if err != nil || len(src) == 0 {
		t.Fatalf("deploy/crds: %v, %d files", err, len(src))
	}
	copies, _ := filepath.Glob(filepath.Join(chartDir, "crds", "*.yaml"))
	if len(copies) != len(src) {
		t.Errorf("chart has %d CRDs, deploy/crds %d (run make manifests)", len(copies), len(src))
	}
	for _, p := range src {
		a, _ := os.ReadFile(p)
		b, err := os.ReadFile(filepath.Join(chartDir, "crds", filepath.Base(p)))
		if err != nil || !bytes.Equal(a, b) {
			t.Errorf("chart's copy of %s is missing or stale (run make manifests)", p)
		}
	}
}

func TestChartLint(t *testing.T) {
	for _, values := range []map[string]any{
		nil,
		{"namespace": map[string]any{"create": true}},
		{"encryption": map[string]any{"type": "none"}, "cgroupRoot": ""},
	} {
		if err := chart.Lint(chartDir, Namespace, values); err != nil {
			t.Errorf("values %v: %v", values, err)
		}
	}
}

// TestChartValues renders non-default values and checks where each lands.
func TestChartValues(t *testing.T) {
	objs := renderObjects(t, map[string]any{
		"image":      map[string]any{"repository": "registry.example/veil", "tag": "1.2.3"},
		"encryption": map[string]any{"strictMode": true, "wireguardPort": 51999, "keyRotationInterval": "24h"},
		"mtu":        1380,
		"cgroupRoot": "/sys/fs/cgroup/unified",
		"logLevel":   "debug",
		"resources":  map[string]any{"requests": map[string]any{"cpu": "250m"}},
		"tolerations": []any{
			map[string]any{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"},
		},
	})
	if _, ok := objs["v1/Namespace /veil-system"]; ok {
		t.Error("namespace rendered with namespace.create=false")
	}
	cm := objs["v1/ConfigMap veil-system/veil-config"]
	if cm == nil {
		t.Fatal("no ConfigMap")
	}
	data, _, _ := unstructured.NestedStringMap(cm.Object, "data")
	for k, want := range map[string]string{
		"strict-mode": "true", "encryption": "wireguard", "mtu": "1380", "wireguard-port": "51999",
		"key-rotation-interval": "24h", "cgroup-root": "/sys/fs/cgroup/unified", "log-level": "debug",
	} {
		if data[k] != want {
			t.Errorf("ConfigMap %s = %q; want %q", k, data[k], want)
		}
	}
	ds := objs["apps/v1/DaemonSet veil-system/veil-agent"]
	if ds == nil {
		t.Fatal("no DaemonSet")
	}
	text := fmt.Sprint(ds.Object)
	for _, want := range []string{"registry.example/veil:1.2.3", "path:/sys/fs/cgroup/unified", "cpu:250m", "key:dedicated", "containerPort:51999"} {
		if !strings.Contains(text, want) {
			t.Errorf("DaemonSet lacks %q", want)
		}
	}
}

// TestChartAPIServerAddress checks that k8sServiceHost and k8sServicePort
// reach the agent as KUBERNETES_SERVICE_HOST/PORT (client-go's in-cluster
// config reads them), so that an agent on a cluster without kube-proxy
// reaches the API server before its own Service load-balancing is loaded,
// and that the defaults leave the kubelet's values alone.
func TestChartAPIServerAddress(t *testing.T) {
	agentEnv := func(values map[string]any) map[string]string {
		t.Helper()
		ds := renderObjects(t, values)["apps/v1/DaemonSet veil-system/veil-agent"]
		if ds == nil {
			t.Fatal("no DaemonSet")
		}
		containers, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
		out := map[string]string{}
		for _, c := range containers {
			env, _, _ := unstructured.NestedSlice(c.(map[string]any), "env")
			for _, e := range env {
				m := e.(map[string]any)
				v, _ := m["value"].(string)
				out[m["name"].(string)] = v
			}
		}
		return out
	}
	env := agentEnv(map[string]any{"k8sServiceHost": "10.250.0.1", "k8sServicePort": 6443})
	if env["KUBERNETES_SERVICE_HOST"] != "10.250.0.1" || env["KUBERNETES_SERVICE_PORT"] != "6443" {
		t.Errorf("agent env with k8sServiceHost/Port set: KUBERNETES_SERVICE_HOST=%q KUBERNETES_SERVICE_PORT=%q; want 10.250.0.1 and 6443",
			env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"])
	}
	for k := range agentEnv(nil) {
		if strings.HasPrefix(k, "KUBERNETES_SERVICE_") {
			t.Errorf("agent env with the defaults sets %s; want the kubelet's value", k)
		}
	}
	if _, err := chart.Render(chartDir, Namespace, map[string]any{"k8sServicePort": 6443}); err == nil || !strings.Contains(err.Error(), "k8sServicePort needs k8sServiceHost") {
		t.Errorf("render with only k8sServicePort: %v; want an error naming k8sServiceHost", err)
	}
}

// TestChartRefuses checks that values the agent cannot honour fail the
// render with a message that says why.
func TestChartRefuses(t *testing.T) {
	for _, tc := range []struct {
		name   string
		values map[string]any
		want   string
	}{
		{"node-to-node without wireguard", map[string]any{"encryption": map[string]any{"nodeToNode": true, "type": "none"}}, "encryption.nodeToNode=true needs encryption.type=wireguard"},
		{"strict without encryption", map[string]any{"encryption": map[string]any{"type": "none", "strictMode": true}}, "strictMode=true needs encryption.type=wireguard"},
		{"unknown encryption", map[string]any{"encryption": map[string]any{"type": "ipsec"}}, "encryption"},
		{"mtu too small", map[string]any{"mtu": 100}, "mtu"},
		{"unknown value", map[string]any{"strictMode": true}, "strictMode"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := chart.Render(chartDir, Namespace, tc.values)
			t.Logf("render: %v", err)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("render error = %v; want one containing %q", err, tc.want)
			}
		})
	}
}
