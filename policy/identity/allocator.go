package identity

import (
	"fmt"
	"maps"
	"sync"
)

// Allocator hands out numbers in [min, max] to string keys (canonical label
// sets, or CIDR prefixes). A key keeps its number while it is held, and
// across restarts when the allocator is rebuilt from a saved State.
// Released numbers are not reused until the range is exhausted, so a stale
// datapath entry for a released number never applies to a newcomer in
// between.
//
// An Allocator is safe for concurrent use.
type Allocator struct {
	mu       sync.Mutex
	min, max ID
	byKey    map[string]ID
	byID     map[ID]string
	next     ID
}

// NewAllocator returns an allocator for [min, max] that starts from saved
// (key → number, as returned by State; may be nil). Saved numbers outside
// the range or given to two keys are an error.
func NewAllocator(min, max ID, saved map[string]ID) (*Allocator, error) {
	if min > max {
		return nil, fmt.Errorf("new identity allocator: empty range %d..%d", min, max)
	}
	a := &Allocator{min: min, max: max, byKey: map[string]ID{}, byID: map[ID]string{}, next: min}
	for k, id := range saved {
		if id < min || id > max {
			return nil, fmt.Errorf("new identity allocator: saved identity %d for %q outside %d..%d", id, k, min, max)
		}
		if other, dup := a.byID[id]; dup {
			return nil, fmt.Errorf("new identity allocator: saved identity %d given to both %q and %q", id, other, k)
		}
		a.byKey[k] = id
		a.byID[id] = k
		if id >= a.next && id < max {
			a.next = id + 1
		}
	}
	return a, nil
}

// Allocate returns key's number, allocating one when key has none.
func (a *Allocator) Allocate(key string) (ID, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if id, ok := a.byKey[key]; ok {
		return id, nil
	}
	id, ok := a.free()
	if !ok {
		return 0, fmt.Errorf("allocate identity for %q: all %d numbers in use", key, uint64(a.max-a.min)+1)
	}
	a.byKey[key] = id
	a.byID[id] = key
	return id, nil
}

// free finds an unused number: the next one after the highest handed out,
// else (range exhausted) the lowest unused.
func (a *Allocator) free() (ID, bool) {
	if _, used := a.byID[a.next]; !used {
		id := a.next
		if a.next < a.max {
			a.next++
		}
		return id, true
	}
	for id := a.min; ; id++ {
		if _, used := a.byID[id]; !used {
			return id, true
		}
		if id == a.max {
			return 0, false
		}
	}
}

// Lookup returns key's number without allocating.
func (a *Allocator) Lookup(key string) (ID, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	id, ok := a.byKey[key]
	return id, ok
}

// Release frees key's number.
func (a *Allocator) Release(key string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if id, ok := a.byKey[key]; ok {
		delete(a.byKey, key)
		delete(a.byID, id)
	}
}

// State returns a copy of key → number for persisting; NewAllocator takes it
// back.
func (a *Allocator) State() map[string]ID {
	a.mu.Lock()
	defer a.mu.Unlock()
	return maps.Clone(a.byKey)
}
