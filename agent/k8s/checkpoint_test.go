package k8s

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	clientfeatures "k8s.io/client-go/features"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"

	"github.com/veilmesh/veil/api/annotations"
	veilfake "github.com/veilmesh/veil/api/client/clientset/versioned/fake"
)

// testCluster is the UID of the fake clusters' namespace default.
const testCluster = "6b1f3c2e-0000-4000-8000-000000000001"

func defaultNamespace() *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: metav1.NamespaceDefault, UID: testCluster}}
}

func testPods() []*PodInfo {
	web := map[string]string{"app": "web", "tier": "front"}
	return []*PodInfo{
		NewPodInfo(PodFields{Namespace: "a", Name: "web-1", ResourceVersion: "101", Labels: web, NodeName: "n1", ServiceAccount: "default", Phase: corev1.PodRunning, PodIP: "10.244.1.5",
			Ports: []NamedPort{{Container: "app", Name: "http", Port: 8080, Protocol: corev1.ProtocolTCP}, {Container: "app", Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}}}),
		NewPodInfo(PodFields{Namespace: "a", Name: "web-2", ResourceVersion: "102", Labels: web, NodeName: "n2", ServiceAccount: "default", Phase: corev1.PodRunning, PodIP: "10.244.2.5"}),
		NewPodInfo(PodFields{Namespace: "b", Name: "host", ResourceVersion: "7", HostNetwork: true, NodeName: "n1", Phase: corev1.PodPending,
			Annotations: map[string]string{"veil.dev/socket-acceleration": "off"}, PodIP: "10.0.0.1", PodIPs: []string{"10.0.0.1", "fd00::1"}}),
		NewPodInfo(PodFields{Namespace: "b", Name: "bare"}),
	}
}

func TestCheckpointRoundTrip(t *testing.T) {
	in := &Checkpoint{ResourceVersion: "12345", Written: time.Unix(1700000000, 123456789), Node: "n1", ClusterID: testCluster, Pods: testPods()}
	b := MarshalCheckpoint(in)
	out, err := UnmarshalCheckpoint(b)
	if err != nil {
		t.Fatal(err)
	}
	if !out.Written.Equal(in.Written) {
		t.Errorf("written %v, want %v", out.Written, in.Written)
	}
	out.Written = in.Written
	if !reflect.DeepEqual(out, in) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", out, in)
	}
	// Pods that shared a label set share it again, and it is written once.
	if reflect.ValueOf(out.Pods[0].Labels).Pointer() != reflect.ValueOf(out.Pods[1].Labels).Pointer() {
		t.Error("the label set two pods shared is two maps after the round trip")
	}
	if n := bytes.Count(b, []byte("front")); n != 1 {
		t.Errorf("a shared label value is written %d times, want once", n)
	}
	// No pods at all is a checkpoint too.
	empty, err := UnmarshalCheckpoint(MarshalCheckpoint(&Checkpoint{ResourceVersion: "1", Node: "n1"}))
	if err != nil || len(empty.Pods) != 0 || empty.ResourceVersion != "1" {
		t.Fatalf("empty checkpoint: %+v, %v", empty, err)
	}
}

// fillValue sets every field of v, recursively, to something not zero.
func fillValue(t *testing.T, v reflect.Value, seed int) {
	t.Helper()
	switch v.Kind() {
	case reflect.String:
		v.SetString("s" + strings.Repeat("x", seed%5) + string(rune('a'+seed%26)))
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(int64(seed + 1))
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(uint64(seed + 1))
	case reflect.Slice:
		s := reflect.MakeSlice(v.Type(), 2, 2)
		for i := range 2 {
			fillValue(t, s.Index(i), seed*3+i)
		}
		v.Set(s)
	case reflect.Map:
		m := reflect.MakeMap(v.Type())
		k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
		fillValue(t, k, seed)
		fillValue(t, e, seed+1)
		m.SetMapIndex(k, e)
		v.Set(m)
	case reflect.Struct:
		for i := range v.NumField() {
			fillValue(t, v.Field(i), seed*7+i)
		}
	default:
		t.Fatalf("fillValue: a field of kind %s: teach the checkpoint codec (and this test) about it", v.Kind())
	}
}

