package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// Prefix lengths of veil_policy keys (enum policy_prefix).
const (
	prefixAnyProto = uint32(podPolicyPrefixPOLICY_PREFIX_ANY_PROTO) // slot, identity, direction
	prefixProto    = uint32(podPolicyPrefixPOLICY_PREFIX_PROTO)     // + protocol
)

// policyKey turns a compiled key into the map key of slot.
func policyKey(slot uint32, k policytypes.Key) (podPolicyKey, error) {
	mk := podPolicyKey{Slot: slot, Identity: uint32(k.Identity), Direction: uint8(k.Direction)}
	if k.Direction != policytypes.Ingress && k.Direction != policytypes.Egress {
		return mk, fmt.Errorf("policy key: direction %d is neither ingress nor egress", k.Direction)
	}
	if k.Proto == policytypes.ProtoAny {
		if k.PortPrefixLen != 0 {
			return mk, fmt.Errorf("policy key: a port prefix needs a protocol")
		}
		mk.Prefixlen = prefixAnyProto
		return mk, nil
	}
	if k.PortPrefixLen > 16 {
		return mk, fmt.Errorf("policy key: port prefix length %d > 16", k.PortPrefixLen)
	}
	mk.Proto = k.Proto
	port := k.Port
	if k.PortPrefixLen < 16 {
		port &^= 0xffff >> k.PortPrefixLen
	}
	mk.Port = be16(port)
	mk.Prefixlen = prefixProto + uint32(k.PortPrefixLen)
	return mk, nil
}

// PolicyMap is the name of the pinned map that holds every endpoint's
// policy entries.
const PolicyMap = "veil_policy"

// PolicyUpdateError is returned by SetPolicy when the new policy could not
// be written. Map names the pinned map that refused it. When FailedClosed is
// set, the endpoint now denies all new flows both ways (no entries, deny
// defaults) until a later SetPolicy succeeds: keeping the old policy would
// leave a revocation unenforced.
type PolicyUpdateError struct {
	Endpoint     netip.Addr
	Map          string
	FailedClosed bool
	Err          error
}

func (e *PolicyUpdateError) Error() string {
	msg := fmt.Sprintf("set policy of endpoint %s: map %s: %v", e.Endpoint, e.Map, e.Err)
	if e.FailedClosed {
		msg += "; the endpoint denies all traffic until its policy can be written"
	}
	return msg
}

func (e *PolicyUpdateError) Unwrap() error { return e.Err }

// SetPolicy replaces the whole policy of the endpoint at ip, atomically: the
// new entries are written into the endpoint's idle slot, then one update of
// the endpoint record switches to it (with the new defaults). A packet sees
// either the old policy or the new one. The old slot's entries are retired,
// not deleted: a program that read the endpoint record just before the
// switch may still be looking them up. They are deleted after an RCU grace
// period (reclaim), at the latest before the slot is written again.
// Per-entry counters carry over for keys present in both.
//
// When the map refuses an entry even after retired entries were reclaimed
// (it is full), the endpoint fails closed and a *PolicyUpdateError says so.
func (d *Datapath) SetPolicy(ip netip.Addr, entries []policytypes.Entry, defaults policytypes.Defaults) error {
	key, err := epKey(ip)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var info podEndpointInfo
	if err := d.endpoints.Lookup(key, &info); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("set policy of %s: no such endpoint", ip)
		}
		return fmt.Errorf("set policy of %s: look up endpoint: %w", ip, err)
	}
	oldSlot := info.PolicySlot
	newSlot := oldSlot ^ 1
	if d.retired[newSlot] {
		if err := d.reclaim(); err != nil {
			return fmt.Errorf("set policy of %s: %w", ip, err)
		}
	}
	// Leftovers of an interrupted replace may sit in the idle slot.
	if err := d.deleteSlot(newSlot); err != nil {
		return err
	}
	werr := d.writeSlot(newSlot, oldSlot, entries)
	if werr != nil && len(d.retired) > 0 {
		// Retired entries may be what fills the map.
		if err := errors.Join(d.deleteSlot(newSlot), d.reclaim()); err != nil {
			return fmt.Errorf("set policy of %s: %w", ip, err)
		}
		werr = d.writeSlot(newSlot, oldSlot, entries)
	}
	if werr != nil {
		return d.failClosed(ip, key, info, newSlot, werr)
	}

	info.PolicySlot = newSlot
	info.IngressEnforce = uint8(defaults.IngressEnforce)
	info.IngressAudit = uint8(defaults.IngressAudit)
	info.EgressEnforce = uint8(defaults.EgressEnforce)
	info.EgressAudit = uint8(defaults.EgressAudit)
	if err := d.endpoints.Update(key, &info, ebpf.UpdateExist); err != nil {
		return fmt.Errorf("set policy of %s: switch slot: %w", ip, err)
	}
	d.retired[oldSlot] = true
	return nil
}

// writeSlot writes entries into slot, carrying counters over from prev.
// What it wrote is recorded in policySlots even when it fails, so that it
// can be deleted.
func (d *Datapath) writeSlot(slot, prev uint32, entries []policytypes.Entry) error {
	oldKeys := make(map[podPolicyKey]bool, len(d.policySlots[prev]))
	for _, k := range d.policySlots[prev] {
		oldKeys[k] = true
	}
	keys := make([]podPolicyKey, 0, len(entries))
	defer func() { d.policySlots[slot] = keys }()
	for _, e := range entries {
		mk, err := policyKey(slot, e.Key)
		if err != nil {
			return err
		}
		val := podPolicyValue{Enforce: uint8(e.Enforce), Audit: uint8(e.Audit), RuleId: e.RuleID}
		oldKey := mk
		oldKey.Slot = prev
		var old podPolicyValue
		// An LPM lookup returns the longest match, so only a key known to
		// exist in the old slot reads its own counters.
		if oldKeys[oldKey] && d.policy.Lookup(&oldKey, &old) == nil {
			val.Hits, val.Bytes = old.Hits, old.Bytes
		}
		if err := d.policy.Update(&mk, &val, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write entry %+v: %w", e.Key, d.mapFull(MapPolicy, d.policy, err))
		}
		keys = append(keys, mk)
	}
	return nil
}

