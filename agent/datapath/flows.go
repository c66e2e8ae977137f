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

// conn names one connection in its opener's direction, to count
// connections that both tables hold once.
type conn struct {
	src, dst     netip.Addr
	sport, dport uint16
	proto        uint8
}

// ctKey is the conntrack key of a connection.
func (c conn) ctKey() podCtKey {
	return podCtKey{Saddr: ip4ToU32(c.src), Daddr: ip4ToU32(c.dst), Sport: c.sport, Dport: c.dport, Proto: c.proto}
}

// EvictFlows revokes every connection for which revoked returns true.
// revoked is asked about the direction that opened the connection, never
// about its replies, and only about connections not already revoked.
//
// A connection's conntrack entry is marked revoked, so its packets are
// checked against policy again and may not pass as replies of a lost
// connection. Its accelerated sockets are marked revoked too: their payload
// takes the TCP path from then on, where policy drops it. They stay in the
// sockhash until they close, because removing a socket from it frees the
// data already redirected into it and not yet read; so every byte accepted
// before the revocation is still delivered, in order.
//
// It returns how many connections were revoked.
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
		// The entry is keyed in the direction of the connection's first
		// packet.
		if revoked(FlowKey{Src: u32ToIP4(k.Saddr), Dst: u32ToIP4(k.Daddr), Proto: k.Proto, DstPort: policyPort(k, v)}) {
			dead = append(dead, k)
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("scan connections: %w", err)
	}
	gone := map[conn]bool{}
	for _, k := range dead {
		ok, err := d.revokeConnection(k)
		if err != nil {
			return len(gone), err
		}
		if ok {
			gone[conn{src: u32ToIP4(k.Saddr), dst: u32ToIP4(k.Daddr), sport: k.Sport, dport: k.Dport, proto: k.Proto}] = true
		}
	}
	// Sockets last: once they are revoked, payload takes the TC path, where
	// the revoked conntrack entry forces a policy check.
	if err := d.revokeSockets(revoked, gone); err != nil {
		return len(gone), err
	}
	return len(gone), nil
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

// openerOf returns the connection of an accelerated socket in the direction
// that opened it: the socket's own for the end that connected, the reverse
// for the end that accepted.
func openerOf(k podSockKey, st sockSockState) conn {
	local, remote := u32ToIP4(k.Sip), u32ToIP4(k.Dip)
	if sockSockFlags(st.Flags)&sockSockFlagsSOCK_F_ACTIVE != 0 {
		return conn{src: local, dst: remote, sport: uint16(k.Sport), dport: uint16(k.Dport), proto: policytypes.ProtoTCP}
	}
	return conn{src: remote, dst: local, sport: uint16(k.Dport), dport: uint16(k.Sport), proto: policytypes.ProtoTCP}
}

// sockKeys returns the sockhash keys of both ends of a local connection.
func sockKeys(c conn) [2]podSockKey {
	src, dst := ip4ToU32(c.src), ip4ToU32(c.dst)
	return [2]podSockKey{
		{Sip: src, Dip: dst, Sport: uint32(c.sport), Dport: uint32(c.dport)},
		{Sip: dst, Dip: src, Sport: uint32(c.dport), Dport: uint32(c.sport)},
	}
}

// revokeSockets marks both ends of every revoked accelerated connection (of
// gone, which holds those revoked by their conntrack entry, and of those
// revoked now, which it adds to gone), and the conntrack entries of the
// latter, whose entries TC may have expired. On the way it forgets the state
// of sockets that have left the sockhash (closed).
func (d *Datapath) revokeSockets(revoked func(FlowKey) bool, gone map[conn]bool) error {
	var (
		k      podSockKey
		st     sockSockState
		cookie uint64
		closed []podSockKey
		now    []conn
		judged = map[conn]bool{}
	)
	it := d.sockstate.Iterate()
	for it.Next(&k, &st) {
		if err := d.sockhash.Lookup(&k, &cookie); errors.Is(err, ebpf.ErrKeyNotExist) {
			closed = append(closed, k)
			continue
		} else if err != nil {
			return fmt.Errorf("look up accelerated socket: %w", err)
		}
		c := openerOf(k, st)
		if sockSockFlags(st.Flags)&sockSockFlagsSOCK_F_REVOKED != 0 || judged[c] {
			continue
		}
		judged[c] = true
		if revoked(FlowKey{Src: c.src, Dst: c.dst, Proto: c.proto, DstPort: c.dport}) {
			now = append(now, c)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("scan accelerated sockets: %w", err)
	}
	legacy, err := d.legacySockets(revoked, judged)
	if err != nil {
		return err
	}
	for _, c := range append(now, legacy...) {
		if _, err := d.revokeConnection(c.ctKey()); err != nil {
			return err
		}
		gone[c] = true
	}
	for c := range gone {
		// Sockhash keys name no protocol: a UDP flow must not revoke a TCP
		// connection between the same ports.
		if c.proto != policytypes.ProtoTCP {
			continue
		}
		for _, k := range sockKeys(c) {
			if err := d.revokeSocket(k); err != nil {
				return err
			}
		}
	}
	// Sockets that joined under an earlier Veil keep the sk_msg program of
	// that time, which knows no state: the only way to stop them is to take
	// them out of the sockhash, at the risk of data queued at them.
	for _, c := range legacy {
		for _, k := range sockKeys(c) {
			if err := d.sockhash.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("evict accelerated socket: %w", err)
			}
		}
	}
	for _, k := range closed {
		if err := d.sockstate.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("forget closed socket: %w", err)
		}
	}
	return nil
}

