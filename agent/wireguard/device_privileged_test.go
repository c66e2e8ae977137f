package wireguard

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/tests/testenv"
)

// side is one end of the lab: a namespace with an underlay veth and a
// WireGuard device.
type side struct {
	ns       *netns.Netns
	veth     string
	underlay netip.Addr
	wgName   string
	wgAddr   netip.Addr
	port     int
	dev      *Device
}

func (s *side) endpoint() netip.AddrPort {
	return netip.AddrPortFrom(s.underlay, uint16(s.port))
}

func (s *side) peer() Peer {
	return Peer{PublicKey: s.dev.Key().PublicKey(), Endpoint: s.endpoint(), AllowedIPs: []netip.Prefix{netip.PrefixFrom(s.wgAddr, 32)}}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: testLogLevel()}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// newNetns creates a uniquely named namespace without IPv6 (so that the
// capture sees no neighbour discovery) and removes it by name on cleanup.
func newNetns(t *testing.T, suffix string) *netns.Netns {
	t.Helper()
	ns, err := netns.NewNetns(fmt.Sprintf("veiltest-%d-wg-%s", os.Getpid(), suffix))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ns.Delete(); err != nil {
			t.Error(err)
		}
	})
	for _, k := range []string{"net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"} {
		if err := ns.Sysctl(k, "1"); err != nil {
			t.Fatal(err)
		}
	}
	return ns
}

// newLab builds two namespaces joined by a veth pair (10.98.x.0/24) with a
// userspace WireGuard device in each, peered with each other, addressed
// 10.97.0.1 and 10.97.0.2 with a route to the other through the device.
func newLab(t *testing.T, tag string) (a, b *side) {
	t.Helper()
	id := os.Getpid() % 1000
	net3 := byte(os.Getpid() % 250)
	a = &side{ns: newNetns(t, tag+"a"), veth: fmt.Sprintf("vwgv%d%sa", id, tag), wgName: fmt.Sprintf("vwgt%d%sa", id, tag),
		underlay: netip.AddrFrom4([4]byte{10, 98, net3, 1}), wgAddr: netip.MustParseAddr("10.97.0.1"), port: 51820}
	b = &side{ns: newNetns(t, tag+"b"), veth: fmt.Sprintf("vwgv%d%sb", id, tag), wgName: fmt.Sprintf("vwgt%d%sb", id, tag),
		underlay: netip.AddrFrom4([4]byte{10, 98, net3, 2}), wgAddr: netip.MustParseAddr("10.97.0.2"), port: 51821}

	bFd, err := os.Open(b.ns.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer bFd.Close()
	// Both ends are created inside the namespaces: nothing ever appears in
	// the host's.
	if err := a.ns.Do(func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: a.veth}, PeerName: b.veth, PeerNamespace: netlink.NsFd(int(bFd.Fd()))}
		return netlink.LinkAdd(veth)
	}); err != nil {
		t.Fatalf("veth: %v", err)
	}
	for _, s := range []*side{a, b} {
		if err := s.ns.Do(func() error { return addrUp(s.veth, netip.PrefixFrom(s.underlay, 24)) }); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []*side{a, b} {
		s.dev = openIn(t, s.ns, Config{Interface: s.wgName, ListenPort: s.port, PrivateKey: keyFile(t, s.wgName), MTU: 1420, Logger: testLogger(t)})
		if err := s.ns.Do(func() error { return addrUp(s.wgName, netip.PrefixFrom(s.wgAddr, 32)) }); err != nil {
			t.Fatal(err)
		}
	}
	routeVia(t, a, b)
	routeVia(t, b, a)
	ctx := context.Background()
	if err := a.dev.SetPeers(ctx, []Peer{b.peer()}); err != nil {
		t.Fatal(err)
	}
	if err := b.dev.SetPeers(ctx, []Peer{a.peer()}); err != nil {
		t.Fatal(err)
	}
	return a, b
}

func keyFile(t *testing.T, name string) Key {
	t.Helper()
	k, err := LoadOrCreateKey(filepath.Join(t.TempDir(), name+".key"))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// openIn opens a device from a thread switched into ns; Netns.Do throws that
// thread away afterwards, so everything later proves the device does not
// need it.
func openIn(t *testing.T, ns *netns.Netns, cfg Config) *Device {
	t.Helper()
	var d *Device
	if err := ns.Do(func() (err error) {
		d, err = Open(context.Background(), cfg)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Error(err)
		}
	})
	return d
}

func addrUp(dev string, p netip.Prefix) error {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return err
	}
	if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: prefixNet(p)}); err != nil {
		return fmt.Errorf("address %s on %s: %w", p, dev, err)
	}
	return netlink.LinkSetUp(l)
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// routeVia routes the other side's tunnel address through s's device.
func routeVia(t *testing.T, s, other *side) {
	t.Helper()
	if err := s.ns.Do(func() error {
		l, err := netlink.LinkByName(s.wgName)
		if err != nil {
			return err
		}
		return netlink.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: prefixNet(netip.PrefixFrom(other.wgAddr, 32)),
			Src: s.wgAddr.AsSlice(), Scope: netlink.SCOPE_LINK})
	}); err != nil {
		t.Fatalf("route in %s: %v", s.ns.Name, err)
	}
}

// listen starts a TCP server inside ns; handle runs per connection.
func listen(t *testing.T, ns *netns.Netns, addr string, handle func(net.Conn)) {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}

func dial(ns *netns.Netns, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	return c, err
}

// capture records every frame on an interface inside ns (AF_PACKET, both
// directions) until stop is called.
type capture struct {
	fd     int
	mu     sync.Mutex
	frames [][]byte
	done   chan struct{}
	stopc  chan struct{}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func startCapture(t *testing.T, ns *netns.Netns, ifname string) *capture {
	t.Helper()
	c := &capture{done: make(chan struct{}), stopc: make(chan struct{})}
	if err := ns.Do(func() error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: l.Attrs().Index}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind AF_PACKET to %s: %w", ifname, err)
		}
		tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			unix.Close(fd)
			return err
		}
		c.fd = fd
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(c.done)
		buf := make([]byte, 65536)
		stopping := false
		for {
			if !stopping {
				select {
				case <-c.stopc:
					stopping = true // drain what is queued, then return
				default:
				}
			}
			flags := 0
			if stopping {
				flags = unix.MSG_DONTWAIT
			}
			n, _, err := unix.Recvfrom(c.fd, buf, flags)
			if err != nil {
				if stopping {
					return
				}
				continue // timeout: look at stopc again
			}
			c.mu.Lock()
			c.frames = append(c.frames, slices.Clone(buf[:n]))
			c.mu.Unlock()
		}
	}()
	t.Cleanup(func() { c.stop() })
	return c
}

func (c *capture) stop() [][]byte {
	select {
	case <-c.stopc:
	default:
		close(c.stopc)
		<-c.done
		unix.Close(c.fd)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.frames
}

// checkWire fails unless every frame is ARP or IPv4 UDP between the two
// listen ports, and no frame contains marker. It returns the number of
// WireGuard transport-data packets seen.
func checkWire(t *testing.T, frames [][]byte, ports []int, marker []byte) (data int) {
	t.Helper()
	for i, f := range frames {
		if bytes.Contains(f, marker) {
			t.Errorf("frame %d carries the marker in plaintext: % x", i, f)
		}
		if len(f) < 14 {
			t.Errorf("frame %d: runt", i)
			continue
		}
		switch et := binary.BigEndian.Uint16(f[12:14]); et {
		case unix.ETH_P_ARP:
			continue
		case unix.ETH_P_IP:
		default:
			t.Errorf("frame %d: ethertype %#04x, want only IPv4 WireGuard and ARP", i, et)
			continue
		}
		ip := f[14:]
		ihl := int(ip[0]&0x0f) * 4
		if ip[9] != unix.IPPROTO_UDP || len(ip) < ihl+8 {
			t.Errorf("frame %d: IP protocol %d, want only UDP", i, ip[9])
			continue
		}
		udp := ip[ihl:]
		sport, dport := int(binary.BigEndian.Uint16(udp[0:2])), int(binary.BigEndian.Uint16(udp[2:4]))
		if !slices.Contains(ports, sport) || !slices.Contains(ports, dport) {
			t.Errorf("frame %d: UDP %d -> %d, want only between listen ports %v", i, sport, dport, ports)
			continue
		}
		if len(udp) > 8 && udp[8] == 4 { // WireGuard message type 4: transport data
			data++
		}
	}
	return data
}

// echo serves a line-less echo and remembers whether marker came through.
func echoHandler(marker []byte, sawMarker *atomic.Bool) func(net.Conn) {
	return func(c net.Conn) {
		buf := make([]byte, 64<<10)
		var seen []byte
		for {
			n, err := c.Read(buf)
			if n > 0 {
				seen = append(seen, buf[:n]...)
				if bytes.Contains(seen, marker) {
					sawMarker.Store(true)
				}
				if len(seen) > 1<<20 {
					seen = seen[len(seen)-len(marker):]
				}
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
}

// wgHandshakes runs `wg show IFACE latest-handshakes` inside ns: public
// key -> unix time (0 = never).
func wgHandshakes(t *testing.T, ns *netns.Netns, iface string) map[string]int64 {
	t.Helper()
	out, err := ns.Run("wg", "show", iface, "latest-handshakes")
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]int64{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		ts, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			t.Fatalf("wg latest-handshakes line %q: %v", line, err)
		}
		m[f[0]] = ts
	}
	return m
}

// checkGoroutines fails the test if goroutines started during it are still
// running shortly after its cleanups.
func checkGoroutines(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				t.Errorf("%d goroutines left behind (had %d):\n%s", runtime.NumGoroutine()-before, before, buf[:runtime.Stack(buf, true)])
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}

func TestPrivilegedTunnel(t *testing.T) {
	testenv.RequirePrivileged(t)
	checkGoroutines(t) // registered first, so it runs after every other cleanup
	ctx := context.Background()
	a, b := newLab(t, "")
	marker := []byte(fmt.Sprintf("VEIL-MARKER-%d-do-not-leak", os.Getpid()))
	var sawMarker atomic.Bool
	listen(t, b.ns, "10.97.0.2:7000", echoHandler(marker, &sawMarker))
	target := "10.97.0.2:7000"

	t.Run("userspace mode in the namespace", func(t *testing.T) {
		if a.dev.Mode() != ModeUserspace {
			t.Errorf("mode %q, want userspace (this kernel has no WireGuard)", a.dev.Mode())
		}
		// The UDP socket must be in the device's namespace, though the
		// thread that opened it is gone.
		out, err := a.ns.Run("ss", "-Hlun", "sport = :"+strconv.Itoa(a.port))
		if err != nil || !strings.Contains(out, strconv.Itoa(a.port)) {
			t.Errorf("no UDP socket on %d in %s: %v %s", a.port, a.ns.Name, err, out)
		}
		l, err := a.dev.nl.LinkByName(a.wgName)
		if err != nil {
			t.Fatal(err)
		}
		if l.Attrs().MTU != 1420 || l.Attrs().Flags&net.FlagUp == 0 {
			t.Errorf("link mtu %d flags %v, want 1420 and up", l.Attrs().MTU, l.Attrs().Flags)
		}
		if _, err := os.Stat(filepath.Join(SocketDir, a.wgName+".sock")); err != nil {
			t.Errorf("UAPI socket: %v", err)
		}
	})

	t.Run("TCP echo across the tunnel, only WireGuard on the wire", func(t *testing.T) {
		capt := startCapture(t, a.ns, a.veth)
		td := startTcpdump(t, b.ns, b.veth)
		c, err := dial(a.ns, target, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		msg := bytes.Repeat(append(slices.Clone(marker), ' '), 200) // several segments
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, msg) {
			t.Fatal("echo differs")
		}
		if !sawMarker.Load() {
			t.Error("server never saw the marker")
		}
		time.Sleep(200 * time.Millisecond) // let the last ACKs cross
		frames := capt.stop()
		data := checkWire(t, frames, []int{a.port, b.port}, marker)
		t.Logf("capture on %s: %d frames, %d WireGuard data packets, marker never in plaintext", a.veth, len(frames), data)
		if data == 0 {
			t.Error("capture saw no WireGuard data packets: it did not see the tunnel")
		}
		if td != nil {
			td.check(t, b.ns, marker, []int{a.port, b.port})
		}
	})

	t.Run("wg show and Status agree", func(t *testing.T) {
		out, err := a.ns.Run("wg", "show", a.wgName)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("wg show %s:\n%s", a.wgName, out)
		if strings.Contains(out, a.dev.Key().PrivateKey().String()) {
			t.Fatal("wg show printed the private key")
		}
		pubB := b.dev.Key().PublicKey().String()
		if !strings.Contains(out, "peer: "+pubB) || !strings.Contains(out, "latest handshake") {
			t.Errorf("wg show does not list %s with a handshake", pubB)
		}
		hs := wgHandshakes(t, a.ns, a.wgName)
		if age := time.Since(time.Unix(hs[pubB], 0)); hs[pubB] == 0 || age > time.Minute {
			t.Errorf("handshake with b: %d (age %v)", hs[pubB], age)
		}
		st, err := a.dev.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode != ModeUserspace || st.Interface != a.wgName || st.ListenPort != a.port ||
			st.PublicKey != a.dev.Key().PublicKey().String() || st.Fingerprint != a.dev.Key().Fingerprint() ||
			st.KeyAge < 0 || st.KeyAge > time.Hour || st.KeyCreated.IsZero() {
			t.Errorf("status %+v", st)
		}
		if len(st.Peers) != 1 {
			t.Fatalf("status peers %+v", st.Peers)
		}
		p := st.Peers[0]
		if p.PublicKey != pubB || p.Endpoint != b.endpoint() || !slices.Equal(p.AllowedIPs, []netip.Prefix{netip.MustParsePrefix("10.97.0.2/32")}) ||
			p.LastHandshake.Unix() != hs[pubB] || p.RxBytes == 0 || p.TxBytes == 0 || p.Keepalive != DefaultKeepalive {
			t.Errorf("status peer %+v, wg says handshake %d", p, hs[pubB])
		}
		t.Logf("Status: mode=%s if=%s fp=%s age=%v port=%d peer=%s endpoint=%s allowed=%v handshake=%s rx=%d tx=%d",
			st.Mode, st.Interface, st.Fingerprint, st.KeyAge, st.ListenPort, p.Fingerprint, p.Endpoint, p.AllowedIPs, p.LastHandshake.Format(time.RFC3339), p.RxBytes, p.TxBytes)
	})

	t.Run("SetPeers leaves unchanged peers' sessions alone", func(t *testing.T) {
		before, err := a.dev.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		other, _ := GenerateKey()
		extra := Peer{PublicKey: other.PublicKey(), Endpoint: netip.MustParseAddrPort("10.98.250.9:51820"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.97.9.0/24")}}
		if err := a.dev.SetPeers(ctx, []Peer{extra, b.peer()}); err != nil {
			t.Fatal(err)
		}
		if err := a.dev.SetPeers(ctx, []Peer{b.peer()}); err != nil {
			t.Fatal(err)
		}
		after, err := a.dev.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(after.Peers) != 1 || !after.Peers[0].LastHandshake.Equal(before.Peers[0].LastHandshake) || after.Peers[0].RxBytes < before.Peers[0].RxBytes {
			t.Errorf("peer b was reset: before %+v after %+v", before.Peers, after.Peers)
		}
		if err := netns.TCPEcho(a.ns, target, 5*time.Second); err != nil {
			t.Error(err)
		}
	})

	t.Run("link bounce reopens the socket in the device's namespace", func(t *testing.T) {
		// wireguard-go reopens its UDP socket from its own goroutines on a
		// link event; the socket must land in the namespace all the same.
		for _, cmd := range [][]string{{"ip", "link", "set", a.wgName, "down"}, {"ip", "link", "set", a.wgName, "up"}} {
			if _, err := a.ns.Run(cmd[0], cmd[1:]...); err != nil {
				t.Fatal(err)
			}
			time.Sleep(1500 * time.Millisecond) // the TUN reports state once a second
		}
		routeVia(t, a, b) // the kernel dropped it with the link
		if err := netns.TCPEcho(a.ns, target, 10*time.Second); err != nil {
			t.Error(err)
		}
		if out, err := a.ns.Run("ss", "-Hlun", "sport = :"+strconv.Itoa(a.port)); err != nil || !strings.Contains(out, strconv.Itoa(a.port)) {
			t.Errorf("no UDP socket on %d in %s after bounce: %v %s", a.port, a.ns.Name, err, out)
		}
	})

	t.Run("TCP stream survives key rotation", func(t *testing.T) {
		var received atomic.Int64
		readErr := make(chan error, 1)
		listen(t, b.ns, "10.97.0.2:7001", func(c net.Conn) {
			buf := make([]byte, 64<<10)
			for {
				n, err := c.Read(buf)
				received.Add(int64(n))
				if err != nil {
					if errors.Is(err, io.EOF) {
						err = nil
					}
					readErr <- err
					return
				}
			}
		})
		capt := startCapture(t, a.ns, a.veth)
		c, err := dial(a.ns, "10.97.0.2:7001", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		stop := make(chan struct{})
		writeErr := make(chan error, 1)
		go func() {
			chunk := bytes.Repeat(append(slices.Clone(marker), ' '), 4096/(len(marker)+1))
			for {
				select {
				case <-stop:
					writeErr <- nil
					return
				case <-time.After(5 * time.Millisecond):
				}
				c.SetWriteDeadline(time.Now().Add(20 * time.Second))
				if _, err := c.Write(chunk); err != nil {
					writeErr <- err
					return
				}
			}
		}()
		start := time.Now()
		testenv.Eventually(t, 5*time.Second, 50*time.Millisecond, func() error {
			if n := received.Load(); n <= 64<<10 {
				return fmt.Errorf("stream to start: %d bytes received", n)
			}
			return nil
		})
		oldPub := a.dev.Key().PublicKey()
		next, err := a.dev.RotateKey(ctx)
		if err != nil {
			t.Fatal(err)
		}
		rotated := received.Load()
		if next.PublicKey() == oldPub || a.dev.Key().PublicKey() != next.PublicKey() {
			t.Fatal("device key did not change")
		}
		// What b's agent does when it sees a's new annotation.
		if err := b.dev.SetPeers(ctx, []Peer{a.peer()}); err != nil {
			t.Fatal(err)
		}
		testenv.Eventually(t, 15*time.Second, 50*time.Millisecond, func() error {
			if n := received.Load(); n <= rotated+256<<10 {
				return fmt.Errorf("stream to resume after rotation: %d bytes received, %d at rotation", n, rotated)
			}
			return nil
		})
		close(stop)
		if err := <-writeErr; err != nil {
			t.Fatalf("writer: %v", err)
		}
		c.Close()
		select {
		case err := <-readErr:
			if err != nil {
				t.Fatalf("reader: %v (connection reset?)", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("reader did not see the stream end")
		}
		took := time.Since(start)
		frames := capt.stop()
		data := checkWire(t, frames, []int{a.port, b.port}, marker)
		t.Logf("capture across the rotation: %d frames, %d WireGuard data packets, marker never in plaintext", len(frames), data)
		if took > 20*time.Second {
			t.Errorf("rotation took %v", took)
		}
		hs := wgHandshakes(t, b.ns, b.wgName)
		if hs[next.PublicKey().String()] == 0 || len(hs) != 1 {
			t.Errorf("b's handshakes after rotation: %v, want only a's new key", hs)
		}
		st, _ := a.dev.Status(ctx)
		if st.Fingerprint != next.Fingerprint() || !st.RotationPending {
			t.Errorf("status after rotation: fp %s pending %v", st.Fingerprint, st.RotationPending)
		}
		if err := next.ConfirmRotation(); err != nil {
			t.Fatal(err)
		}
		t.Logf("stream of %d bytes survived rotation %s -> %s in %v (%d bytes before rotation)", received.Load(), Fingerprint(oldPub), next.Fingerprint(), took.Round(time.Millisecond), rotated)
	})

	t.Run("SetPeers without the peer stops traffic", func(t *testing.T) {
		if err := a.dev.SetPeers(ctx, nil); err != nil {
			t.Fatal(err)
		}
		if st, _ := a.dev.Status(ctx); len(st.Peers) != 0 {
			t.Errorf("peers left: %+v", st.Peers)
		}
		if c, err := dial(a.ns, target, 2*time.Second); err == nil {
			c.Close()
			t.Fatal("connected with no peer")
		}
		if err := a.dev.SetPeers(ctx, []Peer{b.peer()}); err != nil {
			t.Fatal(err)
		}
		if err := netns.TCPEcho(a.ns, target, 10*time.Second); err != nil {
			t.Errorf("after re-adding: %v", err)
		}
	})

	t.Run("Close removes device and socket", func(t *testing.T) {
		if err := a.dev.Close(); err != nil {
			t.Fatal(err)
		}
		var nf netlink.LinkNotFoundError
		if err := a.ns.Do(func() error { _, err := netlink.LinkByName(a.wgName); return err }); !errors.As(err, &nf) {
			t.Errorf("link after Close: %v", err)
		}
		if _, err := os.Stat(filepath.Join(SocketDir, a.wgName+".sock")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("UAPI socket after Close: %v", err)
		}
		if out, err := a.ns.Run("ss", "-Hlun", "sport = :"+strconv.Itoa(a.port)); err != nil || strings.TrimSpace(out) != "" {
			t.Errorf("UDP socket after Close: %v %q", err, out)
		}
		if _, err := a.dev.Status(ctx); !errors.Is(err, net.ErrClosed) {
			t.Errorf("Status after Close: %v", err)
		}
		if err := a.dev.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
}

// TestPrivilegedOpenMode checks the kernel/userspace decision on this
// machine's real kernel, whichever it is.
func TestPrivilegedOpenMode(t *testing.T) {
	testenv.RequirePrivileged(t)
	checkGoroutines(t)
	ns := newNetns(t, "mode")
	name := fmt.Sprintf("vwgt%dm", os.Getpid()%1000)
	key, _ := GenerateKey()
	cfg := Config{Interface: name, PrivateKey: key, Logger: testLogger(t)}

	var kernelErr error
	var kdev *Device
	kcfg := cfg
	kcfg.Mode = ModeKernel
	ns.Do(func() error { kdev, kernelErr = Open(context.Background(), kcfg); return nil })
	if kernelErr == nil {
		t.Logf("kernel has WireGuard")
		if kdev.Mode() != ModeKernel {
			t.Errorf("mode %q", kdev.Mode())
		}
		if err := kdev.Close(); err != nil {
			t.Error(err)
		}
	} else {
		t.Logf("kernel WireGuard: %v", kernelErr)
		if !kernelUnsupported(kernelErr) {
			t.Fatalf("kernel refused for another reason than missing WireGuard: %v", kernelErr)
		}
	}
	d := openIn(t, ns, cfg)
	want := ModeKernel
	if kernelErr != nil {
		want = ModeUserspace
	}
	if d.Mode() != want {
		t.Errorf("auto mode chose %q, want %q", d.Mode(), want)
	}
	out, err := ns.Run("wg", "show", name)
	if err != nil || !strings.Contains(out, key.PublicKey().String()) || !strings.Contains(out, "listening port: 51820") {
		t.Errorf("wg show: %v\n%s", err, out)
	}
	// Open refuses a name already taken instead of adopting a stranger.
	var err2 error
	ns.Do(func() error {
		_, err2 = Open(context.Background(), Config{Interface: name, PrivateKey: key, Mode: ModeUserspace})
		return nil
	})
	if err2 == nil {
		t.Error("second device with the same name opened")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(SocketDir, name+".sock")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left: %v", err)
	}
	for _, bad := range []Config{
		{Interface: "", PrivateKey: key},
		{Interface: "waytoolonginterfacename", PrivateKey: key},
		{Interface: name},
		{Interface: name, PrivateKey: key, MTU: 500},
		{Interface: name, PrivateKey: key, Mode: "fast"},
	} {
		if _, err := Open(context.Background(), bad); err == nil {
			t.Errorf("config %+v accepted", bad)
		}
	}
}

func testLogLevel() slog.Level {
	if os.Getenv("VEIL_WG_DEBUG") == "1" {
		return slog.LevelDebug
	}
	return slog.LevelInfo
}

// tcpdump is a second, independent witness on the other end of the veth.
type tcpdump struct {
	cmd  *exec.Cmd
	file string
	done chan error
}

func startTcpdump(t *testing.T, ns *netns.Netns, ifname string) *tcpdump {
	t.Helper()
	if _, err := exec.LookPath("tcpdump"); err != nil {
		t.Log("no tcpdump: AF_PACKET capture only")
		return nil
	}
	td := &tcpdump{file: filepath.Join(t.TempDir(), "underlay.pcap"), done: make(chan error, 1)}
	td.cmd = exec.Command("nsenter", "--net="+ns.Path(), "--", "tcpdump", "-i", ifname, "--immediate-mode", "-U", "-n", "-w", td.file)
	stderr, err := td.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := td.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		signalled := false
		for sc.Scan() {
			if !signalled && strings.Contains(sc.Text(), "listening on") {
				close(ready)
				signalled = true
			}
		}
		if !signalled {
			close(ready)
		}
		td.done <- td.cmd.Wait()
	}()
	t.Cleanup(func() { td.stop() })
	select {
	case <-ready:
	case <-time.After(5 * time.Second):
		t.Fatal("tcpdump did not start")
	}
	return td
}

// stop ends tcpdump (the process this test started, by its PID) and waits.
func (td *tcpdump) stop() {
	if td.cmd.ProcessState != nil {
		return
	}
	td.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-td.done:
	case <-time.After(5 * time.Second):
		td.cmd.Process.Kill()
		<-td.done
	}
}

func (td *tcpdump) check(t *testing.T, ns *netns.Netns, marker []byte, ports []int) {
	t.Helper()
	td.stop()
	raw, err := os.ReadFile(td.file)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, marker) {
		t.Error("tcpdump capture holds the marker in plaintext")
	}
	out, err := exec.Command("tcpdump", "-nn", "-r", td.file).CombinedOutput()
	if err != nil {
		t.Fatalf("tcpdump -r: %v: %s", err, out)
	}
	var udp, other int
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if line == "" || strings.HasPrefix(line, "reading from") {
			continue
		}
		ok := strings.Contains(line, "UDP") || strings.Contains(line, "ARP")
		portOK := false
		for _, p := range ports {
			portOK = portOK || strings.Contains(line, "."+strconv.Itoa(p)+" >") || strings.Contains(line, "."+strconv.Itoa(p)+":")
		}
		if strings.Contains(line, "UDP") && portOK {
			udp++
		} else if !strings.Contains(line, "ARP") || !ok {
			other++
			t.Errorf("tcpdump saw non-WireGuard traffic: %s", line)
		}
	}
	if udp == 0 {
		t.Error("tcpdump saw no WireGuard UDP")
	}
	t.Logf("tcpdump on %s: %d WireGuard UDP packets to/from ports %v, %d other, marker absent; first lines:\n%s", ns.Name, udp, ports, other, firstLines(string(out), 4))
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n")
}
