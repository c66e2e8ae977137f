// Package ipam hands out pod IPv4 addresses from the node's pod CIDR.
//
// Allocations are keyed by container ID (the CNI attachment) and persisted to
// a JSON file that is replaced atomically on every change, so an agent
// restart neither forgets a running pod's address nor hands it out twice.
// The network address, the first host address (.1, reserved as the CIDR's
// gateway) and the broadcast address are never allocated.
//
// One Allocator owns its state file; it is safe for concurrent use by many
// goroutines, but two processes must not open the same file.
//
//	a, err := ipam.Open("/var/lib/veil/ipam.json", netip.MustParsePrefix("10.244.1.0/24"))
//	ip, err := a.Allocate(ctx, containerID, ipam.Owner{Namespace: "default", Name: "web-0"})
//	...
//	err = a.Release(ctx, containerID) // on CNI DEL; unknown IDs are fine
package ipam

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"
)

// ErrExhausted is matched (errors.Is) by the error Allocate returns when
// every usable address of the pod CIDR is allocated.
var ErrExhausted = errors.New("address pool exhausted")

// ErrOutsideCIDR is matched by the error Allocate returns for a container
// that holds an address outside the current pod CIDR (the CIDR changed while
// the pod was running): the old attachment must be deleted first.
var ErrOutsideCIDR = errors.New("allocation outside pod CIDR")

// ExhaustedError says which pool is full and how big it is.
type ExhaustedError struct {
	CIDR netip.Prefix
	// Size is the number of allocatable addresses in CIDR.
	Size uint64
}

func (e *ExhaustedError) Error() string {
	return fmt.Sprintf("pod CIDR %s is exhausted: all %d allocatable addresses are in use; "+
		"delete unused pods or give the node a larger pod CIDR", e.CIDR, e.Size)
}

// Is makes errors.Is(err, ErrExhausted) true.
func (e *ExhaustedError) Is(target error) bool { return target == ErrExhausted }

// Owner records which pod an address belongs to, for humans and audits; it
// plays no part in allocation.
type Owner struct {
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	UID       string `json:"uid,omitempty"`
}

// Allocation is one address held by one container.
type Allocation struct {
	ContainerID string     `json:"containerID"`
	IP          netip.Addr `json:"ip"`
	Owner
	AllocatedAt time.Time `json:"allocatedAt"`
}

// stateVersion is bumped when the file format changes incompatibly.
const stateVersion = 1

type state struct {
	Version int          `json:"version"`
	CIDR    netip.Prefix `json:"cidr"`
	// Last is the most recently allocated address; allocation continues
	// after it so that a just-released address is reused as late as
	// possible (stale conntrack or caches still point at it).
	Last        netip.Addr   `json:"last,omitzero"`
	Allocations []Allocation `json:"allocations"`
}

// Allocator allocates addresses from one pod CIDR. Create it with Open.
type Allocator struct {
	path string
	cidr netip.Prefix
	// first and last bound the allocatable range (inclusive).
	first, last netip.Addr
	size        uint64

	mu        sync.Mutex
	byID      map[string]Allocation
	byIP      map[netip.Addr]string
	cursor    netip.Addr
	conflicts []Allocation
}

// Open loads the allocations in path (a missing file means none) for the
// pod CIDR cidr. If the file was written for a different CIDR, allocations
// that are still allocatable in the new CIDR are kept; the others are kept
// too, so that DEL can release them, but reported by Conflicts and never
// reused. A file that cannot be parsed is an error: starting empty would
// hand out addresses that running pods hold.
func Open(path string, cidr netip.Prefix) (*Allocator, error) {
	a, err := newAllocator(path, cidr)
	if err != nil {
		return nil, err
	}
	st, err := readState(path)
	if err != nil {
		return nil, err
	}
	if st == nil {
		return a, nil
	}
	for _, al := range st.Allocations {
		if !a.allocatable(al.IP) {
			a.conflicts = append(a.conflicts, al)
		}
		a.byID[al.ContainerID] = al
		a.byIP[al.IP] = al.ContainerID
	}
	if a.allocatable(st.Last) {
		a.cursor = st.Last
	}
	if st.CIDR != cidr {
		// Record the new CIDR now, so the file says what it is used for.
		if err := a.persist(); err != nil {
			return nil, err
		}
	}
	return a, nil
}

