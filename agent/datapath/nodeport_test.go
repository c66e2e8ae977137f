package datapath

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/veilmesh/veil/policy/identity"
)

// NodePort without kube-proxy (bpf/lib/nodeport.h), on crafted frames: the
// translation toward the backend on the underlay, the reverse translation of
// the replies, SNAT for a backend on another node, and what is left alone.

const (
	npPort   = 30080
	npTarget = 8080
)

// nodePortFixture is the verdict tests' cluster with kube-proxy replacement
// on and one NodePort Service whose backends are bs.
func nodePortFixture(t *testing.T, strict, wg bool, proto uint8, bs ...netip.Addr) *progTest {
	t.Helper()
	p := clusterWith(t, Config{NodeIP: pNode1, StrictMode: strict, NodePort: true}, wg)
	p.nodePort(proto, bs...)
	return p
}

func (p *progTest) nodePort(proto uint8, bs ...netip.Addr) {
	p.t.Helper()
	s := Service{ServiceKey: ServiceKey{VIP: NodePortVIP, Port: npPort, Proto: proto, External: true}}
	for _, b := range bs {
		s.Backends = append(s.Backends, Backend{IP: b, Port: npTarget})
	}
	if err := p.d.UpsertService(s); err != nil {
		p.t.Fatalf("upsert nodeport: %v", err)
	}
}

// withChecksums fills in a frame's IPv4 and TCP/UDP checksums.
func withChecksums(frame []byte, l3off int) []byte {
	ip := frame[l3off:]
	ihl := int(ip[0]&0x0f) * 4
	binary.BigEndian.PutUint16(ip[10:], 0)
	binary.BigEndian.PutUint16(ip[10:], ^fold(sum16(ip[:ihl], 0)))
	l4 := ip[ihl:binary.BigEndian.Uint16(ip[2:])]
	off := l4CsumOffset(ip[9])
	binary.BigEndian.PutUint16(l4[off:], 0)
	binary.BigEndian.PutUint16(l4[off:], ^fold(sum16(l4, pseudo(ip, len(l4)))))
	return frame
}

func l4CsumOffset(proto uint8) int {
	if proto == protoTCP {
		return 16
	}
	return 6
}

func pseudo(ip []byte, l4len int) uint32 {
	s := sum16(ip[12:20], 0)
	return s + uint32(ip[9]) + uint32(l4len)
}

func sum16(b []byte, s uint32) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	return s
}

func fold(s uint32) uint16 {
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}

// tuple is what a test reads back from a frame the program left.
type tuple struct {
	src, dst     netip.AddrPort
	csumIP, csum bool // the checksums verify
}

func readTuple(t *testing.T, frame []byte, l3off int) tuple {
	t.Helper()
	if len(frame) < l3off+28 {
		t.Fatalf("frame of %d bytes: too short", len(frame))
	}
	ip := frame[l3off:]
	ihl := int(ip[0]&0x0f) * 4
	l4 := ip[ihl:binary.BigEndian.Uint16(ip[2:])]
	src := netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[12:16])), binary.BigEndian.Uint16(l4[0:]))
	dst := netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[16:20])), binary.BigEndian.Uint16(l4[2:]))
	return tuple{
		src: src, dst: dst,
		csumIP: fold(sum16(ip[:ihl], 0)) == 0xffff,
		csum:   fold(sum16(l4, pseudo(ip, len(l4)))) == 0xffff,
	}
}

