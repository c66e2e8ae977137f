package cli

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/veilmesh/veil/meshctl/output"
	"github.com/veilmesh/veil/policy"
)

// matrixReport is the -o json|yaml output of policy matrix; its shape is a
// contract (issue 3): ports, pods, then one cell per ordered pair of
// distinct pods per port, ordered by port, from, to. JSON is written on one
// line, exactly in the contract's form (and 100 pods make 9,900 cells per
// port).
type matrixReport struct {
	Ports []string     `json:"ports"`
	Pods  []string     `json:"pods"`
	Cells []matrixCell `json:"cells"`
}

type matrixCell struct {
	From    string `json:"from"`
	To      string `json:"to"`
	Port    string `json:"port"`
	Allowed bool   `json:"allowed"`
	Egress  bool   `json:"egress"`
	Ingress bool   `json:"ingress"`
}

func newPolicyMatrixCommand() *cobra.Command {
	var (
		files manifestFlags
		out   outputFlag
		ports []string
	)
	cmd := &cobra.Command{
		Use:   "matrix -f FILE|DIR... --port N[/PROTO]...",
		Short: "Show which pods can reach which, per port",
		Long: `Show the reachability matrix among all pods of the manifests that have an
IP (sorted by namespace/name), for each --port: a grid per port with a row
per source pod and a column per destination pod.

  .  allowed (the source's egress and the destination's ingress both allow)
  X  denied
  -  the pod itself (not traced)

--port is N or N/PROTO with PROTO one of TCP (the default), UDP, SCTP or
ICMP (N is then the ICMP type); repeat it or separate ports with commas.

-o json prints exactly
  {"ports":["80/TCP",…],"pods":["ns/name",…],
   "cells":[{"from":"ns/a","to":"ns/b","port":"80/TCP","allowed":true,"egress":true,"ingress":true},…]}
with one cell per ordered pair of distinct pods per port, ordered by port
(as given), then from, then to (as in pods).

The manifests must be valid: matrix refuses input that 'meshctl policy
validate' reports errors for.

` + exitCodesHelp,
		Example: `  meshctl policy matrix -f manifests/ --port 80 --port 81/UDP
  meshctl policy matrix -f manifests/ --port 80/TCP,53/UDP -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.check(); err != nil {
				return err
			}
			var pps []policy.PortProto
			for _, p := range ports {
				pp, err := parsePort(p)
				if err != nil {
					return err
				}
				pps = append(pps, pp)
			}
			src, err := files.openSource(cmd.InOrStdin(), cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			m, err := src.Matrix(cmd.Context(), pps)
			if err != nil {
				return fmt.Errorf("matrix: %w", err)
			}
			report := newMatrixReport(m)
			w := cmd.OutOrStdout()
			done, err := out.structuredCompact(w, report)
			if err != nil || done {
				return err
			}
			return writeMatrix(w, output.PaletteFor(w), report)
		},
	}
	files.add(cmd)
	addOutputFlag(cmd, &out)
	cmd.Flags().StringSliceVar(&ports, "port", nil, "destination port N[/PROTO]; repeatable")
	_ = cmd.MarkFlagRequired("port") // cannot fail: the flag exists
	return cmd
}

func newMatrixReport(m policy.Matrix) matrixReport {
	r := matrixReport{Ports: []string{}, Pods: []string{}, Cells: []matrixCell{}}
	for _, p := range m.Ports {
		r.Ports = append(r.Ports, portString(p))
	}
	for _, p := range m.Pods {
		r.Pods = append(r.Pods, p.String())
	}
	for _, c := range m.Cells {
		r.Cells = append(r.Cells, matrixCell{
			From: c.From.String(), To: c.To.String(), Port: portString(c.Port),
			Allowed: c.Allowed, Egress: c.Egress, Ingress: c.Ingress,
		})
	}
	return r
}

func writeMatrix(w io.Writer, pal output.Palette, r matrixReport) error {
	allowed := map[[3]string]bool{}
	for _, c := range r.Cells {
		allowed[[3]string{c.Port, c.From, c.To}] = c.Allowed
	}
	var b strings.Builder
	for i, port := range r.Ports {
		if i > 0 {
			b.WriteString("\n")
		}
		n := 0
		for _, c := range r.Cells {
			if c.Port == port && c.Allowed {
				n++
			}
		}
		fmt.Fprintf(&b, "%s  %d/%d allowed\n", pal.Bold(port), n, len(r.Pods)*(len(r.Pods)-1))
		tw := tabwriter.NewWriter(&b, 0, 0, 1, ' ', 0)
		fmt.Fprint(tw, "from \\ to")
		for _, to := range r.Pods {
			fmt.Fprintf(tw, "\t%s", pal.Plain(to))
		}
		fmt.Fprintln(tw)
		for _, from := range r.Pods {
			fmt.Fprint(tw, from)
			for _, to := range r.Pods {
				cell := pal.Grey("-")
				if from != to {
					if allowed[[3]string{port, from, to}] {
						cell = pal.Green(".")
					} else {
						cell = pal.Red("X")
					}
				}
				fmt.Fprintf(tw, "\t%s", cell)
			}
			fmt.Fprintln(tw)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write matrix: %w", err)
		}
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write matrix: %w", err)
	}
	return nil
}
