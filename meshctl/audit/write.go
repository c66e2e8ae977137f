package audit

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"sigs.k8s.io/yaml"

	"github.com/veilmesh/veil/meshctl/output"
)

// DefaultMaxFailures is how many failures the default table lists; the
// rest are counted (-o json and View.Details list them all).
const DefaultMaxFailures = 50

// View is how much of a report Write shows beyond the summary.
type View struct {
	// Details lists every check, as well as the summary.
	Details bool
	// Node lists the checks of one node: its own, and the pairs it is on
	// either side of.
	Node string
	// MaxFailures bounds the failures listed (0: DefaultMaxFailures); the
	// rest are counted.
	MaxFailures int
}

// Write renders r summary first: the verdict, the thresholds, the counts
// of nodes and pairs, each check's passes and failures, then (v.Details,
// v.Node) the checks asked for, what was not tested and the failures,
// bounded by v.MaxFailures; pal colours it. Its size grows with the
// failures, not with the n·(n-1) pairs.
func Write(w io.Writer, pal output.Palette, r Report, v View) error {
	var b strings.Builder
	verdict := pal.Green(r.Verdict)
	if r.Verdict != Pass {
		verdict = pal.Red(r.Verdict)
	}
	s := r.Summary
	fmt.Fprintf(&b, "%s %s  %s, %s, %d/%d checks passed\n", pal.Bold("Encryption audit:"), pal.Bold(verdict),
		output.Plural(s.Nodes, "node"), output.Plural(s.Pairs, "node pair"), s.Checks-s.Failed, s.Checks)
	active := "off"
	if r.Thresholds.Active {
		port := "a UDP port the pod declares, else 9"
		if r.Thresholds.MarkerPort != 0 {
			port = fmt.Sprintf("UDP port %d", r.Thresholds.MarkerPort)
		}
		active = fmt.Sprintf("on (capture %s, markers to %s)", r.Thresholds.CaptureDuration, port)
	}
	fmt.Fprintf(&b, "Generated %s by meshctl %s against %s\n", r.GeneratedAt, r.MeshctlVersion, output.Dash(r.Cluster.Server))
	fmt.Fprintf(&b, "Thresholds: handshake ≤ %s, key age ≤ %s, status age ≤ %s; active %s\n\n",
		r.Thresholds.MaxHandshakeAge, r.Thresholds.MaxKeyAge, r.Thresholds.StaleAfter, active)
	fmt.Fprintf(&b, "Nodes: %d, %d reported, %d with tunnels up, %d with consistent keys\n", s.Nodes, s.Reported, s.TunnelsUp, s.KeysConsistent)
	fmt.Fprintf(&b, "Pairs: %d checked from each node's own peer view, %d failed\n\n", s.Pairs, s.PairsFailed)
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "CHECK\t%s\t%s\n", pal.Plain("PASSED"), pal.Plain("FAILED"))
	for _, c := range s.ByCheck {
		failed := pal.Plain("0")
		if c.Failed > 0 {
			failed = pal.Red(fmt.Sprint(c.Failed))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", c.Check, pal.Plain(fmt.Sprint(c.Passed)), failed)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write audit: %w", err)
	}
	if v.Details || v.Node != "" {
		if v.Node != "" {
			fmt.Fprintf(&b, "\nChecks of %s and its pairs:\n", v.Node)
		} else {
			b.WriteString("\n")
		}
		if _, err := io.WriteString(w, b.String()); err != nil {
			return fmt.Errorf("write audit: %w", err)
		}
		b.Reset()
		// Streamed: a tabwriter holds its rows until flushed, so it is
		// flushed every few hundred rows (each block aligned on its own).
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "SCOPE\tCHECK\t%s\tREASON\n", pal.Plain("RESULT"))
		var err error
		rows := 0
		r.EachCheck(v.Node, func(c Check) bool {
			res := pal.Green(c.Result)
			if c.Result != Pass {
				res = pal.Red(c.Result)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Scope, c.Check, res, c.Reason)
			if rows++; rows%512 == 0 {
				err = tw.Flush()
			}
			return err == nil
		})
		if err == nil {
			err = tw.Flush()
		}
		if err != nil {
			return fmt.Errorf("write audit: %w", err)
		}
	}
	limit := v.MaxFailures
	if limit <= 0 {
		limit = DefaultMaxFailures
	}
	if v.Details {
		limit = max(r.Summary.Failed, len(r.NotTested))
	}
	if len(r.NotTested) > 0 {
		b.WriteString("\nNot tested (active):\n")
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		for _, c := range r.NotTested[:min(limit, len(r.NotTested))] {
			fmt.Fprintf(tw, "  %s\t%s\n", c.Scope, c.Reason)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write audit: %w", err)
		}
		if rest := len(r.NotTested) - limit; rest > 0 {
			fmt.Fprintf(&b, "  … and %d more (--details or -o json lists them all)\n", rest)
		}
	}
	if s.Failed > 0 {
		fmt.Fprintf(&b, "\n%s\n", pal.Bold(pal.Red(fmt.Sprintf("FAIL: %s", output.Plural(s.Failed, "check")+" failed:"))))
		if _, err := io.WriteString(w, b.String()); err != nil {
			return fmt.Errorf("write audit: %w", err)
		}
		b.Reset()
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		shown := 0
		write := func(c Check) bool {
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", c.Scope, c.Check, c.Reason)
			shown++
			return shown < limit
		}
		if v.Details || len(r.Failures) < min(limit, s.Failed) {
			r.EachFailure("", write) // more than Finish kept
		} else {
			for _, c := range r.Failures {
				if !write(c) {
					break
				}
			}
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write audit: %w", err)
		}
		if rest := s.Failed - shown; rest > 0 {
			fmt.Fprintf(&b, "  … and %d more failed (--details or -o json --details lists them all, --node NAME one node's)\n", rest)
		}
	}
	if !v.Details && v.Node == "" {
		b.WriteString("\nEvery check: --details; one node's checks and pairs: --node NAME; all evidence: -o json\n")
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write audit: %w", err)
	}
	return nil
}