// TestCheckpointCoversPodInfo fails when PodInfo gains a field the
// checkpoint does not write: a resumed cache would lose it.
func TestCheckpointCoversPodInfo(t *testing.T) {
	names := func(typ reflect.Type) []string {
		var out []string
		for i := range typ.NumField() {
			out = append(out, typ.Field(i).Name)
		}
		return out
	}
	if got := names(reflect.TypeFor[PodInfo]()); !slices.Equal(got, checkpointPodFields) {
		t.Errorf("PodInfo has fields %v; the checkpoint codec writes %v: encode the new ones (encoder.pod, decoder.pod) and list them in checkpointPodFields", got, checkpointPodFields)
	}
	if got := names(reflect.TypeFor[NamedPort]()); !slices.Equal(got, checkpointPortFields) {
		t.Errorf("NamedPort has fields %v; the checkpoint codec writes %v", got, checkpointPortFields)
	}
	if got := names(reflect.TypeFor[podRare]()); !slices.Equal(got, checkpointRareFields) {
		t.Errorf("podRare has fields %v; the checkpoint codec writes %v", got, checkpointRareFields)
	}
	// Every field of PodFields set, whatever they are (none of them the
	// kind PodInfo holds as a number: every rare field is set), and a
	// usual pod (version, address, phase and host network as numbers):
	// each survives PodInfo, the file, and the resume's path into the
	// cache (Object, then the transform).
	var odd PodFields
	fillValue(t, reflect.ValueOf(&odd).Elem(), 1)
	odd.Ports = odd.Ports[:1] // Object groups ports by container
	// The cache keeps only Veil's annotations.
	odd.Annotations = map[string]string{annotations.SocketAcceleration: "off"}
	usual := PodFields{Namespace: "ns", Name: "web-1", ResourceVersion: "18446744073709551615", Labels: map[string]string{"app": "web"},
		NodeName: "n1", ServiceAccount: "sa", HostNetwork: true, Phase: corev1.PodSucceeded, PodIP: "10.244.255.0"}
	for _, f := range []PodFields{odd, usual} {
		p := NewPodInfo(f)
		if got := p.Fields(); !reflect.DeepEqual(got, f) {
			t.Errorf("through PodInfo:\n got %+v\nwant %+v", got, f)
		}
		out, err := UnmarshalCheckpoint(MarshalCheckpoint(&Checkpoint{ResourceVersion: "1", Pods: []*PodInfo{p}}))
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(out.Pods[0], p) {
			t.Errorf("through the checkpoint:\n got %+v\nwant %+v", out.Pods[0].Fields(), f)
		}
		tr := &transformer{}
		cached, err := tr.transform(out.Pods[0].Object())
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(cached, p) {
			t.Errorf("through the resume into the cache:\n got %+v\nwant %+v", cached.(*PodInfo).Fields(), f)
		}
	}
	if p := NewPodInfo(odd); p.rare == nil || p.rare.resourceVersion == "" || p.rare.podIP == "" || p.rare.phase == "" {
		t.Errorf("PodFields %+v packed without its odd version, address or phase apart: %+v", odd, p)
	}
	if p := NewPodInfo(usual); p.rare != nil || p.rv == 0 || p.bits&podIPIs4 == 0 {
		t.Errorf("a usual pod packed with rare fields, or without its version and address as numbers: %+v", p)
	}
}

