package controlplane

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
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
	// Source is the pinned k8s.io/kubernetes module's directory in the
	// module cache: agnhost's image takes files from there.
	Source string
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
	src, err := sourceDir()
	if err != nil {
		return E2EBinaries{}, err
	}
	modDir, err := moduleDir(ctx, filepath.Join(src, "e2e"), "k8s.io/kubernetes")
	if err != nil {
		return E2EBinaries{}, err
	}
	return E2EBinaries{
		Source:  modDir,
		E2ETest: filepath.Join(dir, "e2e.test"),
		Agnhost: filepath.Join(dir, "agnhost"),
		Kubectl: filepath.Join(dir, "kubectl"),
		Dir:     dir,
	}, nil
}

// moduleDir returns where the module that the wrapper module in modDir
// builds with is in the module cache. The build downloads it; when the
// binaries come from the cache and the module cache has been emptied since
// (a fresh GOMODCACHE, go clean -modcache), it is downloaded again here.
func moduleDir(ctx context.Context, modDir, module string) (string, error) {
	dir, err := listModuleDir(ctx, modDir, module)
	if err != nil || dir != "" {
		return dir, err
	}
	cmd := exec.CommandContext(ctx, "go", "mod", "download", module)
	cmd.Dir = modDir
	cmd.Env = buildEnv()
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("download the pinned %s sources: %w: %s", module, err, strings.TrimSpace(string(out)))
	}
	if dir, err = listModuleDir(ctx, modDir, module); err == nil && dir == "" {
		err = fmt.Errorf("find the pinned %s sources: not in the module cache after go mod download", module)
	}
	return dir, err
}

// listModuleDir is module's directory in the module cache, "" when it is
// not there.
func listModuleDir(ctx context.Context, modDir, module string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Dir}}", module)
	cmd.Dir = modDir
	cmd.Env = buildEnv()
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("find the pinned %s sources: %w%s", module, err, exitStderr(err))
	}
	return strings.TrimSpace(string(out)), nil
}
