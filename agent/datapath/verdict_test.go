package datapath

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// The node of these tests: node 1 (10.99.0.1) hosts pods a and b; node 2
// (10.99.0.2) hosts pod c. A default-deny pod is d.
var (
	pNode1 = addr("10.99.0.1")
	pNode2 = addr("10.99.0.2")
	pA     = addr("10.244.1.2")
	pB     = addr("10.244.1.3")
	pD     = addr("10.244.1.4")
	pC     = addr("10.244.2.2")
	pWorld = addr("192.0.2.7")
)

const (
	ifA = ifLoopback // pod a's veth: frames from a arrive on it
	ifB = 51
	ifD = 52
)

// hostAllowed is what the compiler gives every ingress-isolated pod: its
// own node may always reach it (kubelet probes).
var hostAllowed = policytypes.Entry{
	Key:     policytypes.Key{Direction: policytypes.Ingress, Identity: identity.Host, Proto: policytypes.ProtoAny},
	Enforce: policytypes.Allow, Audit: policytypes.Allow, RuleID: policytypes.RuleLocalHost,
}

// cluster is the fixture: endpoints, the ipcache as the agent writes it,
// and d isolated for ingress except from the host.
func cluster(t *testing.T, strict, wg bool) *progTest {
	t.Helper()
	return clusterWith(t, Config{NodeIP: pNode1, StrictMode: strict}, wg)
}

func clusterWith(t *testing.T, cfg Config, wg bool) *progTest {
	t.Helper()
	p := newProgTest(t, cfg, true, wg)
	p.endpoint(pA, 1, idA, ifA)
	p.endpoint(pB, 2, idB, ifB)
	p.endpoint(pD, 4, idB, ifD)
	var tunnel IPCacheKind
	if wg {
		tunnel = Tunnel
	}
	p.ipcache("10.99.0.1/32", identity.Host, pNode1, NodeAddr)
	p.ipcache("10.99.0.2/32", identity.RemoteNode, pNode2, NodeAddr)
	p.ipcache("10.244.2.0/24", identity.World, pNode2, PodCIDR|tunnel)
	p.ipcache("10.244.2.2/32", idC, pNode2, RemotePod|tunnel)
	p.policy(pD, []policytypes.Entry{hostAllowed}, policytypes.Defaults{
		IngressEnforce: policytypes.Deny, IngressAudit: policytypes.Deny,
	})
	return p
}

func udp(src, dst netip.Addr, dport uint16) pkt {
	return pkt{src: src, dst: dst, proto: protoUDP, sport: 40000, dport: dport, payload: []byte("marker")}
}

func tcp(src, dst netip.Addr, sport, dport uint16, flags uint8) pkt {
	return pkt{src: src, dst: dst, proto: protoTCP, sport: sport, dport: dport, tcpFlags: flags}
}

// verdictCase is one frame through one program, with the expected verdict
// and, for drops, the reason counted.
type verdictCase struct {
	name    string
	prog    string // from_pod, to_pod, from_netdev, to_netdev, from_tunnel
	ifindex int
	mark    uint32 // skb->mark as the program finds it
	frame   pkt
	want    uint32
	reason  DropReason // for tcShot
}

func (p *progTest) check(c verdictCase) []byte {
	p.t.Helper()
	prog := map[string]*ebpf.Program{
		"from_pod": p.d.fromPod, "to_pod": p.d.toPod, "from_netdev": p.d.fromNetdev,
		"to_netdev": p.d.toNetdev, "from_tunnel": p.d.fromTunnel,
	}[c.prog]
	if prog == nil {
		p.t.Fatalf("%s: no program %q", c.name, c.prog)
	}
	before := uint64(0)
	if c.want == tcShot {
		before = p.dropCount(c.reason)
	}
	ifindex := c.ifindex
	if ifindex == 0 {
		ifindex = ifLoopback
	}
	got, out := p.runMark(prog, c.frame.bytes(), ifindex, c.mark)
	if got != c.want {
		p.t.Errorf("%s: %s returned %d; want %d", c.name, c.prog, got, c.want)
	}
	if c.want == tcShot {
		if after := p.dropCount(c.reason); after != before+1 {
			p.t.Errorf("%s: drops for %s went %d -> %d; want one more", c.name, c.reason, before, after)
		}
	}
	return out
}

