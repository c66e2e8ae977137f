package k8s

import (
	"fmt"
	"reflect"
	"runtime"
	"testing"
	"time"
	"unsafe"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"

	"github.com/veilmesh/veil/api/annotations"
)

// A PodInfo is a small part of the slimmed corev1.Pod the cache held
// before; it keeps everything the compiler and the syncer read, so its
// Object equals that slimmed pod.
func TestPodInfoHoldsWhatVeilReadsInAFraction(t *testing.T) {
	const n = 20000
	tr := &transformer{}
	full := make([]*corev1.Pod, n)
	for i := range full {
		full[i] = fullPod(fmt.Sprintf("p%d", i), "n1", fmt.Sprintf("10.%d.%d.%d", i>>16, (i>>8)&255, i&255), map[string]string{"app": fmt.Sprint(i % 50), "tier": "web"})
		if i%10 != 0 {
			delete(full[i].Annotations, annotations.SocketAcceleration) // one pod in ten opts out
		}
	}
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	// Before: the slimmed corev1.Pod the cache held (what Object makes).
	before := heap()
	slim := make([]*corev1.Pod, n)
	for i, p := range full {
		slim[i] = compactPod(p, tr).Object()
	}
	slimBytes := heap() - before
	before = heap()
	infos := make([]*PodInfo, n)
	for i, p := range full {
		o, err := tr.transform(p)
		if err != nil {
			t.Fatal(err)
		}
		infos[i] = o.(*PodInfo)
	}
	infoBytes := heap() - before
	t.Logf("per pod: slimmed corev1.Pod %d bytes, PodInfo %d bytes (%.1f×)", slimBytes/n, infoBytes/n, float64(slimBytes)/float64(infoBytes))
	if infoBytes*3 > slimBytes {
		t.Errorf("PodInfo takes %d bytes a pod, the slimmed corev1.Pod %d: want less than a third", infoBytes/n, slimBytes/n)
	}
	for i := range 3 {
		if got := infos[i].Object(); !reflect.DeepEqual(got, slim[i]) {
			t.Errorf("Object() = %+v\nwant the slimmed pod %+v", got, slim[i])
		}
	}
	if infos[0].Annotations()[annotations.SocketAcceleration] != "false" || len(infos[0].Ports()) != 2 {
		t.Errorf("PodInfo %+v lost the opt-out or the named ports", infos[0])
	}
	runtime.KeepAlive(full)
	runtime.KeepAlive(slim)
	runtime.KeepAlive(infos)
}

// Two IPs, or one that podIP does not repeat, are kept; one equal to
// podIP is kept once.
func TestPodInfoIPs(t *testing.T) {
	p := fullPod("a", "n1", "10.0.0.1", nil)
	if got := compactPod(p, nil); got.PodIPs() != nil || got.Object().Status.PodIPs[0].IP != "10.0.0.1" {
		t.Errorf("one IP: %+v", got)
	}
	p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: "fd00::1"})
	if got := compactPod(p, nil).Object().Status.PodIPs; len(got) != 2 || got[1].IP != "fd00::1" {
		t.Errorf("two IPs: %+v", got)
	}
}

// TestPodInfoIsSmall pins PodInfo's size: 80 bytes is its allocation size
// class; at 150,000 pods each 16 bytes more is 2.3 MiB.
func TestPodInfoIsSmall(t *testing.T) {
	if got := unsafe.Sizeof(PodInfo{}); got > 80 {
		t.Errorf("PodInfo is %d bytes, want at most 80 (rare fields belong in podRare)", got)
	}
}

