package identity

import (
	"maps"
	"math/rand/v2"
	"testing"
)

func TestAllocatorRestart(t *testing.T) {
	a, err := NewAllocator(MinPod, MinCIDR-1, nil)
	if err != nil {
		t.Fatal(err)
	}
	x, _ := a.Allocate("x")
	y, _ := a.Allocate("y")
	if x != MinPod || y != MinPod+1 {
		t.Fatalf("got %d, %d; want %d, %d", x, y, MinPod, MinPod+1)
	}
	if again, _ := a.Allocate("x"); again != x {
		t.Fatalf("x reallocated as %d", again)
	}
	a.Release("x")
	// A released number is not handed to the next newcomer.
	if z, _ := a.Allocate("z"); z == x {
		t.Fatalf("released number %d reused at once", z)
	}
	b, err := NewAllocator(MinPod, MinCIDR-1, a.State())
	if err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(a.State(), b.State()) {
		t.Fatalf("state not restored")
	}
	if id, _ := b.Allocate("y"); id != y {
		t.Fatalf("y is %d after restart; want %d", id, y)
	}
	if w, _ := b.Allocate("w"); w <= y {
		t.Fatalf("new key got %d, not after the saved ones", w)
	}
}

func TestAllocatorExhaustionAndBadState(t *testing.T) {
	a, _ := NewAllocator(10, 11, nil)
	a.Allocate("a")
	a.Allocate("b")
	if _, err := a.Allocate("c"); err == nil {
		t.Fatal("allocated beyond the range")
	}
	a.Release("a")
	if id, err := a.Allocate("c"); err != nil || id != 10 {
		t.Fatalf("got %d, %v; want the freed 10", id, err)
	}
	if _, err := NewAllocator(10, 11, map[string]ID{"a": 12}); err == nil {
		t.Error("accepted a saved number outside the range")
	}
	if _, err := NewAllocator(10, 11, map[string]ID{"a": 10, "b": 10}); err == nil {
		t.Error("accepted a number saved twice")
	}
}

func TestLabelsKey(t *testing.T) {
	a := PodLabels("ns", map[string]string{"app": "web"}, map[string]string{"team": "a"}, "")
	b := PodLabels("ns", map[string]string{"app": "web"}, map[string]string{"team": "a"}, "default")
	if a.Key() != b.Key() {
		t.Errorf("empty service account is not default: %q vs %q", a.Key(), b.Key())
	}
	want := "meta:namespace=ns;meta:serviceaccount=default;ns:team=a;pod:app=web"
	if a.Key() != want {
		t.Errorf("key %q; want %q", a.Key(), want)
	}
	// A pod label and a namespace label with the same key stay apart.
	c := PodLabels("ns", map[string]string{"team": "a"}, map[string]string{"app": "web"}, "")
	if c.Key() == a.Key() {
		t.Error("pod and namespace labels collide")
	}
	// Separators inside (invalid) values cannot forge another set.
	d := PodLabels("ns", map[string]string{"a": "1;pod:b=2"}, nil, "")
	e := PodLabels("ns", map[string]string{"a": "1", "b": "2"}, nil, "")
	if d.Key() == e.Key() {
		t.Error("separator injection collides")
	}
}

// AppendPodKey writes exactly the key of PodLabels, reusing its buffers.
func TestAppendPodKeyIsPodLabelsKey(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	words := []string{"", "a", "app", "web", "x;y", "k=v", "q\"", "b\\s", "ns:x", "team", "tier"}
	pick := func() map[string]string {
		if r.IntN(5) == 0 {
			return nil
		}
		m := map[string]string{}
		for range r.IntN(5) {
			m[words[1+r.IntN(len(words)-1)]] = words[r.IntN(len(words))]
		}
		return m
	}
	var (
		buf     []byte
		scratch Labels
	)
	for i := range 2000 {
		ns, sa := words[1+r.IntN(len(words)-1)], words[r.IntN(len(words))]
		pod, nsl := pick(), pick()
		want := PodLabels(ns, pod, nsl, sa).Key()
		buf, scratch = AppendPodKey(buf[:0], scratch, ns, pod, nsl, sa)
		if string(buf) != want {
			t.Fatalf("case %d: AppendPodKey %q; PodLabels().Key() %q", i, buf, want)
		}
	}
}
