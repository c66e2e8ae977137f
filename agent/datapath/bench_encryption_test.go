package datapath

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime/pprof"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"
	"github.com/vishvananda/netlink"

	"github.com/veilmesh/veil/agent/wireguard"
	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/policy/policytypes"
	"github.com/veilmesh/veil/tests/benchreport"
)

// bareTunnel hand-configures a second pair of WireGuard devices of the same
// (userspace) implementation between the two nodes, with addresses and
// routes and no Veil in the path: the baseline Veil must not fall behind.
func bareTunnel(b *testing.B, tn *testNet) (tun1, tun2 netip.Addr) {
	b.Helper()
	tun1, tun2 = netip.MustParseAddr("10.97.0.1"), netip.MustParseAddr("10.97.0.2")
	suffix := os.Getpid() % 100000
	type side struct {
		node       *netns.Node
		name       string
		self, peer netip.Addr
		underlay   netip.Addr
	}
	sides := []side{
		{tn.n1, fmt.Sprintf("vwb%da", suffix), tun1, tun2, ip2},
		{tn.n2, fmt.Sprintf("vwb%db", suffix), tun2, tun1, ip1},
	}
	devs := make([]*wireguard.Device, 2)
	for i, s := range sides {
		key, err := wireguard.GenerateKey()
		if err != nil {
			b.Fatal(err)
		}
		if err := s.node.Do(func() (err error) {
			devs[i], err = wireguard.Open(context.Background(), wireguard.Config{Interface: s.name, ListenPort: wgPort + 1, PrivateKey: key})
			return err
		}); err != nil {
			b.Fatal(err)
		}
		dev := devs[i]
		b.Cleanup(func() { dev.Close() })
	}
	for i, s := range sides {
		other := devs[1-i]
		if err := devs[i].SetPeers(context.Background(), []wireguard.Peer{{
			PublicKey: other.Key().PublicKey(), Endpoint: netip.AddrPortFrom(s.underlay, wgPort+1),
			AllowedIPs: []netip.Prefix{netip.PrefixFrom(s.peer, 32)},
		}}); err != nil {
			b.Fatal(err)
		}
		if err := s.node.Do(func() error {
			l, err := netlink.LinkByName(s.name)
			if err != nil {
				return err
			}
			if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: s.self.AsSlice(), Mask: net.CIDRMask(32, 32)}}); err != nil {
				return err
			}
			return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: &net.IPNet{IP: s.peer.AsSlice(), Mask: net.CIDRMask(32, 32)}})
		}); err != nil {
			b.Fatal(err)
		}
	}
	return tun1, tun2
}

// topFunctions renders the heaviest functions (by cumulative samples of
// their own code) of a CPU profile.
func topFunctions(raw []byte, n int) string {
	p, err := profile.Parse(bytes.NewReader(raw))
	if err != nil || len(p.Sample) == 0 {
		return "  (no profile samples)\n"
	}
	flat := map[string]int64{}
	var total int64
	for _, s := range p.Sample {
		v := s.Value[len(s.Value)-1]
		total += v
		if len(s.Location) > 0 && len(s.Location[0].Line) > 0 {
			flat[s.Location[0].Line[0].Function.Name] += v
		}
	}
	type fv struct {
		name string
		v    int64
	}
	var fs []fv
	for k, v := range flat {
		fs = append(fs, fv{k, v})
	}
	sort.Slice(fs, func(i, j int) bool { return fs[i].v > fs[j].v })
	var sb strings.Builder
	for i := 0; i < n && i < len(fs); i++ {
		fmt.Fprintf(&sb, "  %5.1f%%  %s\n", 100*float64(fs[i].v)/float64(total), fs[i].name)
	}
	return sb.String()
}

// BenchmarkEncryption measures, side by side in one run, pod-to-pod across
// nodes through Veil's WireGuard path, the same traffic node to node through
// a bare hand-configured tunnel of the same implementation, and the plain
// underlay; then profiles the encrypted bulk transfer.
func BenchmarkEncryption(b *testing.B) {
	tn := newTestNet(b, "benc", netOpts{})
	if err := tn.dp2.SetPolicy(ipC, []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, 0, 0, 1)}, ingressDefaultDeny); err != nil {
		b.Fatal(err)
	}
	tunnel(b, tn, false)
	_, bare2 := bareTunnel(b, tn)
	a, c := endpointRun{&tn.a.Netns, nil}, endpointRun{&tn.c.Netns, nil}
	n1, n2 := endpointRun{&tn.n1.Netns, nil}, endpointRun{&tn.n2.Netns, nil}
	type scenario struct {
		name, kind string
		cli, srv   endpointRun
		addr       string
	}
	scenarios := []scenario{
		{"veil", "rr", a, c, "10.244.2.2:7101"},
		{"bare", "rr", n1, n2, bare2.String() + ":7102"},
		{"underlay", "rr", n1, n2, "10.99.0.2:7103"},
		{"veil", "bulk", a, c, "10.244.2.2:7104"},
		{"bare", "bulk", n1, n2, bare2.String() + ":7105"},
		{"underlay", "bulk", n1, n2, "10.99.0.2:7106"},
	}
	const rounds = 3
	d := 2 * time.Second
	samples := map[string][]float64{}
	for r := 0; r < rounds; r++ {
		for _, s := range scenarios {
			samples[s.kind+"/"+s.name] = append(samples[s.kind+"/"+s.name], measure(b, s.kind, s.cli, s.srv, s.addr, d))
		}
	}
	m := func(k string) float64 { return median(samples[k]) }
	rows := []benchreport.Row{
		benchreport.NewRow("encrypted-rr-vs-bare-tunnel", "req/s", m("rr/bare"), m("rr/veil"), true, 0.95),
		benchreport.NewRow("encrypted-bulk-vs-bare-tunnel", "B/s", m("bulk/bare"), m("bulk/veil"), true, 0.95),
		benchreport.NewRow("encrypted-rr-vs-underlay", "req/s", m("rr/underlay"), m("rr/veil"), true, 0),
		benchreport.NewRow("encrypted-bulk-vs-underlay", "B/s", m("bulk/underlay"), m("bulk/veil"), true, 0),
	}
	benchreport.Print(os.Stdout, fmt.Sprintf("encryption: userspace WireGuard (median of %d rounds of %s)", rounds, d), rows)
	if err := benchreport.AppendJSON(rows); err != nil {
		b.Error(err)
	}

	// Where the time goes: the userspace device runs in this process, so a
	// CPU profile of it during an encrypted bulk transfer shows its cost.
	var prof bytes.Buffer
	if err := pprof.StartCPUProfile(&prof); err == nil {
		measure(b, "bulk", a, c, "10.244.2.2:7107", 3*time.Second)
		pprof.StopCPUProfile()
		fmt.Printf("\nwhere the time goes in the userspace WireGuard device during encrypted bulk (top functions by CPU):\n%s", topFunctions(prof.Bytes(), 12))
	}
	for _, r := range rows {
		b.ReportMetric(r.Ratio, r.Name+"-ratio")
	}
}
