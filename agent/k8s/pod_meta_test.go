package k8s

import (
	"testing"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/client-go/tools/cache"
)

// The store and queue key a PodInfo and read its version without an
// allocation, and read what it holds.
func TestPodMetaReadsThePodInfo(t *testing.T) {
	p := NewPodInfo(PodFields{
		Namespace: "demo", Name: "web-1", ResourceVersion: "4711", Labels: map[string]string{"app": "web"},
		Annotations: map[string]string{"veil.dev/accelerate": "false"},
	})
	m, err := meta.Accessor(p)
	if err != nil {
		t.Fatal(err)
	}
	if m.GetName() != "demo/web-1" || m.GetNamespace() != "" || m.GetResourceVersion() != "4711" ||
		m.GetLabels()["app"] != "web" || m.GetAnnotations()["veil.dev/accelerate"] != "false" {
		t.Fatalf("meta name %q namespace %q version %q labels %v annotations %v", m.GetName(), m.GetNamespace(), m.GetResourceVersion(), m.GetLabels(), m.GetAnnotations())
	}
	// A cached object is never written: a setter changes nothing.
	m.SetName("other")
	m.SetLabels(nil)
	m.SetResourceVersion("1")
	if p.Name() != "web-1" || p.Labels()["app"] != "web" || p.ResourceVersion() != "4711" {
		t.Fatalf("a setter wrote the PodInfo: %+v", p.Fields())
	}
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(p)
	if err != nil || key != "demo/web-1" {
		t.Fatalf("key %q, %v", key, err)
	}
	if n := testing.AllocsPerRun(100, func() { _, _ = cache.DeletionHandlingMetaNamespaceKeyFunc(p) }); n != 0 {
		t.Errorf("keying a PodInfo allocates %v times", n)
	}
}
