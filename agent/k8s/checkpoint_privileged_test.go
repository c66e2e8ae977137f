package k8s

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/veilmesh/veil/api/client/clientset/versioned"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/tests/testenv"
)

// podLists counts the requests that list pods: a List, or a watch that
// streams the initial objects (client-go's watch list). A watch of pods
// from version gone is answered 410 Gone, as the API server answers for a
// version it no longer holds.
type podLists struct {
	rt   http.RoundTripper
	n    *atomic.Int64
	gone string
}

func (c podLists) RoundTrip(r *http.Request) (*http.Response, error) {
	q := r.URL.Query()
	if r.Method != http.MethodGet || r.URL.Path != "/api/v1/pods" {
		return c.rt.RoundTrip(r)
	}
	if q.Get("watch") != "true" || q.Get("sendInitialEvents") == "true" {
		c.n.Add(1)
	} else if c.gone != "" && q.Get("resourceVersion") == c.gone {
		body := fmt.Sprintf(`{"kind":"Status","apiVersion":"v1","status":"Failure","message":"too old resource version: %s","reason":"Expired","code":410}`, c.gone)
		return &http.Response{
			StatusCode: http.StatusGone, Status: "410 Gone", Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
			Header: http.Header{"Content-Type": {"application/json"}}, Body: io.NopCloser(strings.NewReader(body)),
			ContentLength: int64(len(body)), Request: r,
		}, nil
	}
	return c.rt.RoundTrip(r)
}

// runningWatcher is a Watcher as the agent runs it, with its own client.
type runningWatcher struct {
	*Watcher
	lists *atomic.Int64
	logs  *testenv.SyncBuffer
	stop  func()
}

// startCheckpointed starts a Watcher with a checkpoint at path; its
// watches of pods from version gone are answered 410 Gone.
func startCheckpointed(t *testing.T, cfg *rest.Config, path, gone string) *runningWatcher {
	t.Helper()
	lists := &atomic.Int64{}
	kcfg := KubeClientConfig(cfg)
	kcfg.WrapTransport = func(rt http.RoundTripper) http.RoundTripper { return podLists{rt, lists, gone} }
	kube, err := kubernetes.NewForConfig(kcfg)
	if err != nil {
		t.Fatal(err)
	}
	veil, err := versioned.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	logs := &testenv.SyncBuffer{}
	w := NewWithOptions(kube, veil, Options{Checkpoint: &CheckpointOptions{
		Path: path, Node: "n1", MaxAge: 10 * time.Minute, Interval: time.Hour,
		Log: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}})
	ctx, cancel := context.WithCancel(t.Context())
	w.Start(ctx)
	done := make(chan struct{})
	go func() { w.RunCheckpoints(ctx); close(done) }()
	sctx, scancel := context.WithTimeout(ctx, time.Minute)
	defer scancel()
	if err := w.WaitForCacheSync(sctx, time.Hour, func([]string) {}); err != nil {
		cancel()
		<-done
		t.Fatal(err)
	}
	rw := &runningWatcher{Watcher: w, lists: lists, logs: logs, stop: func() { cancel(); <-done }}
	t.Cleanup(rw.stop)
	return rw
}

// podState is what the test compares of a pod: its version and labels.
func podState(p *PodInfo) string {
	keys := slices.Sorted(maps.Keys(p.Labels()))
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%s,", k, p.Labels()[k])
	}
	return p.ResourceVersion() + " " + b.String()
}

func apiPods(ctx context.Context, t *testing.T, kube kubernetes.Interface) map[string]string {
	t.Helper()
	list, err := kube.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for i := range list.Items {
		p := compactPod(&list.Items[i], nil)
		out[p.Key()] = podState(p)
	}
	return out
}

func cachedPods(w *Watcher) map[string]string {
	out := map[string]string{}
	for _, p := range w.Pods.List() {
		out[p.Key()] = podState(p)
	}
	return out
}

// awaitCacheEqualsAPI waits until the watcher's pods are the API server's,
// version for version.
func awaitCacheEqualsAPI(ctx context.Context, t *testing.T, kube kubernetes.Interface, w *Watcher) {
	t.Helper()
	testenv.Eventually(t, 20*time.Second, 20*time.Millisecond, func() error {
		want, got := apiPods(ctx, t, kube), cachedPods(w)
		if !maps.Equal(got, want) {
			return fmt.Errorf("cache holds %d pods, the API server %d; differing: %v", len(got), len(want), diffKeys(got, want))
		}
		return nil
	})
}

