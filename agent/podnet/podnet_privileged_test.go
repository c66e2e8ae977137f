package podnet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/tests/testenv"
)

// testNetns creates a namespace named after this process and test, removed
// by exact name when the test ends.
func testNetns(t *testing.T, suffix string) *netns.Netns {
	t.Helper()
	ns, err := netns.NewNetns(fmt.Sprintf("veiltest-%d-cni-%s", os.Getpid(), suffix))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ns.Delete(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return ns
}

// node gives the test a node namespace with an underlay-like device holding
// the default route (MTU 1400) and the address 10.99.0.1. The device is one
// end of a veth pair whose other end stays in the namespace too, so it has
// carrier without any module beyond veth.
func node(t *testing.T, suffix string) *netns.Netns {
	t.Helper()
	ns := testNetns(t, suffix)
	err := ns.Do(func() error {
		d := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "underlay0", MTU: 1400}, PeerName: "underlay1"}
		if err := netlink.LinkAdd(d); err != nil {
			return err
		}
		peer, err := netlink.LinkByName("underlay1")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(peer); err != nil {
			return err
		}
		if err := netlink.AddrAdd(d, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 99, 0, 1), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(d); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: d.Attrs().Index, Gw: net.IPv4(10, 99, 0, 254)})
	})
	if err != nil {
		t.Fatalf("prepare node namespace: %v", err)
	}
	return ns
}

func TestPrivilegedSetupCheckTeardown(t *testing.T) {
	testenv.RequirePrivileged(t)
	ctx := context.Background()
	nodeNS := node(t, "pn-node")
	pod := testNetns(t, "pn-pod")
	req := Request{
		NetnsPath:   pod.Path(),
		IfName:      "eth0",
		ContainerID: fmt.Sprintf("podnet-test-%d", os.Getpid()),
		IP:          netip.MustParseAddr("10.244.7.9"),
		Routes:      []netip.Prefix{netip.MustParsePrefix("10.99.0.0/16"), netip.MustParsePrefix("10.244.0.0/16")},
	}

	var res Result
	if err := nodeNS.Do(func() (err error) { res, err = Setup(ctx, req); return err }); err != nil {
		t.Fatal(err)
	}
	if res.HostVeth != HostVethName(req.ContainerID) || res.HostIfindex == 0 || len(res.HostMAC) != 6 || len(res.PodMAC) != 6 {
		t.Fatalf("Setup result %+v incomplete", res)
	}
	if res.MTU != 1400 {
		t.Errorf("MTU = %d; want 1400 from the default-route device", res.MTU)
	}

	out, err := pod.Run("ip", "-4", "route", "show")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"10.99.0.0/16 via 169.254.1.1 dev eth0", "10.244.0.0/16 via 169.254.1.1 dev eth0", "169.254.1.1 dev eth0 scope link"} {
		if !strings.Contains(out, want) {
			t.Errorf("pod routes lack %q:\n%s", want, out)
		}
	}
	out, _ = pod.Run("ip", "neigh", "show", "169.254.1.1")
	if !strings.Contains(out, res.HostMAC.String()) || !strings.Contains(out, "PERMANENT") {
		t.Errorf("gateway neighbour %q; want PERMANENT to %s", out, res.HostMAC)
	}
	out, _ = pod.Run("ip", "-o", "link", "show", "eth0")
	if !strings.Contains(out, "mtu 1400") {
		t.Errorf("pod eth0 %q; want mtu 1400", out)
	}
	out, _ = nodeNS.Run("ip", "-4", "route", "show", "10.244.7.9")
	if !strings.Contains(out, "dev "+res.HostVeth) {
		t.Errorf("node route to the pod %q; want dev %s", out, res.HostVeth)
	}

	// The pod reaches an address of the node through the gateway, and the
	// node answers through the /32 route.
	assertConnect(t, nodeNS, pod, "10.99.0.1:7070")

	if err := nodeNS.Do(func() error { _, err := Check(ctx, req); return err }); err != nil {
		t.Fatalf("Check after Setup: %v", err)
	}

	if _, err := pod.Run("ip", "route", "del", "10.244.0.0/16"); err != nil {
		t.Fatal(err)
	}
	if _, err := nodeNS.Run("ip", "route", "del", "10.244.7.9/32"); err != nil {
		t.Fatal(err)
	}
	err = nodeNS.Do(func() error { _, err := Check(ctx, req); return err })
	if err == nil {
		t.Fatal("Check passed with routes missing")
	}
	for _, want := range []string{"route 10.244.0.0/16 via 169.254.1.1 dev eth0", "node route 10.244.7.9/32 dev " + res.HostVeth} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Check error %q does not name %q", err, want)
		}
	}

	// A retried ADD replaces the leftovers and restores everything.
	var again Result
	if err := nodeNS.Do(func() (err error) { again, err = Setup(ctx, req); return err }); err != nil {
		t.Fatalf("second Setup: %v", err)
	}
	if err := nodeNS.Do(func() error { _, err := Check(ctx, req); return err }); err != nil {
		t.Fatalf("Check after second Setup: %v", err)
	}

	teardown := func(netnsPath string) error {
		return nodeNS.Do(func() error { return Teardown(ctx, req.ContainerID, netnsPath, "eth0") })
	}
	if err := teardown(pod.Path()); err != nil {
		t.Fatal(err)
	}
	if out, _ := nodeNS.Run("ip", "link", "show"); strings.Contains(out, again.HostVeth) {
		t.Errorf("host veth %s still present after Teardown:\n%s", again.HostVeth, out)
	}
	if out, _ := pod.Run("ip", "link", "show"); strings.Contains(out, "eth0") {
		t.Errorf("pod eth0 still present after Teardown:\n%s", out)
	}
	if err := teardown(pod.Path()); err != nil {
		t.Errorf("repeated Teardown: %v", err)
	}
	if err := teardown("/run/netns/veiltest-does-not-exist"); err != nil {
		t.Errorf("Teardown with a missing netns: %v", err)
	}
	err = nodeNS.Do(func() error { _, err := Check(ctx, req); return err })
	if err == nil || !strings.Contains(err.Error(), "node-side veth") || !strings.Contains(err.Error(), "interface eth0") {
		t.Errorf("Check after Teardown: %v; want it to name the missing veth and eth0", err)
	}
}

