package cli

import "github.com/spf13/cobra"

func newPolicyCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Validate and explain network policy",
		Long: `Validate and explain NetworkPolicies, MeshPolicies and ClusterMeshPolicies.

The subcommands work offline from manifest files (-f) holding Namespaces,
Pods (labels, status.podIP, container ports), Nodes and policies, as
multi-document YAML, JSON or List objects. Verdicts come from the same
compiler the agent runs, so they are what the datapath would enforce.

` + exitCodesHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newPolicyValidateCommand(), newPolicyTraceCommand(), newPolicyMatrixCommand())
	return cmd
}
