package cli

import (
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/veilmesh/veil/meshctl/output"
	"github.com/veilmesh/veil/policy/manifest"
)

// validateReport is the -o json|yaml output of policy validate.
type validateReport struct {
	Errors   int                `json:"errors"`
	Warnings int                `json:"warnings"`
	Problems []manifest.Problem `json:"problems"`
}

func newPolicyValidateCommand() *cobra.Command {
	var (
		files manifestFlags
		out   outputFlag
	)
	cmd := &cobra.Command{
		Use:   "validate -f FILE|DIR...",
		Short: "Check manifests the way the API server would, and more",
		Long: `Check manifests for every problem the API server would reject: unknown or
misspelt fields, NetworkPolicies as upstream Kubernetes validates them,
MeshPolicies and ClusterMeshPolicies as their CRD schema and CEL rules do
(ports, endPort, CIDRs and except, protocols, ICMP fields, peer forms,
label selectors, mode).

Warnings point at what is valid but probably a mistake: selectors that
match no pod in the files, named ports that no selected pod defines,
namespaces the files do not define, unknown kinds.

Exit codes:
  0  no errors (warnings alone do not fail)
  1  the manifests have errors
  2  usage error, or a file or directory cannot be read`,
		Example: `  meshctl policy validate -f policies/ -f pods.yaml
  kubectl get ns,pods,netpol -A -o yaml | meshctl policy validate -f - -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.check(); err != nil {
				return err
			}
			set, _, problems, err := files.load(cmd.InOrStdin())
			if err != nil {
				return err
			}
			report := validateReport{
				Errors:   len(problems.Errors()),
				Warnings: len(problems.Warnings()),
				Problems: problems,
			}
			if report.Problems == nil {
				report.Problems = []manifest.Problem{}
			}
			w := cmd.OutOrStdout()
			done, err := out.structured(w, report)
			if err != nil {
				return err
			}
			if !done {
				if err := writeProblemsTable(w, output.PaletteFor(w), set, problems); err != nil {
					return err
				}
			}
			if report.Errors > 0 {
				return failed()
			}
			return nil
		},
	}
	files.add(cmd)
	addOutputFlag(cmd, &out)
	return cmd
}

func writeProblemsTable(w io.Writer, pal output.Palette, set *manifest.Set, problems manifest.Problems) error {
	objects := len(set.Namespaces) + len(set.Pods) + len(set.Nodes) + len(set.NetworkPolicies) + len(set.MeshPolicies) + len(set.ClusterMeshPolicies)
	if len(problems) == 0 {
		_, err := fmt.Fprintf(w, "%s: %s, no problems\n", pal.Green("OK"), output.Plural(objects, "object"))
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "%s\tLOCATION\tOBJECT\tFIELD\tMESSAGE\n", pal.Plain("SEVERITY"))
	for _, p := range problems {
		sev := pal.Yellow("warning")
		if p.Severity == manifest.SeverityError {
			sev = pal.Red("error  ")
		}
		loc := p.File
		if p.Line > 0 {
			loc += ":" + strconv.Itoa(p.Line)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", sev, output.Dash(loc), output.Dash(p.Object), output.Dash(p.Field), p.Message)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write problems: %w", err)
	}
	_, err := fmt.Fprintf(w, "\n%s, %s in %s\n", output.Plural(len(problems.Errors()), "error"), output.Plural(len(problems.Warnings()), "warning"), output.Plural(objects, "object"))
	return err
}
