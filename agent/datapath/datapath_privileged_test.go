package datapath

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

func TestPrivilegedDelivery(t *testing.T) {
	for _, legacy := range []bool{false, true} {
		name := "tcx"
		if legacy {
			name = "clsact"
		}
		t.Run(name, func(t *testing.T) {
			tn := newTestNet(t, "dl"+name[:2], netOpts{legacyTC: legacy})
			serveTCP(t, tn.b, 80)
			serveTCP(t, tn.c, 80)
			serveTCP(t, tn.a, 80)
			serveUDP(t, tn.b, 53)

			// Node 1 does not forward: only the program can deliver.
			out, err := tn.n1.Run("sysctl", "-n", "net.ipv4.ip_forward")
			if err != nil || strings.TrimSpace(out) != "0" {
				t.Fatalf("node 1 forwarding: %q %v", out, err)
			}
			before, _ := tn.dp1.Counters()
			for _, c := range []struct {
				name string
				fn   func() error
			}{
				{"same-node tcp a->b", func() error { return tcpEcho(tn.a, "10.244.1.3:80", netip.Addr{}) }},
				{"same-node udp a->b", func() error { return udpEcho(tn.a, "10.244.1.3:53") }},
				{"cross-node tcp a->c", func() error { return tcpEcho(tn.a, "10.244.2.2:80", netip.Addr{}) }},
				{"cross-node tcp c->a", func() error { return tcpEcho(tn.c, "10.244.1.2:80", netip.Addr{}) }},
			} {
				if err := c.fn(); err != nil {
					t.Errorf("%s: %v", c.name, err)
				}
			}
			after, err := tn.dp1.Counters()
			if err != nil {
				t.Fatal(err)
			}
			if after.Local.Packets <= before.Local.Packets {
				t.Errorf("local redirects did not grow: %d -> %d", before.Local.Packets, after.Local.Packets)
			}
			if after.Remote.Packets <= before.Remote.Packets {
				t.Errorf("remote forwards did not grow: %d -> %d", before.Remote.Packets, after.Remote.Packets)
			}
		})
	}
}

