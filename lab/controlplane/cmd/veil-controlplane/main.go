// Command veil-controlplane builds and runs the lab's control plane (etcd +
// kube-apiserver, as the lab and the tests use it) by hand.
//
//	veil-controlplane build   build etcd and kube-apiserver into the cache, print their paths
//	veil-controlplane up      start a control plane, print its kubeconfig path, run until ^C
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/veilmesh/veil/lab/controlplane"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: veil-controlplane build|up")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "build":
		err = build(ctx)
	case "up":
		err = up(ctx)
	default:
		fmt.Fprintf(os.Stderr, "veil-controlplane: unknown command %q (want build or up)\n", os.Args[1])
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "veil-controlplane %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func build(ctx context.Context) error {
	bins, err := controlplane.Build(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("etcd           %s\nkube-apiserver %s\n", bins.Etcd, bins.KubeAPIServer)
	return nil
}

func up(ctx context.Context) error {
	cp, err := controlplane.Start(ctx, controlplane.Options{})
	if err != nil {
		return err
	}
	fmt.Printf("API server %s\nexport KUBECONFIG=%s\n(^C stops it)\n", cp.Server, cp.Kubeconfig)
	<-ctx.Done()
	return cp.Stop()
}
