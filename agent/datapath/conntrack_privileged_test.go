package datapath

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/policy/policytypes"
)

// setMTU sets the MTU of dev inside ns.
func setMTU(t *testing.T, ns *netns.Netns, dev string, mtu int) {
	t.Helper()
	if err := ns.Do(func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		return netlink.LinkSetMTU(l, mtu)
	}); err != nil {
		t.Fatalf("set MTU of %s in %s: %v", dev, ns.Name, err)
	}
}

func addrPort(p *netns.Pod, port int) string {
	return netip.AddrPortFrom(p.IP, uint16(port)).String()
}

// udpDatagramArrives sends one datagram of size bytes from pod from to
// to:port and reports whether it arrived whole.
func udpDatagramArrives(t *testing.T, from, to *netns.Pod, port, size int) bool {
	t.Helper()
	var pc net.PacketConn
	if err := to.Do(func() (err error) {
		pc, err = net.ListenPacket("udp", addrPort(to, port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	msg := make([]byte, size)
	rand.Read(msg)
	if err := from.Do(func() error {
		c, err := net.Dial("udp", addrPort(to, port))
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write(msg)
		return err
	}); err != nil {
		t.Fatalf("send %d bytes to %s: %v", size, addrPort(to, port), err)
	}
	buf := make([]byte, size+1)
	pc.SetReadDeadline(time.Now().Add(time.Second))
	n, _, err := pc.ReadFrom(buf)
	return err == nil && bytes.Equal(buf[:n], msg)
}

// Issue 12, item 3: a 4 KiB UDP datagram leaves a pod whose MTU is 1400 in
// three fragments. Between allowed pods, on the node and across nodes, it
// arrives; to a port policy denies, every fragment is dropped by policy.
func TestPrivilegedLargeUDPIsFragmentedAndJudged(t *testing.T) {
	tn := newTestNet(t, "frag", netOpts{})
	setMTU(t, &tn.a.Netns, "eth0", 1400)
	udp9000 := []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoUDP, 9000, 16, 1)}
	if err := tn.dp1.SetPolicy(ipB, udp9000, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	if err := tn.dp2.SetPolicy(ipC, udp9000, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	c1, _ := tn.dp1.Counters()
	c2, _ := tn.dp2.Counters()
	for _, c := range []struct {
		name  string
		to    *netns.Pod
		port  int
		allow bool
	}{
		{"same node, allowed", tn.b, 9000, true},
		{"other node, allowed", tn.c, 9000, true},
		{"same node, denied", tn.b, 9001, false},
		{"other node, denied", tn.c, 9001, false},
	} {
		if got := udpDatagramArrives(t, tn.a, c.to, c.port, 4096); got != c.allow {
			t.Errorf("%s: 4 KiB datagram arrived = %v; want %v", c.name, got, c.allow)
		}
	}
	d1, _ := tn.dp1.Counters()
	d2, _ := tn.dp2.Counters()
	if n := d1.Drops[DropFragment].Packets + d2.Drops[DropFragment].Packets - c1.Drops[DropFragment].Packets - c2.Drops[DropFragment].Packets; n != 0 {
		t.Errorf("%d fragments dropped for want of their first", n)
	}
	if n := d1.Drops[DropPolicyIngress].Packets - c1.Drops[DropPolicyIngress].Packets; n != 3 {
		t.Errorf("node 1 dropped %d packets by policy; want the 3 fragments of the denied datagram", n)
	}
	if n := d2.Drops[DropPolicyIngress].Packets - c2.Drops[DropPolicyIngress].Packets; n != 3 {
		t.Errorf("node 2 dropped %d packets by policy; want the 3 fragments of the denied datagram", n)
	}
}

// vethLink joins namespaces a and b with a veth pair, each end with its
// address (in a /24) and its own MTU.
func vethLink(t *testing.T, a *netns.Netns, aDev, aIP string, aMTU int, b *netns.Netns, bDev, bIP string, bMTU int) {
	t.Helper()
	bns, err := os.Open(b.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer bns.Close()
	up := func(dev, ip string, mtu int) error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetMTU(l, mtu); err != nil {
			return err
		}
		a, err := netlink.ParseAddr(ip + "/24")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, a); err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	}
	if err := a.Do(func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: aDev}, PeerName: bDev, PeerNamespace: netlink.NsFd(int(bns.Fd()))}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		return up(aDev, aIP, aMTU)
	}); err != nil {
		t.Fatalf("link %s: %v", aDev, err)
	}
	if err := b.Do(func() error { return up(bDev, bIP, bMTU) }); err != nil {
		t.Fatalf("link %s: %v", bDev, err)
	}
}

