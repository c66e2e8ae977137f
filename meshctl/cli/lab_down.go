package cli

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/veilmesh/veil/lab"
)

func newLabDownCommand(o *labOptions) *cobra.Command {
	var (
		prefix string
		grace  time.Duration
	)
	cmd := &cobra.Command{
		Use:   "down [--dir DIR]",
		Short: "Stop the lab and remove everything it created",
		Long: `Stop the lab's supervisor (SIGTERM; SIGKILL after --grace), which stops
the agents, the pods' servers and the control plane; then kill, by PID, any
process of the lab that outlived it, and remove by exact name everything
that carries the lab's prefix: network namespaces, cgroups, bpffs pins,
WireGuard control sockets, and the lab's files in DIR.

down also cleans up after a crashed 'lab up' or supervisor. With --prefix
and no lab in DIR, it removes what a lab with that prefix left on the host.

Exit codes:
  0  nothing of the lab is left (also when there was no lab)
  1  something is left; the message names it
  2  usage error, or not root`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.requireRoot("down"); err != nil {
				return err
			}
			if prefix != "" && !labPrefixRE.MatchString(prefix) {
				return usageErrorf("--prefix %q: not a lab prefix (8 to 32 of a-z, 0-9, '-')", prefix)
			}
			if grace <= 0 {
				return usageErrorf("--grace must be positive")
			}
			dir, err := o.labDir()
			if err != nil {
				return err
			}
			r, err := readLab(dir)
			if err != nil {
				return &exitError{code: ExitFailure, err: err}
			}
			if r.sup.IsSupervisor() {
				fmt.Fprintf(cmd.OutOrStdout(), "Stopping the lab in %s (supervisor pid %d)…\n", dir, r.sup.PID)
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), grace+time.Minute)
			defer cancel()
			err = lab.Down(ctx, dir, prefix, grace)
			if errors.Is(err, lab.ErrNoLab) {
				fmt.Fprintf(cmd.OutOrStdout(), "No lab in %s: nothing to do.\n", dir)
				return nil
			}
			if err != nil {
				return &exitError{code: ExitFailure, err: err}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "The lab in %s is down; nothing of it is left.\n", dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&prefix, "prefix", "", "the lab's prefix, when DIR does not say (after a crash before the lab recorded it)")
	cmd.Flags().DurationVar(&grace, "grace", 3*time.Minute, "how long the supervisor gets to stop the lab before it is killed")
	return cmd
}
