package audit

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/veilmesh/veil/meshctl/output"
)

// Write renders r as the audit's table: the verdict, the thresholds, every
// check, what was not tested and the failures again; pal colours it.
func Write(w io.Writer, pal output.Palette, r Report) error {
	var b strings.Builder
	verdict := pal.Green(r.Verdict)
	if r.Verdict != Pass {
		verdict = pal.Red(r.Verdict)
	}
	pairs := max(len(r.Nodes)*(len(r.Nodes)-1), 0)
	fmt.Fprintf(&b, "%s %s  %s, %s, %d/%d checks passed\n", pal.Bold("Encryption audit:"), pal.Bold(verdict),
		output.Plural(len(r.Nodes), "node"), output.Plural(pairs, "node pair"), len(r.Checks)-len(r.Failures), len(r.Checks))
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
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "SCOPE\tCHECK\t%s\tREASON\n", pal.Plain("RESULT"))
	for _, c := range r.Checks {
		res := pal.Green(c.Result)
		if c.Result != Pass {
			res = pal.Red(c.Result)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Scope, c.Check, res, c.Reason)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write audit: %w", err)
	}
	if len(r.NotTested) > 0 {
		b.WriteString("\nNot tested (active):\n")
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		for _, c := range r.NotTested {
			fmt.Fprintf(tw, "  %s\t%s\n", c.Scope, c.Reason)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write audit: %w", err)
		}
	}
	if len(r.Failures) > 0 {
		fmt.Fprintf(&b, "\n%s\n", pal.Bold(pal.Red(fmt.Sprintf("FAIL: %s", output.Plural(len(r.Failures), "check")+" failed:"))))
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		for _, c := range r.Failures {
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", c.Scope, c.Check, c.Reason)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write audit: %w", err)
		}
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write audit: %w", err)
	}
	return nil
}
