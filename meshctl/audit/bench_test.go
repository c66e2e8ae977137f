package audit

import (
	"io"
	"testing"

	"github.com/veilmesh/veil/meshctl/output"
)

// BenchmarkAudit judges a healthy full mesh of 250 nodes in memory (no API
// server): the engine's share of meshctl audit encryption, New then Finish
// then the default Write. tests/scale's BenchmarkAuditEncryption measures
// the whole command against a real API server.
func BenchmarkAudit(b *testing.B) {
	cs := healthy(250)
	for b.Loop() {
		r := New(cs, now, opts, "bench")
		r.Finish(0)
		if err := Write(io.Discard, output.Palette{}, r, View{}); err != nil {
			b.Fatal(err)
		}
	}
}
