package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"

	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// Flow is a connection the datapath allowed, in the direction of its first
// packet.
type Flow struct {
	Src, Dst             netip.Addr
	SrcPort, DstPort     uint16
	Proto                uint8
	SrcIdentity          identity.ID
	DstIdentity          identity.ID
	Packets, Bytes       uint64
	ReplySeen, AuditOnly bool
	// Revoked: policy no longer allows it (EvictFlows); its packets face
	// policy again.
	Revoked           bool
	Created, LastSeen time.Time
}

func flowFromCT(k podCtKey, v podCtEntry, boot time.Time) Flow {
	return Flow{
		Src: u32ToIP4(k.Saddr), Dst: u32ToIP4(k.Daddr),
		SrcPort: k.Sport, DstPort: policyPort(k, v), Proto: k.Proto,
		SrcIdentity: identity.ID(v.SrcIdentity), DstIdentity: identity.ID(v.DstIdentity),
		Packets: v.Packets, Bytes: v.Bytes,
		ReplySeen: v.Flags&uint16(podCtFlagsCT_F_REPLY_SEEN) != 0,
		AuditOnly: v.Flags&uint16(podCtFlagsCT_F_AUDIT) != 0,
		Revoked:   v.Flags&revokedFlag != 0,
		Created:   boot.Add(time.Duration(v.CreatedNs)), LastSeen: boot.Add(time.Duration(v.LastSeenNs)),
	}
}

// policyPort is the port policy judged a connection by. The key of an ICMP
// echo holds its echo id, which policy never sees: its entry records the
// type and code. Other protocols' destination port is the key's, which
// also holds for entries written before entries recorded it.
func policyPort(k podCtKey, v podCtEntry) uint16 {
	if k.Proto == policytypes.ProtoICMP {
		return v.PolicyPort
	}
	return k.Dport
}

// Flows lists the connection table.
func (d *Datapath) Flows() ([]Flow, error) {
	boot := bootTime()
	var (
		k   podCtKey
		v   podCtEntry
		out []Flow
	)
	it := d.ct.Iterate()
	for it.Next(&k, &v) {
		out = append(out, flowFromCT(k, v, boot))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list connections: %w", err)
	}
	return out, nil
}

// FlowKey is what a revocation decision needs about a connection: who
// opened it, toward which address, protocol and port (for ICMP, type << 8 |
// code, as policy entries hold it).
type FlowKey struct {
	Src, Dst netip.Addr
	Proto    uint8
	DstPort  uint16
}

// EvictFlows revokes every connection for which revoked returns true: its
// conntrack entry is marked revoked (so its packets are checked against
// policy again, and may not pass as replies of a lost connection) and,
// for accelerated TCP, both of its sockets leave the sockhash (so its
// payload goes back through TC, where policy sees it). It returns how many
// connections were revoked.
//
// For an accelerated socket pair the opener is not known; revoked is asked
// about both orientations and either one evicts the pair.
func (d *Datapath) EvictFlows(revoked func(FlowKey) bool) (int, error) {
	var (
		k    podCtKey
		v    podCtEntry
		dead []podCtKey
	)
	it := d.ct.Iterate()
	for it.Next(&k, &v) {
		if v.Flags&revokedFlag != 0 {
			continue
		}
		if revoked(FlowKey{Src: u32ToIP4(k.Saddr), Dst: u32ToIP4(k.Daddr), Proto: k.Proto, DstPort: policyPort(k, v)}) {
			dead = append(dead, k)
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("scan connections: %w", err)
	}
	n := 0
	for _, k := range dead {
		ok, err := d.revokeConnection(k)
		if err != nil {
			return n, err
		}
		if ok {
			n++
		}
	}
	// Sockets last: once the sockhash forgets them, payload takes the TC
	// path, where the revoked conntrack entry forces a policy check.
	if _, err := d.evictSockets(revoked); err != nil {
		return n, err
	}
	return n, nil
}

const revokedFlag = uint16(podCtFlagsCT_F_REVOKED)

// revokeConnection marks the entry of k revoked, or writes a revoked entry
// when there is none (an accelerated connection, whose packets TC has not
// seen for longer than its lifetime). Its lifetime is left as it was, so a
// connection that keeps sending keeps being judged as revoked.
// It reports whether it revoked a live connection.
func (d *Datapath) revokeConnection(k podCtKey) (bool, error) {
	var v podCtEntry
	err := d.ct.Lookup(&k, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		now, err := monotonicNow()
		if err != nil {
			return false, err
		}
		v = podCtEntry{CreatedNs: now, LastSeenNs: now, Flags: revokedFlag,
			PolicyPort: k.Dport, LifetimeS: seconds(d.cfg.CTTimeouts.TCPEstablished)}
		if err := d.ct.Update(&k, &v, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
			return false, fmt.Errorf("revoke connection: write: %w", err)
		}
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("revoke connection: read: %w", err)
	}
	if v.Flags&revokedFlag != 0 {
		return false, nil
	}
	v.Flags |= revokedFlag
	if err := d.ct.Update(&k, &v, ebpf.UpdateExist); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, fmt.Errorf("revoke connection: write: %w", err)
	}
	return true, nil
}

func (d *Datapath) evictSockets(revoked func(FlowKey) bool) (int, error) {
	var (
		k     podSockKey
		dead  []podSockKey
		conns []podCtKey // revoked orientations, whose entries TC may have expired
	)
	it := d.sockhash.Iterate()
	var cookie uint64
	for it.Next(&k, &cookie) {
		src, dst := u32ToIP4(k.Sip), u32ToIP4(k.Dip)
		fwd := revoked(FlowKey{Src: src, Dst: dst, Proto: 6, DstPort: uint16(k.Dport)})
		rev := revoked(FlowKey{Src: dst, Dst: src, Proto: 6, DstPort: uint16(k.Sport)})
		if fwd || rev {
			dead = append(dead, k, podSockKey{Sip: k.Dip, Dip: k.Sip, Sport: k.Dport, Dport: k.Sport})
		}
		if fwd {
			conns = append(conns, podCtKey{Saddr: k.Sip, Daddr: k.Dip, Sport: uint16(k.Sport), Dport: uint16(k.Dport), Proto: 6})
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("scan accelerated sockets: %w", err)
	}
	for _, c := range conns {
		if _, err := d.revokeConnection(c); err != nil {
			return 0, err
		}
	}
	n := 0
	for _, k := range dead {
		err := d.sockhash.Delete(&k)
		if err == nil {
			n++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return n, fmt.Errorf("evict accelerated socket: %w", err)
		}
	}
	return n, nil
}

// AcceleratedSockets returns how many sockets the sockhash holds.
func (d *Datapath) AcceleratedSockets() (int, error) {
	var (
		k      podSockKey
		cookie uint64
		n      int
	)
	it := d.sockhash.Iterate()
	for it.Next(&k, &cookie) {
		n++
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("count accelerated sockets: %w", err)
	}
	return n, nil
}
