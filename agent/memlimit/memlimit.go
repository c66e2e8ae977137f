// Package memlimit holds the agent's settings of the Go runtime's memory
// management. It gives the runtime a soft memory limit
// derived from its container's memory limit, as operators expect of a
// process in a memory-limited container: the garbage collector works
// harder as the heap nears the limit instead of letting the heap double
// (GOGC=100) past it and the kernel kill the agent. The agent's live heap
// grows with the cluster (about 1 KiB per pod of the cluster), so without
// a limit its resident size is about twice that. And it lets the garbage
// collector run less often while the first lists are decoded.
package memlimit

import (
	"bufio"
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
)

// DefaultRatio is the share of the container's limit the runtime aims to
// stay under: the rest is for what the Go runtime does not count (stacks
// of cgo threads, the kernel's page cache charged to the cgroup).
const DefaultRatio = 0.9

// unlimited: cgroup v1 reports "no limit" as a huge number (the largest
// page-aligned int64); anything above 1 PiB is taken as no limit.
const unlimited = 1 << 50

// Container returns the memory limit in bytes of the cgroup the process
// described by procCgroup (the contents of /proc/self/cgroup) runs in,
// under the cgroup filesystem at root (/sys/fs/cgroup): cgroup v2's
// memory.max, else cgroup v1's memory.limit_in_bytes. 0 means no limit.
// The cgroup's own directory is read first, then root's (inside a
// container's cgroup namespace the path is "/").
func Container(root, procCgroup string) (int64, error) {
	var v1, v2 string
	sc := bufio.NewScanner(strings.NewReader(procCgroup))
	for sc.Scan() {
		// hierarchy-ID:controller-list:cgroup-path
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			v2 = parts[2]
		case hasController(parts[1], "memory"):
			v1 = parts[2]
		}
	}
	candidates := []string{}
	if v1 != "" {
		candidates = append(candidates, filepath.Join(root, "memory", v1, "memory.limit_in_bytes"), filepath.Join(root, "memory", "memory.limit_in_bytes"))
	}
	if v2 != "" {
		candidates = append(candidates, filepath.Join(root, v2, "memory.max"), filepath.Join(root, "memory.max"))
	}
	for _, path := range candidates {
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("read memory limit: %w", err)
		}
		s := strings.TrimSpace(string(b))
		if s == "max" {
			return 0, nil
		}
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("memory limit in %s: %q is not a number", path, s)
		}
		if n <= 0 || n >= unlimited {
			return 0, nil
		}
		return n, nil
	}
	return 0, nil
}

func hasController(list, name string) bool {
	for _, c := range strings.Split(list, ",") {
		if c == name {
			return true
		}
	}
	return false
}

// Setting is what Apply decided.
type Setting struct {
	// Limit is the soft limit set, in bytes; 0 when none was.
	Limit int64
	// Container is the container's limit (0: none found).
	Container int64
	// Reason says why no limit was set, when none was.
	Reason string
}

// Decide returns the soft memory limit for the runtime: ratio times the
// container's limit; none when GOMEMLIMIT is set (the operator chose, and
// the runtime applies it itself), when ratio is 0 (turned off) or when the
// container has no limit. root and procCgroup are as for Container.
func Decide(ratio float64, lookupEnv func(string) (string, bool), root, procCgroup string) (Setting, error) {
	if ratio < 0 || ratio > 1 {
		return Setting{}, fmt.Errorf("memory limit ratio %g: want 0 (off) to 1", ratio)
	}
	if v, ok := lookupEnv("GOMEMLIMIT"); ok && v != "" {
		return Setting{Reason: "GOMEMLIMIT=" + v + " is set"}, nil
	}
	if ratio == 0 {
		return Setting{Reason: "turned off (ratio 0)"}, nil
	}
	limit, err := Container(root, procCgroup)
	if err != nil {
		return Setting{}, err
	}
	if limit == 0 {
		return Setting{Reason: "the container has no memory limit"}, nil
	}
	return Setting{Limit: int64(float64(limit) * ratio), Container: limit}, nil
}

// Apply decides the limit for this process (from /proc/self/cgroup,
// /sys/fs/cgroup and its environment) and sets it.
func Apply(ratio float64) (Setting, error) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return Setting{}, fmt.Errorf("read own cgroup: %w", err)
	}
	st, err := Decide(ratio, os.LookupEnv, "/sys/fs/cgroup", string(b))
	if err == nil && st.Limit > 0 {
		debug.SetMemoryLimit(st.Limit)
	}
	return st, err
}

// DefaultStartupGCPercent is the garbage collector's percent (GOGC) until
// the agent first converges. The first lists decode every object of the
// cluster while the live heap grows from nothing: at GOGC=100 the
// collector runs each time the heap doubles, and marked a third of the
// agent's CPU at start in a 150,000-pod cluster. A soft memory limit, when
// set, still bounds the heap.
const DefaultStartupGCPercent = 400

// DefaultSteadyGCPercent is the collector's percent once the agent
// converged. The agent's live heap is mostly its caches of the cluster
// (about 1 KiB per pod), and at GOGC=100 the runtime lets the heap grow
// to twice the live heap between collections and keeps those pages: the
// resident size is about twice the live heap. At 50 the heap grows by
// half: a 150,000-pod cluster's agent stays near 1.5 times its live heap,
// for collections about twice as often (each marks the live heap).
// Measured by tests/scale (steadygc=N) at 150,000 pods: RSS 347–356
// against 413–423 MiB at 100, for 1.19–1.27 times the CPU per change;
// 75 kept as much as 100 (the runtime's scavenger keeps up to 1.1 times
// the heap's goal).
const DefaultSteadyGCPercent = 50

// StartupGC sets the collector's percent to percent until the returned
// function is called (once the agent converged), which then sets steady,
// or puts back what was set before when steady is 0. It does nothing when
// GOGC is set (the operator chose); percent 0 leaves the start as it is.
func StartupGC(percent, steady int, lookupEnv func(string) (string, bool)) (converged func()) {
	if v, ok := lookupEnv("GOGC"); (percent == 0 && steady == 0) || (ok && v != "") {
		return func() {}
	}
	prev := debug.SetGCPercent(-1)
	debug.SetGCPercent(prev)
	if percent != 0 {
		debug.SetGCPercent(percent)
	}
	after := cmp.Or(steady, prev)
	var once sync.Once
	return func() { once.Do(func() { debug.SetGCPercent(after) }) }
}
