package datapath

import (
	"net/netip"
	"testing"
)

// TestPrivilegedServiceExternalFrontendsFromSockets: a socket's own
// connection to an external frontend (a NodePort at this node's or another
// node's address, a LoadBalancer IP) goes straight to a backend, as a
// ClusterIP does, and the application still sees the address it dialled.
// A NodePort without backends here (externalTrafficPolicy Local) is left
// to the node addressed, not refused. (With kube-proxy, Config.NodePort
// off, kube-proxy's rules translate these instead.)
func TestPrivilegedServiceExternalFrontendsFromSockets(t *testing.T) {
	tn := newTestNet(t, "svnp", netOpts{sockets: true, nodePort: true})
	serveTCP(t, tn.b, 8080)
	lbIP := netip.MustParseAddr("192.0.2.100")
	for _, s := range []Service{
		{ServiceKey: ServiceKey{VIP: NodePortVIP, Port: 30080, Proto: 6, External: true}, Backends: []Backend{backendB}},
		{ServiceKey: ServiceKey{VIP: lbIP, Port: 80, Proto: 6, External: true}, Backends: []Backend{backendB}},
		{ServiceKey: ServiceKey{VIP: NodePortVIP, Port: 30081, Proto: 6, External: true}},
	} {
		if err := tn.dp1.UpsertService(s); err != nil {
			t.Fatal(err)
		}
	}
	before, err := tn.dp1.ServiceStats()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.AddrPort{
		netip.AddrPortFrom(ip1, 30080), // this node
		netip.AddrPortFrom(ip2, 30080), // another node's address
		netip.AddrPortFrom(lbIP, 80),
	} {
		if got := tn.svcCall(t, "tcp", a.String()); got != "ok "+a.String() {
			t.Errorf("connect to %s: %s; want translated to pod b, the application seeing %s", a, got, a)
		}
	}
	tn.svcCall(t, "tcp", netip.AddrPortFrom(ip1, 30081).String())
	after, err := tn.dp1.ServiceStats()
	if err != nil {
		t.Fatal(err)
	}
	if d := after.Translated - before.Translated; d != 3 {
		t.Errorf("translated +%d; want +3", d)
	}
	if d := after.Refused - before.Refused; d != 0 {
		t.Errorf("refused +%d; want +0 (a NodePort without backends here is the addressed node's)", d)
	}
}
