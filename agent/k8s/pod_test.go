package k8s

import (
	"fmt"
	"reflect"
	"runtime"
	"testing"

	corev1 "k8s.io/api/core/v1"

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
	if infos[0].Annotations[annotations.SocketAcceleration] != "false" || len(infos[0].Ports) != 2 {
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
	if got := compactPod(p, nil); got.PodIPs != nil || got.Object().Status.PodIPs[0].IP != "10.0.0.1" {
		t.Errorf("one IP: %+v", got)
	}
	p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: "fd00::1"})
	if got := compactPod(p, nil).Object().Status.PodIPs; len(got) != 2 || got[1].IP != "fd00::1" {
		t.Errorf("two IPs: %+v", got)
	}
}
