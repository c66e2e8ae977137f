package policy

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// TestPodTableMatchesMap applies random sets, replacements and deletions to
// a podTable and to a map side by side, through growth, wrap-around probes
// and shrinking, and compares them after every step.
func TestPodTableMatchesMap(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	tab := newPodTable()
	ref := map[EndpointID]*podState{}
	id := func() EndpointID { return EndpointID{fmt.Sprint("ns", r.IntN(3)), fmt.Sprint("p", r.IntN(400))} }
	for step := range 20000 {
		// Grow to a few hundred pods, empty down, grow again.
		deleting := (step/3000)%2 == 1
		switch k := id(); {
		case deleting && r.IntN(10) < 8, !deleting && r.IntN(10) < 2:
			tab.del(k)
			delete(ref, k)
		default:
			p := &podState{id: k}
			tab.set(p)
			ref[k] = p
		}
		if tab.len() != len(ref) {
			t.Fatalf("step %d: len %d, want %d", step, tab.len(), len(ref))
		}
		if step%97 == 0 || tab.len() < 20 {
			for k, p := range ref {
				if got := tab.get(k); got != p {
					t.Fatalf("step %d: get %v = %p, want %p", step, k, got, p)
				}
			}
			n := 0
			for p := range tab.all() {
				if ref[p.id] != p {
					t.Fatalf("step %d: all yields %v not held", step, p.id)
				}
				n++
			}
			if n != len(ref) {
				t.Fatalf("step %d: all yields %d pods, want %d", step, n, len(ref))
			}
			if got := tab.get(EndpointID{"none", "p1"}); got != nil {
				t.Fatalf("step %d: get of an absent id = %v", step, got.id)
			}
		}
	}
	for k := range ref {
		tab.del(k)
	}
	if tab.len() != 0 || len(tab.slots) > 64 {
		t.Errorf("emptied: len %d, %d slots", tab.len(), len(tab.slots))
	}
}
