package datapath

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// checkedTransfer runs a source (in a) of n bytes, pausing srcPace between
// 64 KiB writes, into a checked sink (in b) that sleeps sinkPace after each
// read, both in the acceleration cgroup.
func checkedTransfer(t *testing.T, tn *testNet, port int, n int64, srcPace, sinkPace time.Duration) (src, sink *netns.Proc) {
	t.Helper()
	addr := fmt.Sprintf("%s:%d", ipB, port)
	sink, err := netns.StartHelper(&tn.b.Netns, tn.cg, -1, "checked-sink", addr, sinkPace.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sink.Kill)
	if _, err := sink.WaitLine(ctxT(t, 10*time.Second), "listening"); err != nil {
		t.Fatal(err)
	}
	src, err = netns.StartHelper(&tn.a.Netns, tn.cg, -1, "source", addr, strconv.FormatInt(n, 10), srcPace.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(src.Kill)
	return src, sink
}

// lineInt returns field i of the newest line of p starting with prefix.
func lineInt(p *netns.Proc, prefix string, i int) int64 {
	f := strings.Fields(p.LastLine(prefix))
	if len(f) <= i {
		return 0
	}
	n, _ := strconv.ParseInt(f[i], 10, 64)
	return n
}

// ended reports whether either helper printed "done" within wait.
func ended(wait time.Duration, ps ...*netns.Proc) bool {
	deadline := time.Now().Add(wait)
	for {
		for _, p := range ps {
			if p.LastLine("done") != "" {
				return true
			}
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// onlyAllowed is a policy oracle for EvictFlows: a connection is revoked
// unless it was opened along one of the allowed flows.
func onlyAllowed(allowed ...FlowKey) func(FlowKey) bool {
	return func(k FlowKey) bool {
		for _, a := range allowed {
			if k == a {
				return false
			}
		}
		return true
	}
}

// The client is ingress-isolated (default deny), the server accepts it on
// one port: the connection's reply direction, seen as a flow of its own,
// is denied, yet the connection is allowed. Re-checks triggered by changes
// elsewhere (pods coming and going) must leave it accelerated and intact.
func TestPrivilegedEvictKeepsIsolatedClient(t *testing.T) {
	tn := newTestNet(t, "evkeep", netOpts{sockets: true})
	const port = 5011
	if err := tn.dp1.SetPolicy(ipA, nil, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	if err := tn.dp1.SetPolicy(ipB, []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, port, 16, 1)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	revoked := onlyAllowed(FlowKey{Src: ipA, Dst: ipB, Proto: policytypes.ProtoTCP, DstPort: port})
	before, _ := tn.dp1.Counters()

	const size = 64 << 20
	src, sink := checkedTransfer(t, tn, port, size, time.Millisecond, 0)
	ctx := ctxT(t, time.Minute)
	accelerated := false
	for i := 0; sink.LastLine("done") == "" && sink.LastLine("mismatch") == "" && sink.LastLine("error") == ""; i++ {
		if ctx.Err() != nil {
			t.Fatalf("transfer did not finish: sink %v", sink.Lines())
		}
		// A remote pod comes and goes: the ipcache changes, and the agent
		// re-checks connections.
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, 2, byte(10 + i%200)}), 32)
		if err := tn.dp1.UpsertIPCache(p, IPCacheEntry{Identity: idC + identity.ID(i%7), NodeIP: ip2, Kind: RemotePod}); err != nil {
			t.Fatal(err)
		}
		if _, err := tn.dp1.EvictFlows(revoked); err != nil {
			t.Fatal(err)
		}
		if err := tn.dp1.DeleteIPCache(p); err != nil {
			t.Fatal(err)
		}
		if lineInt(sink, "progress", 1) > 0 {
			n, err := tn.dp1.AcceleratedSockets()
			if err != nil {
				t.Fatal(err)
			}
			// The transfer may have just ended (its sockets close after
			// the helpers print "done", which reaches us a little later).
			if n != 2 && !ended(300*time.Millisecond, src, sink) {
				t.Fatalf("after %d re-checks, accelerated sockets = %d, want 2", i+1, n)
			}
			accelerated = true
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !accelerated {
		t.Errorf("the transfer ended before any re-check saw it accelerated")
	}
	if got := sink.LastLine("done"); got != fmt.Sprintf("done %d", size) {
		t.Fatalf("sink = %q (lines %v), want every byte of %d in order", got, sink.Lines(), size)
	}
	if _, err := src.WaitLine(ctxT(t, 10*time.Second), "done"); err != nil {
		t.Fatal(err)
	}
	after, _ := tn.dp1.Counters()
	if got := after.SocketRedirected.Bytes - before.SocketRedirected.Bytes; got < size*99/100 {
		t.Errorf("sockmap path not taken: redirected %d of %d bytes", got, size)
	}
}

// A slow reader leaves data queued at its accelerated socket when policy is
// revoked. The connection must stop, and every byte the source wrote before
// the revocation must arrive in order (or both ends must see an error).
func TestPrivilegedEvictKeepsAcceptedBytes(t *testing.T) {
	tn := newTestNet(t, "evbytes", netOpts{sockets: true})
	const port = 5012
	if err := tn.dp1.SetPolicy(ipB, []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, port, 16, 1)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	// The source outpaces the sink (about 64 MB/s against 50 MB/s), so
	// data waits at the sink's socket.
	src, sink := checkedTransfer(t, tn, port, 1<<40, time.Millisecond, 5*time.Millisecond)
	ctx := ctxT(t, 30*time.Second)
	for lineInt(sink, "progress", 1) < 16<<20 {
		if ctx.Err() != nil {
			t.Fatalf("transfer did not start: sink %v", sink.Lines())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n, _ := tn.dp1.AcceleratedSockets(); n != 2 {
		t.Fatalf("accelerated sockets = %d, want 2", n)
	}

	// Every byte the source reported before this point was accepted by the
	// kernel before the revocation.
	written := lineInt(src, "sent", 1)
	queued := written - lineInt(sink, "progress", 1)
	if err := tn.dp1.SetPolicy(ipB, nil, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	if _, err := tn.dp1.EvictFlows(func(FlowKey) bool { return true }); err != nil {
		t.Fatal(err)
	}
	t.Logf("revoked with %d bytes written, about %d of them not yet read", written, queued)

	// The sink drains what was accepted, then the connection stops.
	var got int64
	for stable := 0; stable < 15; {
		if ctx.Err() != nil {
			t.Fatalf("connection did not stop: sink at %d bytes", lineInt(sink, "progress", 1))
		}
		time.Sleep(100 * time.Millisecond)
		if l := sink.LastLine("mismatch"); l != "" {
			t.Fatalf("sink received corrupted data: %q", l)
		}
		if l := sink.LastLine("error"); l != "" {
			// Only acceptable when the source saw an error as well.
			if err := src.Wait(ctxT(t, 10*time.Second)); err == nil {
				t.Fatalf("sink saw %q, the source no error", l)
			}
			return
		}
		if l := sink.LastLine("done"); l != "" {
			t.Fatalf("revoked connection ended cleanly: %q", l)
		}
		now := lineInt(sink, "progress", 1)
		if now == got {
			stable++
		} else {
			stable = 0
		}
		got = now
	}
	if got < written {
		t.Fatalf("sink stopped at %d bytes, %d bytes written before the revocation were lost without an error", got, written-got)
	}
	c, _ := tn.dp1.Counters()
	if c.Drops[DropPolicyIngress].Packets == 0 {
		t.Errorf("revoked connection's packets were not dropped by policy")
	}
}

// Sockets that joined the sockhash before sockops recorded state (an
// earlier Veil) are judged by their conntrack entry's direction too, and
// taken out of the sockhash when revoked, since their sk_msg program knows
// no revoked flag.
func TestPrivilegedEvictLegacySockets(t *testing.T) {
	tn := newTestNet(t, "evlegacy", netOpts{sockets: true})
	const port = 5015
	if err := tn.dp1.SetPolicy(ipA, nil, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	if err := tn.dp1.SetPolicy(ipB, []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, port, 16, 1)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	_, sink := checkedTransfer(t, tn, port, 1<<40, 2*time.Millisecond, 0)
	ctx := ctxT(t, 20*time.Second)
	for lineInt(sink, "progress", 1) < 1<<20 {
		if ctx.Err() != nil {
			t.Fatalf("transfer did not start: sink %v", sink.Lines())
		}
		time.Sleep(20 * time.Millisecond)
	}
	members := func() int {
		var (
			k      podSockKey
			cookie uint64
			n      int
		)
		for it := tn.dp1.sockhash.Iterate(); it.Next(&k, &cookie); {
			n++
		}
		return n
	}
	var (
		k    podSockKey
		st   sockSockState
		keys []podSockKey
	)
	for it := tn.dp1.sockstate.Iterate(); it.Next(&k, &st); {
		keys = append(keys, k)
	}
	for _, k := range keys {
		if err := tn.dp1.sockstate.Delete(&k); err != nil {
			t.Fatal(err)
		}
	}
	if n := members(); n != 2 || len(keys) != 2 {
		t.Fatalf("sockhash holds %d sockets, state %d; want 2 and 2", n, len(keys))
	}

	if n, err := tn.dp1.EvictFlows(onlyAllowed(FlowKey{Src: ipA, Dst: ipB, Proto: policytypes.ProtoTCP, DstPort: port})); err != nil || n != 0 {
		t.Fatalf("EvictFlows of an allowed connection = %d, %v; want 0", n, err)
	}
	if n := members(); n != 2 {
		t.Fatalf("allowed legacy sockets evicted: sockhash holds %d, want 2", n)
	}
	if n, err := tn.dp1.EvictFlows(func(FlowKey) bool { return true }); err != nil || n != 1 {
		t.Fatalf("EvictFlows of a revoked connection = %d, %v; want 1", n, err)
	}
	if n := members(); n != 0 {
		t.Fatalf("revoked legacy sockets stay: sockhash holds %d", n)
	}
	if l := sink.LastLine("mismatch"); l != "" {
		t.Errorf("sink: %s", l)
	}
}
