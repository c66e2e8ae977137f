package encryption

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/tests/testenv"
)

// Issue 11: with node-to-node encryption, host traffic to a peer — its
// address or its pods — goes into the tunnel, and while the (userspace)
// device is gone, as when it restarts, it fails closed instead of taking the
// main table's route over the underlay in plaintext.
func TestPrivilegedTunnelRoutesFailClosed(t *testing.T) {
	testenv.RequirePrivileged(t)
	ns, err := netns.NewNetns(fmt.Sprintf("veiltest-%d-tunroute", os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Delete() })

	// IPv6 chatter (router solicitations, MLD) would count as underlay
	// packets; this test is about IPv4 host traffic.
	if err := ns.Sysctl("net.ipv6.conf.default.disable_ipv6", "1"); err != nil {
		t.Fatal(err)
	}
	peerNode := netip.MustParsePrefix("10.99.0.2/32")
	peerPods := netip.MustParsePrefix("10.244.2.0/24")
	err = ns.Do(func() error {
		// The underlay: a plaintext way to the peer in the main table. The
		// tunnel device stands in for WireGuard (any device will do: the
		// routes are the question).
		for _, name := range []string{"und0", "vwgtest"} {
			l := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}
			if err := netlink.LinkAdd(l); err != nil {
				return fmt.Errorf("add %s: %w", name, err)
			}
			for _, n := range []string{name, name + "p"} {
				ll, err := netlink.LinkByName(n)
				if err != nil {
					return err
				}
				if err := netlink.LinkSetUp(ll); err != nil {
					return err
				}
			}
		}
		und, _ := netlink.LinkByName("und0")
		if err := netlink.AddrAdd(und, &netlink.Addr{IPNet: &net.IPNet{IP: net.IP{10, 99, 0, 1}, Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: und.Attrs().Index, Dst: &net.IPNet{IP: net.IP{10, 244, 0, 0}, Mask: net.CIDRMask(16, 32)}, Gw: net.IP{10, 99, 0, 2}}); err != nil {
			return err
		}
		return routeThroughTunnel("vwgtest", map[netip.Prefix]bool{peerNode: true, peerPods: true})
	})
	if err != nil {
		t.Fatal(err)
	}
	routeVia := func(dst string) string {
		out, err := ns.Run("ip", "route", "get", dst)
		if err != nil {
			return "error: " + strings.TrimSpace(out)
		}
		return strings.TrimSpace(out)
	}
	for _, dst := range []string{"10.99.0.2", "10.244.2.7"} {
		if got := routeVia(dst); !strings.Contains(got, "dev vwgtest") {
			t.Errorf("with the device up, host traffic to %s goes %q; want through vwgtest", dst, got)
		}
	}

	underlayTx := func() uint64 {
		var tx uint64
		if err := ns.Do(func() error {
			l, err := netlink.LinkByName("und0")
			if err != nil {
				return err
			}
			tx = l.Attrs().Statistics.TxPackets
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return tx
	}
	txBefore := underlayTx()

	// The device goes away (a userspace device restarting).
	if err := ns.Do(func() error {
		l, err := netlink.LinkByName("vwgtest")
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	}); err != nil {
		t.Fatal(err)
	}
	for _, dst := range []string{"10.99.0.2", "10.244.2.7"} {
		got := routeVia(dst)
		if strings.Contains(got, "und0") || !strings.Contains(got, "error") {
			t.Errorf("with the device gone, host traffic to %s goes %q; want no route (fail closed)", dst, got)
		}
		// And a real send fails rather than leaving by the underlay.
		err := ns.Do(func() error {
			fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM, 0)
			if err != nil {
				return err
			}
			defer syscall.Close(fd)
			return syscall.Sendto(fd, []byte("marker"), 0, &syscall.SockaddrInet4{Port: 9, Addr: netip.MustParseAddr(dst).As4()})
		})
		if err == nil {
			t.Errorf("a host send to %s succeeded with the tunnel device gone", dst)
		}
	}
	if after := underlayTx(); after != txBefore {
		t.Errorf("the underlay sent %d packets while the tunnel was down", after-txBefore)
	}
}
