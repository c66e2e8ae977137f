package datapath

import (
	"net/netip"

	"github.com/veilmesh/veil/policy"

	"testing"
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
	p.policy(pA, []policy.Entry{
		allow(policy.Ingress, idC, protoTCP, 80, 16, 1),
		allow(policy.Ingress, idC, protoUDP, 53, 16, 2),
	}, policy.Defaults{
		IngressEnforce: policy.Deny, IngressAudit: policy.Deny,
		EgressEnforce: policy.Deny, EgressAudit: policy.Deny,
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
	p.policy(pB, []policy.Entry{allow(policy.Ingress, idC, protoUDP, 53, 16, 1)}, ingressDefaultDeny)
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