func newAllocator(path string, cidr netip.Prefix) (*Allocator, error) {
	if !cidr.IsValid() || !cidr.Addr().Is4() {
		return nil, fmt.Errorf("ipam: pod CIDR %s: only IPv4 CIDRs are supported", cidr)
	}
	if cidr.Masked() != cidr {
		return nil, fmt.Errorf("ipam: pod CIDR %s has host bits set (did you mean %s?)", cidr, cidr.Masked())
	}
	if cidr.Bits() > 30 {
		return nil, fmt.Errorf("ipam: pod CIDR %s is too small: at least a /30 is needed "+
			"(network, gateway and broadcast addresses are reserved)", cidr)
	}
	network := cidr.Addr()
	broadcast := lastAddr(cidr)
	size := uint64(1)<<(32-cidr.Bits()) - 3
	return &Allocator{
		path:   path,
		cidr:   cidr,
		first:  network.Next().Next(),
		last:   broadcast.Prev(),
		size:   size,
		byID:   map[string]Allocation{},
		byIP:   map[netip.Addr]string{},
		cursor: network.Next(),
	}, nil
}

func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := (uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func (a *Allocator) allocatable(ip netip.Addr) bool {
	return ip.IsValid() && ip.Is4() && a.first.Compare(ip) <= 0 && ip.Compare(a.last) <= 0
}

// CIDR is the pod CIDR addresses are allocated from.
func (a *Allocator) CIDR() netip.Prefix { return a.cidr }

// Size is the number of allocatable addresses in the CIDR.
func (a *Allocator) Size() uint64 { return a.size }

// Conflicts lists allocations found at Open that lie outside the pod CIDR's
// allocatable range. They stay recorded until released.
func (a *Allocator) Conflicts() []Allocation {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.conflicts)
}

