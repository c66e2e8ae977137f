package datapath

import (
	"errors"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/policy/policytypes"

	"github.com/cilium/ebpf"
)

// fillPolicyMap writes entries of an endpoint id no test uses until the
// policy map refuses one, and returns how many it wrote.
func fillPolicyMap(t *testing.T, dp *Datapath) int {
	t.Helper()
	val := podPolicyValue{Enforce: uint8(policytypes.Allow), Audit: uint8(policytypes.Allow)}
	for n := 0; ; n++ {
		k := fillerKey(n)
		if err := dp.policy.Update(&k, &val, ebpf.UpdateNoExist); err != nil {
			if n == 0 {
				t.Fatalf("policy map refuses the first filler entry: %v", err)
			}
			return n
		}
	}
}

// fillerKey is the n-th filler entry: slot of endpoint id 0x7ffffff0.
func fillerKey(n int) podPolicyKey {
	return podPolicyKey{Prefixlen: prefixAnyProto, Slot: 0x7ffffff0 << 1, Identity: uint32(n), Direction: uint8(policytypes.Ingress)}
}

// A policy update that the map refuses (it is full) must not leave the old
// policy in force: the new one may be a revocation. The endpoint denies both
// ways and the error names the endpoint and the map.
func TestPrivilegedPolicyMapFullFailsClosed(t *testing.T) {
	tn := newTestNet(t, "full", netOpts{})
	serveTCP(t, tn.a, 80)
	serveTCP(t, tn.b, 80)
	// a accepts b on TCP 80; its egress is open.
	if err := tn.dp1.SetPolicy(ipA, []policytypes.Entry{allow(policytypes.Ingress, idB, policytypes.ProtoTCP, 80, 16, 1)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	if err := tcpEcho(tn.b, "10.244.1.2:80", netip.Addr{}); err != nil {
		t.Fatalf("b->a before the update: %v", err)
	}
	start := time.Now()
	n := fillPolicyMap(t, tn.dp1)
	t.Logf("policy map full after %d filler entries (%s)", n, time.Since(start).Round(time.Millisecond))

	// The revocation: only c may reach a now.
	err := tn.dp1.SetPolicy(ipA, []policytypes.Entry{
		allow(policytypes.Ingress, idC, policytypes.ProtoTCP, 80, 16, 2),
		allow(policytypes.Ingress, idC, policytypes.ProtoTCP, 81, 16, 3),
	}, ingressDefaultDeny)
	var perr *PolicyUpdateError
	if !errors.As(err, &perr) {
		t.Fatalf("SetPolicy into a full map: %v; want a *PolicyUpdateError", err)
	}
	if perr.Endpoint != ipA || perr.Map != PolicyMap || !perr.FailedClosed {
		t.Errorf("error %+v; want endpoint %s, map %s, failed closed", perr, ipA, PolicyMap)
	}
	t.Logf("reported: %v", err)
	if err := tcpEcho(tn.b, "10.244.1.2:80", netip.Addr{}); err == nil {
		t.Error("b->a delivered after a failed revocation; want the endpoint to deny")
	}
	if err := tcpEcho(tn.a, "10.244.1.3:80", netip.Addr{}); err == nil {
		t.Error("a->b delivered after a failed policy update; want a's egress denied too")
	}

	// Room again: the next update takes effect.
	for i := range n {
		k := fillerKey(i)
		if err := tn.dp1.policy.Delete(&k); err != nil {
			t.Fatal(err)
		}
	}
	if err := tn.dp1.SetPolicy(ipA, []policytypes.Entry{allow(policytypes.Ingress, idB, policytypes.ProtoTCP, 80, 16, 4)}, ingressDefaultDeny); err != nil {
		t.Fatalf("SetPolicy after making room: %v", err)
	}
	if err := tcpEcho(tn.b, "10.244.1.2:80", netip.Addr{}); err != nil {
		t.Errorf("b->a after a successful update: %v", err)
	}
}

// Opting a pod out of acceleration while it has accelerated connections
// moves them to the TCP path: the rest of their data goes through TCP
// (where TC policy sees it), and nothing is lost on the way.
func TestPrivilegedAccelerationOptOutEvictsSockets(t *testing.T) {
	tn := newTestNet(t, "optev", netOpts{sockets: true})
	if err := tn.dp1.SetPolicy(ipB, []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, 0, 0, 1)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	const size = 48 << 20
	// Paced, so the transfer is still running when the pod opts out.
	src, sink := transfer(t, tn, 5005, size, time.Millisecond)
	ctx := ctxT(t, 20*time.Second)
	for progress(sink) < 4<<20 {
		if ctx.Err() != nil {
			t.Fatalf("transfer did not start: %v", sink.Lines())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n, _ := tn.dp1.AcceleratedSockets(); n != 2 {
		t.Fatalf("accelerated sockets = %d, want 2", n)
	}

	optOut := endpointOf(tn.b, 2, idB)
	optOut.NoAcceleration = true
	if err := tn.n1.Do(func() error { return tn.dp1.UpsertEndpoint(optOut) }); err != nil {
		t.Fatal(err)
	}
	if n, _ := tn.dp1.AcceleratedSockets(); n != 0 {
		t.Errorf("accelerated sockets after the opt-out = %d, want 0", n)
	}
	before, _ := tn.dp1.Counters()
	vethBefore, err := tn.n1.LinkStats("veth-a")
	if err != nil {
		t.Fatal(err)
	}
	srcDone, err := src.WaitLine(ctxT(t, time.Minute), "done")
	if err != nil {
		t.Fatal(err)
	}
	sinkDone, err := sink.WaitLine(ctxT(t, time.Minute), "done")
	if err != nil {
		t.Fatal(err)
	}
	if sf, kf := strings.Fields(srcDone), strings.Fields(sinkDone); sf[1] != strconv.Itoa(size) || kf[1] != sf[1] || kf[2] != sf[2] {
		t.Fatalf("data differs: source %q, sink %q", srcDone, sinkDone)
	}
	after, _ := tn.dp1.Counters()
	vethAfter, _ := tn.n1.LinkStats("veth-a")
	redirected := after.SocketRedirected.Bytes - before.SocketRedirected.Bytes
	tcpBytes := vethAfter.RxBytes - vethBefore.RxBytes
	t.Logf("after the opt-out: %d bytes redirected socket to socket, %d bytes over veth-a", redirected, tcpBytes)
	if redirected != 0 {
		t.Errorf("%d bytes still redirected socket to socket after the opt-out", redirected)
	}
	if tcpBytes < size/4 {
		t.Errorf("only %d bytes went over TCP after the opt-out", tcpBytes)
	}
}

// A swap leaves the replaced entries in the map until a grace period has
// passed, so a program that read the endpoint record before the switch
// never finds its policy half deleted; the next swap reclaims them.
func TestPrivilegedPolicySwapDefersDeletion(t *testing.T) {
	tn := newTestNet(t, "swap", netOpts{})
	first := []policytypes.Entry{allow(policytypes.Ingress, idB, policytypes.ProtoTCP, 80, 16, 1)}
	if err := tn.dp1.SetPolicy(ipA, first, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	// Endpoint a has id 1: its slots are 2 and 3, and it starts on 2.
	old, err := policyKey(1<<1|1, first[0].Key)
	if err != nil {
		t.Fatal(err)
	}
	var v podPolicyValue
	if err := tn.dp1.policy.Lookup(&old, &v); err != nil {
		t.Fatalf("first policy not written to slot 3: %v", err)
	}
	if err := tn.dp1.SetPolicy(ipA, []policytypes.Entry{allow(policytypes.Ingress, idC, policytypes.ProtoTCP, 80, 16, 2)}, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	if err := tn.dp1.policy.Lookup(&old, &v); err != nil {
		t.Errorf("replaced entry deleted right after the switch: %v", err)
	}
	start := time.Now()
	if err := tn.dp1.SetPolicy(ipA, first, ingressDefaultDeny); err != nil {
		t.Fatal(err)
	}
	t.Logf("swap that waited for a grace period: %s", time.Since(start))
	// Slot 3 holds the first policy again, written after the reclaim.
	if err := tn.dp1.policy.Lookup(&old, &v); err != nil || v.RuleId != 1 {
		t.Errorf("slot 3 after the third swap: %+v, %v", v, err)
	}
	stale, err := policyKey(1<<1, policytypes.Key{Direction: policytypes.Ingress, Identity: idC, Proto: policytypes.ProtoTCP, Port: 80, PortPrefixLen: 16})
	if err != nil {
		t.Fatal(err)
	}
	if err := tn.dp1.policy.Lookup(&stale, &v); err != nil {
		t.Errorf("second policy deleted right after the third switch: %v", err)
	}
}