// failClosed switches the endpoint to its idle slot, emptied, with deny
// defaults both ways, after its policy could not be written.
func (d *Datapath) failClosed(ip netip.Addr, key uint32, info podEndpointInfo, idle uint32, cause error) error {
	perr := &PolicyUpdateError{Endpoint: ip, Map: PolicyMap, Err: cause}
	// The idle slot is not referenced, so its partial entries can go now.
	if err := d.deleteSlot(idle); err != nil {
		perr.Err = errors.Join(cause, err)
		return perr
	}
	old := info.PolicySlot
	info.PolicySlot = idle
	info.IngressEnforce, info.IngressAudit = uint8(policytypes.Deny), uint8(policytypes.Deny)
	info.EgressEnforce, info.EgressAudit = uint8(policytypes.Deny), uint8(policytypes.Deny)
	if err := d.endpoints.Update(key, &info, ebpf.UpdateExist); err != nil {
		perr.Err = errors.Join(cause, fmt.Errorf("switch to deny-all: %w", err))
		return perr
	}
	d.retired[old] = true
	perr.FailedClosed = true
	d.log.Error("policy update failed; endpoint fails closed", "endpoint", ip, "map", PolicyMap, "error", cause)
	return perr
}

// reclaim deletes the entries of every retired slot once no program can
// still be reading them.
//
// Why one RCU grace period is enough: TC and socket programs run inside an
// RCU read-side critical section (softirq or rcu_read_lock in the hook), and
// a program's policy lookup happens within the same run as its read of the
// endpoint record. synchronize_rcu returns only after every critical section
// that began before it has ended, so every run that could have read the old
// slot number is finished. membarrier(MEMBARRIER_CMD_GLOBAL) is the system
// call that performs synchronize_rcu. Where it is refused (nohz_full kernels,
// seccomp), reclaimFallback stands in: a program run is bounded by the
// verifier's instruction limit to far less than that.
func (d *Datapath) reclaim() error {
	if len(d.retired) == 0 {
		return nil
	}
	if _, _, errno := unix.Syscall(unix.SYS_MEMBARRIER, membarrierCmdGlobal, 0, 0); errno != 0 {
		time.Sleep(reclaimFallback)
	}
	var errs []error
	for slot := range d.retired {
		errs = append(errs, d.deleteSlot(slot))
	}
	return errors.Join(errs...)
}

const (
	membarrierCmdGlobal = 1 // MEMBARRIER_CMD_GLOBAL: synchronize_rcu()
	reclaimFallback     = 50 * time.Millisecond
)

// deleteSlot removes every entry of a policy slot.
func (d *Datapath) deleteSlot(slot uint32) error {
	for _, k := range d.policySlots[slot] {
		if err := d.policy.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete policy entry of slot %d: %w", slot, err)
		}
	}
	delete(d.policySlots, slot)
	delete(d.retired, slot)
	return nil
}

// indexPolicy rebuilds the slot index from the pinned map after a restart.
func (d *Datapath) indexPolicy() error {
	var (
		k podPolicyKey
		v podPolicyValue
	)
	it := d.policy.Iterate()
	for it.Next(&k, &v) {
		d.policySlots[k.Slot] = append(d.policySlots[k.Slot], k)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("index policy map: %w", err)
	}
	// Entries in an endpoint's idle slot were replaced by the previous
	// process: retired, so a full map reclaims them before failing closed.
	var (
		ip   uint32
		info podEndpointInfo
	)
	eps := d.endpoints.Iterate()
	for eps.Next(&ip, &info) {
		if idle := info.PolicySlot ^ 1; len(d.policySlots[idle]) > 0 {
			d.retired[idle] = true
		}
	}
	if err := eps.Err(); err != nil {
		return fmt.Errorf("index policy map: list endpoints: %w", err)
	}
	return nil
}

// PolicyCounter is how often one policy entry decided a new flow.
type PolicyCounter struct {
	Key    policytypes.Key
	RuleID uint32
	Hits   uint64
	Bytes  uint64
}

// PolicyCounters returns the counters of the active policy of the endpoint.
func (d *Datapath) PolicyCounters(ip netip.Addr) ([]PolicyCounter, error) {
	key, err := epKey(ip)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var info podEndpointInfo
	if err := d.endpoints.Lookup(key, &info); err != nil {
		return nil, fmt.Errorf("policy counters of %s: %w", ip, err)
	}
	var out []PolicyCounter
	for _, mk := range d.policySlots[info.PolicySlot] {
		var v podPolicyValue
		if err := d.policy.Lookup(&mk, &v); err != nil {
			return nil, fmt.Errorf("policy counters of %s: %w", ip, err)
		}
		pk := policytypes.Key{Direction: policytypes.Direction(mk.Direction), Identity: identity.ID(mk.Identity), Proto: mk.Proto}
		if mk.Prefixlen > prefixAnyProto {
			pk.Port = fromBE16(mk.Port)
			pk.PortPrefixLen = uint8(mk.Prefixlen - prefixProto)
		}
		out = append(out, PolicyCounter{Key: pk, RuleID: v.RuleId, Hits: v.Hits, Bytes: v.Bytes})
	}
	return out, nil
}
