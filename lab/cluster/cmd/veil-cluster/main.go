// Command veil-cluster runs the real-kubelet lab cluster of lab/cluster by
// hand, in the foreground, as root:
//
//	veil-cluster up [-nodes 2] [-prefix vrc] [-image bin/veil-image.tar] [-veil=true]
//	    bring up the cluster, import the image, install Veil from its chart,
//	    wait until the nodes are Ready, print the kubeconfig; ^C removes it all
//	veil-cluster down [-prefix vrc]
//	    remove what a cluster with that prefix left after a crash
//
// The binaries come from `make controlplane`'s cache, the image from
// `make image`.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/veilmesh/veil/lab/cluster"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: veil-cluster up|down [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet("veil-cluster "+os.Args[1], flag.ExitOnError)
	prefix := fs.String("prefix", "vrc", "names of everything the cluster creates")
	nodes := fs.Int("nodes", 2, "number of nodes")
	image := fs.String("image", "bin/veil-image.tar", "the agent image (make image)")
	veil := fs.Bool("veil", true, "install Veil from deploy/helm/veil")
	fs.Parse(os.Args[2:])

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "up":
		err = up(ctx, *prefix, *nodes, *image, *veil)
	case "down":
		err = cluster.Cleanup(*prefix, "")
	default:
		fmt.Fprintf(os.Stderr, "veil-cluster: unknown command %q (want up or down)\n", os.Args[1])
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "veil-cluster %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func up(ctx context.Context, prefix string, nodes int, image string, veil bool) error {
	began := time.Now()
	opts := cluster.Options{Prefix: prefix, Nodes: nodes, Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	if veil {
		opts.Images = []string{image}
	}
	c, err := cluster.Start(ctx, opts)
	if err != nil {
		return err
	}
	if veil {
		err = c.InstallVeil(ctx, nil)
		if err == nil {
			err = c.WaitNodesReady(ctx)
		}
	}
	if err != nil {
		return fmt.Errorf("%w (and stop: %v)", err, c.Stop())
	}
	fmt.Printf("cluster %s up in %s: %d nodes\nexport KUBECONFIG=%s\n(^C removes it)\n",
		prefix, time.Since(began).Round(time.Millisecond), nodes, c.Kubeconfig)
	<-ctx.Done()
	return c.Stop()
}
