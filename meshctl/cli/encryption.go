package cli

import "github.com/spf13/cobra"

func newEncryptionCommand(agent *agentOptions, kube *kubeOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "encryption",
		Short: "Show and manage transparent encryption (WireGuard between nodes)",
		Long: `Show and manage Veil's transparent encryption: every node's agent runs a
WireGuard device, peers with every other node and records its state in
the node's MeshNode (mesh.veil.dev/v1alpha1), which meshctl reads from
the API server (--kubeconfig).

` + exitCodesHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newEncryptionStatusCommand(agent, kube), newEncryptionRotateKeyCommand(agent))
	return cmd
}