func TestVerdictsFromPod(t *testing.T) {
	p := cluster(t, false, false)
	for _, c := range []verdictCase{
		{name: "same node, no policy: redirected into the peer", prog: "from_pod", frame: udp(pA, pB, 53), want: tcRedirect},
		{name: "to a remote pod, plaintext: redirected to the underlay", prog: "from_pod", frame: udp(pA, pC, 53), want: tcRedirect},
		{name: "to the world: the host stack", prog: "from_pod", frame: udp(pA, pWorld, 53), want: tcOK},
		{name: "to this node: the host stack", prog: "from_pod", frame: udp(pA, pNode1, 53), want: tcOK},
		{name: "spoofed source address", prog: "from_pod", frame: udp(addr("10.244.1.99"), pB, 53), want: tcShot, reason: DropSpoofedSource},
		{name: "another pod's address from a's veth", prog: "from_pod", frame: udp(pB, pA, 53), want: tcShot, reason: DropSpoofedSource},
		{name: "ingress-isolated destination", prog: "from_pod", frame: udp(pA, pD, 53), want: tcShot, reason: DropPolicyIngress},
		{name: "non-first fragment", prog: "from_pod", frame: pkt{src: pA, dst: pB, proto: protoUDP, fragOff: 100}, want: tcShot, reason: DropFragment},
	} {
		p.check(c)
	}
}

func TestVerdictRewritesMACsOnLocalDelivery(t *testing.T) {
	p := cluster(t, false, false)
	out := p.check(verdictCase{name: "a to b", prog: "from_pod", frame: udp(pA, pB, 53), want: tcRedirect})
	if !bytes.Equal(out[0:6], macPod) || !bytes.Equal(out[6:12], macHost) {
		t.Errorf("delivered frame: dst %x src %x; want dst %x (the pod) src %x (its gateway)", out[0:6], out[6:12], macPod, macHost)
	}
}

func TestVerdictsEgressPolicy(t *testing.T) {
	p := cluster(t, false, false)
	p.policy(pA, []policytypes.Entry{allow(policytypes.Egress, idB, protoTCP, 80, 16, 7)}, policytypes.Defaults{
		EgressEnforce: policytypes.Deny, EgressAudit: policytypes.Deny,
	})
	for _, c := range []verdictCase{
		{name: "allowed port", prog: "from_pod", frame: tcp(pA, pB, 40000, 80, tcpSYN), want: tcRedirect},
		{name: "other port", prog: "from_pod", frame: tcp(pA, pB, 40000, 81, tcpSYN), want: tcShot, reason: DropPolicyEgress},
		{name: "other protocol", prog: "from_pod", frame: udp(pA, pB, 80), want: tcShot, reason: DropPolicyEgress},
		{name: "other peer", prog: "from_pod", frame: tcp(pA, pC, 40000, 80, tcpSYN), want: tcShot, reason: DropPolicyEgress},
	} {
		p.check(c)
	}
}

func TestVerdictsEncryption(t *testing.T) {
	permissive := cluster(t, false, true)
	permissive.check(verdictCase{name: "remote pod of a peer: into the tunnel", prog: "from_pod", frame: udp(pA, pC, 53), want: tcRedirect})

	strict := cluster(t, true, true)
	strict.d.DeleteIPCache(netip.MustParsePrefix("10.244.2.2/32"))
	strict.ipcache("10.244.2.2/32", idC, pNode2, RemotePod)
	strict.check(verdictCase{name: "strict, remote pod without a tunnel", prog: "from_pod", frame: udp(pA, pC, 53), want: tcShot, reason: DropNoTunnel})
	strict.check(verdictCase{name: "strict, guard: pod to remote pod on the underlay", prog: "to_netdev", frame: udp(pA, pC, 53), want: tcShot, reason: DropLeak})
	strict.check(verdictCase{name: "strict, guard: pod to the world", prog: "to_netdev", frame: udp(pA, pWorld, 53), want: tcOK})
	strict.check(verdictCase{name: "strict, plaintext claiming a remote pod", prog: "from_netdev", frame: udp(pC, pB, 53), want: tcShot, reason: DropLeak})
	if l, err := strict.d.Leaks(); err != nil || len(l) == 0 {
		t.Errorf("strict mode drops recorded no leak: %v %v", l, err)
	}
}

