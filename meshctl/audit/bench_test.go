package audit

import (
	"fmt"
	"io"
	"runtime"
	"testing"

	"github.com/veilmesh/veil/meshctl/output"
)

// BenchmarkAudit judges a healthy mesh in memory (no API server): the
// engine's share of meshctl audit encryption, New then Finish then the
// default Write and -o json. Full lists (every peer, as agents before the
// compact status wrote them) and compact statuses run side by side at 250
// nodes; compact alone also at 5,000 (full lists would hold 25 million
// peer entries). It reports the heap the report holds. tests/scale's
// BenchmarkAuditEncryption measures the whole command against a real API
// server.
func BenchmarkAudit(b *testing.B) {
	for _, tc := range []struct {
		nodes   int
		compact bool
	}{{250, false}, {250, true}, {5000, true}} {
		name := "full"
		if tc.compact {
			name = "compact"
		}
		b.Run(fmt.Sprintf("%s/%d", name, tc.nodes), func(b *testing.B) {
			cs := healthyWith(tc.nodes, tc.compact)
			var held uint64
			for b.Loop() {
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				r := New(cs, now, opts, "bench")
				r.Finish(0)
				runtime.GC()
				runtime.ReadMemStats(&after)
				held = after.HeapAlloc - min(before.HeapAlloc, after.HeapAlloc)
				if err := Write(io.Discard, output.Palette{}, r, View{}); err != nil {
					b.Fatal(err)
				}
				if _, err := WriteStructured(io.Discard, output.JSON, r, View{}); err != nil {
					b.Fatal(err)
				}
				if r.Verdict != Pass {
					b.Fatalf("verdict %s: %v", r.Verdict, r.Failures[:min(3, len(r.Failures))])
				}
			}
			b.ReportMetric(float64(held)/(1<<20), "MiB-report")
		})
	}
}
