package datapath

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/veilmesh/veil/agent/wireguard"
	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/policy/identity"
)

// Strict mode on the wire (issue 11): each test sends a marker a way that
// leaves the pod's path through the tunnel, captures every underlay device,
// and requires that no frame carries the marker.

func markerOf(name string) string {
	return fmt.Sprintf("VEIL-%s-MARKER-%d", name, time.Now().UnixNano())
}

// requireNoMarker closes the captures and fails when any frame holds marker.
func requireNoMarker(t *testing.T, marker string, caps map[string]*capture) {
	t.Helper()
	time.Sleep(300 * time.Millisecond)
	for dev, c := range caps {
		c.close()
		_, withMarker, _ := c.summary(marker)
		t.Logf("%s: %d frames, %d with the marker", dev, len(c.frames), withMarker)
		if withMarker != 0 {
			t.Errorf("strict mode let the marker out on %s in %d frames", dev, withMarker)
		}
	}
}

func requireLeak(t *testing.T, dp *Datapath, dst netip.Addr) {
	t.Helper()
	leaks, err := dp.Leaks()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range leaks {
		if l.Dst == dst && l.Reason == DropLeak {
			return
		}
	}
	t.Errorf("no unencrypted-leak record toward %s: %+v", dst, leaks)
}

// Pod traffic that the host DNATs (as kube-proxy does for a ClusterIP; the
// lab routes only its own ranges, so the service address is taken from one) and
// masquerades to the node's address no longer carries a pod's source on the
// underlay; the guard still knows it by the mark from_pod set.
func TestPrivilegedStrictModeMasqueradedPodTraffic(t *testing.T) {
	tn := newTestNet(t, "masq", netOpts{})
	serveTCP(t, tn.c, 80)
	tunnel(t, tn, true)
	forwarding(t, tn)
	for _, cmd := range [][]string{
		{"ip", "route", "replace", "10.244.2.0/24", "via", "10.99.0.2"},
		{"nft", "add", "table", "ip", "veiltest"},
		{"nft", "add chain ip veiltest pre { type nat hook prerouting priority -100; }"},
		{"nft", "add rule ip veiltest pre ip daddr 10.99.96.10 tcp dport 80 dnat to 10.244.2.2:80"},
		{"nft", "add chain ip veiltest post { type nat hook postrouting priority 100; }"},
		{"nft", "add rule ip veiltest post ip saddr 10.244.0.0/16 oifname und1 masquerade"},
	} {
		if out, err := tn.n1.Run(cmd[0], cmd[1:]...); err != nil {
			t.Fatalf("%v: %v: %s", cmd, err, out)
		}
	}
	caps := map[string]*capture{"und1": startCapture(t, tn.n1, "und1")}
	marker := markerOf("MASQ")
	if err := sendMarker(tn.a, "10.99.96.10:80", marker); err == nil {
		t.Errorf("a -> DNAT -> c in plaintext succeeded in strict mode")
	}

	requireNoMarker(t, marker, caps)
	requireLeak(t, tn.dp1, ipC)
}

