package datapath

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/policy/policytypes"
)

// Many accelerated connections at once for a bounded time: short ones with
// partial writes and half-closes, large writes, resets by either end, and
// long ones that stream all along. Both ends check every byte; the kernel
// must never deliver a wrong one, and accelerated state must not outlive
// the sockets.
func TestPrivilegedAccelerationSoak(t *testing.T) {
	tn := newTestNet(t, "soak", netOpts{sockets: true})
	const (
		port      = 5014
		duration  = "20s"
		workers   = "6"
		longConns = 3
		maxConns  = "20000"
	)
	if err := tn.dp1.SetPolicy(ipB, []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, port, 16, 1)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	before, _ := tn.dp1.Counters()
	addr := fmt.Sprintf("%s:%d", ipB, port)
	server, err := netns.StartHelper(&tn.b.Netns, tn.cg, -1, "soak-server", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(server.Kill)
	if _, err := server.WaitLine(ctxT(t, 10*time.Second), "listening"); err != nil {
		t.Fatal(err)
	}
	client, err := netns.StartHelper(&tn.a.Netns, tn.cg, -1, "soak-client", addr, duration, workers, fmt.Sprint(longConns), maxConns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Kill)

	ctx := ctxT(t, 2*time.Minute)
	peak := 0
	for client.LastLine("soak") == "" {
		if ctx.Err() != nil {
			t.Fatalf("soak did not end: client %v", client.Lines())
		}
		if n, err := tn.dp1.AcceleratedSockets(); err == nil {
			peak = max(peak, n)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := client.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	var conns, bytes, resets int64
	if _, err := fmt.Sscanf(client.LastLine("soak"), "soak %d %d %d", &conns, &bytes, &resets); err != nil {
		t.Fatalf("client summary %q: %v", client.LastLine("soak"), err)
	}
	// The server counts a connection once it has checked it.
	for served(server) < conns {
		if ctx.Err() != nil {
			t.Fatalf("server checked %d of %d connections", served(server), conns)
		}
		time.Sleep(100 * time.Millisecond)
	}
	after, _ := tn.dp1.Counters()
	redirected := after.SocketRedirected.Bytes - before.SocketRedirected.Bytes
	t.Logf("%d connections (%d reset, %d long), %d MiB checked, %d MiB redirected socket to socket, up to %d sockets accelerated at once",
		conns, resets, longConns, bytes>>20, redirected>>20, peak)

	for side, p := range map[string]*netns.Proc{"client": client, "server": server} {
		for _, l := range p.Lines() {
			if strings.HasPrefix(l, "fail") {
				t.Errorf("%s: %s", side, l)
			}
		}
	}
	longs := func(p *netns.Proc) []string {
		var out []string
		for _, l := range p.Lines() {
			if strings.HasPrefix(l, "long ") {
				out = append(out, l)
			}
		}
		slices.Sort(out)
		return out
	}
	if c, s := longs(client), longs(server); len(c) != longConns || !slices.Equal(c, s) {
		t.Errorf("long connections: client sent %v, server received %v", c, s)
	}
	if conns < 1000 {
		t.Errorf("only %d connections in the soak", conns)
	}
	if peak == 0 || redirected < uint64(bytes)/2 {
		t.Errorf("the soak was not accelerated: %d of %d bytes redirected, peak %d sockets", redirected, bytes, peak)
	}

	// Every socket closed: none stays in the sockhash, nor its state.
	for {
		members, states := mapLen(t, tn.dp1.sockhash), mapLen(t, tn.dp1.sockstate)
		if members == 0 && states == 0 {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("every connection closed, yet the sockhash holds %d sockets and the state map %d", members, states)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// mapLen counts the entries of a map whose values are 8 bytes.
func mapLen(t *testing.T, m *ebpf.Map) int {
	var (
		k podSockKey
		v uint64
		n int
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

func served(p *netns.Proc) int64 {
	var n int64
	fmt.Sscanf(p.LastLine("served"), "served %d", &n)
	return n
}

// A client resets a connection and opens the next from the same port at
// once (no TIME_WAIT after a reset), while the server still holds the
// first connection's socket, unread: the kernel keeps a socket in the
// sockhash until its process closes it, so the second connection's four-
// tuple finds the dead socket there. Nothing the client sends on the
// second connection may land in the first's socket.
func TestPrivilegedAccelerationFourTupleReusedAfterReset(t *testing.T) {
	tn := newTestNet(t, "reuse", netOpts{sockets: true})
	const port = 5015
	if err := tn.dp1.SetPolicy(ipB, []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, port, 16, 1)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("%s:%d", ipB, port)
	server, err := netns.StartHelper(&tn.b.Netns, tn.cg, -1, "reuse-server", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(server.Kill)
	ctx := ctxT(t, 30*time.Second)
	if _, err := server.WaitLine(ctx, "listening"); err != nil {
		t.Fatal(err)
	}
	before, _ := tn.dp1.Counters()
	client, err := netns.StartHelper(&tn.a.Netns, tn.cg, -1, "reuse-client", addr, "41234")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Kill)
	if err := client.Wait(ctx); err != nil {
		t.Fatalf("client: %v (%v)", err, client.Lines())
	}
	if err := server.Wait(ctx); err != nil {
		t.Fatalf("server: %v (%v)", err, server.Lines())
	}
	after, _ := tn.dp1.Counters()
	t.Logf("client %v, server %v, %d bytes redirected socket to socket", client.Lines(), server.Lines(), after.SocketRedirected.Bytes-before.SocketRedirected.Bytes)
	if first, second := client.LastLine("first"), client.LastLine("second"); first == "" || strings.TrimPrefix(first, "first ") != strings.TrimPrefix(second, "second ") {
		t.Fatalf("the two connections were not from one address and port: %q, %q", first, second)
	}
	if got := server.LastLine("first"); got != "first 5" {
		t.Errorf("first connection: server says %q, want \"first 5\"", got)
	}
	if got := server.LastLine("second"); got != `second "second"` {
		t.Errorf("second connection: server received %q, want what the client sent (second \"second\")", got)
	}
	// The first connection was accelerated, so its socket was in the
	// sockhash when the second came.
	if after.SocketRedirected.Bytes-before.SocketRedirected.Bytes < uint64(len("first")) {
		t.Errorf("nothing was redirected socket to socket: the case is not tested")
	}
}
