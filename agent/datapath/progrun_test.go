package datapath

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// Packet-level tests: the real programs, loaded with private (unpinned) maps
// and attached to nothing, run on crafted frames with BPF_PROG_RUN. They need
// the right to load BPF programs (root) but no network namespace, device or
// pin, so they leave nothing behind.

// TC verdicts as BPF_PROG_RUN returns them.
const (
	tcOK       = 0
	tcShot     = 2
	tcRedirect = 7
)

// Interface indexes the programs are configured with. BPF_PROG_RUN runs a
// frame on the loopback device (ifindex 1) unless told otherwise, and a
// redirect is only returned, never carried out, so the other numbers need
// no device behind them.
const (
	ifLoopback = 1
	ifUnderlay = 41
	ifTunnel   = 42
)

var (
	macPod  = net.HardwareAddr{0x02, 0, 0, 0, 0, 0xaa}
	macHost = net.HardwareAddr{0x02, 0, 0, 0, 0, 0xbb}
)

// progTest is a datapath whose programs run on crafted frames.
type progTest struct {
	t *testing.T
	d *Datapath
}

// newProgTest loads every object with node configuration cfg (NodeIP,
// StrictMode, CTTimeouts, CTMaxEntries are honoured; encryption is on when
// wg is set).
func newProgTest(t *testing.T, cfg Config, underlay, wg bool) *progTest {
	t.Helper()
	cfg.setDefaults()
	d := &Datapath{cfg: cfg, log: cfg.Logger, policySlots: map[uint32][]podPolicyKey{}, retired: map[uint32]bool{}}
	if underlay {
		d.underlayIfindex = ifUnderlay
	}
	if wg {
		d.wgIfindex = ifTunnel
	}
	if err := d.loadObjects(""); err != nil {
		d.Close()
		if errors.Is(err, os.ErrPermission) {
			t.Skipf("loading BPF programs needs root: %v", err)
		}
		t.Fatalf("load programs: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return &progTest{t: t, d: d}
}

// endpoint registers a local pod whose host-side veth has ifindex.
func (p *progTest) endpoint(ip netip.Addr, id uint32, ident identity.ID, ifindex int) {
	p.t.Helper()
	ep := Endpoint{IP: ip, ID: id, Identity: ident, Ifindex: ifindex, MAC: macPod, HostMAC: macHost}
	if err := p.d.putEndpoint(ep, false); err != nil {
		p.t.Fatalf("endpoint %s: %v", ip, err)
	}
}

func (p *progTest) ipcache(prefix string, ident identity.ID, node netip.Addr, kind IPCacheKind) {
	p.t.Helper()
	if err := p.d.UpsertIPCache(netip.MustParsePrefix(prefix), IPCacheEntry{Identity: ident, NodeIP: node, Kind: kind}); err != nil {
		p.t.Fatalf("ipcache %s: %v", prefix, err)
	}
}

func (p *progTest) policy(ip netip.Addr, entries []policytypes.Entry, defaults policytypes.Defaults) {
	p.t.Helper()
	if err := p.d.SetPolicy(ip, entries, defaults); err != nil {
		p.t.Fatalf("policy of %s: %v", ip, err)
	}
}

// denyAll makes ip default-deny in both directions.
func (p *progTest) denyAll(ip netip.Addr) {
	p.policy(ip, nil, policytypes.Defaults{
		IngressEnforce: policytypes.Deny, IngressAudit: policytypes.Deny,
		EgressEnforce: policytypes.Deny, EgressAudit: policytypes.Deny,
	})
}

// skbContext is the head of struct __sk_buff up to tc_index: the fields a
// test may set are mark and ifindex (the device the frame arrives on).
type skbContext struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto uint32
	Priority, IngressIfindex, Ifindex, TCIndex                                  uint32
}

// run runs prog on frame as if it arrived on ifindex, and returns the
// verdict and the frame as the program left it.
func (p *progTest) run(prog *ebpf.Program, frame []byte, ifindex int) (uint32, []byte) {
	p.t.Helper()
	return p.runMark(prog, frame, ifindex, 0)
}

// runMark is run with skb->mark set, as the host stack hands a packet on.
func (p *progTest) runMark(prog *ebpf.Program, frame []byte, ifindex int, mark uint32) (uint32, []byte) {
	p.t.Helper()
	out := make([]byte, len(frame)+256)
	ctx := skbContext{Ifindex: uint32(ifindex), Mark: mark}
	if ifindex == ifLoopback {
		ctx.Ifindex = 0
	}
	opts := &ebpf.RunOptions{Data: frame, DataOut: out, Context: ctx}
	ret, err := prog.Run(opts)
	if err != nil {
		p.t.Fatalf("BPF_PROG_RUN: %v", err)
	}
	return ret, out[:len(opts.DataOut)]
}

// runCtx runs prog on a frame from the loopback device and returns the
// __sk_buff fields as the program left them (e.g. the mark it set).
func (p *progTest) runCtx(prog *ebpf.Program, frame []byte, out *skbContext) error {
	// The kernel hands back the whole __sk_buff: room for all of it.
	var whole struct {
		Head skbContext
		Rest [256]byte
	}
	_, err := prog.Run(&ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256), Context: skbContext{}, ContextOut: &whole})
	*out = whole.Head
	return err
}

