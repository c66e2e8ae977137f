// Command veil-controlplane builds and runs the lab's control plane (etcd +
// kube-apiserver, as the lab and the tests use it) by hand.
//
//	veil-controlplane build   build the control plane, the node components and containerd into the cache, print their paths
//	veil-controlplane e2e     build the upstream e2e test binary, agnhost and kubectl into the cache (for conformance runs), print their paths
//	veil-controlplane up      start a control plane, print its kubeconfig path, run until ^C
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/veilmesh/veil/lab/controlplane"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: veil-controlplane build|e2e|up")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "build":
		err = build(ctx)
	case "e2e":
		err = buildE2E(ctx)
	case "up":
		err = up(ctx)
	default:
		fmt.Fprintf(os.Stderr, "veil-controlplane: unknown command %q (want build, e2e or up)\n", os.Args[1])
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "veil-controlplane %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func build(ctx context.Context) error {
	start := time.Now()
	bins, err := controlplane.BuildCluster(ctx)
	if err != nil {
		return err
	}
	for _, b := range []struct{ name, path string }{
		{"etcd", bins.Etcd},
		{"kube-apiserver", bins.KubeAPIServer},
		{"kube-controller-manager", bins.KubeControllerManager},
		{"kube-scheduler", bins.KubeScheduler},
		{"kubelet", bins.Kubelet},
		{"kube-proxy", bins.KubeProxy},
		{"containerd", bins.Containerd},
		{"containerd-shim-runc-v2", bins.ContainerdShim},
		{"ctr", bins.Ctr},
		{"coredns", bins.CoreDNS},
	} {
		fmt.Printf("%-24s %s\n", b.name, b.path)
	}
	fmt.Printf("(%s)\n", time.Since(start).Round(time.Second))
	return nil
}

func buildE2E(ctx context.Context) error {
	start := time.Now()
	bins, err := controlplane.BuildE2E(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("%-24s %s\n%-24s %s\n%-24s %s\n", "e2e.test", bins.E2ETest, "agnhost", bins.Agnhost, "kubectl", bins.Kubectl)
	fmt.Printf("(%s)\n", time.Since(start).Round(time.Second))
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
