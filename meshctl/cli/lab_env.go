package cli

import (
	"fmt"
	"io"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/veilmesh/veil/lab"
	"github.com/veilmesh/veil/meshctl/agentclient"
)

func newLabEnvCommand(o *labOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "env",
		Short: "Print the shell exports that point kubectl and meshctl at the lab",
		Long: `Print the shell exports that point kubectl and meshctl at the running lab:
KUBECONFIG (the lab's API server, as cluster admin), ` + agentclient.EnvLabState + ` (so that
--node NAME reaches that node's agent) and ` + agentclient.EnvSocket + ` (node-1's agent, the
default without --node).

Exit codes:
  0  the exports were printed
  1  no lab runs in the lab directory
  2  usage error`,
		Example: `  eval $(meshctl lab env)`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			dir, err := o.labDir()
			if err != nil {
				return err
			}
			r, err := readLab(dir)
			if err != nil {
				return &exitError{code: ExitFailure, err: err}
			}
			if err := r.requireRunning(); err != nil {
				return err
			}
			return writeLabEnv(cmd.OutOrStdout(), dir, r.state)
		},
	}
}

// writeLabEnv prints one export per line, each ended by ';' so that an
// unquoted eval $(…), which joins the lines, runs them one by one.
func writeLabEnv(w io.Writer, dir string, st *lab.State) error {
	if len(st.Nodes) == 0 {
		return &exitError{code: ExitFailure, err: fmt.Errorf("lab state in %s lists no node", dir)}
	}
	for _, kv := range [][2]string{
		{envKubeconfig, st.Kubeconfig},
		{agentclient.EnvLabState, filepath.Join(dir, lab.StateFile)},
		{agentclient.EnvSocket, st.Nodes[0].Socket},
	} {
		if _, err := fmt.Fprintf(w, "export %s=%s;\n", kv[0], shellQuote(kv[1])); err != nil {
			return fmt.Errorf("write lab env: %w", err)
		}
	}
	return nil
}