// dropCount is how many packets were dropped for reason so far.
func (p *progTest) dropCount(reason DropReason) uint64 {
	p.t.Helper()
	c, err := p.d.Counters()
	if err != nil {
		p.t.Fatalf("counters: %v", err)
	}
	return c.Drops[reason].Packets
}

// pkt describes an IPv4 frame to craft.
type pkt struct {
	src, dst     netip.Addr
	proto        uint8
	sport, dport uint16
	tcpFlags     uint8  // TCP only
	icmpType     uint8  // ICMP only
	icmpCode     uint8  // ICMP only
	icmpID       uint16 // ICMP echo only
	fragOff      uint16 // in 8-byte units
	moreFrags    bool
	ipID         uint16
	payload      []byte
	inner        []byte // ICMP errors: the embedded IP header and 8 bytes
	noEthernet   bool   // an L3 device's packet: starts at the IP header
}

const (
	protoICMP = 1
	protoTCP  = 6
	protoUDP  = 17
	protoSCTP = 132

	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

// bytes renders the frame: Ethernet (unless noEthernet), IPv4, L4, payload.
// Checksums are left zero: the programs never check them.
func (k pkt) bytes() []byte {
	var l4 []byte
	switch k.proto {
	case protoTCP:
		l4 = make([]byte, 20)
		binary.BigEndian.PutUint16(l4[0:], k.sport)
		binary.BigEndian.PutUint16(l4[2:], k.dport)
		l4[12] = 5 << 4
		l4[13] = k.tcpFlags
	case protoUDP, protoSCTP:
		l4 = make([]byte, 8)
		binary.BigEndian.PutUint16(l4[0:], k.sport)
		binary.BigEndian.PutUint16(l4[2:], k.dport)
	case protoICMP:
		l4 = make([]byte, 8)
		l4[0], l4[1] = k.icmpType, k.icmpCode
		binary.BigEndian.PutUint16(l4[4:], k.icmpID)
		l4 = append(l4, k.inner...)
	}
	if k.fragOff != 0 {
		l4 = nil // a later fragment carries payload only
	}
	body := append(l4, k.payload...)
	ip := make([]byte, 20)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(body)))
	binary.BigEndian.PutUint16(ip[4:], k.ipID)
	frag := k.fragOff & 0x1fff
	if k.moreFrags {
		frag |= 0x2000
	}
	binary.BigEndian.PutUint16(ip[6:], frag)
	ip[8] = 64
	ip[9] = k.proto
	s, d := k.src.As4(), k.dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	frame := append(ip, body...)
	if k.noEthernet {
		return frame
	}
	eth := make([]byte, 14)
	copy(eth[0:], macHost)
	copy(eth[6:], macPod)
	binary.BigEndian.PutUint16(eth[12:], 0x0800)
	return append(eth, frame...)
}

// ipHeader returns the IPv4 header and first 8 L4 bytes of k, as an ICMP
// error embeds them.
func (k pkt) ipHeader() []byte {
	k.noEthernet = true
	k.payload = nil
	b := k.bytes()
	return b[:28]
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }
