package datapath

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/policy/policytypes"
	"github.com/veilmesh/veil/tests/testenv"
)

// svcClientEnv makes the test binary a Service client: the socket programs
// only see sockets created inside the test cgroup, so the client runs as a
// helper process in pod a's namespace and the cgroup. Its one output line is
// "ok <address the application saw>" or "err <error>".
const svcClientEnv = "VEIL_TEST_SVC_CLIENT"

func maybeRunSvcClient() {
	mode := os.Getenv(svcClientEnv)
	if mode == "" {
		return
	}
	start := time.Now()
	seen, err := svcClient(mode, os.Args[len(os.Args)-1])
	if err != nil {
		fmt.Printf("err %v (after %s)\n", err, time.Since(start).Round(time.Millisecond))
	} else {
		fmt.Println("ok", seen)
	}
	os.Exit(0)
}

// svcClient talks to addr once and returns the peer address the
// application saw: getpeername for connected sockets (tcp, udpconn, tcp6 on
// an IPv6 socket with a v4-mapped address), the reply's source for
// unconnected UDP (udp).
func svcClient(mode, addr string) (string, error) {
	const timeout = time.Second
	msg := []byte("veil-svc-" + mode)
	switch mode {
	case "tcp", "udpconn":
		network := map[string]string{"tcp": "tcp4", "udpconn": "udp4"}[mode]
		c, err := net.DialTimeout(network, addr, timeout)
		if err != nil {
			return "", err
		}
		defer c.Close()
		peer, err := peerName(c.(syscall.Conn))
		if err != nil {
			return "", err
		}
		return peer, echoOnce(c, msg, timeout)
	case "udp":
		pc, err := net.ListenPacket("udp4", ":0")
		if err != nil {
			return "", err
		}
		defer pc.Close()
		to, err := net.ResolveUDPAddr("udp4", addr)
		if err != nil {
			return "", err
		}
		if _, err := pc.WriteTo(msg, to); err != nil {
			return "", err
		}
		pc.SetReadDeadline(time.Now().Add(timeout))
		buf := make([]byte, 256)
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return "", err
		}
		if string(buf[:n]) != string(msg) {
			return "", fmt.Errorf("echo: got %q", buf[:n])
		}
		return from.String(), nil
	case "who":
		// whoBurst connects: which backend answered each (see serveWho).
		var got []string
		for range whoBurst {
			c, err := net.DialTimeout("tcp4", addr, timeout)
			if err != nil {
				return "", err
			}
			c.SetDeadline(time.Now().Add(timeout))
			b, err := io.ReadAll(c)
			c.Close()
			if err != nil {
				return "", err
			}
			got = append(got, string(b))
		}
		return strings.Join(got, ","), nil
	case "loop":
		// Connects for loopTime (at most loopMax), printing for each
		// "<start unix ns> <connected unix ns> <backend>": which backend
		// answered a connect made between the two times.
		end := time.Now().Add(loopTime)
		n := 0
		for ; n < loopMax && time.Now().Before(end); n++ {
			// Paced, so the load spans the test's updates.
			time.Sleep(loopPace)
			start := time.Now().UnixNano()
			c, err := net.DialTimeout("tcp4", addr, timeout)
			if err != nil {
				return "", fmt.Errorf("connect %d: %w", n, err)
			}
			connected := time.Now().UnixNano()
			c.SetDeadline(time.Now().Add(timeout))
			b, err := io.ReadAll(c)
			c.Close()
			if err != nil {
				return "", fmt.Errorf("connect %d: %w", n, err)
			}
			fmt.Println(start, connected, string(b))
		}
		return fmt.Sprint(n), nil
	case "connrate":
		// Connects (each read to the server's close) for connRateTime;
		// the result is "COUNT SECONDS".
		start := time.Now()
		n := 0
		for time.Since(start) < connRateTime {
			c, err := net.DialTimeout("tcp4", addr, timeout)
			if err != nil {
				return "", fmt.Errorf("connect %d: %w", n, err)
			}
			c.SetDeadline(time.Now().Add(timeout))
			_, err = io.Copy(io.Discard, c)
			c.Close()
			if err != nil {
				return "", fmt.Errorf("connect %d: %w", n, err)
			}
			n++
		}
		return fmt.Sprintf("%d %f", n, time.Since(start).Seconds()), nil
	case "sctp":
		// One SCTP association to addr: the peer the application sees.
		ap := netip.MustParseAddrPort(addr)
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, ipprotoSCTP)
		if err != nil {
			return "", fmt.Errorf("sctp socket: %w", err)
		}
		defer syscall.Close(fd)
		if err := syscall.Connect(fd, &syscall.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}); err != nil {
			return "", fmt.Errorf("connect %s: %w", addr, err)
		}
		sa, err := syscall.Getpeername(fd)
		if err != nil {
			return "", err
		}
		in := sa.(*syscall.SockaddrInet4)
		return netip.AddrPortFrom(netip.AddrFrom4(in.Addr), uint16(in.Port)).String(), nil
	case "hold":
		// One connection, used again after the test has taken its
		// backend out of the Service.
		c, err := net.DialTimeout("tcp4", addr, timeout)
		if err != nil {
			return "", err
		}
		defer c.Close()
		if err := echoOnce(c, msg, timeout); err != nil {
			return "", err
		}
		fmt.Println("connected")
		time.Sleep(holdTime)
		return "still answered", echoOnce(c, msg, timeout)
	case "tcp6":
		ap := netip.MustParseAddrPort(addr)
		fd, err := syscall.Socket(syscall.AF_INET6, syscall.SOCK_STREAM, 0)
		if err != nil {
			return "", err
		}
		f := os.NewFile(uintptr(fd), "tcp6")
		defer f.Close()
		tv := syscall.NsecToTimeval(int64(timeout))
		syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_SNDTIMEO, &tv)
		syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
		mapped := netip.AddrFrom16(ap.Addr().As16())
		if err := syscall.Connect(fd, &syscall.SockaddrInet6{Addr: mapped.As16(), Port: int(ap.Port())}); err != nil {
			return "", fmt.Errorf("connect %s: %w", mapped, err)
		}
		sa, err := syscall.Getpeername(fd)
		if err != nil {
			return "", err
		}
		peer := sa.(*syscall.SockaddrInet6)
		if _, err := syscall.Write(fd, msg); err != nil {
			return "", err
		}
		buf := make([]byte, 256)
		n, err := syscall.Read(fd, buf)
		if err != nil {
			return "", err
		}
		if string(buf[:n]) != string(msg) {
			return "", fmt.Errorf("echo: got %q", buf[:n])
		}
		return netip.AddrPortFrom(netip.AddrFrom16(peer.Addr).Unmap(), uint16(peer.Port)).String(), nil
	}
	return "", fmt.Errorf("unknown client mode %q", mode)
}

