package cli

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	labcluster "github.com/veilmesh/veil/lab/cluster"
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
the cluster: every process (control plane, kubelets, containerd and every
container), then, by exact name, the nodes' mount namespaces and everything
mounted in them, the network namespaces, the cgroups in every hierarchy and
the cluster's files. down then removes whatever a crashed supervisor left,
and the lab's record and log.

With --prefix and no record in DIR, it removes what a lab with that prefix
left there after a crash before it wrote its record.

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
				return usageErrorf("--prefix %q: not a lab prefix (3 to 12 of a-z, 0-9)", prefix)
			}
			if grace <= 0 {
				return usageErrorf("--grace must be positive")
			}
			dir, err := o.labDir()
			if err != nil {
				return err
			}
			s, err := readLab(dir)
			if err != nil {
				return err
			}
			if s.SupervisorRunning() {
				fmt.Fprintf(cmd.OutOrStdout(), "Stopping the lab in %s (supervisor pid %d)…\n", dir, s.Supervisor)
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), grace+time.Minute)
			defer cancel()
			began := time.Now()
			err = labcluster.Down(ctx, dir, prefix, grace)
			if errors.Is(err, labcluster.ErrNoLab) {
				fmt.Fprintf(cmd.OutOrStdout(), "No lab in %s: nothing to do.\n", dir)
				return nil
			}
			if err != nil {
				return &exitError{code: ExitFailure, err: err}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "The lab in %s is down (%s); nothing of it is left.\n", dir, time.Since(began).Round(100*time.Millisecond))
			return nil
		},
	}
	cmd.Flags().StringVar(&prefix, "prefix", "", "the lab's prefix, when DIR has no record (after a crash before the lab wrote it)")
	cmd.Flags().DurationVar(&grace, "grace", 2*time.Minute, "how long the supervisor gets to stop the lab before it is killed")
	return cmd
}