func diffKeys(a, b map[string]string) []string {
	var out []string
	for k, v := range a {
		if b[k] != v {
			out = append(out, k)
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// TestPrivilegedResumeFromCheckpoint runs the pod cache's checkpoint
// against a real API server: an agent lists, writes its checkpoint as it
// stops; while it is away a pod is relabelled, one deleted and one
// created; the next start resumes from the checkpoint without listing pods
// and catches up with the changes by watching from its version. A
// checkpoint whose version the API server no longer holds (410 Gone) ends
// in a real list and a correct cache, its stale pods gone.
func TestPrivilegedResumeFromCheckpoint(t *testing.T) {
	testenv.RequirePrivileged(t)
	cp := controlplane.StartForTest(t, controlplane.Options{})
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	kube, err := kubernetes.NewForConfig(cp.Config)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ck"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod := func(i int) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ck", Name: fmt.Sprintf("p%d", i), Labels: map[string]string{"app": fmt.Sprintf("a%d", i%3)}},
			Spec: corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{Name: "c", Image: "x",
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}},
		}
	}
	for i := range 20 {
		if _, err := kube.CoreV1().Pods("ck").Create(ctx, pod(i), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(t.TempDir(), CheckpointFile)

	// First start: no checkpoint, a real list; the stop writes one.
	a := startCheckpointed(t, cp.Config, path, "")
	if a.lists.Load() == 0 {
		t.Fatal("the first start listed no pods")
	}
	awaitCacheEqualsAPI(ctx, t, kube, a.Watcher)
	a.stop()
	ck, err := ReadCheckpoint(path)
	if err != nil {
		t.Fatalf("no checkpoint after a clean stop: %v", err)
	}
	if len(ck.Pods) != 20 || ck.ResourceVersion == "" || ck.Node != "n1" {
		t.Fatalf("checkpoint of %d pods at %q for %q; want 20 at a version, for n1", len(ck.Pods), ck.ResourceVersion, ck.Node)
	}

	// While the agent is away.
	p1, err := kube.CoreV1().Pods("ck").Get(ctx, "p1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p1.Labels = map[string]string{"app": "moved", "new": "yes"}
	if _, err := kube.CoreV1().Pods("ck").Update(ctx, p1, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := kube.CoreV1().Pods("ck").Delete(ctx, "p2", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CoreV1().Pods("ck").Create(ctx, pod(20), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// Second start: from the checkpoint, no list, then the three changes.
	b := startCheckpointed(t, cp.Config, path, "")
	if n := b.lists.Load(); n != 0 {
		t.Errorf("the start from a checkpoint listed pods %d times before its caches synced", n)
	}
	if !strings.Contains(b.logs.String(), "resuming from checkpoint") {
		t.Errorf("the start did not log the resume:\n%s", b.logs.String())
	}
	awaitCacheEqualsAPI(ctx, t, kube, b.Watcher)
	if n := b.lists.Load(); n != 0 {
		t.Errorf("the resumed agent listed pods %d times while catching up; it should only watch", n)
	}
	if p, err := b.Pods.Get("ck", "p1"); err != nil || p.Labels()["new"] != "yes" {
		t.Errorf("relabelled pod %+v, %v", p, err)
	}
	b.stop()

	// Checkpoints the API server cannot watch from: each holds a pod
	// deleted since and misses one that exists, and must end in a real
	// list and a correct cache. A lab API server keeps every version since
	// it started (its watch cache evicts only events older than 75 s), so
	// the 410 Gone it sends for a version it no longer holds comes from
	// the client's transport. A version it has not reached (a checkpoint
	// of an earlier cluster) it would wait for, with the cache stale
	// meanwhile: the agent checks for that before resuming.
	ck, err = ReadCheckpoint(path)
	if err != nil {
		t.Fatal(err)
	}
	ck.Pods = slices.DeleteFunc(ck.Pods, func(p *PodInfo) bool { return p.Name() == "p3" })
	ck.Pods = append(ck.Pods, NewPodInfo(PodFields{Namespace: "ck", Name: "ghost", ResourceVersion: "2", NodeName: "n1"}))
	for _, tc := range []struct {
		name, rv, gone, log string
	}{
		{"410 Gone", ck.ResourceVersion, ck.ResourceVersion, "no longer holds the checkpoint's version"},
		{"version ahead of the cluster", "999999999", "", "is ahead of the API server's"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stale := *ck
			stale.ResourceVersion, stale.Written = tc.rv, time.Now()
			if err := WriteCheckpoint(path, &stale); err != nil {
				t.Fatal(err)
			}
			c := startCheckpointed(t, cp.Config, path, tc.gone)
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("log:\n%s", c.logs.String())
				}
			})
			awaitCacheEqualsAPI(ctx, t, kube, c.Watcher)
			if c.lists.Load() == 0 {
				t.Errorf("a checkpoint the API server cannot watch from was kept without a list; log:\n%s", c.logs.String())
			}
			if !strings.Contains(c.logs.String(), tc.log) {
				t.Errorf("the log does not say %q:\n%s", tc.log, c.logs.String())
			}
			c.stop()
		})
	}
}
