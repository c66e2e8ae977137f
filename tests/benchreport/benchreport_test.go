package benchreport

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestNewRowRatio(t *testing.T) {
	if r := NewRow("x", "req/s", 100, 150, true, 1.4); r.Ratio != 1.5 {
		t.Errorf("higher-is-better ratio = %v, want 1.5", r.Ratio)
	}
	if r := NewRow("x", "us", 100, 50, false, 0); r.Ratio != 2 {
		t.Errorf("lower-is-better ratio = %v, want 2", r.Ratio)
	}
	if r := NewRow("x", "us", 0, 50, true, 0); r.Ratio != 0 {
		t.Errorf("zero baseline ratio = %v, want 0", r.Ratio)
	}
}

func TestPrintAndAppendJSON(t *testing.T) {
	var sb strings.Builder
	rows := []Row{NewRow("same-node-rr-accel-vs-plain", "req/s", 10, 20, true, 1.4), NewRow("b", "B/s", 10, 5, true, 2)}
	Print(&sb, "title", rows)
	for _, want := range []string{"same-node-rr-accel-vs-plain", "2.00x", ">= 1.40x met", "MISSED"} {
		if !strings.Contains(sb.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, sb.String())
		}
	}
	path := filepath.Join(t.TempDir(), "bench.json")
	t.Setenv("BENCH_JSON", path)
	if err := AppendJSON(rows[:1]); err != nil {
		t.Fatal(err)
	}
	if err := AppendJSON(rows[1:]); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(path)
	var got []map[string]any
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0]["name"] != "same-node-rr-accel-vs-plain" || got[1]["ratio"] != 0.5 {
		t.Errorf("report = %v", got)
	}
	for _, k := range []string{"name", "unit", "baseline", "value", "ratio"} {
		if _, ok := got[0][k]; !ok {
			t.Errorf("row lacks key %q", k)
		}
	}
}
