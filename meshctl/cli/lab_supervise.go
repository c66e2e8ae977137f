package cli

import (
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	labcluster "github.com/veilmesh/veil/lab/cluster"
)

// newLabSuperviseCommand is the process 'lab up' leaves behind: it owns the
// lab's cluster (its processes and the API server's relay live in it)
// until SIGTERM, then stops it.
func newLabSuperviseCommand(o *labOptions) *cobra.Command {
	f := labUpFlags{wait: 1}
	cmd := &cobra.Command{
		Use:    "supervise --dir DIR --prefix P --nodes N --kube-proxy MODE --image TAR",
		Short:  "Own a running lab until SIGTERM (started by 'lab up')",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.check(); err != nil {
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
			mode, _ := labcluster.ParseKubeProxyMode(f.kubeProxy)
			opts := labcluster.UpOptions{
				Options:    labcluster.Options{Prefix: f.prefix, Nodes: f.nodes, Images: []string{f.image}, KubeProxy: mode, Logger: log},
				StrictMode: f.strict,
			}
			if err := labcluster.Supervise(ctx, dir, opts, log); err != nil {
				return &exitError{code: ExitFailure, err: err}
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&f.nodes, "nodes", 2, "number of nodes")
	cmd.Flags().StringVar(&f.prefix, "prefix", defaultLabPrefix, "names everything the lab creates")
	cmd.Flags().StringVar(&f.kubeProxy, "kube-proxy", string(labcluster.KubeProxyNFTables), "none, iptables or nftables")
	cmd.Flags().BoolVar(&f.strict, "strict-mode", false, "install Veil in strict mode")
	cmd.Flags().StringVar(&f.image, "image", "", "Veil's image tarball")
	return cmd
}
