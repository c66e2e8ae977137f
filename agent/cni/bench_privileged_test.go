package cni

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/veilmesh/veil/agent/ipam"
	"github.com/veilmesh/veil/tests/testenv"
)

// BenchmarkPrivilegedPluginAdd measures CNI ADD as kubelet's runtime sees
// it: the veil-cni process, the gRPC call, address allocation (with fsync),
// veth creation and pod-side configuration. DEL runs between iterations,
// untimed. Reports p50/p99 of ADD.
func BenchmarkPrivilegedPluginAdd(b *testing.B) {
	testenv.RequirePrivileged(b)
	node := nodeNetns(b, "b-node")
	pod := testNetns(b, "b-pod")
	alloc, err := ipam.Open(filepath.Join(b.TempDir(), "ipam.json"), netip.MustParsePrefix("10.244.8.0/24"))
	if err != nil {
		b.Fatal(err)
	}
	h := &Handler{IPAM: alloc, Net: NodeNetwork{}, Endpoints: &fakeEndpoints{}, Log: slog.New(slog.DiscardHandler)}
	sock := startAgent(b, &nodeAgent{h: h, node: node})
	conf := netConf(sock, "")
	pluginBinary(b)

	var lat []time.Duration
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		call := cniCall{cmd: "ADD", id: fmt.Sprintf("bench-%d-%d", os.Getpid(), i), args: podArgs, conf: conf, netns: pod.Path()}
		start := time.Now()
		if out := run(b, call); out.exit != 0 {
			b.Fatalf("ADD: %s", out.stdout)
		}
		lat = append(lat, time.Since(start))
		b.StopTimer()
		call.cmd = "DEL"
		if out := run(b, call); out.exit != 0 {
			b.Fatalf("DEL: %s", out.stdout)
		}
		b.StartTimer()
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}