// legacySockets returns the revoked connections of sockhash members of
// which neither end has state (they joined before sockops recorded it).
// Their opener is found from their conntrack entry; when it is gone, either
// direction being revoked revokes them.
func (d *Datapath) legacySockets(revoked func(FlowKey) bool, judged map[conn]bool) ([]conn, error) {
	var (
		k      podSockKey
		cookie uint64
		st     sockSockState
		out    []conn
	)
	it := d.sockhash.Iterate()
	for it.Next(&k, &cookie) {
		c, known := d.openerFromCT(k)
		if judged[c] {
			continue
		}
		stateless := true
		for _, sk := range sockKeys(c) {
			if err := d.sockstate.Lookup(&sk, &st); !errors.Is(err, ebpf.ErrKeyNotExist) {
				stateless = false
			}
		}
		if !stateless {
			continue
		}
		judged[c] = true
		r := conn{src: c.dst, dst: c.src, sport: c.dport, dport: c.sport, proto: c.proto}
		if revoked(FlowKey{Src: c.src, Dst: c.dst, Proto: c.proto, DstPort: c.dport}) ||
			(!known && revoked(FlowKey{Src: r.src, Dst: r.dst, Proto: r.proto, DstPort: r.dport})) {
			out = append(out, c)
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("scan accelerated sockets: %w", err)
	}
	return out, nil
}

// openerFromCT returns the connection of a socket in the direction of its
// conntrack entry, and whether there is one.
func (d *Datapath) openerFromCT(k podSockKey) (conn, bool) {
	c := conn{src: u32ToIP4(k.Sip), dst: u32ToIP4(k.Dip), sport: uint16(k.Sport), dport: uint16(k.Dport), proto: policytypes.ProtoTCP}
	r := conn{src: c.dst, dst: c.src, sport: c.dport, dport: c.sport, proto: c.proto}
	var v podCtEntry
	for _, cand := range []conn{c, r} {
		key := cand.ctKey()
		if d.ct.Lookup(&key, &v) == nil {
			return cand, true
		}
	}
	// Unknown: a canonical orientation, so both ends name one connection.
	if c.sport < c.dport {
		return r, false
	}
	return c, false
}

// revokeSocket sets the revoked flag of one socket, if it is still known.
func (d *Datapath) revokeSocket(k podSockKey) error {
	var st sockSockState
	if err := d.sockstate.Lookup(&k, &st); errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("read accelerated socket state: %w", err)
	}
	st.Flags |= uint32(sockSockFlagsSOCK_F_REVOKED)
	// The agent is the only writer of an existing entry's flags (sk_msg
	// writes only tcp_path, and a lost tcp_path store is harmless next to
	// the revoked flag).
	err := d.sockstate.Update(&k, &st, ebpf.UpdateExist)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("revoke accelerated socket: %w", err)
	}
	return nil
}

// AcceleratedSockets returns how many sockets sk_msg redirects payload for:
// those in the sockhash that are neither revoked nor fallen back to the TCP
// path.
func (d *Datapath) AcceleratedSockets() (int, error) {
	var (
		k      podSockKey
		cookie uint64
		st     sockSockState
		n      int
	)
	it := d.sockhash.Iterate()
	for it.Next(&k, &cookie) {
		err := d.sockstate.Lookup(&k, &st)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("read accelerated socket state: %w", err)
		}
		if sockSockFlags(st.Flags)&sockSockFlagsSOCK_F_REVOKED == 0 && st.TcpPath == 0 {
			n++
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("count accelerated sockets: %w", err)
	}
	return n, nil
}
