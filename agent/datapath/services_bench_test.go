package datapath

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/tests/benchreport"
)

// connRateTime is how long one "connrate" client connects.
const connRateTime = 2 * time.Second

// measureRR runs an rr-server on serverAddr in srv and an rr-client to
// clientAddr in cli (pinned as measure pins them) and returns requests/s.
func measureRR(b *testing.B, cli, srv endpointRun, serverAddr, clientAddr string, d time.Duration) float64 {
	b.Helper()
	server, err := netns.StartHelper(srv.ns, srv.cg, 1, "rr-server", serverAddr)
	if err != nil {
		b.Fatal(err)
	}
	defer server.Kill()
	if _, err := server.WaitLine(ctxT(b, 10*time.Second), "listening"); err != nil {
		b.Fatal(err)
	}
	client, err := netns.StartHelper(cli.ns, cli.cg, 1, "rr-client", clientAddr, d.String(), "1")
	if err != nil {
		b.Fatal(err)
	}
	defer client.Kill()
	line, err := client.WaitLine(ctxT(b, d+30*time.Second), "rr")
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

// measureConnRate runs a "connrate" client in pod a (in the cgroup) to
// addr and returns connects/s.
func measureConnRate(b *testing.B, tn *testNet, addr string) float64 {
	b.Helper()
	p, err := netns.StartProc(&tn.a.Netns, tn.cg, 0, []string{svcClientEnv + "=connrate"}, addr)
	if err != nil {
		b.Fatal(err)
	}
	if err := p.Wait(ctxT(b, connRateTime+30*time.Second)); err != nil {
		b.Fatal(err)
	}
	var n, secs float64
	if _, err := fmt.Sscanf(p.LastLine("ok "), "ok %f %f", &n, &secs); err != nil || secs == 0 {
		b.Fatalf("connrate client: %v %v", err, p.Lines())
	}
	return n / secs
}

// BenchmarkServices measures, side by side in one run, the cost of
// socket-level load balancing: request/response through a ClusterIP
// against the backend's pod IP directly (same node and cross node; the
// client is in the Service hooks' cgroup either way), and the connect rate
// to one Service with 10,000 Services in the map against with it alone.
func BenchmarkServices(b *testing.B) {
	tn := newTestNet(b, "bsvc", netOpts{sockets: true})
	inCg := endpointRun{&tn.a.Netns, tn.cg}
	sameNode, crossNode := endpointRun{&tn.b.Netns, nil}, endpointRun{&tn.c.Netns, nil}
	rrSame := ServiceKey{VIP: netip.MustParseAddr("10.96.1.1"), Port: 80, Proto: 6}
	rrCross := ServiceKey{VIP: netip.MustParseAddr("10.96.1.2"), Port: 80, Proto: 6}
	conn := ServiceKey{VIP: netip.MustParseAddr("10.96.1.3"), Port: 80, Proto: 6}
	for _, s := range []Service{
		{ServiceKey: rrSame, Backends: []Backend{{IP: ipB, Port: 7101}}},
		{ServiceKey: rrCross, Backends: []Backend{{IP: ipC, Port: 7102}}},
		{ServiceKey: conn, Backends: []Backend{{IP: ipC, Port: 7103}}},
	} {
		if err := tn.dp1.UpsertService(s); err != nil {
			b.Fatal(err)
		}
	}
	serveWho(b, tn.c, 7103)
	// others are the 9,999 Services beside conn in the crowded map.
	var others []ServiceKey
	for i := range 9999 {
		others = append(others, ServiceKey{VIP: netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)}), Port: 80, Proto: 6})
	}
	crowd := func(on bool) {
		b.Helper()
		for _, k := range others {
			var err error
			if on {
				err = tn.dp1.UpsertService(Service{ServiceKey: k, Backends: []Backend{{IP: ipC, Port: 7103}}})
			} else {
				err = tn.dp1.DeleteService(k)
			}
			if err != nil {
				b.Fatal(err)
			}
		}
	}

	const rounds = 3
	d := 2 * time.Second
	if s := os.Getenv("VEIL_BENCH_SECONDS"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n > 0 {
			d = time.Duration(n) * time.Second
		}
	}
	samples := map[string][]float64{}
	add := func(k string, v float64) { samples[k] = append(samples[k], v) }
	// Rounds interleave baseline and Service, so drift on a shared machine
	// hits both alike.
	for range rounds {
		add("rr same pod", measureRR(b, inCg, sameNode, "10.244.1.3:7101", "10.244.1.3:7101", d))
		add("rr same svc", measureRR(b, inCg, sameNode, "10.244.1.3:7101", "10.96.1.1:80", d))
		add("rr cross pod", measureRR(b, inCg, crossNode, "10.244.2.2:7102", "10.244.2.2:7102", d))
		add("rr cross svc", measureRR(b, inCg, crossNode, "10.244.2.2:7102", "10.96.1.2:80", d))
		add("conn 1", measureConnRate(b, tn, "10.96.1.3:80"))
		crowd(true)
		add("conn 10k", measureConnRate(b, tn, "10.96.1.3:80"))
		crowd(false)
	}
	m := func(k string) float64 { return median(samples[k]) }
	rows := []benchreport.Row{
		benchreport.NewRow("svc-rr-same-node-vs-pod-ip", "req/s", m("rr same pod"), m("rr same svc"), true, 0.98),
		benchreport.NewRow("svc-rr-cross-node-vs-pod-ip", "req/s", m("rr cross pod"), m("rr cross svc"), true, 0.98),
		benchreport.NewRow("svc-connect-10k-services-vs-1", "conn/s", m("conn 1"), m("conn 10k"), true, 0.95),
	}
	benchreport.Print(os.Stdout, fmt.Sprintf("services (median of %d rounds; rr %s, connect %s)", rounds, d, connRateTime), rows)
	if err := benchreport.AppendJSON(rows); err != nil {
		b.Error(err)
	}
	for _, r := range rows {
		b.ReportMetric(r.Ratio, r.Name+"-ratio")
	}
}
