package datapath

import (
	"testing"

	"github.com/veilmesh/veil/policy/identity"
)

// Issue 10, item 1: a packet from the wire that claims to come from this
// node's own address must never get the host identity (which every
// ingress-isolated pod admits), whichever device brings it.
func TestVerdictForgedHostSourceIsDropped(t *testing.T) {
	p := cluster(t, false, true)
	// A second address of this node (issue 10, item 7): the agent writes
	// every address of its own node as host.
	p.ipcache("172.16.0.1/32", identity.Host, pNode1, NodeAddr)
	for _, c := range []verdictCase{
		{name: "underlay, src = node address, to an isolated pod", prog: "from_netdev", frame: udp(pNode1, pD, 9999), want: tcShot, reason: DropSpoofedSource},
		{name: "underlay, src = the node's second address", prog: "from_netdev", frame: udp(addr("172.16.0.1"), pD, 9999), want: tcShot, reason: DropSpoofedSource},
		{name: "underlay, src = node address, to an open pod", prog: "from_netdev", frame: udp(pNode1, pB, 9999), want: tcShot, reason: DropSpoofedSource},
	} {
		p.check(c)
	}
}

// Issue 10, item 2: when a peer has a tunnel, its pods' addresses are only
// believed from the tunnel device, in permissive mode too.
func TestVerdictPlaintextFromTunnelledPeerIsDropped(t *testing.T) {
	p := cluster(t, false, true)
	p.check(verdictCase{name: "underlay, src = remote pod of a peer", prog: "from_netdev", frame: udp(pC, pB, 53), want: tcShot, reason: DropUnencryptedPeer})
	p.check(verdictCase{name: "underlay, src = the peer's pod CIDR", prog: "from_netdev", frame: udp(addr("10.244.2.77"), pB, 53), want: tcShot, reason: DropUnencryptedPeer})
	// Without a tunnel to that node, plaintext is how its pods arrive.
	plain := cluster(t, false, false)
	plain.check(verdictCase{name: "no tunnel: remote pod over the underlay", prog: "from_netdev", frame: udp(pC, pB, 53), want: tcRedirect})
}

// Issue 10, item 7: kubelet probes from another address of this node are the
// host, not the world.
func TestVerdictHostFromSecondNodeAddress(t *testing.T) {
	p := cluster(t, false, false)
	p.ipcache("172.16.0.1/32", identity.Host, pNode1, NodeAddr)
	p.check(verdictCase{name: "probe from the node's second address", prog: "to_pod", frame: udp(addr("172.16.0.1"), pD, 8080), want: tcOK})
}
