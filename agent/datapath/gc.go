package datapath

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Garbage collection of the connection table. The programs already ignore
// an entry whose idle lifetime has passed; deleting it frees its slot, so
// that the LRU evicts dead connections rather than live ones.

// gcBatch is how many entries one batch lookup reads. A hash bucket must
// fit in one batch; buckets hold about one entry each.
const gcBatch = 1024

// GCStats is what one garbage-collection pass did.
type GCStats struct {
	// Scanned and Deleted count entries; Wrapped is true when the pass
	// reached the end of the table (the next one starts over).
	Scanned, Deleted int
	Wrapped          bool
}

// monotonicNow is the clock of bpf_ktime_get_ns().
func monotonicNow() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("read the monotonic clock: %w", err)
	}
	return uint64(ts.Nano()), nil
}

// expired reports whether an entry's idle lifetime, which the programs set
// by protocol and TCP state, has passed at now. A packet on another CPU may
// have touched it after now was read.
func expired(v *podCtEntry, now uint64) bool {
	return now > v.LastSeenNs && now-v.LastSeenNs >= uint64(v.LifetimeS)*uint64(time.Second)
}

// GCConntrack makes one bounded pass of the garbage collector: it reads at
// most max entries of the connection table, from where the previous pass
// stopped, and deletes those whose idle lifetime has passed. An entry that
// a packet revives between the read and the delete is kept.
func (d *Datapath) GCConntrack(max int) (GCStats, error) {
	d.gcMu.Lock()
	defer d.gcMu.Unlock()
	var st GCStats
	now, err := monotonicNow()
	if err != nil {
		return st, err
	}
	keys := make([]podCtKey, gcBatch)
	vals := make([]podCtEntry, gcBatch)
	for st.Scanned < max && !st.Wrapped {
		n, err := d.ct.BatchLookup(&d.gcCursor, keys, vals, nil)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			st.Wrapped = true
			d.gcCursor = ebpf.MapBatchCursor{}
		} else if err != nil {
			d.gcCursor = ebpf.MapBatchCursor{}
			return st, fmt.Errorf("garbage-collect connections: read: %w", err)
		}
		st.Scanned += n
		for i := range n {
			if !expired(&vals[i], now) {
				continue
			}
			var cur podCtEntry
			if d.ct.Lookup(&keys[i], &cur) != nil || !expired(&cur, now) {
				continue
			}
			err := d.ct.Delete(&keys[i])
			if err == nil {
				st.Deleted++
			} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
				return st, fmt.Errorf("garbage-collect connections: delete: %w", err)
			}
		}
	}
	return st, nil
}

// Pacing of RunConntrackGC: a default-size table is swept every 40 s,
// reading about 2 MiB per pass.
const (
	gcInterval = 5 * time.Second
	gcPerPass  = 32768
)

// RunConntrackGC runs bounded garbage-collection passes (GCConntrack) until
// ctx is done. Errors are logged: the next pass retries.
func (d *Datapath) RunConntrackGC(ctx context.Context) {
	t := time.NewTicker(gcInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, err := d.GCConntrack(gcPerPass)
		if err != nil {
			d.log.Warn("conntrack garbage collection failed", "err", err)
			continue
		}
		if st.Deleted > 0 {
			d.log.Debug("conntrack garbage collection", "scanned", st.Scanned, "deleted", st.Deleted)
		}
	}
}
