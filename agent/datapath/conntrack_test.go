package datapath

import (
	"net/netip"

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
