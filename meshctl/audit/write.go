package audit

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

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
		output.Plural(s.Nodes, "node"), output.Plural(s.Pairs, "node pair"), len(r.Checks)-len(r.Failures), len(r.Checks))
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
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "SCOPE\tCHECK\t%s\tREASON\n", pal.Plain("RESULT"))
		for _, c := range r.Checks {
			if v.Node != "" && !onNode(c.Scope, v.Node) {
				continue
			}
			res := pal.Green(c.Result)
			if c.Result != Pass {
				res = pal.Red(c.Result)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Scope, c.Check, res, c.Reason)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write audit: %w", err)
		}
	}
	limit := v.MaxFailures
	if limit <= 0 {
		limit = DefaultMaxFailures
	}
	if v.Details {
		limit = max(len(r.Failures), len(r.NotTested))
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
	if len(r.Failures) > 0 {
		fmt.Fprintf(&b, "\n%s\n", pal.Bold(pal.Red(fmt.Sprintf("FAIL: %s", output.Plural(len(r.Failures), "check")+" failed:"))))
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		for _, c := range r.Failures[:min(limit, len(r.Failures))] {
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", c.Scope, c.Check, c.Reason)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write audit: %w", err)
		}
		if rest := len(r.Failures) - limit; rest > 0 {
			fmt.Fprintf(&b, "  … and %d more failed (--details or -o json lists them all, --node NAME one node's)\n", rest)
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

// onNode is true when scope is node, or a pair with node on either side.
func onNode(scope, node string) bool {
	if scope == node {
		return true
	}
	a, b, ok := strings.Cut(scope, "→")
	return ok && (a == node || b == node)
}
