package cli

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/output"
)

func newEncryptionRotateKeyCommand(agent *agentOptions) *cobra.Command {
	var out outputFlag
	cmd := &cobra.Command{
		Use:   "rotate-key",
		Short: "Replace a node's WireGuard key",
		Long: `Ask the agent of this node (or of --node) to replace its WireGuard key.
The agent makes a new key, reconfigures its device and republishes the
public half in its Node annotation; every other node's agent picks it up
from there and re-peers, and established flows carry on across the
rotation. Prints the old and the new key fingerprint; 'meshctl encryption
status' then shows when the peers have handshaken with the new key.

Exit codes:
  0  the key was rotated
  2  usage error, a node the cluster does not have, encryption is off on the node
  3  the agent could not be reached, did not answer or failed, or RBAC
     forbids reaching it through the API server`,
		Example: `  sudo meshctl encryption rotate-key
  meshctl encryption rotate-key --node node-2`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.check(); err != nil {
				return err
			}
			c, err := agent.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer c.Close()
			resp, err := unary(cmd.Context(), c, "rotate key", func(ctx context.Context) (*agentv1.RotateKeyResponse, error) {
				return c.Client.RotateKey(ctx, &agentv1.RotateKeyRequest{})
			})
			if err != nil {
				return err
			}
			r := rotateKeyReport{Node: c.Status.Node, OldFingerprint: resp.OldFingerprint, NewFingerprint: resp.NewFingerprint}
			w := cmd.OutOrStdout()
			done, err := out.structured(w, r)
			if err != nil || done {
				return err
			}
			if _, err := fmt.Fprintf(w, "%s: key rotated: %s → %s\n", output.OrUnknown(r.Node), output.Dash(r.OldFingerprint), output.Dash(r.NewFingerprint)); err != nil {
				return fmt.Errorf("write rotate-key: %w", err)
			}
			return nil
		},
	}
	addOutputFlag(cmd, &out)
	return cmd
}

// rotateKeyReport is the -o json|yaml output of encryption rotate-key.
type rotateKeyReport struct {
	Node           string `json:"node"`
	OldFingerprint string `json:"oldFingerprint"`
	NewFingerprint string `json:"newFingerprint"`
}