// Allocate returns the address held by containerID, allocating one if it
// holds none, so a retried CNI ADD gets the same address. The allocation is
// on disk before Allocate returns.
func (a *Allocator) Allocate(ctx context.Context, containerID string, owner Owner) (netip.Addr, error) {
	if err := ctx.Err(); err != nil {
		return netip.Addr{}, fmt.Errorf("allocate address for container %q: %w", containerID, err)
	}
	if containerID == "" {
		return netip.Addr{}, errors.New("allocate address: empty container ID")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if al, ok := a.byID[containerID]; ok {
		if !a.allocatable(al.IP) {
			return netip.Addr{}, fmt.Errorf("allocate address for container %q: it holds %s, outside pod CIDR %s; delete the pod's network attachment first: %w",
				containerID, al.IP, a.cidr, ErrOutsideCIDR)
		}
		return al.IP, nil
	}
	ip, ok := a.nextFree()
	if !ok {
		return netip.Addr{}, fmt.Errorf("allocate address for container %q: %w", containerID,
			&ExhaustedError{CIDR: a.cidr, Size: a.size})
	}
	al := Allocation{ContainerID: containerID, IP: ip, Owner: owner, AllocatedAt: time.Now().UTC().Truncate(time.Second)}
	prevCursor := a.cursor
	a.byID[containerID] = al
	a.byIP[ip] = containerID
	a.cursor = ip
	if err := a.persist(); err != nil {
		delete(a.byID, containerID)
		delete(a.byIP, ip)
		a.cursor = prevCursor
		return netip.Addr{}, fmt.Errorf("allocate address for container %q: %w", containerID, err)
	}
	return ip, nil
}

// nextFree scans the allocatable range once, starting after the cursor.
func (a *Allocator) nextFree() (netip.Addr, bool) {
	ip := a.cursor
	for range a.size {
		ip = ip.Next()
		if !a.allocatable(ip) {
			ip = a.first
		}
		if _, used := a.byIP[ip]; !used {
			return ip, true
		}
	}
	return netip.Addr{}, false
}

// Release frees the address held by containerID. Releasing a container that
// holds nothing is not an error: CNI DEL may be repeated.
func (a *Allocator) Release(ctx context.Context, containerID string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("release address of container %q: %w", containerID, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	al, ok := a.byID[containerID]
	if !ok {
		return nil
	}
	delete(a.byID, containerID)
	delete(a.byIP, al.IP)
	if err := a.persist(); err != nil {
		a.byID[containerID] = al
		a.byIP[al.IP] = containerID
		return fmt.Errorf("release address %s of container %q: %w", al.IP, containerID, err)
	}
	a.conflicts = slices.DeleteFunc(a.conflicts, func(c Allocation) bool { return c.ContainerID == containerID })
	return nil
}

// Lookup returns the allocation held by containerID.
func (a *Allocator) Lookup(containerID string) (Allocation, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	al, ok := a.byID[containerID]
	return al, ok
}

// List returns every allocation, ordered by address.
func (a *Allocator) List() []Allocation {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.sortedLocked()
}

func (a *Allocator) sortedLocked() []Allocation {
	out := make([]Allocation, 0, len(a.byID))
	for _, al := range a.byID {
		out = append(out, al)
	}
	slices.SortFunc(out, func(x, y Allocation) int { return x.IP.Compare(y.IP) })
	return out
}

// persist writes the state with temp file + fsync + rename + directory
// fsync, so a crash leaves either the old or the new file, never a torn one.
func (a *Allocator) persist() error {
	st := state{Version: stateVersion, CIDR: a.cidr, Allocations: a.sortedLocked()}
	if a.allocatable(a.cursor) {
		st.Last = a.cursor
	}
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode ipam state: %w", err)
	}
	data = append(data, '\n')
	dir := filepath.Dir(a.path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create ipam state directory %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(a.path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write ipam state %s: %w", a.path, err)
	}
	committed := false
	defer func() {
		if !committed {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("write ipam state %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("sync ipam state %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close ipam state %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), a.path); err != nil {
		return fmt.Errorf("replace ipam state %s: %w", a.path, err)
	}
	committed = true
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync ipam state directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync ipam state directory %s: %w", dir, err)
	}
	return nil
}

// readState returns nil for a missing file and an error naming the file and
// the fix for anything it cannot trust.
func readState(path string) (*state, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ipam: read state %s: %w", path, err)
	}
	corrupt := func(format string, args ...any) error {
		return fmt.Errorf("ipam: state file %s is corrupt: %s; it records the addresses of running pods, "+
			"so it is not reset automatically: repair it, or move it aside to start with no allocations "+
			"(pods still running keep addresses that may then be handed out again)", path, fmt.Sprintf(format, args...))
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, corrupt("the file is empty")
	}
	var st state
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&st); err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			return nil, corrupt("invalid JSON at byte %d: %v", se.Offset, err)
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, corrupt("invalid JSON: the file ends early (truncated)")
		}
		return nil, corrupt("%v", err)
	}
	if st.Version != stateVersion {
		return nil, corrupt("version %d, this agent understands version %d", st.Version, stateVersion)
	}
	seenID := map[string]bool{}
	seenIP := map[netip.Addr]string{}
	for i, al := range st.Allocations {
		switch {
		case al.ContainerID == "":
			return nil, corrupt("allocation %d has no container ID", i)
		case !al.IP.IsValid() || !al.IP.Is4():
			return nil, corrupt("allocation %d (container %q) has no IPv4 address", i, al.ContainerID)
		case seenID[al.ContainerID]:
			return nil, corrupt("container %q appears twice", al.ContainerID)
		case seenIP[al.IP] != "":
			return nil, corrupt("address %s is held by both %q and %q", al.IP, seenIP[al.IP], al.ContainerID)
		}
		seenID[al.ContainerID] = true
		seenIP[al.IP] = al.ContainerID
	}
	return &st, nil
}
