package cli

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	labcluster "github.com/veilmesh/veil/lab/cluster"
)

func newLabEnvCommand(o *labOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "env",
		Short: "Print the shell export that points kubectl and meshctl at the lab",
		Long: `Print the shell export that points kubectl and meshctl at the running
lab: KUBECONFIG, the lab's API server (through the relay on this host's
loopback that the lab's supervisor runs), as cluster admin.

Exit codes:
  0  the export was printed
  1  no lab runs in the lab directory
  2  usage error`,
		Example: `  eval $(meshctl lab env)`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, s, err := o.runningLab()
			if err != nil {
				return err
			}
			return writeLabEnv(cmd.OutOrStdout(), s)
		},
	}
}

// writeLabEnv prints one export a line, each ended by ';' so that an
// unquoted eval $(…), which joins the lines, runs them one by one.
func writeLabEnv(w io.Writer, s *labcluster.LabState) error {
	if s.Kubeconfig == "" {
		return &exitError{code: ExitFailure, err: fmt.Errorf("the lab's record in %s names no kubeconfig", s.Dir)}
	}
	if _, err := fmt.Fprintf(w, "export %s=%s;\n", envKubeconfig, shellQuote(s.Kubeconfig)); err != nil {
		return fmt.Errorf("write lab env: %w", err)
	}
	return nil
}
