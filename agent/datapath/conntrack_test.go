package datapath

import (
	"fmt"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// Connection tracking (issue 12): what rides an entry and what policy judges.

// isolated makes ip default-deny for ingress, open for egress: what a
// client pod under a namespace's default-deny ingress policy gets.
func (p *progTest) isolated(ip netip.Addr) {
	p.t.Helper()
	p.policy(ip, nil, ingressDefaultDeny)
}

func icmpEcho(src, dst netip.Addr, typ uint8, id uint16) pkt {
	return pkt{src: src, dst: dst, proto: protoICMP, icmpType: typ, icmpID: id, payload: []byte("ping")}
}

const (
	icmpEchoReply    = 0
	icmpUnreachable  = 3
	icmpEchoRequest  = 8
	icmpTimeExceeded = 11
)

// Issue 12, item 4: a SYN in the reverse direction of an existing entry is a
// new connection attempt by the other side, which policy must judge.
func TestConntrackReverseSYNIsJudgedByPolicy(t *testing.T) {
	p := cluster(t, false, false)
	p.isolated(pA)
	p.check(verdictCase{name: "a opens to c", prog: "from_pod", frame: tcp(pA, pC, 40000, 80, tcpSYN), want: tcRedirect})
	p.check(verdictCase{name: "c opens from the reply tuple", prog: "from_netdev", frame: tcp(pC, pA, 80, 40000, tcpSYN), want: tcShot, reason: DropPolicyIngress})
	p.check(verdictCase{name: "c's SYN-ACK still rides", prog: "from_netdev", frame: tcp(pC, pA, 80, 40000, tcpSYN|tcpACK), want: tcRedirect})
}

// Issue 12, item 4: an echo request and its reply are different things; a
// peer may not ping a pod by reusing the echo id of the pod's own ping.
func TestConntrackEchoRequestDoesNotRideReplyEntry(t *testing.T) {
	p := cluster(t, false, false)
	p.isolated(pA)
	p.check(verdictCase{name: "a pings c", prog: "from_pod", frame: icmpEcho(pA, pC, icmpEchoRequest, 7), want: tcRedirect})
	p.check(verdictCase{name: "c pings a with a's echo id", prog: "from_netdev", frame: icmpEcho(pC, pA, icmpEchoRequest, 7), want: tcShot, reason: DropPolicyIngress})
	p.check(verdictCase{name: "c's echo reply rides", prog: "from_netdev", frame: icmpEcho(pC, pA, icmpEchoReply, 7), want: tcRedirect})
	p.check(verdictCase{name: "an echo reply nobody asked for", prog: "from_netdev", frame: icmpEcho(pC, pA, icmpEchoReply, 8), want: tcShot, reason: DropPolicyIngress})
}

// Issue 12, item 6: a revocation re-check asks policy about an ICMP
// connection by its ICMP type and code (what policy entries hold), never by
// its echo id. Here the id, read as a port, would be type 3 code 0.
func TestConntrackRecheckJudgesICMPByType(t *testing.T) {
	p := cluster(t, false, false)
	p.check(verdictCase{name: "a pings c", prog: "from_pod", frame: icmpEcho(pA, pC, icmpEchoRequest, icmpUnreachable<<8), want: tcRedirect})
	var asked []FlowKey
	n, err := p.d.EvictFlows(func(k FlowKey) bool {
		asked = append(asked, k)
		// The policy now allows pings only.
		return !(k.Proto == protoICMP && k.DstPort == icmpEchoRequest<<8)
	})
	if err != nil {
		t.Fatalf("EvictFlows: %v", err)
	}
	if n != 0 {
		t.Errorf("EvictFlows removed %d connections, asked about %+v; want the allowed ping kept", n, asked)
	}
	flows, err := p.d.Flows()
	if err != nil {
		t.Fatalf("Flows: %v", err)
	}
	if len(flows) != 1 || flows[0].DstPort != icmpEchoRequest<<8 {
		t.Errorf("flows %+v; want one ping, DstPort = echo request type << 8", flows)
	}
}

// icmpError is an ICMP error from src to dst about the packet about.
func icmpError(src, dst netip.Addr, typ, code uint8, about pkt) pkt {
	return pkt{src: src, dst: dst, proto: protoICMP, icmpType: typ, icmpCode: code, inner: about.ipHeader()}
}

const (
	codePortUnreachable = 3
	codeFragNeeded      = 4
)

// Issue 12, item 2: ICMP errors about a tracked connection are related to
// it and pass where policy would drop them (path-MTU discovery, port
// unreachable); errors about nothing tracked, or sent to someone other than
// the sender of the packet they quote, are judged by policy.
func TestConntrackICMPErrorsAreRelated(t *testing.T) {
	p := cluster(t, false, false)
	p.isolated(pA)
	open := tcp(pA, pC, 40000, 80, tcpSYN)
	query := udp(pA, pC, 53)
	ping := icmpEcho(pA, pC, icmpEchoRequest, 9)
	for _, c := range []verdictCase{
		{name: "a opens to c", prog: "from_pod", frame: open, want: tcRedirect},
		{name: "a queries c", prog: "from_pod", frame: query, want: tcRedirect},
		{name: "a pings c", prog: "from_pod", frame: ping, want: tcRedirect},
		{name: "a router: fragmentation needed, to a", prog: "from_netdev", frame: icmpError(pNode2, pA, icmpUnreachable, codeFragNeeded, tcp(pA, pC, 40000, 80, tcpACK)), want: tcRedirect},
		{name: "c: port unreachable, to a", prog: "from_netdev", frame: icmpError(pC, pA, icmpUnreachable, codePortUnreachable, query), want: tcRedirect},
		{name: "a router: time exceeded by a's ping", prog: "from_netdev", frame: icmpError(pNode2, pA, icmpTimeExceeded, 0, ping), want: tcRedirect},
		{name: "an error about a connection a never had", prog: "from_netdev", frame: icmpError(pC, pA, icmpUnreachable, codePortUnreachable, udp(pA, pC, 54)), want: tcShot, reason: DropPolicyIngress},
		{name: "an error quoting a packet its destination did not send", prog: "from_netdev", frame: icmpError(pC, pA, icmpUnreachable, codePortUnreachable, udp(pC, pA, 53)), want: tcShot, reason: DropPolicyIngress},
		{name: "a truncated quote", prog: "from_netdev", frame: pkt{src: pC, dst: pA, proto: protoICMP, icmpType: icmpUnreachable, icmpCode: codeFragNeeded, inner: open.ipHeader()[:20]}, want: tcShot, reason: DropPolicyIngress},
	} {
		p.check(c)
	}
}

// Issue 12, item 2, the other way round: errors about packets that the
// responder of a connection sent go back to the responder, here an
// ingress- and egress-isolated pod that admits c on TCP 80 and UDP 53.
func TestConntrackICMPErrorsToTheResponder(t *testing.T) {
	p := cluster(t, false, false)
	p.policy(pA, []policytypes.Entry{
		allow(policytypes.Ingress, idC, protoTCP, 80, 16, 1),
		allow(policytypes.Ingress, idC, protoUDP, 53, 16, 2),
	}, policytypes.Defaults{
		IngressEnforce: policytypes.Deny, IngressAudit: policytypes.Deny,
		EgressEnforce: policytypes.Deny, EgressAudit: policytypes.Deny,
	})
	query := pkt{src: pC, dst: pA, proto: protoUDP, sport: 33000, dport: 53, payload: []byte("q")}
	for _, c := range []verdictCase{
		{name: "c opens to a:80", prog: "from_netdev", frame: tcp(pC, pA, 41000, 80, tcpSYN), want: tcRedirect},
		{name: "a router: a's reply needs fragmenting", prog: "from_netdev", frame: icmpError(pNode2, pA, icmpUnreachable, codeFragNeeded, tcp(pA, pC, 80, 41000, tcpACK)), want: tcRedirect},
		{name: "c queries a:53", prog: "from_netdev", frame: query, want: tcRedirect},
		{name: "a: port unreachable, to c", prog: "from_pod", frame: icmpError(pA, pC, icmpUnreachable, codePortUnreachable, query), want: tcRedirect},
		{name: "a: port unreachable about a query never made", prog: "from_pod", frame: icmpError(pA, pC, icmpUnreachable, codePortUnreachable, udp(pC, pA, 54)), want: tcShot, reason: DropPolicyEgress},
	} {
		p.check(c)
	}
}

// fragments splits a UDP datagram of src to dst:dport into a first fragment
// (with the UDP header) and a last one, with IP id id.
func fragments(src, dst netip.Addr, dport, id uint16) (first, last pkt) {
	first = pkt{src: src, dst: dst, proto: protoUDP, sport: 40000, dport: dport, ipID: id, moreFrags: true, payload: make([]byte, 1200)}
	last = pkt{src: src, dst: dst, proto: protoUDP, ipID: id, fragOff: 1208 / 8, payload: make([]byte, 300)}
	return first, last
}

// Issue 12, item 3: later fragments carry no ports; they get the verdict of
// their first fragment, whose ports are remembered, and are dropped when
// it was not seen.
func TestConntrackFragmentsFollowTheirFirst(t *testing.T) {
	p := cluster(t, false, false)
	p.policy(pB, []policytypes.Entry{allow(policytypes.Ingress, idC, protoUDP, 53, 16, 1)}, ingressDefaultDeny)
	okFirst, okLast := fragments(pA, pC, 53, 100)
	inFirst, inLast := fragments(pC, pB, 53, 101)
	badFirst, badLast := fragments(pC, pB, 54, 102)
	_, lone := fragments(pC, pB, 53, 103)
	for _, c := range []verdictCase{
		{name: "a to c: first fragment", prog: "from_pod", frame: okFirst, want: tcRedirect},
		{name: "a to c: last fragment", prog: "from_pod", frame: okLast, want: tcRedirect},
		{name: "c to b:53 (allowed): first fragment", prog: "from_netdev", frame: inFirst, want: tcRedirect},
		{name: "c to b:53 (allowed): last fragment", prog: "from_netdev", frame: inLast, want: tcRedirect},
		{name: "c to b:54 (denied): first fragment", prog: "from_netdev", frame: badFirst, want: tcShot, reason: DropPolicyIngress},
		{name: "c to b:54 (denied): last fragment", prog: "from_netdev", frame: badLast, want: tcShot, reason: DropPolicyIngress},
		{name: "a fragment whose first was never seen", prog: "from_netdev", frame: lone, want: tcShot, reason: DropFragment},
		{name: "the same, from a pod", prog: "from_pod", frame: pkt{src: pA, dst: pB, proto: protoUDP, ipID: 104, fragOff: 100}, want: tcShot, reason: DropFragment},
	} {
		p.check(c)
	}
}

// flowSet renders the connection table as "src:sport>dst:dport/proto".
func (p *progTest) flowSet() map[string]bool {
	p.t.Helper()
	flows, err := p.d.Flows()
	if err != nil {
		p.t.Fatalf("Flows: %v", err)
	}
	out := map[string]bool{}
	for _, f := range flows {
		out[fmt.Sprintf("%s:%d>%s:%d/%d", f.Src, f.SrcPort, f.Dst, f.DstPort, f.Proto)] = true
	}
	return out
}

// Issue 12, item 5: idle lifetimes by protocol and TCP state, and the
// garbage collector that deletes what has expired. With two-second
// lifetimes for everything but established TCP, after 2.5 s only the
// established connection is alive; an expired UDP reply faces policy.
func TestConntrackLifetimesAndGC(t *testing.T) {
	const life = 2 * time.Second // the setup must take less
	p := newProgTestCT(t, CTTimeouts{TCPEstablished: time.Hour, TCPOpening: life, TCPClosing: life, UDP: life, ICMP: life}, 0)
	for _, c := range []verdictCase{
		{name: "udp: a queries c", prog: "from_pod", frame: udp(pA, pC, 53), want: tcRedirect},
		{name: "udp: c answers", prog: "from_netdev", frame: udp(pA, pC, 53).reply(), want: tcRedirect},
		{name: "icmp: a pings c", prog: "from_pod", frame: icmpEcho(pA, pC, icmpEchoRequest, 5), want: tcRedirect},
		{name: "tcp established: SYN", prog: "from_pod", frame: tcp(pA, pC, 40000, 80, tcpSYN), want: tcRedirect},
		{name: "tcp established: SYN-ACK", prog: "from_netdev", frame: tcp(pC, pA, 80, 40000, tcpSYN|tcpACK), want: tcRedirect},
		{name: "tcp closed: SYN", prog: "from_pod", frame: tcp(pA, pC, 40001, 80, tcpSYN), want: tcRedirect},
		{name: "tcp closed: SYN-ACK", prog: "from_netdev", frame: tcp(pC, pA, 80, 40001, tcpSYN|tcpACK), want: tcRedirect},
		{name: "tcp closed: FIN from a", prog: "from_pod", frame: tcp(pA, pC, 40001, 80, tcpFIN|tcpACK), want: tcRedirect},
		{name: "tcp closed: FIN from c", prog: "from_netdev", frame: tcp(pC, pA, 80, 40001, tcpFIN|tcpACK), want: tcRedirect},
		{name: "tcp reset: SYN", prog: "from_pod", frame: tcp(pA, pC, 40002, 80, tcpSYN), want: tcRedirect},
		{name: "tcp reset: SYN-ACK", prog: "from_netdev", frame: tcp(pC, pA, 80, 40002, tcpSYN|tcpACK), want: tcRedirect},
		{name: "tcp reset: RST from c", prog: "from_netdev", frame: tcp(pC, pA, 80, 40002, tcpRST|tcpACK), want: tcRedirect},
		{name: "tcp opening: SYN nobody answers", prog: "from_pod", frame: tcp(pA, pC, 40003, 80, tcpSYN), want: tcRedirect},
	} {
		p.check(c)
	}
	if got := len(p.flowSet()); got != 6 {
		t.Fatalf("%d connections before expiry; want 6: %v", got, p.flowSet())
	}
	if st, err := p.d.GCConntrack(1 << 20); err != nil || st.Deleted != 0 || !st.Wrapped {
		t.Errorf("GC before expiry: %+v, %v; want nothing deleted, a whole pass", st, err)
	}
	time.Sleep(life + 500*time.Millisecond)
	p.check(verdictCase{name: "udp: c answers after the lifetime", prog: "from_netdev", frame: udp(pA, pC, 53).reply(), want: tcShot, reason: DropPolicyIngress})
	st, err := p.d.GCConntrack(1 << 20)
	if err != nil {
		t.Fatalf("GC: %v", err)
	}
	want := map[string]bool{fmt.Sprintf("%s:40000>%s:80/6", pA, pC): true}
	if got := p.flowSet(); st.Deleted != 5 || !reflect.DeepEqual(got, want) {
		t.Errorf("after GC (%+v): connections %v; want only %v", st, got, want)
	}
}

// The GC does bounded work per pass and resumes where it stopped.
func TestConntrackGCIsBounded(t *testing.T) {
	p := newProgTestCT(t, CTTimeouts{UDP: time.Second}, 0)
	for port := uint16(1); port <= 3000; port++ {
		p.run(p.d.fromPod, udp(pA, pC, port).bytes(), ifA)
	}
	time.Sleep(1100 * time.Millisecond)
	total, passes := 0, 0
	for {
		st, err := p.d.GCConntrack(1024)
		if err != nil {
			t.Fatalf("GC: %v", err)
		}
		if st.Scanned > 1024+gcBatch {
			t.Errorf("one pass scanned %d entries; want at most about 1024", st.Scanned)
		}
		total += st.Deleted
		passes++
		if st.Wrapped {
			break
		}
	}
	if total != 3000 || passes < 3 {
		t.Errorf("GC deleted %d in %d passes; want 3000 in at least 3", total, passes)
	}
}

// Issue 12, item 5: a reply that finds no entry (the LRU evicted it, the
// GC or an agent restart lost it) is judged as the connection it answers:
// a TCP segment with ACK passes when policy allows the opposite direction
// on the port it comes from, and its entry is written again. Not a SYN,
// nor UDP, whose replies cannot be told from new datagrams.
func TestConntrackLostEntryReplyIsRederived(t *testing.T) {
	p := cluster(t, false, false)
	p.policy(pA, []policytypes.Entry{allow(policytypes.Egress, idC, protoTCP, 80, 16, 1)}, policytypes.Defaults{
		IngressEnforce: policytypes.Deny, IngressAudit: policytypes.Deny,
		EgressEnforce: policytypes.Deny, EgressAudit: policytypes.Deny,
	})
	p.endpoint(pB, 2, idB, ifLoopback) // b sends in this test
	p.policy(pB, []policytypes.Entry{allow(policytypes.Ingress, idC, protoTCP, 8080, 16, 2)}, policytypes.Defaults{
		IngressEnforce: policytypes.Deny, IngressAudit: policytypes.Deny,
		EgressEnforce: policytypes.Deny, EgressAudit: policytypes.Deny,
	})
	for _, c := range []verdictCase{
		{name: "a opens to c:80", prog: "from_pod", frame: tcp(pA, pC, 40000, 80, tcpSYN), want: tcRedirect},
		{name: "c opens to b:8080", prog: "from_netdev", frame: tcp(pC, pB, 41000, 8080, tcpSYN), want: tcRedirect},
	} {
		p.check(c)
	}
	p.loseEntries()
	for _, c := range []verdictCase{
		{name: "c's SYN-ACK to a", prog: "from_netdev", frame: tcp(pC, pA, 80, 40000, tcpSYN|tcpACK), want: tcRedirect},
		{name: "b's data to c", prog: "from_pod", frame: tcp(pB, pC, 8080, 41000, tcpACK), want: tcRedirect},
		{name: "c's ACK from a port a may not reach", prog: "from_netdev", frame: tcp(pC, pA, 81, 40000, tcpACK), want: tcShot, reason: DropPolicyIngress},
		{name: "c's SYN from a's peer port", prog: "from_netdev", frame: tcp(pC, pA, 80, 40001, tcpSYN), want: tcShot, reason: DropPolicyIngress},
		{name: "b's data from a port c may not reach", prog: "from_pod", frame: tcp(pB, pC, 8081, 41000, tcpACK), want: tcShot, reason: DropPolicyEgress},
		{name: "udp from a's peer port", prog: "from_netdev", frame: pkt{src: pC, dst: pA, proto: protoUDP, sport: 80, dport: 40000}, want: tcShot, reason: DropPolicyIngress},
	} {
		p.check(c)
	}
	want := map[string]bool{
		fmt.Sprintf("%s:40000>%s:80/6", pA, pC):   true,
		fmt.Sprintf("%s:41000>%s:8080/6", pC, pB): true,
	}
	if got := p.flowSet(); !reflect.DeepEqual(got, want) {
		t.Errorf("connections %v; want the two written again as opened: %v", got, want)
	}
	p.check(verdictCase{name: "a's next segment rides the entry", prog: "from_pod", frame: tcp(pA, pC, 40000, 80, tcpACK), want: tcRedirect})
}

// Issue 12, item 5: one pod churning through far more connections than the
// table holds does not break another pod's long-lived connection under
// default deny, though the LRU evicts its entry: with a small table, and
// (unless -short) 300k connections through a table of the default size.
func TestConntrackChurnDoesNotBreakAnotherPodsConnection(t *testing.T) {
	t.Run("1024 entries", func(t *testing.T) { testChurn(t, 1024, 8*1024) })
	t.Run("default size, 300k connections", func(t *testing.T) {
		if testing.Short() {
			t.Skip("300k connections take seconds")
		}
		testChurn(t, 0, 300000)
	})
}

// testChurn opens connections from pod b, each a SYN and its SYN-ACK, until
// pod a's established connection loses its entry (at most churn of them),
// then checks that a's connection still carries data.
func testChurn(t *testing.T, size uint32, churn int) {
	p := newProgTestCT(t, CTTimeouts{}, size)
	p.endpoint(pB, 2, idB, ifLoopback) // b sends in this test
	p.check(verdictCase{name: "a opens to c", prog: "from_pod", frame: tcp(pA, pC, 40000, 80, tcpSYN), want: tcRedirect})
	p.check(verdictCase{name: "c answers", prog: "from_netdev", frame: tcp(pC, pA, 80, 40000, tcpSYN|tcpACK), want: tcRedirect})
	long := podCtKey{Saddr: ip4ToU32(pA), Daddr: ip4ToU32(pC), Sport: 40000, Dport: 80, Proto: protoTCP}
	tracked := func() bool {
		var v podCtEntry
		return p.d.ct.Lookup(&long, &v) == nil
	}
	const step = 1024
	opened := 0
	for ; opened < churn && tracked(); opened += step {
		for j := opened; j < opened+step; j++ {
			syn := tcp(pB, pC, uint16(1024+j%60000), uint16(1+j/60000), tcpSYN)
			synAck := syn.reply()
			synAck.tcpFlags = tcpSYN | tcpACK
			if got, _ := p.run(p.d.fromPod, syn.bytes(), ifLoopback); got != tcRedirect {
				t.Fatalf("churn connection %d: SYN verdict %d", j, got)
			}
			if got, _ := p.run(p.d.fromNetdev, synAck.bytes(), ifLoopback); got != tcRedirect {
				t.Fatalf("churn connection %d: SYN-ACK verdict %d", j, got)
			}
		}
	}
	if tracked() {
		t.Fatalf("the churn did not evict a's entry: the test proves nothing")
	}
	t.Logf("a's entry was evicted within %d connections of b", opened)
	p.check(verdictCase{name: "c's data to a after the churn", prog: "from_netdev", frame: tcp(pC, pA, 80, 40000, tcpACK), want: tcRedirect})
	if !tracked() {
		t.Errorf("a's connection was not written again")
	}
}

// newProgTestCT is the cluster fixture with a isolated for ingress (a
// client under default deny), and the given conntrack lifetimes and size.
func newProgTestCT(t *testing.T, timeouts CTTimeouts, size uint32) *progTest {
	t.Helper()
	p := newProgTest(t, Config{NodeIP: pNode1, CTTimeouts: timeouts, CTMaxEntries: size}, true, false)
	p.endpoint(pA, 1, idA, ifA)
	p.ipcache("10.99.0.2/32", identity.RemoteNode, pNode2, NodeAddr)
	p.ipcache("10.244.2.0/24", identity.World, pNode2, PodCIDR)
	p.ipcache("10.244.2.2/32", idC, pNode2, RemotePod)
	p.isolated(pA)
	return p
}

// reply is k as its peer answers it.
func (k pkt) reply() pkt {
	k.src, k.dst = k.dst, k.src
	k.sport, k.dport = k.dport, k.sport
	return k
}

// loseEntries deletes every conntrack entry, as LRU eviction or the garbage
// collector would.
func (p *progTest) loseEntries() {
	p.t.Helper()
	var (
		k    podCtKey
		v    podCtEntry
		keys []podCtKey
	)
	it := p.d.ct.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	for _, k := range keys {
		if err := p.d.ct.Delete(&k); err != nil {
			p.t.Fatalf("delete entry: %v", err)
		}
	}
}

// Issue 12, item 5: a revoked connection is not a lost one. Its segments
// face policy and may not pass as replies of the opposite connection,
// though policy would allow that one; nor may they ride an entry the peer
// opens the other way.
func TestConntrackRevokedConnectionIsNotRederived(t *testing.T) {
	p := cluster(t, false, false)
	p.endpoint(pB, 2, idB, ifLoopback) // b sends in this test
	p.policy(pB, []policytypes.Entry{allow(policytypes.Ingress, idA, protoTCP, 5002, 16, 1)}, ingressDefaultDeny)
	p.check(verdictCase{name: "a opens to b:5002", prog: "from_pod", frame: tcp(pA, pB, 40000, 5002, tcpSYN), want: tcRedirect})
	p.check(verdictCase{name: "b answers", prog: "from_pod", frame: tcp(pB, pA, 5002, 40000, tcpSYN|tcpACK), want: tcRedirect})

	p.policy(pB, nil, ingressDefaultDeny)
	if n, err := p.d.EvictFlows(func(k FlowKey) bool { return k.Dst == pB && k.DstPort == 5002 }); err != nil || n != 1 {
		t.Fatalf("EvictFlows: %d, %v; want one connection revoked", n, err)
	}
	for _, c := range []verdictCase{
		{name: "a's data after the revocation", prog: "from_pod", frame: tcp(pA, pB, 40000, 5002, tcpACK), want: tcShot, reason: DropPolicyIngress},
		{name: "b's ACK: b may reach a", prog: "from_pod", frame: tcp(pB, pA, 5002, 40000, tcpACK), want: tcRedirect},
		{name: "a's data does not ride b's entry", prog: "from_pod", frame: tcp(pA, pB, 40000, 5002, tcpACK), want: tcShot, reason: DropPolicyIngress},
	} {
		p.check(c)
	}
	p.policy(pB, []policytypes.Entry{allow(policytypes.Ingress, idA, protoTCP, 5002, 16, 1)}, ingressDefaultDeny)
	p.check(verdictCase{name: "allowed again: a's data", prog: "from_pod", frame: tcp(pA, pB, 40000, 5002, tcpACK), want: tcRedirect})
	flows, err := p.d.Flows()
	if err != nil {
		t.Fatalf("Flows: %v", err)
	}
	for _, f := range flows {
		if f.Revoked {
			t.Errorf("connection %+v still revoked after policy allowed it again", f)
		}
	}
}

// Issue 12, item 2: ICMP errors the host stack routes to a pod (here from
// a router in the world) are related too. (from_tunnel shares the lookup;
// BPF_PROG_RUN cannot hand it an L3 packet.)
func TestConntrackICMPErrorsFromTheHostStack(t *testing.T) {
	p := cluster(t, false, false)
	p.isolated(pA)
	router := addr("198.51.100.1")
	for _, c := range []verdictCase{
		{name: "a opens to the world", prog: "from_pod", frame: tcp(pA, pWorld, 40001, 443, tcpSYN), want: tcOK},
		{name: "a router's fragmentation needed", prog: "to_pod", frame: icmpError(router, pA, icmpUnreachable, codeFragNeeded, tcp(pA, pWorld, 40001, 443, tcpACK)), want: tcOK},
		{name: "a router's error about nothing tracked", prog: "to_pod", frame: icmpError(router, pA, icmpUnreachable, codeFragNeeded, tcp(pA, pWorld, 40003, 443, tcpACK)), want: tcShot, reason: DropPolicyIngress},
	} {
		p.check(c)
	}
}
