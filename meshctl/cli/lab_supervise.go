package cli

import (
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/veilmesh/veil/lab"
)

// newLabSuperviseCommand is the process 'lab up' leaves behind: it owns the
// lab (relays and pod servers live in it) until SIGTERM, then stops it.
func newLabSuperviseCommand(o *labOptions) *cobra.Command {
	var (
		nodes  int
		prefix string
		strict bool
	)
	cmd := &cobra.Command{
		Use:    "supervise --dir DIR --prefix P --nodes N",
		Short:  "Own a running lab until SIGTERM (started by 'lab up')",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkLabUpFlags(nodes, prefix, 1); err != nil {
				return err
			}
			if err := o.requireRoot("supervise"); err != nil {
				return err
			}
			dir, err := o.labDir()
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, os.Interrupt)
			defer stop()
			log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			if err := lab.Supervise(ctx, lab.SuperviseOptions{Prefix: prefix, Nodes: nodes, Dir: dir, StrictMode: strict, Log: log}); err != nil {
				return &exitError{code: ExitFailure, err: err}
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&nodes, "nodes", 2, "number of nodes")
	cmd.Flags().StringVar(&prefix, "prefix", defaultLabPrefix, "names everything the lab creates")
	cmd.Flags().BoolVar(&strict, "strict-mode", false, "run the agents in strict mode")
	return cmd
}
