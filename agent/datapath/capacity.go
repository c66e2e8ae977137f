package datapath

import (
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// MapSizes size the maps that grow with the cluster and the node. Zero
// keeps a map's default. A map pinned by an agent with another size must
// be removed (cleanup mode) before the new size applies.
type MapSizes struct {
	// Endpoints: local pods. Default 1024.
	Endpoints uint32
	// IPCache: every remote pod, plus each node's addresses and pod CIDRs.
	// Default 65536.
	IPCache uint32
	// Policy: the entries of every local endpoint, twice while a policy is
	// replaced. Default 262144.
	Policy uint32
}

// The maps whose capacity is watched, by name in Veil's objects.
const (
	MapEndpoints = "endpoints"
	MapIPCache   = "ipcache"
	MapPolicy    = "policy"
	MapConntrack = "conntrack"
)

// mapSpecNames are the BPF names of the watched maps.
var mapSpecNames = map[string]string{
	MapEndpoints: "veil_endpoints", MapIPCache: "veil_ipcache", MapPolicy: "veil_policy", MapConntrack: "veil_ct",
}

// apply sets the configured sizes on a collection's map specs.
func (s MapSizes) apply(spec *ebpf.CollectionSpec) {
	for name, size := range map[string]uint32{MapEndpoints: s.Endpoints, MapIPCache: s.IPCache, MapPolicy: s.Policy} {
		if m, ok := spec.Maps[mapSpecNames[name]]; ok && size > 0 {
			m.MaxEntries = size
		}
	}
}

// NearFull is the fill ratio from which a map is reported as nearly full.
const NearFull = 0.9

// MapFullError is a write refused because the map holds as many entries as
// it can: nothing was written, and nothing will be until entries go or the
// map is made bigger.
type MapFullError struct {
	Map      string
	Capacity uint32
	Err      error
}

func (e *MapFullError) Error() string {
	return fmt.Sprintf("%s map is full (%d entries): raise its size (--%s-max-entries): %v", e.Map, e.Capacity, e.Map, e.Err)
}

func (e *MapFullError) Unwrap() error { return e.Err }

// capacity follows how full the watched maps are.
type capacity struct {
	mu sync.Mutex
	// full counts the writes each map refused for lack of room.
	full map[string]uint64
	// warned: the map was reported nearly full and has not dropped below
	// NearFull since.
	warned map[string]bool
}

// mapFull turns the kernel's "no room" (E2BIG from hash maps, ENOSPC from
// LPM tries) into a MapFullError, counts it and logs it; other errors pass.
func (d *Datapath) mapFull(name string, m *ebpf.Map, err error) error {
	if err == nil || !(errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOSPC)) {
		return err
	}
	d.capacity.mu.Lock()
	if d.capacity.full == nil {
		d.capacity.full = map[string]uint64{}
	}
	d.capacity.full[name]++
	d.capacity.mu.Unlock()
	ferr := &MapFullError{Map: name, Capacity: m.MaxEntries(), Err: err}
	d.log.Error("datapath map full: write refused", "map", name, "capacity", ferr.Capacity)
	return ferr
}

// MapUse is how full one map is.
type MapUse struct {
	Map      string
	Entries  uint32
	Capacity uint32
	// FullErrors counts the writes refused because the map was full.
	FullErrors uint64
}

// Fill is Entries / Capacity.
func (u MapUse) Fill() float64 {
	if u.Capacity == 0 {
		return 0
	}
	return float64(u.Entries) / float64(u.Capacity)
}

// MapUsage counts the entries of the watched maps (it walks them: call it
// at metrics scrapes, not per packet) and logs a warning when one reaches
// NearFull, once until it drops below again.
func (d *Datapath) MapUsage() ([]MapUse, error) {
	maps := map[string]*ebpf.Map{MapEndpoints: d.endpoints, MapIPCache: d.ipcache, MapPolicy: d.policy, MapConntrack: d.ct}
	names := []string{MapEndpoints, MapIPCache, MapPolicy, MapConntrack}
	out := make([]MapUse, 0, len(names))
	var errs []error
	for _, name := range names {
		m := maps[name]
		if m == nil {
			continue
		}
		n, err := countKeys(m)
		if err != nil {
			errs = append(errs, fmt.Errorf("count %s map: %w", name, err))
			continue
		}
		out = append(out, MapUse{Map: name, Entries: n, Capacity: m.MaxEntries()})
	}
	d.capacity.mu.Lock()
	defer d.capacity.mu.Unlock()
	if d.capacity.warned == nil {
		d.capacity.warned = map[string]bool{}
	}
	for i := range out {
		u := &out[i]
		u.FullErrors = d.capacity.full[u.Map]
		near := u.Fill() >= NearFull
		if near && !d.capacity.warned[u.Map] {
			d.log.Warn("datapath map nearly full", "map", u.Map, "entries", u.Entries, "capacity", u.Capacity,
				"hint", fmt.Sprintf("raise --%s-max-entries", u.Map))
		}
		d.capacity.warned[u.Map] = near
	}
	slices.SortFunc(out, func(a, b MapUse) int { return slices.Index(names, a.Map) - slices.Index(names, b.Map) })
	return out, errors.Join(errs...)
}

// countKeys walks a map's keys.
func countKeys(m *ebpf.Map) (uint32, error) {
	key := make([]byte, m.KeySize())
	next := make([]byte, m.KeySize())
	var n uint32
	var cur any // nil: start from the first key
	for {
		if err := m.NextKey(cur, next); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return n, nil
			}
			return n, err
		}
		n++
		copy(key, next)
		cur = key
	}
}