// A pod talking to another node's own address (NodePort, a hostNetwork
// server, kubelet) is encrypted like pod-to-pod traffic.
func TestPrivilegedStrictModePodToRemoteNodeAddress(t *testing.T) {
	tn := newTestNet(t, "tonode", netOpts{})
	dev1, dev2 := tunnel(t, tn, true)
	forwarding(t, tn)
	// Each node's own address is among its allowed IPs, as the agent
	// configures them: a pod's packet to a node has somewhere to go.
	ctx := context.Background()
	if err := dev1.SetPeers(ctx, []wireguard.Peer{{PublicKey: dev2.Key().PublicKey(), Endpoint: netip.AddrPortFrom(ip2, wgPort),
		AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24"), netip.PrefixFrom(ip2, 32)}}}); err != nil {
		t.Fatal(err)
	}
	if err := dev2.SetPeers(ctx, []wireguard.Peer{{PublicKey: dev1.Key().PublicKey(), Endpoint: netip.AddrPortFrom(ip1, wgPort),
		AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.PrefixFrom(ip1, 32)}}}); err != nil {
		t.Fatal(err)
	}
	if err := tn.dp1.UpsertIPCache(netip.PrefixFrom(ip2, 32), IPCacheEntry{Identity: identity.RemoteNode, NodeIP: ip2, Kind: NodeAddr | Tunnel}); err != nil {
		t.Fatal(err)
	}
	if _, err := tn.n2.Run("ip", "route", "replace", "10.244.1.0/24", "via", "10.99.0.1"); err != nil {
		t.Fatal(err)
	}
	// A server of node 2's host that acknowledges without echoing: its
	// reply is the host's own traffic, not the pod's bytes.
	var ln net.Listener
	if err := tn.n2.Do(func() (err error) {
		ln, err = net.Listen("tcp", "10.99.0.2:8080")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 256)
				if n, _ := c.Read(buf); n > 0 {
					c.Write([]byte("ack"))
				}
			}()
		}
	}()

	caps := map[string]*capture{"und1": startCapture(t, tn.n1, "und1"), "und2": startCapture(t, tn.n2, "und2")}
	marker := markerOf("TONODE")
	var conn net.Conn
	if err := tn.a.Do(func() (err error) {
		conn, err = net.DialTimeout("tcp", "10.99.0.2:8080", 3*time.Second)
		return err
	}); err != nil {
		t.Fatalf("a -> node 2's address: %v", err)
	}
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := conn.Write([]byte(marker)); err != nil {
		t.Fatalf("write: %v", err)
	}
	ack := make([]byte, 3)
	if _, err := io.ReadFull(conn, ack); err != nil {
		t.Errorf("a -> node 2's address: no acknowledgement: %v", err)
	}
	conn.Close()
	requireNoMarker(t, marker, caps)
	c1, _ := tn.dp1.Counters()
	if c1.Tunnel.Packets == 0 {
		t.Errorf("nothing went into the tunnel: %+v", c1)
	}
}

// A second device toward another node (a second NIC, a VLAN) is guarded as
// the underlay is, once the agent sees it.
func TestPrivilegedStrictModeSecondDevice(t *testing.T) {
	tn := newTestNet(t, "nic2", netOpts{})
	tunnel(t, tn, true)
	under1, underIP1, under2, underIP2 := tn.n1.Underlay, tn.n1.UnderlayIP, tn.n2.Underlay, tn.n2.UnderlayIP
	if err := netns.Connect(tn.n1, tn.n2, "nic2a", "nic2b", netip.MustParseAddr("10.98.0.1"), netip.MustParseAddr("10.98.0.2")); err != nil {
		t.Fatal(err)
	}
	tn.n1.Underlay, tn.n1.UnderlayIP, tn.n2.Underlay, tn.n2.UnderlayIP = under1, underIP1, under2, underIP2
	// Until the agent guards it, the audit sees the new device as a way
	// around the tunnel.
	var unguarded []string
	if err := tn.n1.Do(func() (err error) { unguarded, err = tn.dp1.UnguardedDevices(); return err }); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(unguarded, "nic2a") {
		t.Errorf("unguarded devices before GuardDevices = %v; want nic2a", unguarded)
	}
	if err := tn.n1.Do(tn.dp1.GuardDevices); err != nil {
		t.Fatalf("guard devices: %v", err)
	}
	guarded, err := tn.dp1.GuardedDevices()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(guarded, "nic2a") || !slices.Contains(guarded, "und1") {
		t.Errorf("guarded devices = %v; want und1 and nic2a", guarded)
	}
	if err := tn.n1.Do(func() (err error) { unguarded, err = tn.dp1.UnguardedDevices(); return err }); err != nil {
		t.Fatal(err)
	}
	if len(unguarded) != 0 {
		t.Errorf("unguarded devices after GuardDevices = %v; want none", unguarded)
	}
	if _, err := tn.n1.Run("ip", "route", "replace", "10.244.2.0/24", "via", "10.98.0.2", "dev", "nic2a"); err != nil {
		t.Fatal(err)
	}
	caps := map[string]*capture{"und1": startCapture(t, tn.n1, "und1"), "nic2a": startCapture(t, tn.n1, "nic2a")}
	marker := markerOf("NIC2")
	if err := sendRaw(tn.n1, ipA, ipC, marker); err != nil {
		t.Fatal(err)
	}
	requireNoMarker(t, marker, caps)
	requireLeak(t, tn.dp1, ipC)
}

// forwarding turns IP forwarding on in both test nodes, as a real node has
// it, so that a packet the host stack is handed can leave.
func forwarding(t *testing.T, tn *testNet) {
	t.Helper()
	for _, n := range []*netns.Node{tn.n1, tn.n2} {
		if err := n.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
			t.Fatal(err)
		}
	}
}