func peerName(c syscall.Conn) (string, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return "", err
	}
	var sa syscall.Sockaddr
	var serr error
	if err := raw.Control(func(fd uintptr) { sa, serr = syscall.Getpeername(int(fd)) }); err != nil {
		return "", err
	}
	if serr != nil {
		return "", fmt.Errorf("getpeername: %w", serr)
	}
	in, ok := sa.(*syscall.SockaddrInet4)
	if !ok {
		return "", fmt.Errorf("getpeername: %T", sa)
	}
	return netip.AddrPortFrom(netip.AddrFrom4(in.Addr), uint16(in.Port)).String(), nil
}

func echoOnce(c net.Conn, msg []byte, timeout time.Duration) error {
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(msg); err != nil {
		return err
	}
	buf := make([]byte, 256)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	if string(buf[:n]) != string(msg) {
		return fmt.Errorf("echo: got %q", buf[:n])
	}
	return nil
}

// svcCall runs one client in pod a and returns what it printed.
func (tn *testNet) svcCall(t *testing.T, mode, addr string) string {
	t.Helper()
	p, err := netns.StartProc(&tn.a.Netns, tn.cg, -1, []string{svcClientEnv + "=" + mode}, addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Wait(ctxT(t, 10*time.Second)); err != nil {
		t.Fatalf("%s client to %s: %v", mode, addr, err)
	}
	return strings.Join(p.Lines(), "\n")
}

var (
	vip        = netip.MustParseAddr("10.96.0.10")
	vipEmpty   = netip.MustParseAddr("10.96.0.11")
	backendB   = Backend{IP: ipB, Port: 8080}
	backendC   = Backend{IP: ipC, Port: 8080}
	svcTCP     = ServiceKey{VIP: vip, Port: 80, Proto: 6}
	svcUDP     = ServiceKey{VIP: vip, Port: 53, Proto: 17}
	svcTCPNone = ServiceKey{VIP: vipEmpty, Port: 80, Proto: 6}
	svcUDPNone = ServiceKey{VIP: vipEmpty, Port: 53, Proto: 17}
)

// TestPrivilegedServiceClusterIP: pod a reaches a ClusterIP whose backends
// are pod b (same node) and pod c (other node) over TCP, connected and
// unconnected UDP, and an IPv6 socket with a v4-mapped address; the
// application sees the Service address as its peer and as the source of
// replies; a Service without backends refuses at once; and a's egress
// policy judges the backend's identity.
func TestPrivilegedServiceClusterIP(t *testing.T) {
	tn := newTestNet(t, "svc", netOpts{sockets: true})
	for _, p := range []*netns.Pod{tn.b, tn.c} {
		serveTCP(t, p, 8080)
		serveUDP(t, p, 8080)
	}
	set := func(k ServiceKey, bs ...Backend) {
		t.Helper()
		if err := tn.dp1.UpsertService(Service{ServiceKey: k, Backends: bs}); err != nil {
			t.Fatal(err)
		}
	}
	tcpAddr := netip.AddrPortFrom(vip, 80).String()
	udpAddr := netip.AddrPortFrom(vip, 53).String()

	for _, c := range []struct {
		name    string
		backend Backend
	}{{"same-node", backendB}, {"cross-node", backendC}} {
		set(svcTCP, c.backend)
		set(svcUDP, c.backend)
		for _, call := range []struct{ mode, addr string }{
			{"tcp", tcpAddr}, {"udpconn", udpAddr}, {"udp", udpAddr}, {"tcp6", tcpAddr},
		} {
			if got, want := tn.svcCall(t, call.mode, call.addr), "ok "+call.addr; got != want {
				t.Errorf("%s %s to %s: got %q; want %q", c.name, call.mode, call.addr, got, want)
			}
		}
	}

	// Both backends: every connect lands on one of them.
	set(svcTCP, backendB, backendC)
	for i := 0; i < 6; i++ {
		if got := tn.svcCall(t, "tcp", tcpAddr); got != "ok "+tcpAddr {
			t.Errorf("tcp to two backends, try %d: %s", i, got)
		}
	}

	// No backends: refused at once, not a timeout.
	set(svcTCPNone)
	set(svcUDPNone)
	for _, call := range []struct{ mode, addr string }{
		{"tcp", netip.AddrPortFrom(vipEmpty, 80).String()},
		{"udp", netip.AddrPortFrom(vipEmpty, 53).String()},
		{"tcp6", netip.AddrPortFrom(vipEmpty, 80).String()},
	} {
		start := time.Now()
		got := tn.svcCall(t, call.mode, call.addr)
		if !strings.HasPrefix(got, "err") || !strings.Contains(got, "connection refused") {
			t.Errorf("%s to a Service without backends: got %q; want connection refused", call.mode, got)
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("%s to a Service without backends took %s", call.mode, d)
		}
	}

	// Egress policy of a judges the backend: denying c's identity stops the
	// Service's traffic to c, while b still answers.
	if err := tn.dp1.SetPolicy(ipA, []policytypes.Entry{deny(policytypes.Egress, idC, 0, 0, 0, 7)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	set(svcTCP, backendC)
	if got := tn.svcCall(t, "tcp", tcpAddr); !strings.HasPrefix(got, "err") {
		t.Errorf("tcp to the Service with backend c after denying c: %q", got)
	}
	set(svcTCP, backendB)
	if got := tn.svcCall(t, "tcp", tcpAddr); got != "ok "+tcpAddr {
		t.Errorf("tcp to the Service with backend b after denying c: %q", got)
	}

	// Deleted: the address is left to the network (nothing there).
	if err := tn.dp1.DeleteService(svcTCP); err != nil {
		t.Fatal(err)
	}
	if got := tn.svcCall(t, "tcp", tcpAddr); !strings.HasPrefix(got, "err") {
		t.Errorf("tcp to a deleted Service: %q", got)
	}
}

// TestPrivilegedServiceMaps: upserts switch generations atomically, readback
// shows the active backends (terminating only without a ready one), and
// deletes leave nothing behind.
func TestPrivilegedServiceMaps(t *testing.T) {
	tn := newTestNet(t, "svm", netOpts{sockets: true})
	dp := tn.dp1
	term := Backend{IP: ipC, Port: 8080, Terminating: true}
	for _, c := range []struct {
		name string
		in   []Backend
		want []Backend
	}{
		{"ready", []Backend{backendB, backendC}, []Backend{backendB, backendC}},
		{"ready over terminating", []Backend{term, backendB}, []Backend{backendB}},
		{"terminating only", []Backend{term}, []Backend{term}},
		{"none", nil, nil},
		{"again", []Backend{backendC}, []Backend{backendC}},
	} {
		if err := dp.UpsertService(Service{ServiceKey: svcTCP, Backends: c.in}); err != nil {
			t.Fatal(err)
		}
		got, err := dp.Services()
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0].ServiceKey != svcTCP || fmt.Sprint(got[0].Backends) != fmt.Sprint(c.want) {
			t.Errorf("%s: got %v; want %v %v", c.name, got, svcTCP, c.want)
		}
	}
	if err := dp.DeleteService(svcTCP); err != nil {
		t.Fatal(err)
	}
	if err := dp.DeleteService(svcTCP); err != nil {
		t.Errorf("delete twice: %v", err)
	}
	if got, err := dp.Services(); err != nil || len(got) != 0 {
		t.Errorf("after delete: %v %v", got, err)
	}
	var k sockLb4BackendKey
	var v sockLb4Backend
	if it := dp.lb.backends.Iterate(); it.Next(&k, &v) {
		t.Errorf("backend left after delete: %+v", k)
	}
	if err := dp.UpsertService(Service{ServiceKey: ServiceKey{VIP: netip.MustParseAddr("fd00::1"), Port: 80, Proto: 6}}); err == nil {
		t.Errorf("IPv6 service accepted")
	}

	// Affinity reads back, and is cleared again.
	for _, aff := range []time.Duration{10800 * time.Second, 0} {
		if err := dp.UpsertService(Service{ServiceKey: svcTCP, Backends: []Backend{backendB}, Affinity: aff}); err != nil {
			t.Fatal(err)
		}
		if got, err := dp.Services(); err != nil || len(got) != 1 || got[0].Affinity != aff {
			t.Errorf("affinity %s: read back %v %v", aff, got, err)
		}
	}
	for _, aff := range []time.Duration{1500 * time.Millisecond, -time.Second, MaxAffinity + time.Second} {
		if err := dp.UpsertService(Service{ServiceKey: svcTCP, Backends: []Backend{backendB}, Affinity: aff}); err == nil {
			t.Errorf("affinity %s accepted", aff)
		}
	}
	// Members of both generations go with the Service.
	if err := dp.UpsertService(Service{ServiceKey: svcTCP, Backends: []Backend{backendB, backendC}, Affinity: time.Second}); err != nil {
		t.Fatal(err)
	}
	if err := dp.UpsertService(Service{ServiceKey: svcTCP, Backends: []Backend{backendC}, Affinity: time.Second}); err != nil {
		t.Fatal(err)
	}
	if err := dp.DeleteService(svcTCP); err != nil {
		t.Fatal(err)
	}
	var mk sockLb4MemberKey
	var mv uint32
	if it := dp.lb.members.Iterate(); it.Next(&mk, &mv) {
		t.Errorf("member left after delete: %+v", mk)
	}
}

// whoBurst is how many connects one "who" client makes.
const whoBurst = 12

// serveWho answers every TCP connection to p's port with the address it
// listens on, so a client learns which backend it reached.
func serveWho(t testing.TB, p *netns.Pod, port int) {
	t.Helper()
	addr := fmt.Sprintf("%s:%d", p.IP, port)
	var ln net.Listener
	if err := p.Do(func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, addr)
			c.Close()
		}
	}()
}

// who runs one "who" client in pod a and returns the backends it
// reached, in order.
func (tn *testNet) who(t *testing.T, addr string) []string {
	t.Helper()
	out := tn.svcCall(t, "who", addr)
	got, ok := strings.CutPrefix(out, "ok ")
	if !ok {
		t.Fatalf("who client to %s: %s", addr, out)
	}
	return strings.Split(got, ",")
}

func distinct(xs []string) []string {
	var out []string
	for _, x := range xs {
		if !slices.Contains(out, x) {
			out = append(out, x)
		}
	}
	return out
}

// TestPrivilegedServiceAffinity: sessionAffinity ClientIP on a real kernel.
// Without affinity one client's connects spread over the backends; with it
// they all land on one, across client processes of the same pod (network
// namespace); a backend that leaves is never chosen from the affinity
// again, even when the generation it was in is reused; and after the
// timeout a new choice is made.
func TestPrivilegedServiceAffinity(t *testing.T) {
	tn := newTestNet(t, "aff", netOpts{sockets: true})
	serveWho(t, tn.b, 8080)
	serveWho(t, tn.b, 8081)
	serveWho(t, tn.c, 8080)
	bB, bC, bB2 := Backend{IP: ipB, Port: 8080}, Backend{IP: ipC, Port: 8080}, Backend{IP: ipB, Port: 8081}
	name := func(b Backend) string { return netip.AddrPortFrom(b.IP, b.Port).String() }
	set := func(affinity time.Duration, bs ...Backend) {
		t.Helper()
		if err := tn.dp1.UpsertService(Service{ServiceKey: svcTCP, Backends: bs, Affinity: affinity}); err != nil {
			t.Fatal(err)
		}
	}
	addr := netip.AddrPortFrom(vip, 80).String()

	set(0, bB, bC)
	if got := distinct(tn.who(t, addr)); len(got) != 2 {
		t.Errorf("without affinity, %d connects reached %v; want both backends", whoBurst, got)
	}

	set(5*time.Second, bB, bC)
	first := distinct(tn.who(t, addr))
	if len(first) != 1 {
		t.Fatalf("with affinity, %d connects reached %v; want one backend", whoBurst, first)
	}
	if again := distinct(tn.who(t, addr)); !slices.Equal(again, first) {
		t.Errorf("with affinity, a second client process of the pod reached %v; want %v", again, first)
	}

	// The chosen backend leaves. The next upsert reuses the generation it
	// was a member of, without it; no client connects in between, so the
	// affinity still names it.
	other := bB
	if first[0] == name(bB) {
		other = bC
	}
	set(5*time.Second, other)
	set(5*time.Second, other, bB2)
	got := distinct(tn.who(t, addr))
	if slices.Contains(got, first[0]) || len(got) != 1 {
		t.Errorf("after backend %s left, affinity reached %v; want one backend, not %s", first[0], got, first[0])
	}

	// A short timeout: within it the choice holds, past it a new one is
	// made. Each new choice is random, so rounds repeat (bounded) until
	// one differs; 10 rounds of two backends miss with p = 2^-9.
	set(time.Second, bB, bC)
	prev := distinct(tn.who(t, addr))
	if len(prev) != 1 {
		t.Fatalf("with a 1s affinity, a burst reached %v; want one backend", prev)
	}
	changed := false
	for round := 0; round < 10 && !changed; round++ {
		time.Sleep(1200 * time.Millisecond)
		cur := distinct(tn.who(t, addr))
		if len(cur) != 1 {
			t.Fatalf("round %d: a burst within the timeout reached %v; want one backend", round, cur)
		}
		changed = cur[0] != prev[0]
		prev = cur
	}
	if !changed {
		t.Errorf("after 10 timeouts of 1s the client was always sent to %s; want a new choice", prev[0])
	}
}

// TestPrivilegedServiceTranslations: a translated connect is recorded under
// the client's network namespace and the backend, with the Service address
// it asked for (what names a flow's Service); a direct connect to the pod
// is not; the counters count translations and refusals.
func TestPrivilegedServiceTranslations(t *testing.T) {
	tn := newTestNet(t, "svx", netOpts{sockets: true})
	serveTCP(t, tn.b, 8080)
	serveTCP(t, tn.c, 8080)
	cookie, err := NetnsCookie(tn.a.Path())
	if err != nil {
		t.Fatal(err)
	}
	other, err := NetnsCookie(tn.b.Path())
	if err != nil || other == cookie {
		t.Fatalf("pod b's netns cookie %d, %v; want one other than a's %d", other, err, cookie)
	}
	if err := tn.dp1.UpsertService(Service{ServiceKey: svcTCP, Backends: []Backend{backendB}}); err != nil {
		t.Fatal(err)
	}
	if err := tn.dp1.UpsertService(Service{ServiceKey: svcTCPNone}); err != nil {
		t.Fatal(err)
	}
	before, err := tn.dp1.ServiceStats()
	if err != nil {
		t.Fatal(err)
	}

	// Straight to pod c: nothing recorded.
	direct := netip.AddrPortFrom(backendC.IP, backendC.Port)
	if got := tn.svcCall(t, "tcp", direct.String()); got != "ok "+direct.String() {
		t.Fatalf("direct: %s", got)
	}
	if _, ok, err := tn.dp1.LastTranslation(cookie, direct, 6); ok || err != nil {
		t.Errorf("a direct connect was recorded as a translation (%v)", err)
	}

	addr := netip.AddrPortFrom(vip, 80)
	for range 3 {
		if got := tn.svcCall(t, "tcp", addr.String()); got != "ok "+addr.String() {
			t.Fatalf("through the Service: %s", got)
		}
	}
	if got := tn.svcCall(t, "tcp", netip.AddrPortFrom(vipEmpty, 80).String()); !strings.Contains(got, "refused") {
		t.Fatalf("to a Service without backends: %s", got)
	}
	backend := netip.AddrPortFrom(backendB.IP, backendB.Port)
	tr, ok, err := tn.dp1.LastTranslation(cookie, backend, 6)
	if err != nil || !ok {
		t.Fatalf("translation of a to %s: %v, %v", backend, ok, err)
	}
	if tr.Service != addr || tr.Age > 10*time.Second {
		t.Errorf("translation: %+v; want %s, just now", tr, addr)
	}
	if _, ok, _ := tn.dp1.LastTranslation(other, backend, 6); ok {
		t.Errorf("translation recorded under pod b's namespace")
	}
	if _, ok, _ := tn.dp1.LastTranslation(cookie, backend, 17); ok {
		t.Errorf("translation recorded for UDP")
	}
	after, err := tn.dp1.ServiceStats()
	if err != nil {
		t.Fatal(err)
	}
	if d := after.Translated - before.Translated; d != 3 {
		t.Errorf("translated +%d; want +3", d)
	}
	if d := after.Refused - before.Refused; d != 1 {
		t.Errorf("refused +%d; want +1", d)
	}
}

// TestPrivilegedServiceMapFull: a Service the map has no room for fails
// with ErrServiceMapFull and leaves nothing behind; the Services already
// there keep working and can still be updated.
func TestPrivilegedServiceMapFull(t *testing.T) {
	tn := newTestNet(t, "svf", netOpts{sockets: true})
	dp := tn.dp1
	capacity := int(dp.lb.services.MaxEntries())
	start := time.Now()
	for i := range capacity {
		k := ServiceKey{VIP: netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)}), Port: 80, Proto: 6}
		if err := dp.UpsertService(Service{ServiceKey: k, Backends: []Backend{backendB}}); err != nil {
			t.Fatalf("service %d of %d: %v", i, capacity, err)
		}
	}
	t.Logf("%d services written in %s", capacity, time.Since(start).Round(time.Millisecond))
	backendsBefore := countEntries(t, dp.lb.backends)
	err := dp.UpsertService(Service{ServiceKey: svcTCP, Backends: []Backend{backendB, backendC}})
	if !errors.Is(err, ErrServiceMapFull) {
		t.Fatalf("one Service too many: %v; want ErrServiceMapFull", err)
	}
	if !strings.Contains(err.Error(), fmt.Sprint(capacity)) {
		t.Errorf("error %q does not say the capacity", err)
	}
	if n := countEntries(t, dp.lb.backends); n != backendsBefore {
		t.Errorf("backends %d after the failed upsert; want %d", n, backendsBefore)
	}
	if len(dp.lb.ids) != capacity {
		t.Errorf("%d service ids in use; want %d", len(dp.lb.ids), capacity)
	}
	first := ServiceKey{VIP: netip.AddrFrom4([4]byte{10, 97, 0, 0}), Port: 80, Proto: 6}
	if err := dp.UpsertService(Service{ServiceKey: first, Backends: []Backend{backendC}}); err != nil {
		t.Errorf("update of a Service in a full map: %v", err)
	}
}

func countEntries(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	n := 0
	var k, v []byte
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// The "loop" client's bounds, and how long the "hold" client waits before
// using its connection again.
const (
	loopTime = 3 * time.Second
	loopMax  = 20000
	loopPace = 200 * time.Microsecond
	holdTime = 1500 * time.Millisecond
)

// TestPrivilegedServiceChurn: a client loops connects (bounded) while the
// Service's backends scale up and down every 100 ms; once an update has
// returned, no connect reaches a backend it removed (connects that start
// during an update may reach either set). A connection established to a
// backend that then leaves the Service keeps working.
func TestPrivilegedServiceChurn(t *testing.T) {
	tn := newTestNet(t, "svch", netOpts{sockets: true})
	var all []Backend
	for _, p := range []*netns.Pod{tn.b, tn.c} {
		for port := 8080; port < 8083; port++ {
			serveWho(t, p, port)
			all = append(all, Backend{IP: p.IP, Port: uint16(port)})
		}
	}
	name := func(b Backend) string { return netip.AddrPortFrom(b.IP, b.Port).String() }
	sets := [][]Backend{all[:1], all[:3], all, all[2:], all[4:], all[1:2], all[3:6], all[:2], all[5:]}
	type update struct {
		begin, end int64
		set        map[string]bool
	}
	var updates []update
	upsert := func(bs []Backend) {
		t.Helper()
		u := update{begin: time.Now().UnixNano(), set: map[string]bool{}}
		if err := tn.dp1.UpsertService(Service{ServiceKey: svcTCP, Backends: bs}); err != nil {
			t.Fatal(err)
		}
		u.end = time.Now().UnixNano()
		for _, b := range bs {
			u.set[name(b)] = true
		}
		updates = append(updates, u)
	}
	upsert(sets[0])
	addr := netip.AddrPortFrom(vip, 80).String()
	p, err := netns.StartProc(&tn.a.Netns, tn.cg, -1, []string{svcClientEnv + "=loop"}, addr)
	if err != nil {
		t.Fatal(err)
	}
	// Bounded: the client stops after loopTime; so do the updates.
	for i := 1; i <= int(loopTime/(100*time.Millisecond)) && p.LastLine("ok ") == "" && p.LastLine("err ") == ""; i++ {
		time.Sleep(100 * time.Millisecond)
		upsert(sets[i%len(sets)])
	}
	if err := p.Wait(ctxT(t, loopTime+10*time.Second)); err != nil {
		t.Fatal(err)
	}
	lines := p.Lines()
	if last := lines[len(lines)-1]; !strings.HasPrefix(last, "ok") {
		t.Fatalf("client: %s", last)
	}
	// The hook ran between a connect's start and its return. The map held
	// one update's set at a time, switched somewhere within that update's
	// call: the sets a connect may have seen are those from the last update
	// that had returned before it started to the last one begun before it
	// returned.
	checked, racing := 0, 0
	for _, l := range lines[:len(lines)-1] {
		var start, connected int64
		var backend string
		if _, err := fmt.Sscan(l, &start, &connected, &backend); err != nil {
			t.Fatalf("client line %q: %v", l, err)
		}
		lo, hi := 0, 0
		for j, u := range updates {
			if u.end < start {
				lo = j
			}
			if u.begin <= connected {
				hi = j
			}
		}
		ok := false
		for j := lo; j <= hi; j++ {
			ok = ok || updates[j].set[backend]
		}
		if hi > lo {
			racing++
		}
		if !ok {
			t.Errorf("connect at %d..%d reached %s, which update %d (returned at %d) had removed", start, connected, backend, lo, updates[lo].end)
		}
		checked++
	}
	t.Logf("%d connects checked against %d backend updates (%d started during an update)", checked, len(updates), racing)
	if checked < 100 || len(updates) < 10 {
		t.Errorf("only %d connects over %d updates: the churn did not overlap the load", checked, len(updates))
	}

	// A connection to a backend that leaves: it still answers.
	serveTCP(t, tn.b, 8090)
	leaving := Backend{IP: ipB, Port: 8090}
	upsert([]Backend{leaving})
	hold, err := netns.StartProc(&tn.a.Netns, tn.cg, -1, []string{svcClientEnv + "=hold"}, addr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hold.WaitLine(ctxT(t, 5*time.Second), "connected"); err != nil {
		t.Fatalf("hold client: %v %v", err, hold.Lines())
	}
	terminating := leaving
	terminating.Terminating = true
	upsert([]Backend{terminating, all[0]})
	upsert([]Backend{all[0]})
	if err := hold.Wait(ctxT(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if got := hold.LastLine(""); got != "ok still answered" {
		t.Errorf("established connection to a backend that left: %q", got)
	}
}

const ipprotoSCTP = 132

// TestPrivilegedServiceSCTP: an SCTP ClusterIP, where the kernel has SCTP.
func TestPrivilegedServiceSCTP(t *testing.T) {
	testenv.RequirePrivileged(t)
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, ipprotoSCTP)
	if err != nil {
		t.Skipf("this kernel has no SCTP (socket: %v; CONFIG_IP_SCTP unset or the module not loaded)", err)
	}
	syscall.Close(fd)
	tn := newTestNet(t, "svsctp", netOpts{sockets: true})
	var lfd int
	if err := tn.b.Do(func() (err error) {
		if lfd, err = syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, ipprotoSCTP); err != nil {
			return err
		}
		if err := syscall.Bind(lfd, &syscall.SockaddrInet4{Addr: ipB.As4(), Port: 9000}); err != nil {
			return err
		}
		return syscall.Listen(lfd, 16)
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(lfd) })
	k := ServiceKey{VIP: vip, Port: 90, Proto: ipprotoSCTP}
	if err := tn.dp1.UpsertService(Service{ServiceKey: k, Backends: []Backend{{IP: ipB, Port: 9000}}}); err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(vip, 90).String()
	if got := tn.svcCall(t, "sctp", addr); got != "ok "+addr {
		t.Errorf("sctp to %s: %q; want the Service address as the peer", addr, got)
	}
}

// TestPrivilegedServiceStrictEncrypted: in strict mode, a ClusterIP whose
// backend is on the other node is reached through the tunnel: the
// connection works, WireGuard crosses the underlay, and neither a pod frame
// in the clear nor the client's payload does.
func TestPrivilegedServiceStrictEncrypted(t *testing.T) {
	tn := newTestNet(t, "svenc", netOpts{sockets: true})
	serveTCP(t, tn.c, 8080)
	tunnel(t, tn, true)
	if err := tn.dp1.UpsertService(Service{ServiceKey: svcTCP, Backends: []Backend{backendC}}); err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(vip, 80).String()
	// The first packets wait for the userspace WireGuard handshake, which
	// on a loaded machine can outlast one dial: warm up with a few tries.
	got := ""
	for try := 0; try < 5 && got != "ok "+addr; try++ {
		got = tn.svcCall(t, "tcp", addr)
	}
	if got != "ok "+addr {
		t.Fatalf("through the Service to the other node with the tunnel up (5 tries): %s", got)
	}
	cap1 := startCapture(t, tn.n1, "und1")
	for i := range 3 {
		if got := tn.svcCall(t, "tcp", addr); got != "ok "+addr {
			t.Fatalf("try %d through the Service to the other node: %s", i, got)
		}
	}
	time.Sleep(200 * time.Millisecond)
	cap1.close()
	// svcClient's payload is "veil-svc-" and its mode.
	wg, withPayload, plain := cap1.summary("veil-svc-tcp")
	t.Logf("underlay capture: %d frames, %d WireGuard, %d with the payload, %d plaintext pod frames", len(cap1.frames), wg, withPayload, plain)
	if wg == 0 {
		t.Errorf("no WireGuard packets on the underlay")
	}
	if withPayload != 0 || plain != 0 {
		t.Errorf("plaintext on the underlay: %d frames with the payload, %d pod frames", withPayload, plain)
	}
}