func TestPrivilegedSetupFailureLeavesNothing(t *testing.T) {
	testenv.RequirePrivileged(t)
	ctx := context.Background()
	nodeNS := node(t, "pf-node")
	pod := testNetns(t, "pf-pod")
	req := Request{NetnsPath: pod.Path(), IfName: "eth0", ContainerID: "failing", IP: netip.MustParseAddr("10.244.7.10"), MTU: 1300}
	missing := req
	missing.NetnsPath = "/run/netns/veiltest-does-not-exist"
	err := nodeNS.Do(func() error { _, err := Setup(ctx, missing); return err })
	if !errors.Is(err, ErrNetnsNotFound) {
		t.Fatalf("Setup with a missing netns: %v; want ErrNetnsNotFound", err)
	}

	// An eth0 that is not ours already sits in the pod: Setup must fail and
	// remove its half-made veth.
	if _, err := pod.Run("ip", "link", "add", "eth0", "type", "bridge"); err != nil {
		t.Fatal(err)
	}
	err = nodeNS.Do(func() error { _, err := Setup(ctx, req); return err })
	if err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("Setup over an existing eth0: %v; want an 'already exists' error", err)
	}
	if out, _ := nodeNS.Run("ip", "link", "show"); strings.Contains(out, HostVethName("failing")) {
		t.Errorf("failed Setup left %s behind:\n%s", HostVethName("failing"), out)
	}
	// Teardown leaves interfaces that are not veths alone.
	if err := nodeNS.Do(func() error { return Teardown(ctx, "failing", pod.Path(), "eth0") }); err != nil {
		t.Fatal(err)
	}
	if out, _ := pod.Run("ip", "link", "show", "eth0"); !strings.Contains(out, "eth0") {
		t.Error("Teardown removed a bridge eth0 it did not create")
	}
}

func assertConnect(t *testing.T, server, client *netns.Netns, addr string) {
	t.Helper()
	var ln net.Listener
	if err := server.Do(func() (err error) { ln, err = net.Listen("tcp4", addr); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Write([]byte("ok"))
			c.Close()
		}
	}()
	err := client.Do(func() error {
		c, err := net.DialTimeout("tcp4", addr, 3*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 2)
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Read(buf); err != nil {
			return err
		}
		return nil
	})
	if err != nil {
		t.Fatalf("pod → node %s: %v", addr, err)
	}
}
