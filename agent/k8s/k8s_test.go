package k8s

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/rest"

	veilfake "github.com/veilmesh/veil/api/client/clientset/versioned/fake"
	"github.com/veilmesh/veil/api/policy/v1alpha1"
)

func TestKeysAfterCacheSync(t *testing.T) {
	kube := kubefake.NewClientset(
		&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "a"}},
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "x"}},
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}},
	)
	veil := veilfake.NewSimpleClientset(&v1alpha1.MeshPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "mp"}})
	w := New(kube, veil, 0)
	var (
		mu   sync.Mutex
		seen = map[Key]bool{}
	)
	if err := w.OnChange(func(k Key) { mu.Lock(); seen[k] = true; mu.Unlock() }); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w.Start(ctx)
	synced := false
	if err := w.WaitForCacheSync(ctx, time.Hour, func(waiting []string) { synced = waiting == nil }); err != nil {
		t.Fatal(err)
	}
	// The pod cache is read by key alone: no index costs an entry per pod.
	if ix := w.informers[Pod].GetIndexer().GetIndexers(); len(ix) != 0 {
		t.Errorf("the pod cache keeps indexes %v", ix)
	}
	if _, err := w.Pods.Get("x", "a"); err != nil {
		t.Errorf("pod by key: %v", err)
	}
	if !synced {
		t.Fatal("WaitForCacheSync returned without reporting that nothing is waiting")
	}
	want := []Key{
		{Kind: Namespace, Name: "x"},
		{Kind: Node, Name: "n1"},
		{Kind: MeshPolicy, Namespace: "x", Name: "mp"},
	}
	got := w.Keys()
	if len(got) != len(want) {
		t.Fatalf("Keys = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("Keys = %v, want %v (namespaces and nodes first, no pods)", got, want)
		}
	}
	if _, err := w.Pods.Get("x", "a"); err != nil {
		t.Fatalf("pod lister: %v", err)
	}

	// A change after the first list reaches the handler as a key.
	if _, err := kube.CoreV1().Pods("x").Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "b"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := veil.PolicyV1alpha1().MeshPolicies("x").Create(ctx, &v1alpha1.MeshPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "mp2"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for {
		mu.Lock()
		ok := seen[Key{Kind: Pod, Namespace: "x", Name: "b"}] && seen[Key{Kind: MeshPolicy, Namespace: "x", Name: "mp2"}]
		mu.Unlock()
		if ok {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("handler saw %v", seen)
		case <-time.After(10 * time.Millisecond):
		}
	}
	// The first list's objects do not: the first convergence reads the
	// caches whole once they synced, and keying and queueing each of the
	// cluster's pods once more cost a resumed start at 150,000 pods about
	// a fifth of its CPU. An informer delivers its notifications in order,
	// so those of the first list came before b and mp2.
	mu.Lock()
	defer mu.Unlock()
	for _, k := range []Key{{Kind: Pod, Namespace: "x", Name: "a"}, {Kind: MeshPolicy, Namespace: "x", Name: "mp"}} {
		if seen[k] {
			t.Errorf("the handler saw %v of the first list", k)
		}
	}
}

func TestWaitForCacheSyncReportsWhatIsWaiting(t *testing.T) {
	w := New(kubefake.NewClientset(), veilfake.NewSimpleClientset(), 0)
	// Never started: nothing lists, so the wait reports and then gives up.
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	var reported []string
	err := w.WaitForCacheSync(ctx, 0, func(waiting []string) { reported = waiting })
	if err == nil {
		t.Fatal("caches of unstarted informers synced")
	}
	if len(reported) != 6 {
		t.Fatalf("reported %v, want all six kinds", reported)
	}
}

// Kubernetes' own kinds are read as protobuf; the config given is left as
// it was, for Veil's custom resources (JSON only).
func TestKubeClientConfigSpeaksProtobuf(t *testing.T) {
	cfg := &rest.Config{Host: "https://127.0.0.1:6443"}
	got := KubeClientConfig(cfg)
	if got.ContentType != "application/vnd.kubernetes.protobuf" || !strings.HasPrefix(got.AcceptContentTypes, "application/vnd.kubernetes.protobuf,") {
		t.Errorf("content type %q, accept %q; want protobuf first", got.ContentType, got.AcceptContentTypes)
	}
	if cfg.ContentType != "" || cfg.AcceptContentTypes != "" || got.Host != cfg.Host {
		t.Errorf("the given config changed (%+v) or the host was lost (%q)", cfg, got.Host)
	}
}