// route adds a route to dst via gw inside ns.
func route(t *testing.T, ns *netns.Netns, dst, gw string) {
	t.Helper()
	if err := ns.Do(func() error {
		_, d, err := net.ParseCIDR(dst)
		if err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{Dst: d, Gw: net.ParseIP(gw)})
	}); err != nil {
		t.Fatalf("route %s via %s in %s: %v", dst, gw, ns.Name, err)
	}
}

// Issue 12, item 2: path-MTU discovery under default deny. Pod a, which
// admits nothing, sends 16 MiB to a server w in the world, two hops away:
// node 1 routes to router r, whose link toward w has an MTU of 1280 (w's
// own end has 1500, so w announces an MSS that does not fit). r answers
// a's full-size segments with "fragmentation needed", which reaches a only
// as related to a's connection; without it the transfer stalls.
func TestPrivilegedPathMTUDiscoveryUnderDefaultDeny(t *testing.T) {
	tn := newTestNet(t, "pmtu", netOpts{})
	prefix := fmt.Sprintf("veiltest-%d-pmtu", os.Getpid())
	r, err := netns.NewNetns(prefix + "-r")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Delete() })
	w, err := netns.NewNetns(prefix + "-w")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Delete() })
	vethLink(t, &tn.n1.Netns, "rt1", "10.99.5.1", 1500, r, "rt0", "10.99.5.2", 1500)
	vethLink(t, r, "rw", "10.99.6.1", 1280, w, "wr", "10.99.6.2", 1500)
	route(t, &tn.n1.Netns, "10.99.6.0/24", "10.99.5.2")
	route(t, r, "10.244.1.0/24", "10.99.5.1")
	route(t, w, "10.244.0.0/16", "10.99.6.1")
	for _, ns := range []*netns.Netns{&tn.n1.Netns, r} {
		if err := ns.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
			t.Fatal(err)
		}
	}
	if err := tn.dp1.SetPolicy(ipA, nil, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}

	const size = 16 << 20
	addr := "10.99.6.2:7000"
	sink, err := netns.StartHelper(w, nil, -1, "sink", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sink.Kill)
	if _, err := sink.WaitLine(ctxT(t, 10*time.Second), "listening"); err != nil {
		t.Fatal(err)
	}
	src, err := netns.StartHelper(&tn.a.Netns, nil, -1, "source", addr, strconv.Itoa(size), "0s")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(src.Kill)
	sinkDone, err := sink.WaitLine(ctxT(t, 15*time.Second), "done")
	if err != nil {
		c, _ := tn.dp1.Counters()
		t.Fatalf("transfer did not complete (%d bytes arrived; drops %+v): %v", progress(sink), c.Drops, err)
	}
	srcDone, err := src.WaitLine(ctxT(t, 5*time.Second), "done")
	if err != nil {
		t.Fatal(err)
	}
	if sf, kf := strings.Fields(srcDone), strings.Fields(sinkDone); kf[1] != strconv.Itoa(size) || kf[2] != sf[2] {
		t.Fatalf("data differs: source %q, sink %q", srcDone, sinkDone)
	}
}
