package datapath

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/policy/policytypes"
	"github.com/veilmesh/veil/tests/benchreport"
)

// endpointRun is one side of a measurement: where a helper runs.
type endpointRun struct {
	ns *netns.Netns
	cg *netns.Cgroup
}

// measure runs server mode in srv and client mode in cli and returns the
// client's rate: requests/s for "rr", bytes/s for "bulk". Bulk pins client
// and server to CPUs 0 and 1, so both can run at once; request/response pins
// both to CPU 1, so each round trip costs the path and two context switches
// rather than two cross-CPU wakeups (on a VM those IPIs cost more than the
// whole network path and hide what the datapath does).
func measure(b *testing.B, kind string, cli, srv endpointRun, addr string, d time.Duration) float64 {
	b.Helper()
	serverMode, clientMode := "rr-server", "rr-client"
	args := []string{addr, d.String(), "1"}
	if kind == "bulk" {
		serverMode, clientMode = "discard", "bulk-client"
		args = args[:2]
	}
	clientCPU := 0
	if kind == "rr" {
		clientCPU = 1
	}
	server, err := netns.StartHelper(srv.ns, srv.cg, 1, serverMode, addr)
	if err != nil {
		b.Fatal(err)
	}
	defer server.Kill()
	if _, err := server.WaitLine(ctxT(b, 10*time.Second), "listening"); err != nil {
		b.Fatal(err)
	}
	client, err := netns.StartHelper(cli.ns, cli.cg, clientCPU, clientMode, args...)
	if err != nil {
		b.Fatal(err)
	}
	defer client.Kill()
	line, err := client.WaitLine(ctxT(b, d+30*time.Second), kind)
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(line)
	count, _ := strconv.ParseFloat(f[1], 64)
	secs, _ := strconv.ParseFloat(f[2], 64)
	if secs == 0 {
		b.Fatalf("bad measurement %q", line)
	}
	return count / secs
}

func median(xs []float64) float64 {
	sort.Float64s(xs)
	return xs[len(xs)/2]
}

// BenchmarkDatapath measures, side by side in one run, the same-node pair
// with and without socket acceleration, host loopback, and the cross-node
// pair against the bare underlay between the two nodes. It prints ratios.
func BenchmarkDatapath(b *testing.B) {
	tn := newTestNet(b, "bench", netOpts{sockets: true})
	allowAll := []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, 0, 0, 1)}
	if err := tn.dp1.SetPolicy(ipB, allowAll, ingressDefaultDeny); err != nil {
		b.Fatal(err)
	}
	// Policy stays on for the cross-node pair: c accepts a on TCP.
	if err := tn.dp2.SetPolicy(ipC, allowAll, ingressDefaultDeny); err != nil {
		b.Fatal(err)
	}
	a, bb, c := &tn.a.Netns, &tn.b.Netns, &tn.c.Netns
	accelA, accelB := endpointRun{a, tn.cg}, endpointRun{bb, tn.cg}
	plainA, plainB, plainC := endpointRun{a, nil}, endpointRun{bb, nil}, endpointRun{c, nil}
	node1, node2 := endpointRun{&tn.n1.Netns, nil}, endpointRun{&tn.n2.Netns, nil}

	type scenario struct {
		name, kind string
		cli, srv   endpointRun
		addr       string
	}
	scenarios := []scenario{
		{"same-node accelerated", "rr", accelA, accelB, "10.244.1.3:7001"},
		{"same-node plain", "rr", plainA, plainB, "10.244.1.3:7002"},
		{"cross-node pod", "rr", plainA, plainC, "10.244.2.2:7003"},
		{"underlay node", "rr", node1, node2, "10.99.0.2:7004"},
		{"same-node accelerated", "bulk", accelA, accelB, "10.244.1.3:7005"},
		{"same-node plain", "bulk", plainA, plainB, "10.244.1.3:7006"},
		{"loopback", "bulk", plainA, plainA, "127.0.0.1:7007"},
		{"cross-node pod", "bulk", plainA, plainC, "10.244.2.2:7008"},
		{"underlay node", "bulk", node1, node2, "10.99.0.2:7009"},
	}
	const rounds = 3
	d := 2 * time.Second
	if s := os.Getenv("VEIL_BENCH_SECONDS"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n > 0 {
			d = time.Duration(n) * time.Second
		}
	}
	samples := map[string][]float64{}
	// Rounds interleave the scenarios, so drift on a shared machine hits
	// baseline and Veil alike.
	for r := 0; r < rounds; r++ {
		for _, s := range scenarios {
			key := s.kind + "/" + s.name
			samples[key] = append(samples[key], measure(b, s.kind, s.cli, s.srv, s.addr, d))
		}
	}
	m := func(k string) float64 { return median(samples[k]) }
	rows := []benchreport.Row{
		benchreport.NewRow("same-node-rr-accel-vs-plain", "req/s", m("rr/same-node plain"), m("rr/same-node accelerated"), true, 1.4),
		benchreport.NewRow("same-node-bulk-accel-vs-plain", "B/s", m("bulk/same-node plain"), m("bulk/same-node accelerated"), true, 2),
		benchreport.NewRow("same-node-bulk-accel-vs-loopback", "B/s", m("bulk/loopback"), m("bulk/same-node accelerated"), true, 1),
		benchreport.NewRow("cross-node-rr-vs-underlay", "req/s", m("rr/underlay node"), m("rr/cross-node pod"), true, 0.97),
		benchreport.NewRow("cross-node-bulk-vs-underlay", "B/s", m("bulk/underlay node"), m("bulk/cross-node pod"), true, 0),
	}
	benchreport.Print(os.Stdout, fmt.Sprintf("datapath (median of %d rounds of %s; bulk: client CPU 0, server CPU 1; rr: both on CPU 1)", rounds, d), rows)
	if err := benchreport.AppendJSON(rows); err != nil {
		b.Error(err)
	}
	for _, r := range rows {
		b.ReportMetric(r.Ratio, r.Name+"-ratio")
	}
}