func TestPrivilegedPolicy(t *testing.T) {
	tn := newTestNet(t, "pol", netOpts{})
	serveTCP(t, tn.b, 80, 81, 8003, 8009)
	serveUDP(t, tn.b, 80)
	serveTCP(t, tn.c, 80, 81)

	// b accepts from a: TCP 80, TCP 8000-8007 (one /13 prefix), UDP any
	// port, SCTP 9000; from c: TCP 80 only. Default deny ingress.
	// Its egress is default deny too: replies must still pass.
	b := []policytypes.Entry{
		allow(policytypes.Ingress, idA, policytypes.ProtoTCP, 80, 16, 1),
		allow(policytypes.Ingress, idA, policytypes.ProtoTCP, 8000, 13, 2),
		allow(policytypes.Ingress, idA, policytypes.ProtoUDP, 0, 0, 3),
		allow(policytypes.Ingress, idA, policytypes.ProtoSCTP, 9000, 16, 4),
		allow(policytypes.Ingress, idC, policytypes.ProtoTCP, 80, 16, 5),
	}
	strict := ingressDefaultDeny
	strict.EgressEnforce, strict.EgressAudit = policytypes.Deny, policytypes.Deny
	if err := tn.dp1.SetPolicy(ipB, b, strict); err != nil {
		t.Fatal(err)
	}
	// c accepts TCP 80 from any identity but denies a on any port: deny wins
	// across the identity and wildcard lookups.
	cEntries := []policytypes.Entry{
		allow(policytypes.Ingress, identity.Any, policytypes.ProtoTCP, 80, 16, 6),
		allow(policytypes.Ingress, identity.Any, policytypes.ProtoTCP, 81, 16, 7),
		deny(policytypes.Ingress, idA, policytypes.ProtoTCP, 81, 16, 8),
	}
	if err := tn.dp2.SetPolicy(ipC, cEntries, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}

	before1, _ := tn.dp1.Counters()
	before2, _ := tn.dp2.Counters()
	cases := []struct {
		name string
		fn   func() error
		want bool
	}{
		{"a->b tcp/80 allowed, reply passes b's default-deny egress", func() error { return tcpEcho(tn.a, "10.244.1.3:80", netip.Addr{}) }, true},
		{"a->b tcp/81 denied", func() error { return tcpEcho(tn.a, "10.244.1.3:81", netip.Addr{}) }, false},
		{"a->b tcp/8003 in range", func() error { return tcpEcho(tn.a, "10.244.1.3:8003", netip.Addr{}) }, true},
		{"a->b tcp/8009 outside range", func() error { return tcpEcho(tn.a, "10.244.1.3:8009", netip.Addr{}) }, false},
		{"a->b udp/80 allowed (any UDP port)", func() error { return udpEcho(tn.a, "10.244.1.3:80") }, true},
		{"c->b tcp/80 allowed across nodes", func() error { return tcpEcho(tn.c, "10.244.1.3:80", netip.Addr{}) }, true},
		{"c->b tcp/81 denied across nodes", func() error { return tcpEcho(tn.c, "10.244.1.3:81", netip.Addr{}) }, false},
		{"a->c tcp/80 allowed by wildcard", func() error { return tcpEcho(tn.a, "10.244.2.2:80", netip.Addr{}) }, true},
		{"a->c tcp/81 deny beats wildcard allow", func() error { return tcpEcho(tn.a, "10.244.2.2:81", netip.Addr{}) }, false},
	}
	for _, c := range cases {
		err := c.fn()
		if got := err == nil; got != c.want {
			t.Errorf("%s: reachable=%v, want %v (err %v)", c.name, got, c.want, err)
		}
	}
	if !sctpReaches(t, tn.a, tn.b, 9000) {
		t.Errorf("a->b sctp/9000: not delivered, want allowed")
	}
	if sctpReaches(t, tn.a, tn.b, 9001) {
		t.Errorf("a->b sctp/9001: delivered, want denied")
	}

	after1, _ := tn.dp1.Counters()
	after2, _ := tn.dp2.Counters()
	if d := after1.Drops[DropPolicyIngress].Packets - before1.Drops[DropPolicyIngress].Packets; d == 0 {
		t.Errorf("node 1 policy-denied-ingress drops not counted")
	}
	if d := after2.Drops[DropPolicyIngress].Packets - before2.Drops[DropPolicyIngress].Packets; d == 0 {
		t.Errorf("node 2 policy-denied-ingress drops not counted")
	}

	// Egress policy of the source: a may only send TCP 80.
	if err := tn.dp1.SetPolicy(ipA, []policytypes.Entry{allow(policytypes.Egress, identity.Any, policytypes.ProtoTCP, 80, 16, 9)},
		policytypes.Defaults{EgressEnforce: policytypes.Deny, EgressAudit: policytypes.Deny}); err != nil {
		t.Fatal(err)
	}
	if err := udpEcho(tn.a, "10.244.1.3:80"); err == nil {
		t.Errorf("a->b udp/80 passed a's egress default deny")
	}
	if err := tcpEcho(tn.a, "10.244.1.3:80", netip.Addr{}); err != nil {
		t.Errorf("a->b tcp/80 with egress allow: %v", err)
	}
	c1, _ := tn.dp1.Counters()
	if c1.Drops[DropPolicyEgress].Packets == 0 {
		t.Errorf("policy-denied-egress drops not counted")
	}

	// Per-entry counters: the entry that allowed a->b tcp/80 decided flows.
	counters, err := tn.dp1.PolicyCounters(ipB)
	if err != nil {
		t.Fatal(err)
	}
	var hits uint64
	for _, c := range counters {
		if c.RuleID == 1 {
			hits = c.Hits
		}
	}
	if hits < 2 {
		t.Errorf("rule 1 hits = %d, want >= 2 (counters %+v)", hits, counters)
	}
}

func TestPrivilegedAntiSpoofing(t *testing.T) {
	tn := newTestNet(t, "spoof", netOpts{})
	serveTCP(t, tn.c, 80)
	// a claims b's address and an address nobody holds.
	for _, ip := range []string{"10.244.1.3", "10.244.1.99"} {
		if _, err := tn.a.Run("ip", "addr", "add", ip+"/32", "dev", "eth0"); err != nil {
			t.Fatal(err)
		}
	}
	before, _ := tn.dp1.Counters()
	for _, src := range []string{"10.244.1.3", "10.244.1.99"} {
		if err := tcpEcho(tn.a, "10.244.2.2:80", netip.MustParseAddr(src)); err == nil {
			t.Errorf("a spoofing %s reached c", src)
		}
	}
	if err := tcpEcho(tn.a, "10.244.2.2:80", ipA); err != nil {
		t.Errorf("a with its own address: %v", err)
	}
	after, _ := tn.dp1.Counters()
	if after.Drops[DropSpoofedSource].Packets <= before.Drops[DropSpoofedSource].Packets {
		t.Errorf("spoofed-source drops not counted: %+v", after.Drops)
	}
}

