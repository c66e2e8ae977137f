package cli

import "github.com/spf13/cobra"

func newAuditCommand(agent *agentOptions, kube *kubeOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Audit the mesh for compliance",
		Long: `Audit the whole mesh from the API server (--kubeconfig) and give a
PASS/FAIL verdict with a reason for every failure, fit for a compliance
record with -o json.

` + exitCodesHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newAuditEncryptionCommand(agent, kube))
	return cmd
}