func TestVerdictsToPod(t *testing.T) {
	p := cluster(t, false, false)
	for _, c := range []verdictCase{
		{name: "host to an isolated pod: allowed as host", prog: "to_pod", frame: udp(pNode1, pD, 8080), want: tcOK},
		{name: "world to an isolated pod", prog: "to_pod", frame: udp(pWorld, pD, 8080), want: tcShot, reason: DropPolicyIngress},
		{name: "not an endpoint", prog: "to_pod", frame: udp(pNode1, addr("10.244.1.77"), 80), want: tcShot, reason: DropUnknownEndpoint},
		{name: "not IPv4", prog: "to_pod", frame: pkt{src: pNode1, dst: pD, proto: protoUDP, noEthernet: true}, want: tcShot, reason: DropUnsupportedL3},
	} {
		p.check(c)
	}
}

func TestVerdictsFromNetdev(t *testing.T) {
	p := cluster(t, false, false)
	for _, c := range []verdictCase{
		{name: "remote pod to a local pod", prog: "from_netdev", frame: udp(pC, pB, 53), want: tcRedirect},
		{name: "remote pod to an isolated pod", prog: "from_netdev", frame: udp(pC, pD, 53), want: tcShot, reason: DropPolicyIngress},
		{name: "not for a pod: the host's", prog: "from_netdev", frame: udp(pNode2, pNode1, 53), want: tcOK},
	} {
		p.check(c)
	}
}

func TestVerdictInvalidPacket(t *testing.T) {
	p := cluster(t, false, false)
	frame := udp(pA, pB, 53).bytes()
	before := p.dropCount(DropInvalidPacket)
	got, _ := p.run(p.d.fromPod, frame[:14+20+2], ifA) // UDP header cut short
	if got != tcShot {
		t.Errorf("truncated UDP: verdict %d; want %d", got, tcShot)
	}
	if after := p.dropCount(DropInvalidPacket); after != before+1 {
		t.Errorf("invalid-packet drops %d -> %d; want one more", before, after)
	}
}

func TestVerdictRepliesRideConntrack(t *testing.T) {
	p := cluster(t, false, false)
	p.policy(pA, nil, policytypes.Defaults{
		IngressEnforce: policytypes.Deny, IngressAudit: policytypes.Deny,
		EgressEnforce: policytypes.Allow, EgressAudit: policytypes.Allow,
	})
	// a opens a connection to remote pod c; c's reply from the underlay is
	// established, although a denies all ingress.
	p.check(verdictCase{name: "a opens", prog: "from_pod", frame: tcp(pA, pC, 40000, 80, tcpSYN), want: tcRedirect})
	p.check(verdictCase{name: "c replies", prog: "from_netdev", frame: tcp(pC, pA, 80, 40000, tcpSYN|tcpACK), want: tcRedirect})
	p.check(verdictCase{name: "c opens its own", prog: "from_netdev", frame: tcp(pC, pA, 81, 40000, tcpSYN), want: tcShot, reason: DropPolicyIngress})
}

// A connection whose first packet the host stack carried — a pod's to an
// address no pod holds (a ClusterIP that kube-proxy translates, the API
// server, the world), or one the stack delivered into a pod (to_pod: a
// translated connection to a backend, the host's own) — keeps the stack
// for its replies: handed straight into a pod (or the tunnel) they would
// miss netfilter, whose connection tracking undoes the translation and
// which, in kube-proxy's iptables mode, drops the next packets of a
// connection whose reply it never saw as INVALID.
func TestVerdictRepliesOfStackConnectionsKeepTheStack(t *testing.T) {
	p := cluster(t, false, false)
	p.endpoint(pB, 2, idB, ifLoopback) // b's frames arrive on the harness's device
	vip := addr("10.96.0.10")
	p.check(verdictCase{name: "a to a ClusterIP: the stack translates", prog: "from_pod", frame: tcp(pA, vip, 40100, 53, tcpSYN), want: tcOK})
	p.check(verdictCase{name: "the reply from the underlay goes up the stack", prog: "from_netdev", frame: tcp(vip, pA, 53, 40100, tcpSYN|tcpACK), want: tcOK})
	p.check(verdictCase{name: "the stack delivers it", prog: "to_pod", frame: tcp(vip, pA, 53, 40100, tcpSYN|tcpACK), want: tcOK})

	// kube-proxy translated a's connection to local backend b: b's reply
	// goes up the stack too, where it is turned back into the ClusterIP's.
	p.check(verdictCase{name: "translated a -> b delivered by the stack", prog: "to_pod", frame: tcp(pA, pB, 40200, 80, tcpSYN), want: tcOK})
	p.check(verdictCase{name: "b's reply to a goes up the stack", prog: "from_pod", frame: tcp(pB, pA, 80, 40200, tcpSYN|tcpACK), want: tcOK})

	// Pod-to-pod connections that never met the stack keep the direct way.
	p.check(verdictCase{name: "a opens to b directly", prog: "from_pod", frame: tcp(pA, pB, 40300, 80, tcpSYN), want: tcRedirect})
	p.check(verdictCase{name: "b answers directly", prog: "from_pod", frame: tcp(pB, pA, 80, 40300, tcpSYN|tcpACK), want: tcRedirect})
}