func TestPrivilegedFlowEvents(t *testing.T) {
	tn := newTestNet(t, "ev", netOpts{})
	serveTCP(t, tn.b, 80, 81)
	if err := tn.dp1.SetPolicy(ipB, []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, 80, 16, 42)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var (
		mu     sync.Mutex
		events []FlowEvent
		done   = make(chan error, 1)
	)
	go func() {
		done <- tn.dp1.ReadEvents(ctx, func(ev FlowEvent) {
			mu.Lock()
			events = append(events, ev)
			mu.Unlock()
		})
	}()
	tcpEcho(tn.a, "10.244.1.3:80", netip.Addr{})
	tcpEcho(tn.a, "10.244.1.3:81", netip.Addr{})

	find := func(port uint16, v policytypes.Verdict) *FlowEvent {
		mu.Lock()
		defer mu.Unlock()
		for i := range events {
			ev := events[i]
			if ev.Src == ipA && ev.Dst == ipB && ev.DstPort == port && ev.Proto == policytypes.ProtoTCP && ev.Verdict == v {
				return &ev
			}
		}
		return nil
	}
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) && (find(80, policytypes.Allow) == nil || find(81, policytypes.Deny) == nil) {
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != context.Canceled {
		t.Errorf("ReadEvents returned %v, want context.Canceled", err)
	}
	if ev := find(80, policytypes.Allow); ev == nil {
		t.Errorf("no ALLOW event for a->b tcp/80")
	} else if ev.SrcIdentity != idA || ev.DstIdentity != idB || ev.RuleID != 42 || ev.Point != FromPod ||
		ev.Flags&FlagIngressDecided == 0 || time.Since(ev.Time) > time.Minute || time.Since(ev.Time) < 0 {
		t.Errorf("ALLOW event fields wrong: %+v", *ev)
	}
	if ev := find(81, policytypes.Deny); ev == nil {
		t.Errorf("no DENY event for a->b tcp/81")
	} else if ev.Reason != DropPolicyIngress || ev.SrcIdentity != idA {
		t.Errorf("DENY event fields wrong: %+v", *ev)
	}
}

