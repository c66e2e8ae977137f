// Package benchreport prints Veil's benchmark results the one way they are
// read: a metric measured side by side with its baseline in the same run,
// and their ratio (> 1 means Veil is faster). With BENCH_JSON=path the rows
// are also appended to a JSON array in that file, so several benchmark
// binaries of one `make bench` run share one report.
package benchreport

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
)

// Row is one compared metric.
type Row struct {
	Name     string  `json:"name"`
	Unit     string  `json:"unit"`
	Baseline float64 `json:"baseline"`
	Value    float64 `json:"value"`
	Ratio    float64 `json:"ratio"`
	// Target is the ratio the design asks for; 0 means none.
	Target float64 `json:"target,omitempty"`
}

// NewRow computes the ratio of value to baseline; higherIsBetter says which
// way the unit points (requests/s: yes; latency: no).
func NewRow(name, unit string, baseline, value float64, higherIsBetter bool, target float64) Row {
	r := Row{Name: name, Unit: unit, Baseline: baseline, Value: value, Target: target}
	switch {
	case baseline == 0 || value == 0:
	case higherIsBetter:
		r.Ratio = value / baseline
	default:
		r.Ratio = baseline / value
	}
	return r
}

// Print writes rows as an aligned table.
func Print(w io.Writer, title string, rows []Row) {
	fmt.Fprintf(w, "\n%s\n", title)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "METRIC\tUNIT\tBASELINE\tVEIL\tRATIO\tTARGET")
	for _, r := range rows {
		target := "-"
		if r.Target > 0 {
			mark := "met"
			if r.Ratio < r.Target {
				mark = "MISSED"
			}
			target = fmt.Sprintf(">= %.2fx %s", r.Target, mark)
		}
		fmt.Fprintf(tw, "%s\t%s\t%.4g\t%.4g\t%.2fx\t%s\n", r.Name, r.Unit, r.Baseline, r.Value, r.Ratio, target)
	}
	tw.Flush()
}

// AppendJSON appends rows to the JSON array in the file named by
// $BENCH_JSON; it does nothing when the variable is unset.
func AppendJSON(rows []Row) error {
	path := os.Getenv("BENCH_JSON")
	if path == "" {
		return nil
	}
	var all []Row
	raw, err := os.ReadFile(path)
	switch {
	case err == nil && len(raw) > 0:
		if err := json.Unmarshal(raw, &all); err != nil {
			return fmt.Errorf("read benchmark report %s: %w", path, err)
		}
	case err != nil && !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("read benchmark report %s: %w", path, err)
	}
	all = append(all, rows...)
	out, err := json.MarshalIndent(all, "", "  ")
	if err != nil {
		return fmt.Errorf("encode benchmark report: %w", err)
	}
	if err := os.WriteFile(path, append(out, '\n'), 0o644); err != nil {
		return fmt.Errorf("write benchmark report %s: %w", path, err)
	}
	return nil
}
