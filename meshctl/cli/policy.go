package cli

import "github.com/spf13/cobra"

func newPolicyCommand(agent *agentOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Validate and explain network policy",
		Long: `Validate and explain NetworkPolicies, MeshPolicies and ClusterMeshPolicies.

validate and matrix work offline from manifest files (-f) holding
Namespaces, Pods (labels, status.podIP, container ports), Nodes and
policies, as multi-document YAML, JSON or List objects. Verdicts come from
the same compiler the agent runs, so they are what the datapath would
enforce. trace works from manifest files too, or without -f asks the agent
about its live state; get shows what the agent has compiled for one pod.

` + exitCodesHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newPolicyValidateCommand(), newPolicyTraceCommand(agent), newPolicyMatrixCommand(), newPolicyGetCommand(agent))
	return cmd
}
