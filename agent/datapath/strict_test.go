package datapath

import (
	"net/netip"
	"testing"

	"github.com/veilmesh/veil/policy/identity"
)

// Issue 11, strict mode completeness: no byte a pod sent leaves for another
// node outside WireGuard, whatever its destination and whatever the host
// stack did to it after from_pod.

const markFromPod = uint32(podMarkMARK_FROM_POD)

func strictCluster(t *testing.T) *progTest {
	t.Helper()
	p := clusterWith(t, Config{NodeIP: pNode1, StrictMode: true, ClusterCIDR: netip.MustParsePrefix("10.244.0.0/16")}, true)
	// Node 2 is a WireGuard peer: its own address is reached through the
	// tunnel as its pods are.
	p.ipcache("10.99.0.2/32", identity.RemoteNode, pNode2, NodeAddr|Tunnel)
	// Node 3 has no tunnel yet.
	p.ipcache("10.99.0.3/32", identity.RemoteNode, addr("10.99.0.3"), NodeAddr)
	return p
}

func TestVerdictStrictGuardMasqueradedPodTraffic(t *testing.T) {
	p := strictCluster(t)
	masq := udp(pNode1, pC, 53) // the host rewrote the pod's source
	p.check(verdictCase{name: "masqueraded pod packet to a remote pod", prog: "to_netdev", frame: masq, mark: markFromPod, want: tcShot, reason: DropLeak})
	p.check(verdictCase{name: "masqueraded pod packet to a remote node", prog: "to_netdev", frame: udp(pNode1, pNode2, 30080), mark: markFromPod, want: tcShot, reason: DropLeak})
	p.check(verdictCase{name: "masqueraded pod packet to the world", prog: "to_netdev", frame: udp(pNode1, pWorld, 53), mark: markFromPod, want: tcOK})
	p.check(verdictCase{name: "the host's own packet to a remote node", prog: "to_netdev", frame: udp(pNode1, pNode2, 10250), want: tcOK})
	p.check(verdictCase{name: "the host's own packet to a remote pod", prog: "to_netdev", frame: udp(pNode1, pC, 53), want: tcOK})
}

func TestVerdictStrictPodToRemoteNodeAddress(t *testing.T) {
	p := strictCluster(t)
	p.check(verdictCase{name: "pod to a peer node's address: into the tunnel", prog: "from_pod", frame: udp(pA, pNode2, 30080), want: tcRedirect})
	p.check(verdictCase{name: "pod to a node without a tunnel", prog: "from_pod", frame: udp(pA, addr("10.99.0.3"), 30080), want: tcShot, reason: DropNoTunnel})
	p.check(verdictCase{name: "guard: pod to a remote node address in plaintext", prog: "to_netdev", frame: udp(pA, pNode2, 30080), want: tcShot, reason: DropLeak})
	p.check(verdictCase{name: "pod to its own node: the host stack", prog: "from_pod", frame: udp(pA, pNode1, 10250), want: tcOK})
}

func TestVerdictStrictUnknownClusterAddress(t *testing.T) {
	p := strictCluster(t)
	unknown := addr("10.244.9.9") // a pod the ipcache has not heard of
	p.check(verdictCase{name: "pod to an unknown cluster address", prog: "from_pod", frame: udp(pA, unknown, 53), want: tcShot, reason: DropNoTunnel})
	p.check(verdictCase{name: "guard: pod to an unknown cluster address", prog: "to_netdev", frame: udp(pA, unknown, 53), want: tcShot, reason: DropLeak})
	p.check(verdictCase{name: "pod to the world still works", prog: "from_pod", frame: udp(pA, pWorld, 53), want: tcOK})
}

func TestVerdictStrictGuardUnparseable(t *testing.T) {
	p := strictCluster(t)
	later := pkt{src: pA, dst: pC, proto: protoUDP, fragOff: 185, payload: []byte("marker")}
	p.check(verdictCase{name: "a pod's later fragment to a remote pod", prog: "to_netdev", frame: later, want: tcShot, reason: DropFragment})
	masqLater := pkt{src: pNode1, dst: pC, proto: protoUDP, fragOff: 185, payload: []byte("marker")}
	p.check(verdictCase{name: "a masqueraded later fragment", prog: "to_netdev", frame: masqLater, mark: markFromPod, want: tcShot, reason: DropFragment})
	frame := udp(pA, pC, 53).bytes()
	before := p.dropCount(DropInvalidPacket)
	if got, _ := p.run(p.d.toNetdev, frame[:14+20+2], ifLoopback); got != tcShot {
		t.Errorf("a pod's cut UDP header to a remote pod: verdict %d; want %d", got, tcShot)
	}
	if after := p.dropCount(DropInvalidPacket); after != before+1 {
		t.Errorf("invalid-packet drops %d -> %d; want one more", before, after)
	}
	// A VLAN-tagged frame: the guard does not look inside, so a pod's is
	// refused and the host's passes.
	vlan := udp(pA, pC, 53).bytes()
	vlan[12], vlan[13] = 0x81, 0x00
	if got, _ := p.runMark(p.d.toNetdev, vlan, ifLoopback, markFromPod); got != tcShot {
		t.Errorf("a pod's non-IPv4 frame on the underlay: verdict %d; want %d", got, tcShot)
	}
	if got, _ := p.run(p.d.toNetdev, vlan, ifLoopback); got != tcOK {
		t.Errorf("the host's non-IPv4 frame: verdict %d; want %d", got, tcOK)
	}
}

func TestVerdictFromPodMarksAndTunnelClears(t *testing.T) {
	p := strictCluster(t)
	// The mark is what the guard reads after a masquerade; a packet sent
	// into the tunnel leaves it behind.
	for _, c := range []struct {
		name string
		dst  netip.Addr
		want uint32
	}{
		{"to the world: marked", pWorld, markFromPod},
		{"into the tunnel: unmarked", pC, 0},
	} {
		var ctxOut skbContext
		if err := p.runCtx(p.d.fromPod, udp(pA, c.dst, 53).bytes(), &ctxOut); err != nil {
			t.Fatal(err)
		}
		if got := ctxOut.Mark & uint32(podMarkMARK_MASK); got != c.want {
			t.Errorf("%s: mark %#x; want %#x", c.name, got, c.want)
		}
	}
}

func TestVerdictStrictGuardLetsLocalPodsBe(t *testing.T) {
	p := strictCluster(t)
	// The guard may sit on a pod's veth (attached before its endpoint was
	// known): what leaves by it enters a local pod.
	p.check(verdictCase{name: "pod to a local pod through the host stack", prog: "to_netdev", frame: udp(pA, pB, 53), mark: markFromPod, want: tcOK})
}
