package wireguard

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/tests/testenv"
)

// manyPeers returns n peers that exist only on paper: keys, endpoints
// nothing answers on, one /32 each in 10.200.0.0/14.
func manyPeers(tb testing.TB, n int) []Peer {
	tb.Helper()
	out := make([]Peer, n)
	for i := range out {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			tb.Fatal(err)
		}
		out[i] = Peer{
			PublicKey:  k.PublicKey(),
			Endpoint:   netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}), 51820),
			AllowedIPs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(200 + i>>16), byte(i >> 8), byte(i)}), 32)},
		}
	}
	return out
}

// rewriteAll is what a device configured from scratch on every change
// does: the whole peer list, replacing the old one.
func rewriteAll(d *Device, peers []Peer) error {
	cfgs := make([]wgtypes.PeerConfig, len(peers))
	ka := d.keepalive
	for i, p := range peers {
		cfgs[i] = wgtypes.PeerConfig{PublicKey: p.PublicKey, Endpoint: net.UDPAddrFromAddrPort(p.Endpoint), PersistentKeepaliveInterval: &ka,
			ReplaceAllowedIPs: true, AllowedIPs: toIPNets(p.AllowedIPs)}
	}
	return d.wg.ConfigureDevice(d.cfg.Interface, wgtypes.Config{ReplacePeers: true, Peers: cfgs})
}

// With 5,000 peers, changing one peer leaves the others' sessions alone:
// a live peer keeps its handshake and its counters only grow, and traffic
// keeps flowing; a rewrite of the whole list (the alternative) resets it.
func TestPrivilegedSetPeersAtScale(t *testing.T) {
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("skipped under -short: configures 5,000 peers")
	}
	ctx := context.Background()
	a, b := newLab(t, "s")
	var sawMarker atomic.Bool
	listen(t, b.ns, "10.97.0.2:7000", echoHandler([]byte("unused"), &sawMarker))
	peers := append(manyPeers(t, 4999), b.peer())
	if err := a.dev.SetPeers(ctx, peers); err != nil {
		t.Fatal(err)
	}
	if err := netns.TCPEcho(a.ns, "10.97.0.2:7000", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	bStatus := func() PeerStatus {
		t.Helper()
		st, err := a.dev.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Peers) != len(peers) {
			t.Fatalf("%d peers on the device, want %d", len(st.Peers), len(peers))
		}
		for _, p := range st.Peers {
			if p.PublicKey == b.dev.Key().PublicKey().String() {
				return p
			}
		}
		t.Fatal("b is not a peer")
		return PeerStatus{}
	}
	before := bStatus()
	if before.LastHandshake.IsZero() || before.RxBytes == 0 {
		t.Fatalf("no session with b before the change: %+v", before)
	}

	peers[0].Endpoint = netip.AddrPortFrom(netip.MustParseAddr("10.96.255.1"), 51820)
	peers[1].AllowedIPs = append(peers[1].AllowedIPs, netip.MustParsePrefix("10.203.0.0/24"))
	start := time.Now()
	if err := a.dev.SetPeers(ctx, peers); err != nil {
		t.Fatal(err)
	}
	t.Logf("SetPeers with two of %d peers changed: %s", len(peers), time.Since(start))
	after := bStatus()
	if !after.LastHandshake.Equal(before.LastHandshake) || after.RxBytes < before.RxBytes || after.TxBytes < before.TxBytes {
		t.Errorf("b's session was reset by a change to other peers: before %+v after %+v", before, after)
	}
	if err := netns.TCPEcho(a.ns, "10.97.0.2:7000", 10*time.Second); err != nil {
		t.Errorf("traffic to b after the change: %v", err)
	}
	st, err := a.dev.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Peers {
		switch p.PublicKey {
		case peers[0].PublicKey.String():
			if p.Endpoint != peers[0].Endpoint {
				t.Errorf("changed peer's endpoint %s, want %s", p.Endpoint, peers[0].Endpoint)
			}
		case peers[1].PublicKey.String():
			if len(p.AllowedIPs) != 2 {
				t.Errorf("changed peer's allowed IPs %v, want two", p.AllowedIPs)
			}
		}
	}

	// The alternative: the whole list again.
	start = time.Now()
	if err := rewriteAll(a.dev, peers); err != nil {
		t.Fatal(err)
	}
	t.Logf("rewrite of all %d peers: %s", len(peers), time.Since(start))
	if rewritten := bStatus(); !rewritten.LastHandshake.IsZero() && rewritten.RxBytes >= after.RxBytes {
		t.Errorf("a full rewrite kept b's session (%+v): this test cannot tell the two apart", rewritten)
	}
}

// BenchmarkSetPeers5000 measures applying one changed peer out of 5,000
// on the userspace device: SetPeers (only the change is sent) against a
// rewrite of the whole list, side by side, and reports the ratio.
func BenchmarkSetPeers5000(b *testing.B) {
	testenv.RequirePrivileged(b)
	ns, err := netns.NewNetns(fmt.Sprintf("veiltest-%d-wg-bench", os.Getpid()))
	if err != nil {
		b.Fatal(err)
	}
	defer ns.Delete()
	key, err := GenerateKey()
	if err != nil {
		b.Fatal(err)
	}
	var d *Device
	if err := ns.Do(func() (err error) {
		d, err = Open(context.Background(), Config{Interface: fmt.Sprintf("vwgb%d", os.Getpid()%10000), PrivateKey: key, Mode: ModeUserspace})
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	ctx := context.Background()
	peers := manyPeers(b, 5000)
	if err := d.SetPeers(ctx, peers); err != nil {
		b.Fatal(err)
	}
	var incremental, rewrite time.Duration
	i := 0
	for b.Loop() {
		i++
		peers[i%len(peers)].Endpoint = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 95, byte(i >> 8), byte(i)}), 51820)
		start := time.Now()
		if err := d.SetPeers(ctx, peers); err != nil {
			b.Fatal(err)
		}
		incremental += time.Since(start)
		start = time.Now()
		if err := rewriteAll(d, peers); err != nil {
			b.Fatal(err)
		}
		rewrite += time.Since(start)
	}
	b.ReportMetric(float64(incremental.Nanoseconds())/float64(i), "ns/SetPeers")
	b.ReportMetric(float64(rewrite.Nanoseconds())/float64(i), "ns/rewrite")
	b.ReportMetric(float64(rewrite)/float64(incremental), "rewrite/SetPeers")
}