func ap(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

func (p *progTest) expectTuple(what string, frame []byte, l3off int, src, dst netip.AddrPort) tuple {
	p.t.Helper()
	got := readTuple(p.t, frame, l3off)
	if (src.IsValid() && got.src != src) || got.dst != dst {
		p.t.Errorf("%s: frame %s -> %s; want %s -> %s", what, got.src, got.dst, src, dst)
	}
	if !got.csumIP || !got.csum {
		p.t.Errorf("%s: checksums after the rewrite: ip ok %v, l4 ok %v; want both valid", what, got.csumIP, got.csum)
	}
	return got
}

func TestNodePortLocalBackendKeepsClientAddress(t *testing.T) {
	for _, proto := range []uint8{protoTCP, protoUDP} {
		p := nodePortFixture(t, false, false, proto, pA)
		first := pkt{src: pWorld, dst: pNode1, proto: proto, sport: 40000, dport: npPort, tcpFlags: tcpSYN, payload: []byte("hello")}
		got, out := p.run(p.d.fromNetdev, withChecksums(first.bytes(), 14), ifLoopback)
		if got != tcRedirect {
			t.Fatalf("proto %d: first packet to the NodePort: from_netdev returned %d; want %d (into the backend pod)", proto, got, tcRedirect)
		}
		p.expectTuple("to the backend", out, 14, ap(pWorld, 40000), ap(pA, npTarget))

		reply := pkt{src: pA, dst: pWorld, proto: proto, sport: npTarget, dport: 40000, tcpFlags: tcpSYN | tcpACK, payload: []byte("hi")}
		got, out = p.run(p.d.fromPod, withChecksums(reply.bytes(), 14), ifA)
		if got != tcRedirect {
			t.Fatalf("proto %d: backend's reply: from_pod returned %d; want %d (out of the underlay)", proto, got, tcRedirect)
		}
		p.expectTuple("reply to the client", out, 14, ap(pNode1, npPort), ap(pWorld, 40000))

		next := first
		next.tcpFlags = tcpACK
		got, out = p.run(p.d.fromNetdev, withChecksums(next.bytes(), 14), ifLoopback)
		if got != tcRedirect {
			t.Fatalf("proto %d: the client's next packet: from_netdev returned %d; want %d", proto, got, tcRedirect)
		}
		p.expectTuple("next packet", out, 14, ap(pWorld, 40000), ap(pA, npTarget))
	}
}

// A backend on another node: the client's source becomes this node's address
// and a port of its own, so the reply comes back here, where it is turned back
// toward the client. Without encryption the reply arrives on the underlay
// (out of the tunnel: TestNodePortReplyOutOfTheTunnel).
func TestNodePortRemoteBackendIsSNATed(t *testing.T) {
	for _, proto := range []uint8{protoTCP, protoUDP} {
		p := nodePortFixture(t, false, false, proto, pC)
		first := pkt{src: pWorld, dst: pNode1, proto: proto, sport: 40000, dport: npPort, tcpFlags: tcpSYN, payload: []byte("hello")}
		got, out := p.run(p.d.fromNetdev, withChecksums(first.bytes(), 14), ifLoopback)
		if got != tcRedirect {
			t.Fatalf("proto %d: from_netdev returned %d; want %d (to the backend's node)", proto, got, tcRedirect)
		}
		fw := p.expectTuple("to the remote backend", out, 14, netip.AddrPort{}, ap(pC, npTarget))
		if fw.src.Addr() != pNode1 || fw.src.Port() < 61000 {
			t.Fatalf("proto %d: source toward the remote backend %s; want this node's address and a port from 61000", proto, fw.src)
		}

		reply := pkt{src: pC, dst: pNode1, proto: proto, sport: npTarget, dport: fw.src.Port(), tcpFlags: tcpSYN | tcpACK, payload: []byte("hi")}
		got, out = p.run(p.d.fromNetdev, withChecksums(reply.bytes(), 14), ifLoopback)
		if got != tcRedirect {
			t.Fatalf("proto %d: the backend's reply: from_netdev returned %d; want %d (out to the client)", proto, got, tcRedirect)
		}
		p.expectTuple("reply to the client", out, 14, ap(pNode1, npPort), ap(pWorld, 40000))

		next := first
		next.tcpFlags = tcpACK
		_, out = p.run(p.d.fromNetdev, withChecksums(next.bytes(), 14), ifLoopback)
		p.expectTuple("next packet", out, 14, fw.src, ap(pC, npTarget))
	}
}

// With encryption the translated packet goes into the tunnel, and a reply
// in plaintext on the underlay is not taken for the backend's in strict mode.
func TestNodePortRemoteBackendGoesThroughTheTunnel(t *testing.T) {
	p := nodePortFixture(t, true, true, protoTCP, pC)
	// Strict mode: peers' node addresses are in their allowed IPs.
	p.ipcache("10.99.0.2/32", identity.RemoteNode, pNode2, NodeAddr|Tunnel)
	got, out := p.run(p.d.fromNetdev, withChecksums(tcp(pWorld, pNode1, 40000, npPort, tcpSYN).bytes(), 14), ifLoopback)
	if got != tcRedirect {
		t.Fatalf("from_netdev returned %d; want %d (into the tunnel)", got, tcRedirect)
	}
	fw := p.expectTuple("to the remote backend", out, 14, netip.AddrPort{}, ap(pC, npTarget))
	if c, err := p.d.Counters(); err != nil || c.Tunnel.Packets != 1 {
		t.Errorf("tunnel counter %+v, %v; want 1 packet into the tunnel", c.Tunnel, err)
	}
	spoof := tcp(pC, pNode1, npTarget, fw.src.Port(), tcpSYN|tcpACK)
	p.check(verdictCase{name: "plaintext reply in strict mode", prog: "from_netdev", frame: spoof, want: tcOK})
}

// Encryption without strict mode or node-to-node encryption: the backend's
// node would not admit this node's own address out of the tunnel, so the
// SNATed packet goes in the clear, as the host's own traffic to it does.
func TestNodePortRemoteBackendPlainWhereNodeAddressesAreNotTunneled(t *testing.T) {
	p := nodePortFixture(t, false, true, protoTCP, pC)
	got, _ := p.run(p.d.fromNetdev, withChecksums(tcp(pWorld, pNode1, 40000, npPort, tcpSYN).bytes(), 14), ifLoopback)
	if got != tcRedirect {
		t.Fatalf("from_netdev returned %d; want %d (to the backend's node)", got, tcRedirect)
	}
	c, err := p.d.Counters()
	if err != nil || c.Tunnel.Packets != 0 || c.Remote.Packets != 1 {
		t.Errorf("counters tunnel %+v remote %+v, %v; want 1 packet sent to the node in the clear", c.Tunnel, c.Remote, err)
	}
}

func TestNodePortRemoteBackendWithoutTunnelIsRefusedInStrictMode(t *testing.T) {
	p := clusterWith(t, Config{NodeIP: pNode1, StrictMode: true, NodePort: true}, true)
	p.ipcache("10.244.2.0/24", 0, pNode2, PodCIDR)
	p.ipcache("10.244.2.2/32", idC, pNode2, RemotePod)
	p.nodePort(protoTCP, pC)
	p.check(verdictCase{name: "no tunnel to the backend's node", prog: "from_netdev",
		frame: tcp(pWorld, pNode1, 40000, npPort, tcpSYN), want: tcShot, reason: DropNoTunnel})
}

func TestNodePortBackendPolicyJudgesTheClient(t *testing.T) {
	// d admits only its host: a NodePort client from the world is denied.
	p := nodePortFixture(t, false, false, protoTCP, pD)
	p.check(verdictCase{name: "world client to an isolated backend", prog: "from_netdev",
		frame: tcp(pWorld, pNode1, 40000, npPort, tcpSYN), want: tcShot, reason: DropPolicyIngress})
}

func TestNodePortLeftAlone(t *testing.T) {
	p := nodePortFixture(t, false, false, protoTCP, pA)
	// A Service without local backends (externalTrafficPolicy Local on a
	// node without one): the host stack refuses.
	if err := p.d.UpsertService(Service{ServiceKey: ServiceKey{VIP: NodePortVIP, Port: npPort + 1, Proto: protoTCP, External: true}}); err != nil {
		t.Fatal(err)
	}
	// A ClusterIP is the socket hooks', not the underlay's.
	vip := addr("10.96.0.10")
	if err := p.d.UpsertService(Service{ServiceKey: ServiceKey{VIP: vip, Port: 80, Proto: protoTCP}, Backends: []Backend{{IP: pA, Port: npTarget}}}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []verdictCase{
		{name: "no backend", frame: tcp(pWorld, pNode1, 40000, npPort+1, tcpSYN)},
		{name: "not a SYN and no flow (the host's own connection)", frame: tcp(pWorld, pNode1, 40001, npPort, tcpACK)},
		{name: "another port", frame: tcp(pWorld, pNode1, 40000, 22, tcpSYN)},
		{name: "a ClusterIP from outside", frame: tcp(pWorld, vip, 40000, 80, tcpSYN)},
		{name: "the NodePort on an address not this node's", frame: tcp(pWorld, pNode2, 40000, npPort, tcpSYN)},
	} {
		c.prog, c.want = "from_netdev", tcOK
		in := c.frame.bytes()
		out := p.check(c)
		if string(out) != string(in) {
			t.Errorf("%s: frame rewritten; want it untouched", c.name)
		}
	}

	// Off (kube-proxy runs): nothing is translated.
	off := clusterWith(t, Config{NodeIP: pNode1}, false)
	off.nodePort(protoTCP, pA)
	off.check(verdictCase{name: "replacement off", prog: "from_netdev",
		frame: tcp(pWorld, pNode1, 40000, npPort, tcpSYN), want: tcOK})
}

func TestNodePortExternalKeysReadBack(t *testing.T) {
	p := nodePortFixture(t, false, false, protoTCP, pA)
	lbIP := addr("192.0.2.100")
	if err := p.d.UpsertService(Service{ServiceKey: ServiceKey{VIP: lbIP, Port: 80, Proto: protoTCP, External: true}, Backends: []Backend{{IP: pA, Port: npTarget}}}); err != nil {
		t.Fatal(err)
	}
	if err := p.d.UpsertService(Service{ServiceKey: ServiceKey{VIP: lbIP, Port: 80, Proto: protoTCP}, Backends: []Backend{{IP: pB, Port: npTarget}}}); err != nil {
		t.Fatal(err)
	}
	got, err := p.d.Services()
	if err != nil {
		t.Fatal(err)
	}
	want := map[ServiceKey]netip.Addr{
		{VIP: NodePortVIP, Port: npPort, Proto: protoTCP, External: true}: pA,
		{VIP: lbIP, Port: 80, Proto: protoTCP, External: true}:            pA,
		{VIP: lbIP, Port: 80, Proto: protoTCP}:                            pB,
	}
	if len(got) != len(want) {
		t.Fatalf("read back %d services; want %d: %+v", len(got), len(want), got)
	}
	for _, s := range got {
		if b, ok := want[s.ServiceKey]; !ok || len(s.Backends) != 1 || s.Backends[0].IP != b {
			t.Errorf("read back %s with %+v; want backend %s", s.ServiceKey, s.Backends, b)
		}
	}
	// The LoadBalancer IP from outside goes to the external entry's backend.
	_, out := p.run(p.d.fromNetdev, withChecksums(tcp(pWorld, lbIP, 40000, 80, tcpSYN).bytes(), 14), ifLoopback)
	p.expectTuple("LoadBalancer IP", out, 14, ap(pWorld, 40000), ap(pA, npTarget))
}

// The reply of a remote backend out of the tunnel (an L3 device): rewritten
// back toward the client, given an Ethernet header and sent out of the
// underlay. BPF_PROG_RUN always reads a frame's first 14 bytes as Ethernet
// (skb->protocol from bytes 12-13, which from_tunnel checks), so the
// backend here has an address starting 8.0: an IP header whose source
// begins 0x08 0x00 reads as ETH_P_IP. Nothing else in these programs cares
// what the backend's address is.
func TestNodePortReplyOutOfTheTunnel(t *testing.T) {
	backend := addr("8.0.2.2")
	p := clusterWith(t, Config{NodeIP: pNode1, StrictMode: true, NodePort: true}, true)
	p.ipcache("10.99.0.2/32", identity.RemoteNode, pNode2, NodeAddr|Tunnel)
	p.ipcache("8.0.2.2/32", idC, pNode2, RemotePod|Tunnel)
	p.nodePort(protoTCP, backend)
	got, out := p.run(p.d.fromNetdev, withChecksums(tcp(pWorld, pNode1, 40000, npPort, tcpSYN).bytes(), 14), ifLoopback)
	if got != tcRedirect {
		t.Fatalf("from_netdev returned %d; want %d (into the tunnel)", got, tcRedirect)
	}
	fw := p.expectTuple("to the remote backend", out, 14, netip.AddrPort{}, ap(backend, npTarget))

	reply := pkt{src: backend, dst: pNode1, proto: protoTCP, sport: npTarget, dport: fw.src.Port(), tcpFlags: tcpSYN | tcpACK, noEthernet: true}
	got, out = p.run(p.d.fromTunnel, withChecksums(reply.bytes(), 0), ifLoopback)
	if got != tcRedirect {
		t.Fatalf("reply out of the tunnel: from_tunnel returned %d; want %d (out of the underlay)", got, tcRedirect)
	}
	if len(out) < 14 || binary.BigEndian.Uint16(out[12:]) != 0x0800 {
		t.Fatalf("reply sent without an Ethernet header for IPv4: % x", out[:min(len(out), 14)])
	}
	p.expectTuple("reply to the client", out, 14, ap(pNode1, npPort), ap(pWorld, 40000))

	// Anything else to this node out of the tunnel is the host's.
	other := pkt{src: backend, dst: pNode1, proto: protoTCP, sport: npTarget, dport: 50000, tcpFlags: tcpACK, noEthernet: true}
	if got, _ := p.run(p.d.fromTunnel, withChecksums(other.bytes(), 0), ifLoopback); got != tcOK {
		t.Errorf("a packet to the host out of the tunnel: from_tunnel returned %d; want %d", got, tcOK)
	}
}