func TestCheckpointRejectsDamage(t *testing.T) {
	good := MarshalCheckpoint(&Checkpoint{ResourceVersion: "12345", Written: time.Now(), Node: "n1", ClusterID: testCluster, Pods: testPods()})
	// Cut anywhere: never a panic, always ErrCheckpointCorrupt.
	for n := range len(good) {
		if _, err := UnmarshalCheckpoint(good[:n]); !errors.Is(err, ErrCheckpointCorrupt) {
			t.Fatalf("truncated to %d of %d bytes: %v, want ErrCheckpointCorrupt", n, len(good), err)
		}
	}
	for i := len(checkpointMagic) + 1; i < len(good); i++ {
		bad := slices.Clone(good)
		bad[i] ^= 0x40
		if _, err := UnmarshalCheckpoint(bad); !errors.Is(err, ErrCheckpointCorrupt) {
			t.Fatalf("byte %d flipped: %v, want ErrCheckpointCorrupt", i, err)
		}
	}
	// A well-formed body with a checksum that matches but nonsense in it
	// (a reference to a string never written) is corrupt too.
	nonsense := []byte(checkpointMagic)
	nonsense = binary.AppendUvarint(nonsense, checkpointVersion)
	nonsense = binary.AppendVarint(nonsense, 0)
	nonsense = append(nonsense, 1, '1', 2, 'n', '1', 1, 'c', 1 /* one pod */, 9 /* namespace: string #8 */)
	nonsense = binary.LittleEndian.AppendUint32(nonsense, crc32.Checksum(nonsense, castagnoli))
	if _, err := UnmarshalCheckpoint(nonsense); !errors.Is(err, ErrCheckpointCorrupt) || !strings.Contains(err.Error(), "namespace reference") {
		t.Errorf("a reference to no string: %v", err)
	}
	// Another format version: rejected as such, checksum or not.
	other := slices.Clone(good)
	other[len(checkpointMagic)] = checkpointVersion + 1
	if _, err := UnmarshalCheckpoint(other); !errors.Is(err, ErrCheckpointVersion) {
		t.Errorf("version %d: %v, want ErrCheckpointVersion", checkpointVersion+1, err)
	}
	if _, err := UnmarshalCheckpoint([]byte("{\"pods\": []}\n")); !errors.Is(err, ErrCheckpointCorrupt) || !strings.Contains(err.Error(), "not a pod cache checkpoint") {
		t.Errorf("not a checkpoint: %v", err)
	}
}

func TestWriteCheckpointAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, CheckpointFile)
	first := &Checkpoint{ResourceVersion: "1", Written: time.Unix(1, 0), Node: "n1", Pods: testPods()[:1]}
	if err := WriteCheckpoint(path, first); err != nil {
		t.Fatal(err)
	}
	second := &Checkpoint{ResourceVersion: "2", Written: time.Unix(2, 0), Node: "n1", Pods: testPods()}
	if err := WriteCheckpoint(path, second); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	got, err := ReadCheckpoint(path)
	if err != nil || got.ResourceVersion != "2" || len(got.Pods) != len(second.Pods) {
		t.Fatalf("read back %+v, %v; want the second checkpoint", got, err)
	}
	// A write that cannot complete (the rename meets a directory) leaves
	// what was there and no temporary file.
	blocked := filepath.Join(dir, "blocked")
	if err := os.MkdirAll(filepath.Join(blocked, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := WriteCheckpoint(blocked, second); err == nil {
		t.Fatal("a checkpoint replaced a directory")
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	for _, e := range ents {
		left = append(left, e.Name())
	}
	if !slices.Equal(left, []string{"blocked", CheckpointFile}) {
		t.Errorf("the directory holds %v, want only the checkpoint and the directory in the way", left)
	}
	if _, err := ReadCheckpoint(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a missing checkpoint: %v, want os.ErrNotExist", err)
	}
}

// startWatcher runs a Watcher on fakes until its caches sync.
func startWatcher(t *testing.T, kube *kubefake.Clientset, ck *CheckpointOptions) (*Watcher, context.CancelFunc) {
	t.Helper()
	w := NewWithOptions(kube, veilfake.NewSimpleClientset(), Options{Checkpoint: ck})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	w.Start(ctx)
	if err := w.WaitForCacheSync(ctx, time.Hour, func([]string) {}); err != nil {
		cancel()
		t.Fatal(err)
	}
	return w, cancel
}

func podListed(kube *kubefake.Clientset) bool {
	for _, a := range kube.Actions() {
		if a.GetVerb() == "list" && a.GetResource().Resource == "pods" {
			return true
		}
	}
	return false
}

// A fake clientset lists with List, not a streamed watch: the first List
// is answered from the checkpoint.
func TestResumeServesFirstListFromCheckpoint(t *testing.T) {
	path := filepath.Join(t.TempDir(), CheckpointFile)
	// The fake API server is at version 2 or so.
	if err := WriteCheckpoint(path, &Checkpoint{ResourceVersion: "1", Written: time.Now(), Node: "n1", ClusterID: testCluster, Pods: testPods()}); err != nil {
		t.Fatal(err)
	}
	// No pods in the fake: its watch replays what it holds, whatever the
	// version asked.
	kube := kubefake.NewClientset(defaultNamespace())
	var logs bytes.Buffer
	w, cancel := startWatcher(t, kube, &CheckpointOptions{Path: path, Node: "n1", MaxAge: time.Minute, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	defer cancel()
	if podListed(kube) {
		t.Errorf("the first list of pods went to the API server; log: %s", logs.String())
	}
	got := w.Pods.List()
	slices.SortFunc(got, func(a, b *PodInfo) int { return strings.Compare(a.Key(), b.Key()) })
	want := testPods()
	slices.SortFunc(want, func(a, b *PodInfo) int { return strings.Compare(a.Key(), b.Key()) })
	if !reflect.DeepEqual(got, want) {
		t.Errorf("cache after resume:\n got %+v\nwant %+v", got, want)
	}
	if !strings.Contains(logs.String(), "resuming from checkpoint") || !strings.Contains(logs.String(), "pods=4") {
		t.Errorf("the start did not log the resume: %s", logs.String())
	}
}

// checkpointV1 is a checkpoint as main at 2ae97ad wrote it (format 1,
// before PodInfo was packed): the first two of testPods at version 103.
const checkpointV1 = "VEILPODC\x01\x80\x80\xd0\xe2ƿΗ/\x03103\x02n1$6b1f3c2e-0000-4000-8000-000000000001\x02\x00\x01a\x05web-1\x03101\x01\x02\x00\x03app\x00\x03web\x00\x04tier\x00\x05front\x00\x00\x02n1\x00\adefault\x00\x00\aRunning\n10.244.1.5\x00\x02\x02\x00\x04http\x90?\x00\x03TCP\x02\x00\x03dns5\x00\x03UDP\x01\x05web-2\x03102\x02\x00\x00\x02n2\a\x00\b\n10.244.2.5\x00\x00\xf7\xcb^\x86"

func TestResumeRefusesCheckpoints(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write func(path string) error
		log   string
		// kept: the file is still there after the start.
		kept bool
	}{
		{"corrupt", func(p string) error { return os.WriteFile(p, []byte("VEILPODC garbage"), 0o600) }, "checkpoint unreadable", false},
		{"other version", func(p string) error {
			b := MarshalCheckpoint(&Checkpoint{ResourceVersion: "5", Written: time.Now(), Node: "n1", ClusterID: testCluster})
			b[len(checkpointMagic)]++
			return os.WriteFile(p, b, 0o600)
		}, "unknown format version", false},
		{"version 1", func(p string) error { return os.WriteFile(p, []byte(checkpointV1), 0o600) }, "version 1, this agent reads 2", false},
		{"too old", func(p string) error {
			return WriteCheckpoint(p, &Checkpoint{ResourceVersion: "5", Written: time.Now().Add(-time.Hour), Node: "n1", ClusterID: testCluster, Pods: testPods()})
		}, "checkpoint too old", true},
		{"another node", func(p string) error {
			return WriteCheckpoint(p, &Checkpoint{ResourceVersion: "5", Written: time.Now(), Node: "n2", ClusterID: testCluster, Pods: testPods()})
		}, "another node's", true},
		{"another cluster", func(p string) error {
			return WriteCheckpoint(p, &Checkpoint{ResourceVersion: "5", Written: time.Now(), Node: "n1", ClusterID: "other", Pods: testPods()})
		}, "is of another cluster", true},
		{"ahead of the cluster", func(p string) error {
			return WriteCheckpoint(p, &Checkpoint{ResourceVersion: "999999", Written: time.Now(), Node: "n1", ClusterID: testCluster, Pods: testPods()})
		}, "is ahead of the API server's", true},
		{"missing", func(string) error { return nil }, "no checkpoint", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), CheckpointFile)
			if err := tc.write(path); err != nil {
				t.Fatal(err)
			}
			kube := kubefake.NewClientset(defaultNamespace(), &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "live"}})
			var logs bytes.Buffer
			w, cancel := startWatcher(t, kube, &CheckpointOptions{Path: path, Node: "n1", MaxAge: 10 * time.Minute, Log: slog.New(slog.NewTextHandler(&logs, nil))})
			defer cancel()
			if !podListed(kube) {
				t.Error("pods were not listed from the API server")
			}
			if got := w.Pods.List(); len(got) != 1 || got[0].Name() != "live" {
				t.Errorf("cache %+v, want the API server's one pod", got)
			}
			if !strings.Contains(logs.String(), tc.log) {
				t.Errorf("log %q does not say %q", logs.String(), tc.log)
			}
			if _, err := os.Stat(path); tc.kept != (err == nil) {
				t.Errorf("after the start the checkpoint file: %v (want it kept: %v)", err, tc.kept)
			}
		})
	}
}

// The checkpointer writes only a synced cache with a version, and only
// when the version moved.
func TestCheckpointerWritesWhenChanged(t *testing.T) {
	path := filepath.Join(t.TempDir(), CheckpointFile)
	kube := kubefake.NewClientset(defaultNamespace())
	w, cancel := startWatcher(t, kube, &CheckpointOptions{Path: path, Node: "n1", Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	defer cancel()
	idx := w.informers[Pod].GetIndexer()
	c := w.ckpt
	synced := false
	c.synced = func() bool { return synced }
	if err := idx.Add(NewPodInfo(PodFields{Namespace: "a", Name: "p", ResourceVersion: "41"})); err != nil {
		t.Fatal(err)
	}
	if err := c.write(time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a cache not yet synced was written: %v", err)
	}
	synced = true
	if err := c.write(time.Now()); err != nil {
		t.Fatal(err)
	}
	ck, err := ReadCheckpoint(path)
	if err != nil {
		t.Fatal(err)
	}
	if ck.ResourceVersion != idx.LastStoreSyncResourceVersion() || ck.ResourceVersion != "41" || len(ck.Pods) != 1 || ck.ClusterID != testCluster {
		t.Fatalf("checkpoint at %q with %d pods of cluster %q, want the store's version 41, its pod, cluster %s", ck.ResourceVersion, len(ck.Pods), ck.ClusterID, testCluster)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := c.write(time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("an unchanged cache was written again")
	}
}

// BenchmarkCheckpoint150k encodes and decodes a checkpoint of 150,000 pods
// shaped as tests/scale makes them (500 namespaces, 5,000 nodes, 60 label
// sets a namespace, two named ports): what the agent pays every 30 s while
// the cache changes, and once at start.
func BenchmarkCheckpoint150k(b *testing.B) {
	sets := map[string]map[string]string{}
	pods := make([]*PodInfo, 150000)
	for i := range pods {
		ns := fmt.Sprintf("ns-%03d", i%500)
		key := fmt.Sprintf("%s/%d", ns, i%60)
		if sets[key] == nil {
			sets[key] = map[string]string{"app": fmt.Sprintf("app-%d", i%10), "tier": fmt.Sprintf("t%d", i%3), "version": fmt.Sprintf("v%d", i%2), "pod-template-hash": fmt.Sprintf("%08x", i%60)}
		}
		pods[i] = NewPodInfo(PodFields{
			Namespace: ns, Name: fmt.Sprintf("app-%d-%08x-%05d", i%10, i%60, i), ResourceVersion: strconv.Itoa(100000 + i),
			Labels: sets[key], NodeName: fmt.Sprintf("node-%04d", i/30), ServiceAccount: "default", Phase: corev1.PodRunning,
			PodIP: fmt.Sprintf("10.%d.%d.%d", 100+i/65536, i/256%256, i%256),
			Ports: []NamedPort{{Container: "app", Name: "http", Port: 8080, Protocol: corev1.ProtocolTCP}, {Container: "app", Name: "metrics", Port: 9090, Protocol: corev1.ProtocolTCP}},
		})
	}
	ck := &Checkpoint{ResourceVersion: "999999", Written: time.Now(), Node: "node-0000", ClusterID: testCluster, Pods: pods}
	var enc []byte
	b.Run("marshal", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			enc = MarshalCheckpoint(ck)
		}
		b.ReportMetric(float64(len(enc))/(1<<20), "MiB")
	})
	b.Run("unmarshal", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := UnmarshalCheckpoint(enc); err != nil {
				b.Fatal(err)
			}
		}
	})
	// The list that answers the reflector, read as it reads it, each pod
	// through the informer's transform.
	b.Run("list-into-cache", func(b *testing.B) {
		b.ReportAllocs()
		kube := kubefake.NewClientset(defaultNamespace())
		for b.Loop() {
			from := *ck
			from.ResourceVersion, from.Pods = "1", slices.Clone(pods)
			l := newResumingPods(kube, func() *Checkpoint { return &from }, slog.New(slog.NewTextHandler(io.Discard, nil)))
			tr := &transformer{}
			l.internWith(tr)
			obj, err := l.ListWithContext(b.Context(), metav1.ListOptions{})
			if err != nil {
				b.Fatal(err)
			}
			items, err := meta.ExtractListWithAlloc(obj)
			if err != nil {
				b.Fatal(err)
			}
			for _, item := range items {
				if _, err := tr.transform(item); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
}

// A watch list that would resume is declined, and the List the reflector
// falls back to is answered with the checkpoint's PodInfos themselves, at
// its version, their label sets and named ports the transformer's.
func TestResumeAnswersWatchListWithAList(t *testing.T) {
	kube := kubefake.NewClientset(defaultNamespace())
	ck := &Checkpoint{ResourceVersion: "1", Written: time.Now(), Node: "n1", ClusterID: testCluster, Pods: testPods()}
	// As read from a file: its label sets are the decoder's.
	ck, err := UnmarshalCheckpoint(MarshalCheckpoint(ck))
	if err != nil {
		t.Fatal(err)
	}
	want := testPods()
	l := newResumingPods(kube, func() *Checkpoint { return ck }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	tr := &transformer{}
	l.internWith(tr)
	if w, err := l.WatchWithContext(t.Context(), metav1.ListOptions{SendInitialEvents: new(true)}); !errors.Is(err, errListFromCheckpoint) || w != nil {
		t.Fatalf("a watch list that would resume: %v, %v; want it declined", w, err)
	}
	obj, err := l.ListWithContext(t.Context(), metav1.ListOptions{ResourceVersion: "0"})
	if err != nil {
		t.Fatal(err)
	}
	if podListed(kube) {
		t.Error("the List the reflector falls back to went to the API server")
	}
	// As the reflector reads a list.
	acc, err := meta.ListAccessor(obj)
	if err != nil {
		t.Fatal(err)
	}
	if acc.GetResourceVersion() != "1" || acc.GetContinue() != "" {
		t.Errorf("list at %q, continue %q; want the checkpoint's version, whole", acc.GetResourceVersion(), acc.GetContinue())
	}
	items, err := meta.ExtractListWithAlloc(obj)
	if err != nil {
		t.Fatal(err)
	}
	var got []*PodInfo
	for _, item := range items {
		out, err := tr.transform(item)
		if err != nil {
			t.Fatal(err)
		}
		if out != item {
			t.Fatalf("the transform made %T of a listed PodInfo; the cache is to hold the PodInfo itself", out)
		}
		got = append(got, out.(*PodInfo))
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("pods listed:\n got %+v\nwant %+v", got, want)
	}
	// The label set shared in the checkpoint is the interner's, which
	// pods listed or watched later get too.
	if later := tr.labels.intern(map[string]string{"app": "web", "tier": "front"}); reflect.ValueOf(later).Pointer() != reflect.ValueOf(got[0].Labels()).Pointer() {
		t.Error("a resumed pod's label set is not the one the transformer hands out")
	}
	// So is its list of named ports.
	for _, p := range got {
		if len(p.Ports()) == 0 {
			continue
		}
		if later := tr.ports.intern(slices.Clone(p.Ports())); later != p.ports {
			t.Errorf("resumed pod %s: its named ports are not the list the transformer hands out", p.Key())
		}
	}
	// Taken once: the next list is a real one.
	if l.take(t.Context()) != nil {
		t.Error("the checkpoint can be taken twice")
	}
	if _, err := l.ListWithContext(t.Context(), metav1.ListOptions{}); err != nil || !podListed(kube) {
		t.Errorf("the second list did not go to the API server: %v", err)
	}
}

// A client that streams lists (the real one; client-go's WatchListClient
// is on by default): the informer's reflector asks for a watch list, is
// declined, falls back to a List, and the cache holds the checkpoint's
// pods, with no list of pods sent.
func TestResumeWatchListClientTakesTheCheckpointList(t *testing.T) {
	if !clientfeatures.FeatureGates().Enabled(clientfeatures.WatchListClient) {
		t.Fatal("client-go's WatchListClient is off: this test would not ask for a watch list")
	}
	kube := kubefake.NewClientset(defaultNamespace())
	ck := &Checkpoint{ResourceVersion: "1", Written: time.Now(), Node: "n1", ClusterID: testCluster, Pods: testPods()}
	l := newResumingPods(kube, func() *Checkpoint { return ck }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	// Not the fake, which says it cannot stream a list.
	l.client = struct{}{}
	if l.IsWatchListSemanticsUnSupported() {
		t.Fatal("the client still says it cannot stream a list")
	}
	inf := cache.NewSharedIndexInformer(l, &corev1.Pod{}, 0, cache.Indexers{})
	tr := &transformer{}
	l.internWith(tr)
	if err := inf.SetTransform(tr.transform); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	go inf.RunWithContext(ctx)
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		t.Fatal("the pod informer did not sync")
	}
	if podListed(kube) {
		t.Error("the first list of pods went to the API server")
	}
	var got []*PodInfo
	for _, o := range inf.GetStore().List() {
		got = append(got, o.(*PodInfo))
	}
	slices.SortFunc(got, func(a, b *PodInfo) int { return strings.Compare(a.Key(), b.Key()) })
	want := testPods()
	slices.SortFunc(want, func(a, b *PodInfo) int { return strings.Compare(a.Key(), b.Key()) })
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("cache after resume:\n got %+v\nwant %+v", got, want)
	}
	if rv := inf.LastSyncResourceVersion(); rv != "1" {
		t.Errorf("the reflector synced at %q, want the checkpoint's version", rv)
	}
}

// A checkpoint read at start but refused (here: another cluster's) is not
// the cache: once the store reaches the refused checkpoint's version, the
// cache must still be written over it. Recording the refused version as
// the last one written skipped that write, and a later start could resume
// from the refused file once its version was no longer ahead.
func TestCheckpointerWritesOverARefusedCheckpoint(t *testing.T) {
	path := filepath.Join(t.TempDir(), CheckpointFile)
	if err := WriteCheckpoint(path, &Checkpoint{ResourceVersion: "41", Written: time.Now(), Node: "n1", ClusterID: "other", Pods: testPods()}); err != nil {
		t.Fatal(err)
	}
	kube := kubefake.NewClientset(defaultNamespace())
	w, cancel := startWatcher(t, kube, &CheckpointOptions{Path: path, Node: "n1", Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	defer cancel()
	if !podListed(kube) {
		t.Fatal("the other cluster's checkpoint was resumed from; want a list")
	}
	idx := w.informers[Pod].GetIndexer()
	if err := idx.Add(NewPodInfo(PodFields{Namespace: "a", Name: "p", ResourceVersion: "41"})); err != nil {
		t.Fatal(err)
	}
	if err := w.ckpt.write(time.Now()); err != nil {
		t.Fatal(err)
	}
	ck, err := ReadCheckpoint(path)
	if err != nil {
		t.Fatal(err)
	}
	if ck.ClusterID != testCluster || len(ck.Pods) != 1 || ck.Pods[0].Name() != "p" {
		t.Fatalf("checkpoint of cluster %q with %d pods, want this cluster's cache (%s, the one pod a/p)", ck.ClusterID, len(ck.Pods), testCluster)
	}
}

// The watch that catches up from a checkpoint tells why it failed, but not
// the closed stream a stop causes (the stream may report it as an error
// while the reader still reads), and its reader ends with it.
func TestTellingWatchTellsOnlyWhileRunning(t *testing.T) {
	var told []error
	ch := make(chan watch.Event, 2)
	w := newTellingWatch(watch.NewProxyWatcher(ch), func(err error) { told = append(told, err) })
	ch <- watch.Event{Type: watch.Error, Object: &metav1.Status{Status: metav1.StatusFailure, Code: 410, Reason: metav1.StatusReasonExpired, Message: "too old"}}
	if ev := <-w.ResultChan(); ev.Type != watch.Error {
		t.Fatalf("passed on %s, want the error event", ev.Type)
	}
	if len(told) != 1 || !apierrors.IsResourceExpired(told[0]) {
		t.Fatalf("told %v, want the 410", told)
	}
	w.Stop()
	ch <- watch.Event{Type: watch.Error, Object: &metav1.Status{Status: metav1.StatusFailure, Message: "response body closed"}}
	close(ch)
	select {
	case _, open := <-w.ResultChan():
		if open {
			t.Error("an event passed on after Stop")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the stopped watch's reader did not end")
	}
	if len(told) != 1 {
		t.Errorf("told %v after Stop", told[1:])
	}
	w.Stop() // twice is fine
}
