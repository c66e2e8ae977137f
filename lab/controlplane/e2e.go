package controlplane

import (
	"context"
	"path/filepath"
)

// E2EBinaries are the upstream Kubernetes end-to-end test binary, its test
// server and kubectl, built from build/e2e at the lab's Kubernetes release.
type E2EBinaries struct {
	// E2ETest is `go test -c k8s.io/kubernetes/test/e2e`: the ginkgo suite
	// Kubernetes' own conformance runs use.
	E2ETest string
	// Agnhost is k8s.io/kubernetes/test/images/agnhost, the server most of
	// the e2e tests' pods run; tests/conformance packs it as an image.
	Agnhost string
	// Kubectl is the e2e framework's way into pods (kubectl exec).
	Kubectl string
	// Dir is the cache directory that holds all three.
	Dir string
}

// e2eSet is built only for conformance runs (make conformance and its CI
// slice), never by Build or BuildCluster: e2e.test compiles most of
// Kubernetes' test tree. It pins k8s.io/kubernetes as build/kubernetes
// does, so the tests match the lab's kubelet.
var e2eSet = buildSet{
	recipe: "e2e 1: -trimpath -ldflags=-s -w +version, CGO_ENABLED=0, e2e.test by go test -c",
	wrappers: []wrapper{
		{name: "e2e.test", module: "e2e", pkg: "k8s.io/kubernetes/test/e2e", ldflags: kubeVersionLDFlags, test: true},
		{name: "agnhost", module: "e2e", pkg: "k8s.io/kubernetes/test/images/agnhost"},
		{name: "kubectl", module: "e2e", pkg: "k8s.io/kubernetes/cmd/kubectl", ldflags: kubeVersionLDFlags},
	},
	keyFiles: []string{"e2e/go.mod", "e2e/go.sum"},
}

// BuildE2E returns the e2e test binary, agnhost and kubectl, built and cached as
// Build does (one set, its own key).
func BuildE2E(ctx context.Context) (E2EBinaries, error) {
	dir, err := buildCached(ctx, e2eSet)
	if err != nil {
		return E2EBinaries{}, err
	}
	return E2EBinaries{
		E2ETest: filepath.Join(dir, "e2e.test"),
		Agnhost: filepath.Join(dir, "agnhost"),
		Kubectl: filepath.Join(dir, "kubectl"),
		Dir:     dir,
	}, nil
}
