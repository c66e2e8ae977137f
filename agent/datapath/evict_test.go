package datapath

import (
	"testing"

	"github.com/veilmesh/veil/policy/policytypes"
)

// Both ends of one accelerated connection name the same connection, in the
// direction of the end that connected.
func TestOpenerOfSocketPair(t *testing.T) {
	client := podSockKey{Sip: ip4ToU32(ipA), Dip: ip4ToU32(ipB), Sport: 40001, Dport: 80}
	server := podSockKey{Sip: ip4ToU32(ipB), Dip: ip4ToU32(ipA), Sport: 80, Dport: 40001}
	want := conn{src: ipA, dst: ipB, sport: 40001, dport: 80, proto: policytypes.ProtoTCP}
	for _, c := range []struct {
		name string
		key  podSockKey
		st   sockSockState
	}{
		{"connecting end", client, sockSockState{Flags: uint32(sockSockFlagsSOCK_F_ACTIVE)}},
		{"accepting end", server, sockSockState{}},
		{"revoked accepting end", server, sockSockState{Flags: uint32(sockSockFlagsSOCK_F_REVOKED), TcpPath: 1}},
	} {
		if got := openerOf(c.key, c.st); got != want {
			t.Errorf("%s: openerOf(%+v) = %+v; want %+v", c.name, c.key, got, want)
		}
	}
	if got := sockKeys(want); got != [2]podSockKey{client, server} {
		t.Errorf("sockKeys(%+v) = %+v; want client %+v, server %+v", want, got, client, server)
	}
}