// Issue 14: with the socket hooks off, kube-proxy translates a pod's
// connection to a ClusterIP in the stack, toward a backend on another node.
// The backend answers from its own address, a tuple Veil's conntrack never
// saw (it knows client -> ClusterIP). That reply must go up the stack, where
// netfilter turns it back into the ClusterIP's and to_pod judges it; handed
// straight to the pod it would reach a socket that never talked to the
// backend and be reset.
func TestVerdictRemoteBackendRepliesOfStackConnectionsKeepTheStack(t *testing.T) {
	vip := addr("10.96.0.10")

	t.Run("underlay", func(t *testing.T) {
		p := cluster(t, false, false)
		p.check(verdictCase{name: "a to a ClusterIP: the stack translates", prog: "from_pod", frame: tcp(pA, vip, 40400, 80, tcpSYN), want: tcOK})
		p.check(verdictCase{name: "the remote backend's SYN-ACK goes up the stack", prog: "from_netdev", frame: tcp(pC, pA, 8080, 40400, tcpSYN|tcpACK), want: tcOK})
		p.check(verdictCase{name: "and its later segments", prog: "from_netdev", frame: tcp(pC, pA, 8080, 40400, tcpACK), want: tcOK})

		dns := udp(pA, vip, 53)
		p.check(verdictCase{name: "a to the DNS ClusterIP: the stack translates", prog: "from_pod", frame: dns, want: tcOK})
		reply := pkt{src: pC, dst: pA, proto: protoUDP, sport: 53, dport: dns.sport, payload: []byte("answer")}
		p.check(verdictCase{name: "the remote DNS backend's answer goes up the stack", prog: "from_netdev", frame: reply, want: tcOK})

		// Ports a never used through the stack keep the direct way.
		p.check(verdictCase{name: "c opens to a directly", prog: "from_netdev", frame: tcp(pC, pA, 40500, 80, tcpSYN), want: tcRedirect})
		p.check(verdictCase{name: "another port of a, same protocol", prog: "from_netdev", frame: tcp(pC, pA, 8080, 40401, tcpSYN|tcpACK), want: tcRedirect})
		p.check(verdictCase{name: "a's stack port, other protocol", prog: "from_netdev", frame: pkt{src: pC, dst: pA, proto: protoUDP, sport: 8080, dport: 40400, payload: []byte("x")}, want: tcRedirect})
	})

	t.Run("tunnel", func(t *testing.T) {
		// Out of the tunnel frames start at the IP header; see
		// TestNodePortReplyOutOfTheTunnel for why the backend is 8.0.x.x.
		backend := addr("8.0.2.2")
		p := clusterWith(t, Config{NodeIP: pNode1}, true)
		p.ipcache("8.0.2.2/32", idC, pNode2, RemotePod|Tunnel)
		p.check(verdictCase{name: "a to a ClusterIP: the stack translates", prog: "from_pod", frame: tcp(pA, vip, 40600, 80, tcpSYN), want: tcOK})
		synAck := pkt{src: backend, dst: pA, proto: protoTCP, sport: 8080, dport: 40600, tcpFlags: tcpSYN | tcpACK, noEthernet: true}
		p.check(verdictCase{name: "the remote backend's SYN-ACK out of the tunnel goes up the stack", prog: "from_tunnel", frame: synAck, want: tcOK})
		other := pkt{src: backend, dst: pA, proto: protoTCP, sport: 40700, dport: 80, tcpFlags: tcpSYN, noEthernet: true}
		p.check(verdictCase{name: "a new connection out of the tunnel is delivered directly", prog: "from_tunnel", frame: other, want: tcRedirect})
	})
}