// The informer's store keys a pod by the PodInfo's own key string: one
// string a pod, not a key and a name.
func TestStoreSharesThePodInfoKey(t *testing.T) {
	idx := cache.NewIndexer(cache.DeletionHandlingMetaNamespaceKeyFunc, cache.Indexers{})
	p := compactPod(fullPod("web-1", "n1", "10.244.1.5", nil), &transformer{})
	if err := idx.Add(p); err != nil {
		t.Fatal(err)
	}
	keys := idx.ListKeys()
	if len(keys) != 1 || keys[0] != "demo/web-1" || p.Key() != "demo/web-1" || p.Namespace() != "demo" || p.Name() != "web-1" {
		t.Fatalf("store keys %q for pod %s (namespace %q, name %q)", keys, p.Key(), p.Namespace(), p.Name())
	}
	if unsafe.StringData(keys[0]) != unsafe.StringData(p.Key()) {
		t.Error("the store's key is a string of its own, not the PodInfo's")
	}
	if unsafe.StringData(p.Name()) != unsafe.StringData(p.Key()[len("demo/"):]) {
		t.Error("the pod's name is a string of its own, not the tail of its key")
	}
	got, err := NewPodStore(idx).Get("demo", "web-1")
	if err != nil || got != p {
		t.Errorf("Get = %v, %v", got, err)
	}
	// So does the informer's, after its first list and after an update.
	kube := kubefake.NewClientset(defaultNamespace(), fullPod("web-1", "n1", "10.244.1.5", nil))
	w, cancel := startWatcher(t, kube, nil)
	defer cancel()
	// cached returns the cached pod and the store's key for it.
	cached := func() (*PodInfo, string) {
		t.Helper()
		p, err := w.Pods.Get("demo", "web-1")
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range w.informers[Pod].GetIndexer().ListKeys() {
			if k == p.Key() {
				return p, k
			}
		}
		t.Fatalf("no key %s in the store", p.Key())
		return nil, ""
	}
	if p, k := cached(); unsafe.StringData(k) != unsafe.StringData(p.Key()) {
		t.Error("after the first list, the informer's store keys the pod by a string of its own, not the PodInfo's")
	}
	relabelled := fullPod("web-1", "n1", "10.244.1.5", map[string]string{"v": "2"})
	relabelled.ResourceVersion = "43"
	if _, err := kube.CoreV1().Pods("demo").Update(t.Context(), relabelled, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		p, k := cached()
		if p.Labels()["v"] == "2" {
			if unsafe.StringData(k) != unsafe.StringData(p.Key()) {
				t.Error("after an update, the informer's store keys the pod by a string of its own, not the PodInfo's")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the update did not reach the cache")
		}
	}
	// A pod without a namespace is keyed by its name.
	q := NewPodInfo(PodFields{Name: "bare"})
	if q.Key() != "bare" || q.Name() != "bare" || q.Namespace() != "" {
		t.Errorf("pod without a namespace: key %q, name %q, namespace %q", q.Key(), q.Name(), q.Namespace())
	}
	if k, err := cache.MetaNamespaceKeyFunc(q); err != nil || k != "bare" {
		t.Errorf("its store key %q, %v", k, err)
	}
}

// Versions, addresses and phases PodInfo does not hold as numbers are kept
// as they were written, and compared as strings.
func TestPodInfoKeepsOddValues(t *testing.T) {
	for _, tc := range []struct {
		rv, ip string
		phase  corev1.PodPhase
		packed bool
	}{
		{"1", "0.0.0.0", corev1.PodPending, true},
		{"18446744073709551615", "255.255.255.255", corev1.PodUnknown, true},
		{"18446744073709551616", "10.0.0.1", "", false}, // above uint64
		{"0", "10.0.0.1", "", false},
		{"007", "10.0.0.1", "", false},
		{"12a", "10.0.0.1", "", false},
		{"1", "010.0.0.1", "", false},
		{"1", "10.0.0.256", "", false},
		{"1", "10.0.0", "", false},
		{"1", "10.0.0.1.", "", false},
		{"1", "10..0.1", "", false},
		{"1", "::ffff:10.0.0.1", "", false},
		{"1", "fd00::1", "", false},
		{"1", "10.0.0.1", "Evicted", false},
		{"", "", "", true},
	} {
		p := NewPodInfo(PodFields{Namespace: "a", Name: "p", ResourceVersion: tc.rv, PodIP: tc.ip, Phase: tc.phase})
		if p.ResourceVersion() != tc.rv || p.PodIP() != tc.ip || p.Phase() != tc.phase {
			t.Errorf("%q %q %q: read back %q %q %q", tc.rv, tc.ip, tc.phase, p.ResourceVersion(), p.PodIP(), p.Phase())
		}
		if packed := p.rare == nil; packed != tc.packed {
			t.Errorf("%q %q %q: packed without rare fields = %v, want %v", tc.rv, tc.ip, tc.phase, packed, tc.packed)
		}
		same := NewPodInfo(PodFields{Namespace: "a", Name: "p", ResourceVersion: tc.rv, PodIP: tc.ip, Phase: tc.phase})
		other := NewPodInfo(PodFields{Namespace: "a", Name: "p", ResourceVersion: tc.rv + "0", PodIP: tc.ip, Phase: tc.phase})
		if !p.sameVersion(same) || p.sameVersion(other) || unreadChange(p, same) || !unreadChange(p, other) {
			t.Errorf("%q: versions %q and %q compare wrongly", tc.rv, tc.rv, tc.rv+"0")
		}
	}
	// A number and a string of other digits are not the same version.
	if NewPodInfo(PodFields{ResourceVersion: "7"}).sameVersion(NewPodInfo(PodFields{ResourceVersion: "07"})) {
		t.Error("versions 7 and 07 are the same")
	}
}

// DeepCopyObject (a PodInfo is a runtime.Object, to answer the first list
// from a checkpoint) copies every field, and a write to the copy's maps or
// slices leaves the original as it was.
func TestPodInfoDeepCopy(t *testing.T) {
	for _, p := range testPods() {
		cp, ok := p.DeepCopyObject().(*PodInfo)
		if !ok || cp == p {
			t.Fatalf("%s: DeepCopyObject returned %T %p", p.Key(), cp, cp)
		}
		if !reflect.DeepEqual(cp, p) {
			t.Fatalf("%s: copy\n got %+v\nwant %+v", p.Key(), cp, p)
		}
		want := p.Fields()
		for k := range cp.labels {
			cp.labels[k] = "changed"
		}
		if cp.ports != nil && len(*cp.ports) > 0 {
			(*cp.ports)[0].Port++
		}
		if cp.rare != nil {
			for k := range cp.rare.annotations {
				cp.rare.annotations[k] = "changed"
			}
			if len(cp.rare.podIPs) > 0 {
				cp.rare.podIPs[0] = "changed"
			}
		}
		if got := p.Fields(); !reflect.DeepEqual(got, want) {
			t.Errorf("%s: writing the copy changed the original:\n got %+v\nwant %+v", p.Key(), got, want)
		}
	}
}
