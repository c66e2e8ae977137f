package datapath

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
)

// Prefix lengths of veil_policy keys (enum policy_prefix).
const (
	prefixAnyProto = uint32(podPolicyPrefixPOLICY_PREFIX_ANY_PROTO) // slot, identity, direction
	prefixProto    = uint32(podPolicyPrefixPOLICY_PREFIX_PROTO)     // + protocol
)

// policyKey turns a compiled key into the map key of slot.
func policyKey(slot uint32, k policy.Key) (podPolicyKey, error) {
	mk := podPolicyKey{Slot: slot, Identity: uint32(k.Identity), Direction: uint8(k.Direction)}
	if k.Direction != policy.Ingress && k.Direction != policy.Egress {
		return mk, fmt.Errorf("policy key: direction %d is neither ingress nor egress", k.Direction)
	}
	if k.Proto == policy.ProtoAny {
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

// SetPolicy replaces the whole policy of the endpoint at ip, atomically: the
// new entries are written into the endpoint's idle slot, then one update of
// the endpoint record switches to it (with the new defaults), then the old
// slot is emptied. A packet sees either the old policy or the new one.
// Per-entry counters carry over for keys present in both.
func (d *Datapath) SetPolicy(ip netip.Addr, entries []policy.Entry, defaults policy.Defaults) error {
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

	// Leftovers of an interrupted replace may sit in the idle slot.
	if err := d.deleteSlot(newSlot); err != nil {
		return err
	}
	oldKeys := make(map[podPolicyKey]bool, len(d.policySlots[oldSlot]))
	for _, k := range d.policySlots[oldSlot] {
		oldKeys[k] = true
	}
	keys := make([]podPolicyKey, 0, len(entries))
	for _, e := range entries {
		mk, err := policyKey(newSlot, e.Key)
		if err != nil {
			return fmt.Errorf("set policy of %s: %w", ip, err)
		}
		val := podPolicyValue{Enforce: uint8(e.Enforce), Audit: uint8(e.Audit), RuleId: e.RuleID}
		oldKey := mk
		oldKey.Slot = oldSlot
		var old podPolicyValue
		// An LPM lookup returns the longest match, so only a key known to
		// exist in the old slot reads its own counters.
		if oldKeys[oldKey] && d.policy.Lookup(&oldKey, &old) == nil {
			val.Hits, val.Bytes = old.Hits, old.Bytes
		}
		if err := d.policy.Update(&mk, &val, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("set policy of %s: write entry %+v: %w", ip, e.Key, err)
		}
		keys = append(keys, mk)
	}
	d.policySlots[newSlot] = keys

	info.PolicySlot = newSlot
	info.IngressEnforce = uint8(defaults.IngressEnforce)
	info.IngressAudit = uint8(defaults.IngressAudit)
	info.EgressEnforce = uint8(defaults.EgressEnforce)
	info.EgressAudit = uint8(defaults.EgressAudit)
	if err := d.endpoints.Update(key, &info, ebpf.UpdateExist); err != nil {
		return fmt.Errorf("set policy of %s: switch slot: %w", ip, err)
	}
	return d.deleteSlot(oldSlot)
}

// deleteSlot removes every entry of a policy slot.
func (d *Datapath) deleteSlot(slot uint32) error {
	for _, k := range d.policySlots[slot] {
		if err := d.policy.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete policy entry of slot %d: %w", slot, err)
		}
	}
	delete(d.policySlots, slot)
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
	return nil
}

// PolicyCounter is how often one policy entry decided a new flow.
type PolicyCounter struct {
	Key    policy.Key
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
		pk := policy.Key{Direction: policy.Direction(mk.Direction), Identity: identity.ID(mk.Identity), Proto: mk.Proto}
		if mk.Prefixlen > prefixAnyProto {
			pk.Port = fromBE16(mk.Port)
			pk.PortPrefixLen = uint8(mk.Prefixlen - prefixProto)
		}
		out = append(out, PolicyCounter{Key: pk, RuleID: v.RuleId, Hits: v.Hits, Bytes: v.Bytes})
	}
	return out, nil
}
