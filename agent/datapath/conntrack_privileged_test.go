package datapath

import (
	"bytes"
	"crypto/rand"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/tests/netlab"
)

// setMTU sets the MTU of dev inside ns.
func setMTU(t *testing.T, ns *netlab.Netns, dev string, mtu int) {
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

func addrPort(p *netlab.Pod, port int) string {
	return netip.AddrPortFrom(p.IP, uint16(port)).String()
}

// udpDatagramArrives sends one datagram of size bytes from pod from to
// to:port and reports whether it arrived whole.
func udpDatagramArrives(t *testing.T, from, to *netlab.Pod, port, size int) bool {
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
	udp9000 := []policy.Entry{allow(policy.Ingress, idA, policy.ProtoUDP, 9000, 16, 1)}
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
		to    *netlab.Pod
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
