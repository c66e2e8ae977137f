package datapath

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/veilmesh/veil/agent/wireguard"
	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/policy/identity"
)

const wgPort = 51871

// tunnel gives both test nodes a userspace WireGuard device peered with the
// other, and reloads their datapaths with encryption on.
func tunnel(t testing.TB, tn *testNet, strict bool) (dev1, dev2 *wireguard.Device) {
	t.Helper()
	open := func(n *netns.Node, name string) *wireguard.Device {
		key, err := wireguard.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		var dev *wireguard.Device
		if err := n.Do(func() (err error) {
			dev, err = wireguard.Open(context.Background(), wireguard.Config{Interface: name, ListenPort: wgPort, PrivateKey: key})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dev.Close() })
		return dev
	}
	suffix := os.Getpid() % 100000
	name1, name2 := fmt.Sprintf("vwg%da", suffix), fmt.Sprintf("vwg%db", suffix)
	dev1, dev2 = open(tn.n1, name1), open(tn.n2, name2)
	// As the agent does: pods get the tunnel's MTU, so nothing they send is
	// too big for it.
	mtu, err := wireguard.PodMTU(1500)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []*netns.Pod{tn.a, tn.b, tn.c} {
		if _, err := p.Run("ip", "link", "set", "eth0", "mtu", fmt.Sprint(mtu)); err != nil {
			t.Fatal(err)
		}
		if _, err := p.Node.Run("ip", "link", "set", p.HostVeth, "mtu", fmt.Sprint(mtu)); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	if err := dev1.SetPeers(ctx, []wireguard.Peer{{PublicKey: dev2.Key().PublicKey(), Endpoint: netip.AddrPortFrom(ip2, wgPort), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")}}}); err != nil {
		t.Fatal(err)
	}
	if err := dev2.SetPeers(ctx, []wireguard.Peer{{PublicKey: dev1.Key().PublicKey(), Endpoint: netip.AddrPortFrom(ip1, wgPort), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}}}); err != nil {
		t.Fatal(err)
	}
	// Reload both datapaths with the device (the pinned maps stay).
	tn.dp1.Close()
	cfg1 := tn.config1(netOpts{})
	cfg1.WireGuardInterface, cfg1.StrictMode = name1, strict
	tn.dp1 = tn.load(tn.n1, cfg1)
	tn.dp2.Close()
	tn.dp2 = tn.load(tn.n2, Config{BPFFSRoot: tn.root2, UnderlayInterface: "und2", NodeIP: ip2, WireGuardInterface: name2, StrictMode: strict})
	setTunnel(t, tn, true)
	return dev1, dev2
}

// setTunnel marks the remote pods of each node as reachable through the
// tunnel, or not (a peer that went away).
func setTunnel(t testing.TB, tn *testNet, on bool) {
	t.Helper()
	kind := RemotePod
	if on {
		kind |= Tunnel
	}
	for _, e := range []struct {
		dp   *Datapath
		ip   netip.Addr
		id   identity.ID
		node netip.Addr
	}{{tn.dp1, ipC, idC, ip2}, {tn.dp2, ipA, idA, ip1}, {tn.dp2, ipB, idB, ip1}} {
		if err := e.dp.UpsertIPCache(netip.PrefixFrom(e.ip, 32), IPCacheEntry{Identity: e.id, NodeIP: e.node, Kind: kind}); err != nil {
			t.Fatal(err)
		}
	}
}

// capture records every frame on a device of a node until stopped.
type capture struct {
	mu     sync.Mutex
	frames [][]byte
	fd     int
	done   chan struct{}
}

func startCapture(t *testing.T, n *netns.Node, dev string) *capture {
	t.Helper()
	c := &capture{done: make(chan struct{})}
	err := n.Do(func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		proto := uint16(syscall.ETH_P_ALL)
		be := proto<<8 | proto>>8
		fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, int(be))
		if err != nil {
			return err
		}
		c.fd = fd
		return syscall.Bind(fd, &syscall.SockaddrLinklayer{Protocol: be, Ifindex: l.Attrs().Index})
	})
	if err != nil {
		t.Fatal(err)
	}
	tv := syscall.NsecToTimeval(int64(100 * time.Millisecond))
	syscall.SetsockoptTimeval(c.fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
	go func() {
		defer close(c.done)
		buf := make([]byte, 65536)
		for {
			n, _, err := syscall.Recvfrom(c.fd, buf, 0)
			if err == syscall.EBADF {
				return
			}
			if n > 0 {
				c.mu.Lock()
				c.frames = append(c.frames, append([]byte(nil), buf[:n]...))
				c.mu.Unlock()
			}
		}
	}()
	t.Cleanup(c.close)
	return c
}

// close ends the capture: closing the socket ends the reader with EBADF.
func (c *capture) close() {
	select {
	case <-c.done:
		return
	default:
	}
	syscall.Close(c.fd)
	<-c.done
}

// summary counts WireGuard UDP frames, frames holding marker, and IPv4
// frames between pod addresses in the clear.
func (c *capture) summary(marker string) (wg, withMarker, plainPod int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, f := range c.frames {
		if bytes.Contains(f, []byte(marker)) {
			withMarker++
		}
		if len(f) < 34 || binary.BigEndian.Uint16(f[12:14]) != 0x0800 {
			continue
		}
		ip := f[14:]
		src, dst := netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		ihl := int(ip[0]&0x0f) * 4
		if ip[9] == 17 && len(ip) >= ihl+4 && binary.BigEndian.Uint16(ip[ihl+2:ihl+4]) == wgPort {
			wg++
		}
		if netip.MustParsePrefix("10.244.0.0/16").Contains(src) && netip.MustParsePrefix("10.244.0.0/16").Contains(dst) {
			plainPod++
		}
	}
	return
}

// sendMarker opens a TCP connection from p to addr and sends marker, then
// reads it back (the server echoes).
func sendMarker(p *netns.Pod, addr, marker string) error {
	var conn net.Conn
	if err := p.Do(func() (err error) {
		conn, err = net.DialTimeout("tcp", addr, 2*time.Second)
		return err
	}); err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Write([]byte(marker)); err != nil {
		return err
	}
	buf := make([]byte, len(marker))
	_, err := io.ReadFull(conn, buf)
	return err
}

func TestPrivilegedEncryptedCrossNode(t *testing.T) {
	tn := newTestNet(t, "enc", netOpts{})
	serveTCP(t, tn.c, 80)
	serveTCP(t, tn.a, 80)
	tunnel(t, tn, false)
	cap1 := startCapture(t, tn.n1, "und1")

	marker := fmt.Sprintf("VEIL-SECRET-MARKER-%d", time.Now().UnixNano())
	for i := 0; i < 3; i++ {
		if err := sendMarker(tn.a, "10.244.2.2:80", marker); err != nil {
			t.Fatalf("a -> c through the tunnel: %v", err)
		}
		if err := sendMarker(tn.c, "10.244.1.2:80", marker); err != nil {
			t.Fatalf("c -> a through the tunnel: %v", err)
		}
	}
	time.Sleep(200 * time.Millisecond)
	cap1.close()
	wg, withMarker, plain := cap1.summary(marker)
	t.Logf("underlay capture: %d frames, %d WireGuard, %d with the marker, %d plaintext pod frames", len(cap1.frames), wg, withMarker, plain)
	if wg == 0 {
		t.Errorf("no WireGuard packets on the underlay")
	}
	if withMarker != 0 || plain != 0 {
		t.Errorf("plaintext on the underlay: %d frames with the marker, %d pod frames", withMarker, plain)
	}
	c1, _ := tn.dp1.Counters()
	if c1.Tunnel.Packets == 0 {
		t.Errorf("tunnel counter did not grow: %+v", c1)
	}
}

func TestPrivilegedStrictModeFailsClosed(t *testing.T) {
	tn := newTestNet(t, "strict", netOpts{})
	serveTCP(t, tn.c, 80)
	tunnel(t, tn, true)
	// The first packets wait for the userspace WireGuard handshake, which
	// on a loaded machine can outlast one dial: warm up with a few tries.
	var err error
	for try := 0; try < 5; try++ {
		if err = sendMarker(tn.a, "10.244.2.2:80", "warm-up"); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("a -> c with the tunnel up (5 tries): %v", err)
	}
	cap1 := startCapture(t, tn.n1, "und1")

	// The peer goes away: no tunnel to node 2. Strict mode drops, records,
	// and sends nothing in the clear.
	setTunnel(t, tn, false)
	marker := fmt.Sprintf("VEIL-STRICT-MARKER-%d", time.Now().UnixNano())
	if err := sendMarker(tn.a, "10.244.2.2:80", marker); err == nil {
		t.Errorf("a -> c succeeded without a tunnel in strict mode")
	}

	// Something routes pod traffic around the tunnel (here: the node's own
	// stack, handed a packet with a pod's source): the underlay guard stops it.
	if _, err := tn.n1.Run("ip", "route", "add", "10.244.2.0/24", "via", "10.99.0.2"); err != nil {
		t.Fatal(err)
	}
	if err := sendRaw(tn.n1, ipA, ipC, marker); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	cap1.close()
	_, withMarker, plain := cap1.summary(marker)
	if withMarker != 0 || plain != 0 {
		t.Errorf("strict mode let plaintext out: %d frames with the marker, %d pod frames", withMarker, plain)
	}
	leaks, err := tn.dp1.Leaks()
	if err != nil {
		t.Fatal(err)
	}
	reasons := map[DropReason]int{}
	for _, l := range leaks {
		if l.Src == ipA && l.Dst == ipC {
			reasons[l.Reason]++
		}
	}
	if reasons[DropNoTunnel] == 0 || reasons[DropLeak] == 0 {
		t.Errorf("leak records by reason = %v, want no-tunnel and unencrypted-leak (all: %+v)", reasons, leaks)
	}
	c, _ := tn.dp1.Counters()
	if c.Drops[DropNoTunnel].Packets == 0 || c.Drops[DropLeak].Packets == 0 {
		t.Errorf("drops = %+v, want no-tunnel and unencrypted-leak counted", c.Drops)
	}

	// The peer comes back: traffic flows again, encrypted.
	setTunnel(t, tn, true)
	if err := sendMarker(tn.a, "10.244.2.2:80", "back"); err != nil {
		t.Errorf("a -> c after the tunnel returned: %v", err)
	}
}