// sendRaw makes node n's own stack send a UDP packet with a pod's source
// address: traffic that something routed around the tunnel.
func sendRaw(n *netns.Node, src, dst netip.Addr, payload string) error {
	return n.Do(func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		pkt := make([]byte, 20+8+len(payload))
		pkt[0], pkt[8], pkt[9] = 0x45, 64, 17
		binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
		copy(pkt[12:16], src.AsSlice())
		copy(pkt[16:20], dst.AsSlice())
		binary.BigEndian.PutUint16(pkt[20:], 4000)
		binary.BigEndian.PutUint16(pkt[22:], 80)
		binary.BigEndian.PutUint16(pkt[24:], uint16(8+len(payload)))
		copy(pkt[28:], payload)
		return syscall.Sendto(fd, pkt, 0, &syscall.SockaddrInet4{Addr: dst.As4()})
	})
}

// reloadWithClusterCIDR reloads node 1's strict datapath knowing the
// cluster's pod range, as the agent configures it.
func reloadWithClusterCIDR(t *testing.T, tn *testNet, wgName string) {
	t.Helper()
	tn.dp1.Close()
	cfg := tn.config1(netOpts{})
	cfg.WireGuardInterface, cfg.StrictMode = wgName, true
	cfg.ClusterCIDR = netip.MustParsePrefix("10.244.0.0/16")
	tn.dp1 = tn.load(tn.n1, cfg)
}

// Before the first sync after a reboot the ipcache does not know the remote
// pods yet: a pod's packet to one is refused, not handed to a host route.
func TestPrivilegedStrictModeUnknownClusterAddress(t *testing.T) {
	tn := newTestNet(t, "unknown", netOpts{})
	serveTCP(t, tn.c, 80)
	dev1, _ := tunnel(t, tn, true)
	forwarding(t, tn)
	reloadWithClusterCIDR(t, tn, dev1.Interface())
	// The ipcache forgets node 2's pods (pins gone after a reboot); the host
	// has a plaintext route to them.
	for _, p := range []string{"10.244.2.2/32", "10.244.2.0/24"} {
		if err := tn.dp1.DeleteIPCache(netip.MustParsePrefix(p)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tn.n1.Run("ip", "route", "replace", "10.244.2.0/24", "via", "10.99.0.2"); err != nil {
		t.Fatal(err)
	}
	caps := map[string]*capture{"und1": startCapture(t, tn.n1, "und1")}
	marker := markerOf("UNKNOWN")
	if err := tn.a.Do(func() error {
		c, err := net.Dial("udp", "10.244.2.2:80")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte(marker))
		return err
	}); err != nil {
		t.Logf("send: %v", err)
	}
	requireNoMarker(t, marker, caps)
	c1, _ := tn.dp1.Counters()
	if c1.Drops[DropNoTunnel].Packets == 0 {
		t.Errorf("no no-tunnel drop counted: %+v", c1.Drops)
	}
}

// A later fragment of a pod's datagram carries no ports; whatever routed
// it around the tunnel, the guard refuses it by its addresses.
func TestPrivilegedStrictModeLaterFragment(t *testing.T) {
	tn := newTestNet(t, "frag", netOpts{})
	tunnel(t, tn, true)
	if _, err := tn.n1.Run("ip", "route", "replace", "10.244.2.0/24", "via", "10.99.0.2"); err != nil {
		t.Fatal(err)
	}
	caps := map[string]*capture{"und1": startCapture(t, tn.n1, "und1")}
	marker := markerOf("FRAG")
	if err := tn.n1.Do(func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		pkt := make([]byte, 20+len(marker))
		pkt[0], pkt[8], pkt[9] = 0x45, 64, 17
		binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
		binary.BigEndian.PutUint16(pkt[4:], 0x4242)
		binary.BigEndian.PutUint16(pkt[6:], 185) // offset 1480: a later fragment
		copy(pkt[12:16], ipA.AsSlice())
		copy(pkt[16:20], ipC.AsSlice())
		copy(pkt[20:], marker)
		return syscall.Sendto(fd, pkt, 0, &syscall.SockaddrInet4{Addr: ipC.As4()})
	}); err != nil {
		t.Fatal(err)
	}
	requireNoMarker(t, marker, caps)
	c1, _ := tn.dp1.Counters()
	if c1.Drops[DropFragment].Packets == 0 {
		t.Errorf("no fragment drop counted: %+v", c1.Drops)
	}
}