// transfer runs source (in a) -> sink (in b) of n bytes through the cgroup
// and returns both processes; pace slows the source down.
func transfer(t *testing.T, tn *testNet, port int, n int64, pace time.Duration) (src, sink *netns.Proc) {
	t.Helper()
	addr := fmt.Sprintf("%s:%d", ipB, port)
	sink, err := netns.StartHelper(&tn.b.Netns, tn.cg, -1, "sink", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sink.Kill)
	if _, err := sink.WaitLine(ctxT(t, 10*time.Second), "listening"); err != nil {
		t.Fatal(err)
	}
	src, err = netns.StartHelper(&tn.a.Netns, tn.cg, -1, "source", addr, strconv.FormatInt(n, 10), pace.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(src.Kill)
	return src, sink
}

func progress(p *netns.Proc) int64 {
	f := strings.Fields(p.LastLine("progress"))
	if len(f) < 2 {
		return 0
	}
	n, _ := strconv.ParseInt(f[1], 10, 64)
	return n
}

func TestPrivilegedSocketAcceleration(t *testing.T) {
	tn := newTestNet(t, "sock", netOpts{sockets: true})
	if err := tn.dp1.SetPolicy(ipB, []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, 0, 0, 1)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	vethBefore, err := tn.n1.LinkStats("veth-a")
	if err != nil {
		t.Fatal(err)
	}
	ctrBefore, _ := tn.dp1.Counters()

	const size = 128 << 20
	src, sink := transfer(t, tn, 5001, size, 0)
	srcDone, err := src.WaitLine(ctxT(t, 2*time.Minute), "done")
	if err != nil {
		t.Fatal(err)
	}
	sinkDone, err := sink.WaitLine(ctxT(t, 2*time.Minute), "done")
	if err != nil {
		t.Fatal(err)
	}
	sf, kf := strings.Fields(srcDone), strings.Fields(sinkDone)
	if sf[1] != strconv.Itoa(size) || kf[1] != sf[1] || kf[2] != sf[2] {
		t.Fatalf("data differs: source %q, sink %q", srcDone, sinkDone)
	}
	vethAfter, _ := tn.n1.LinkStats("veth-a")
	ctrAfter, _ := tn.dp1.Counters()
	redirected := ctrAfter.SocketRedirected.Bytes - ctrBefore.SocketRedirected.Bytes
	vethBytes := vethAfter.RxBytes - vethBefore.RxBytes
	t.Logf("transferred %d bytes: sk_msg redirected %d bytes, veth-a carried %d bytes / %d packets",
		size, redirected, vethBytes, vethAfter.RxPackets-vethBefore.RxPackets)
	if redirected < size*99/100 {
		t.Errorf("sockmap path not taken: redirected %d of %d bytes", redirected, size)
	}
	if vethBytes > size/100 {
		t.Errorf("veth carried %d bytes of a %d-byte accelerated transfer", vethBytes, size)
	}
}

func TestPrivilegedAccelerationOptOut(t *testing.T) {
	tn := newTestNet(t, "optout", netOpts{sockets: true})
	if err := tn.dp1.SetPolicy(ipB, []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, 0, 0, 1)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	// b opts out; a connection from a (which did not) stays on TCP too.
	optOut := endpointOf(tn.b, 2, idB)
	optOut.NoAcceleration = true
	if err := tn.n1.Do(func() error { return tn.dp1.UpsertEndpoint(optOut) }); err != nil {
		t.Fatal(err)
	}
	eps, err := tn.dp1.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	for _, ep := range eps {
		if ep.IP == ipB && !ep.NoAcceleration {
			t.Fatalf("endpoint b lost its opt-out: %+v", ep)
		}
	}
	before, _ := tn.dp1.Counters()
	const size = 16 << 20
	src, sink := transfer(t, tn, 5004, size, 0)
	srcDone, err := src.WaitLine(ctxT(t, time.Minute), "done")
	if err != nil {
		t.Fatal(err)
	}
	sinkDone, err := sink.WaitLine(ctxT(t, time.Minute), "done")
	if err != nil {
		t.Fatal(err)
	}
	if sf, kf := strings.Fields(srcDone), strings.Fields(sinkDone); kf[1] != strconv.Itoa(size) || kf[2] != sf[2] {
		t.Fatalf("data differs: source %q, sink %q", srcDone, sinkDone)
	}
	after, _ := tn.dp1.Counters()
	if got := after.SocketRedirected.Bytes - before.SocketRedirected.Bytes; got != 0 {
		t.Errorf("an opted-out pod's connection was accelerated: %d bytes redirected", got)
	}
	if n, _ := tn.dp1.AcceleratedSockets(); n != 0 {
		t.Errorf("accelerated sockets = %d, want 0", n)
	}
}

func TestPrivilegedRevokeStopsAcceleratedConnection(t *testing.T) {
	tn := newTestNet(t, "rev", netOpts{sockets: true})
	if err := tn.dp1.SetPolicy(ipB, []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, 0, 0, 1)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	_, sink := transfer(t, tn, 5002, 1<<40, 2*time.Millisecond)
	ctx := ctxT(t, 20*time.Second)
	for progress(sink) < 4<<20 {
		if ctx.Err() != nil {
			t.Fatalf("transfer did not start: %v", sink.Lines())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n, _ := tn.dp1.AcceleratedSockets(); n != 2 {
		t.Fatalf("accelerated sockets = %d, want 2", n)
	}

	// Revoke: b accepts nothing any more.
	if err := tn.dp1.SetPolicy(ipB, nil, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	n, err := tn.dp1.EvictFlows(func(k FlowKey) bool { return k.Dst == ipB && k.Src == ipA })
	if err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		t.Errorf("EvictFlows removed no connection")
	}
	if n, _ := tn.dp1.AcceleratedSockets(); n != 0 {
		t.Errorf("accelerated sockets after eviction = %d, want 0", n)
	}
	time.Sleep(time.Second)
	p1 := progress(sink)
	time.Sleep(1500 * time.Millisecond)
	p2 := progress(sink)
	if p2 != p1 {
		t.Errorf("revoked connection still moves data: %d -> %d bytes", p1, p2)
	}
	c, _ := tn.dp1.Counters()
	if c.Drops[DropPolicyIngress].Packets == 0 {
		t.Errorf("revoked connection's packets were not dropped by policy")
	}
}

func TestPrivilegedRestartKeepsEnforcing(t *testing.T) {
	tn := newTestNet(t, "rst", netOpts{noLoad: true})
	serveTCP(t, tn.b, 80, 81)
	spec := loaderSpec{
		Config:    tn.config1(netOpts{}),
		Endpoints: []Endpoint{endpointOf(tn.a, 1, idA), endpointOf(tn.b, 2, idB)},
		Policy: map[netip.Addr][]policytypes.Entry{ipB: {
			allow(policytypes.Ingress, idA, policytypes.ProtoTCP, 80, 16, 1),
			allow(policytypes.Ingress, idA, policytypes.ProtoTCP, 5003, 16, 2),
		}},
		Defaults: ingressDefaultDeny,
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	startLoader := func() *netns.Proc {
		p, err := netns.StartProc(&tn.n1.Netns, nil, -1, []string{loaderEnv + "=" + string(raw)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Kill)
		if _, err := p.WaitLine(ctxT(t, 30*time.Second), "ready"); err != nil {
			t.Fatal(err)
		}
		return p
	}
	loader := startLoader()

	const size = 48 << 20
	src, sink := transfer(t, tn, 5003, size, 2*time.Millisecond)
	ctx := ctxT(t, 20*time.Second)
	for progress(sink) < 2<<20 {
		if ctx.Err() != nil {
			t.Fatalf("transfer did not start: %v", sink.Lines())
		}
		time.Sleep(20 * time.Millisecond)
	}

	loader.Kill()
	// Nobody owns the datapath now: allowed stays allowed, denied stays denied.
	if err := tcpEcho(tn.a, "10.244.1.3:80", netip.Addr{}); err != nil {
		t.Errorf("allowed flow while no loader runs: %v", err)
	}
	if err := tcpEcho(tn.a, "10.244.1.3:81", netip.Addr{}); err == nil {
		t.Errorf("denied flow passed while no loader runs")
	}
	mid := progress(sink)
	time.Sleep(300 * time.Millisecond)
	if progress(sink) <= mid {
		t.Errorf("transfer stalled while no loader runs")
	}

	startLoader()
	if err := tcpEcho(tn.a, "10.244.1.3:81", netip.Addr{}); err == nil {
		t.Errorf("denied flow passed after restart")
	}
	srcDone, err := src.WaitLine(ctxT(t, 2*time.Minute), "done")
	if err != nil {
		t.Fatal(err)
	}
	sinkDone, err := sink.WaitLine(ctxT(t, 2*time.Minute), "done")
	if err != nil {
		t.Fatal(err)
	}
	if sf, kf := strings.Fields(srcDone), strings.Fields(sinkDone); kf[1] != strconv.Itoa(size) || kf[2] != sf[2] {
		t.Errorf("transfer across restart corrupted: source %q sink %q", srcDone, sinkDone)
	}

	// The test process adopts the datapath for cleanup.
	tn.dp1 = tn.load(tn.n1, spec.Config)
}

func TestLoadNamesMissingBPFFS(t *testing.T) {
	_, err := Load(Config{BPFFSRoot: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "bpffs") {
		t.Fatalf("Load on a non-bpffs root: %v, want an error naming bpffs", err)
	}
}

func TestPolicyKeyPrefixes(t *testing.T) {
	cases := []struct {
		key  policytypes.Key
		want uint32
		port uint16
		err  bool
	}{
		{policytypes.Key{Identity: 5}, prefixAnyProto, 0, false},
		{policytypes.Key{Identity: 5, Proto: policytypes.ProtoTCP, Port: 80, PortPrefixLen: 16}, 96, 80, false},
		{policytypes.Key{Identity: 5, Proto: policytypes.ProtoTCP, Port: 8007, PortPrefixLen: 13}, 93, 8000, false},
		{policytypes.Key{Identity: 5, Proto: policytypes.ProtoUDP}, prefixProto, 0, false},
		{policytypes.Key{Identity: 5, PortPrefixLen: 3}, 0, 0, true},
		{policytypes.Key{Identity: 5, Proto: 6, PortPrefixLen: 17}, 0, 0, true},
		{policytypes.Key{Direction: 7}, 0, 0, true},
	}
	for _, c := range cases {
		got, err := policyKey(3, c.key)
		if (err != nil) != c.err {
			t.Errorf("policyKey(%+v) err = %v, want error %v", c.key, err, c.err)
			continue
		}
		if err != nil {
			continue
		}
		if got.Prefixlen != c.want || fromBE16(got.Port) != c.port || got.Slot != 3 {
			t.Errorf("policyKey(%+v) = %+v (port %d), want prefix %d port %d", c.key, got, fromBE16(got.Port), c.want, c.port)
		}
	}
}
