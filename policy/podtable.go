package policy

import (
	"hash/maphash"
	"iter"
)

// podTable is the compiler's pods by EndpointID: an open-addressed table
// (linear probing) of pointers, 8 bytes a slot, where a
// map[EndpointID]*podState takes 40 and a control byte (at 150,000 pods
// about 2 against 14 MiB). A pod is found by its own id, so the table
// keeps no key.
type podTable struct {
	seed  maphash.Seed
	slots []*podState // nil: free; len a power of two
	n     int
}

func newPodTable() podTable { return podTable{seed: maphash.MakeSeed()} }

func (t *podTable) home(id EndpointID) int {
	return int(maphash.Comparable(t.seed, id) & uint64(len(t.slots)-1))
}

// len is the number of pods held.
func (t *podTable) len() int { return t.n }

// get returns the pod of id, or nil.
func (t *podTable) get(id EndpointID) *podState {
	if t.n == 0 {
		return nil
	}
	mask := len(t.slots) - 1
	for i := t.home(id); ; i = (i + 1) & mask {
		p := t.slots[i]
		if p == nil {
			return nil
		}
		if p.id == id {
			return p
		}
	}
}

// set holds p in place of the pod of the same id, if any.
func (t *podTable) set(p *podState) {
	if (t.n+1)*4 > len(t.slots)*3 {
		t.resize(max(8, len(t.slots)*2))
	}
	mask := len(t.slots) - 1
	for i := t.home(p.id); ; i = (i + 1) & mask {
		q := t.slots[i]
		if q == nil {
			t.slots[i] = p
			t.n++
			return
		}
		if q.id == p.id {
			t.slots[i] = p
			return
		}
	}
}

// del drops the pod of id, if any.
func (t *podTable) del(id EndpointID) {
	if t.n == 0 {
		return
	}
	mask := len(t.slots) - 1
	i := t.home(id)
	for ; ; i = (i + 1) & mask {
		p := t.slots[i]
		if p == nil {
			return
		}
		if p.id == id {
			break
		}
	}
	// Shift back the pods after i that probed past it, so that no probe
	// meets a hole before its pod.
	for j := i; ; {
		t.slots[i] = nil
		for {
			j = (j + 1) & mask
			q := t.slots[j]
			if q == nil {
				t.n--
				if len(t.slots) > 64 && t.n*8 < len(t.slots) {
					t.resize(len(t.slots) / 2)
				}
				return
			}
			// q stays unless its home is cyclically outside (i, j].
			k := t.home(q.id)
			if i <= j {
				if i < k && k <= j {
					continue
				}
			} else if i < k || k <= j {
				continue
			}
			t.slots[i] = q
			i = j
			break
		}
	}
}

func (t *podTable) resize(size int) {
	old := t.slots
	t.slots, t.n = make([]*podState, size), 0
	for _, p := range old {
		if p != nil {
			t.set(p)
		}
	}
}

// all yields every pod, in no particular order. The table must not be
// changed meanwhile.
func (t *podTable) all() iter.Seq[*podState] {
	return func(yield func(*podState) bool) {
		for _, p := range t.slots {
			if p != nil && !yield(p) {
				return
			}
		}
	}
}