// WriteStructured writes r as JSON or YAML (format); it reports false for
// table output. The report holds the summary, the nodes and the failures
// Finish kept; with v.Details it also lists every check (or v.Node's),
// written one by one as they are made, so that memory does not grow with
// the pairs however many are written.
func WriteStructured(w io.Writer, format string, r Report, v View) (bool, error) {
	if !v.Details && v.Node == "" {
		return output.Structured(w, format, r)
	}
	r.Checks = nil
	switch format {
	case output.JSON:
		head, err := json.MarshalIndent(r, "", "  ")
		if err != nil {
			return true, fmt.Errorf("encode JSON: %w", err)
		}
		bw := bufio.NewWriter(w)
		// The report without checks ends in "\n}": the checks go before it.
		bw.Write(head[:len(head)-2])
		bw.WriteString(",\n  \"checks\": [")
		sep := "\n    "
		r.EachCheck(v.Node, func(c Check) bool {
			row, err := json.Marshal(c)
			if err != nil {
				return false
			}
			bw.WriteString(sep)
			bw.Write(row)
			sep = ",\n    "
			return true
		})
		bw.WriteString("\n  ]\n}\n")
		if err := bw.Flush(); err != nil {
			return true, fmt.Errorf("write JSON: %w", err)
		}
		return true, nil
	case output.YAML:
		head, err := yaml.Marshal(r)
		if err != nil {
			return true, fmt.Errorf("encode YAML: %w", err)
		}
		bw := bufio.NewWriter(w)
		bw.Write(head)
		bw.WriteString("checks:\n")
		var encErr error
		r.EachCheck(v.Node, func(c Check) bool {
			var row []byte
			if row, encErr = yaml.Marshal([]Check{c}); encErr != nil {
				return false
			}
			bw.Write(row)
			return true
		})
		if encErr != nil {
			return true, fmt.Errorf("encode YAML: %w", encErr)
		}
		if err := bw.Flush(); err != nil {
			return true, fmt.Errorf("write YAML: %w", err)
		}
		return true, nil
	}
	return false, nil
}
