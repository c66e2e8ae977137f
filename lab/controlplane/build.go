package controlplane

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// Binaries are the paths of a built control plane.
type Binaries struct {
	Etcd          string
	KubeAPIServer string
	// Dir is the cache directory that holds both.
	Dir string
}

// ClusterBinaries are the paths of everything a real-kubelet lab runs that
// the project builds: the control plane, the node components from the same
// Kubernetes pins, and containerd.
type ClusterBinaries struct {
	Binaries
	KubeControllerManager string
	KubeScheduler         string
	Kubelet               string
	KubeProxy             string
	Containerd            string
	ContainerdShim        string
	Ctr                   string
	// CoreDNS is the cluster DNS server, which the lab packs as an image.
	CoreDNS string
}

// wrapper is one binary built from a module under build/.
type wrapper struct {
	// name is the binary's name in the cache dir.
	name string
	// module is the module's directory under build/.
	module string
	// pkg is the main package to build: a directory relative to the module,
	// or the import path of a tool the module's go.mod declares.
	pkg string
	// ldflags beyond the defaults, computed from the module's pins.
	ldflags func(ctx context.Context, dir string) (string, error)
	// test builds pkg's test binary (go test -c) instead of a command.
	test bool
}

// buildSet is a group of binaries cached together under one key. Each set
// has its own key so that adding a set, or changing its pins, leaves the
// others' caches valid.
type buildSet struct {
	// recipe is hashed into the cache key; bump it when the way the set is
	// built (flags, environment) changes, so caches built the old way are
	// not reused.
	recipe   string
	wrappers []wrapper
	// keyFiles are hashed, in order, into the cache key: a change of a
	// pinned version or of a wrapper's main means a new build. Paths are
	// relative to build/.
	keyFiles []string
	tags     string
}

// controlPlaneSet is etcd and kube-apiserver, one module each. Its key is
// computed as it was before the other sets existed, so existing caches stay
// valid.
var controlPlaneSet = buildSet{
	recipe: "1: -trimpath -ldflags=-s -w +version, CGO_ENABLED=0",
	wrappers: []wrapper{
		{name: "etcd", module: "etcd", pkg: "."},
		{name: "kube-apiserver", module: "kube-apiserver", pkg: ".", ldflags: kubeVersionLDFlags},
	},
	keyFiles: []string{
		"etcd/go.mod", "etcd/go.sum", "etcd/main.go",
		"kube-apiserver/go.mod", "kube-apiserver/go.sum", "kube-apiserver/main.go",
	},
}

// kubernetesSet is the rest of Kubernetes a lab cluster runs, built from one
// module that pins k8s.io/kubernetes as kube-apiserver's does.
var kubernetesSet = buildSet{
	recipe: "kubernetes 1: -trimpath -ldflags=-s -w +version, CGO_ENABLED=0",
	wrappers: []wrapper{
		{name: "kube-controller-manager", module: "kubernetes", pkg: "./kube-controller-manager", ldflags: kubeVersionLDFlags},
		{name: "kube-scheduler", module: "kubernetes", pkg: "./kube-scheduler", ldflags: kubeVersionLDFlags},
		{name: "kubelet", module: "kubernetes", pkg: "./kubelet", ldflags: kubeVersionLDFlags},
		{name: "kube-proxy", module: "kubernetes", pkg: "./kube-proxy", ldflags: kubeVersionLDFlags},
	},
	keyFiles: []string{
		"kubernetes/go.mod", "kubernetes/go.sum",
		"kubernetes/kube-controller-manager/main.go", "kubernetes/kube-scheduler/main.go",
		"kubernetes/kubelet/main.go", "kubernetes/kube-proxy/main.go",
	},
}

// containerdSet is the lab nodes' container runtime. The tags leave out
// snapshotters that need cgo or kernel features the lab does not use.
var containerdSet = buildSet{
	recipe: "containerd 1: -trimpath -ldflags=-s -w +version, CGO_ENABLED=0",
	tags:   "no_btrfs no_devmapper no_zfs",
	wrappers: []wrapper{
		{name: "containerd", module: "containerd", pkg: "github.com/containerd/containerd/v2/cmd/containerd", ldflags: containerdVersionLDFlags},
		{name: "containerd-shim-runc-v2", module: "containerd", pkg: "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2", ldflags: containerdVersionLDFlags},
		{name: "ctr", module: "containerd", pkg: "github.com/containerd/containerd/v2/cmd/ctr", ldflags: containerdVersionLDFlags},
	},
	keyFiles: []string{"containerd/go.mod", "containerd/go.sum"},
}

// corednsSet is the lab clusters' DNS: a main that imports CoreDNS's server
// and only the plugins a lab uses.
var corednsSet = buildSet{
	recipe:   "coredns 1: -trimpath -ldflags=-s -w, CGO_ENABLED=0",
	wrappers: []wrapper{{name: "coredns", module: "coredns", pkg: "."}},
	keyFiles: []string{"coredns/go.mod", "coredns/go.sum", "coredns/main.go"},
}

// Build returns the etcd and kube-apiserver binaries built from the modules
// pinned under lab/controlplane/build/. They are built once per set of
// pins and Go toolchain into CacheDir()/<key>/; later calls, from any process,
// return the cached binaries. Concurrent callers wait for one build.
func Build(ctx context.Context) (Binaries, error) {
	dir, err := buildCached(ctx, controlPlaneSet)
	if err != nil {
		return Binaries{}, err
	}
	return Binaries{
		Etcd:          filepath.Join(dir, "etcd"),
		KubeAPIServer: filepath.Join(dir, "kube-apiserver"),
		Dir:           dir,
	}, nil
}

// BuildCluster returns, built and cached as Build does, everything a
// real-kubelet lab runs that the project builds. The four sets (control
// plane, Kubernetes node components, containerd, CoreDNS) are cached
// separately.
func BuildCluster(ctx context.Context) (ClusterBinaries, error) {
	cp, err := Build(ctx)
	if err != nil {
		return ClusterBinaries{}, err
	}
	kube, err := buildCached(ctx, kubernetesSet)
	if err != nil {
		return ClusterBinaries{}, err
	}
	ctrd, err := buildCached(ctx, containerdSet)
	if err != nil {
		return ClusterBinaries{}, err
	}
	dns, err := buildCached(ctx, corednsSet)
	if err != nil {
		return ClusterBinaries{}, err
	}
	return ClusterBinaries{
		Binaries:              cp,
		KubeControllerManager: filepath.Join(kube, "kube-controller-manager"),
		KubeScheduler:         filepath.Join(kube, "kube-scheduler"),
		Kubelet:               filepath.Join(kube, "kubelet"),
		KubeProxy:             filepath.Join(kube, "kube-proxy"),
		Containerd:            filepath.Join(ctrd, "containerd"),
		ContainerdShim:        filepath.Join(ctrd, "containerd-shim-runc-v2"),
		Ctr:                   filepath.Join(ctrd, "ctr"),
		CoreDNS:               filepath.Join(dns, "coredns"),
	}, nil
}

// buildCached builds set into CacheDir()/<key>/ unless a complete build is
// there, and returns that dir.
func buildCached(ctx context.Context, set buildSet) (string, error) {
	src, err := sourceDir()
	if err != nil {
		return "", err
	}
	goVersion, err := goEnv(ctx, "GOVERSION")
	if err != nil {
		return "", err
	}
	key, err := cacheKey(src, set, goVersion+" "+runtime.GOOS+"/"+runtime.GOARCH)
	if err != nil {
		return "", err
	}
	root := CacheDir()
	dir := filepath.Join(root, key)
	if complete(dir) {
		return dir, nil
	}

	if err := os.MkdirAll(root, 0o755); err != nil {
		return "", fmt.Errorf("create control-plane cache %s: %w", root, err)
	}
	unlock, err := lockFile(ctx, filepath.Join(root, key+".lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if complete(dir) {
		return dir, nil
	}

	tmp, err := os.MkdirTemp(root, key+".tmp-")
	if err != nil {
		return "", fmt.Errorf("create control-plane build dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	// MkdirTemp's 0700 would hide a shared cache from other users.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", fmt.Errorf("create control-plane build dir: %w", err)
	}
	for _, w := range set.wrappers {
		if err := buildWrapper(ctx, filepath.Join(src, w.module), filepath.Join(tmp, w.name), w, set.tags); err != nil {
			return "", err
		}
	}
	if err := os.WriteFile(filepath.Join(tmp, completeMarker), []byte(goVersion+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("mark control-plane build complete: %w", err)
	}
	// A leftover dir without the marker is a build that died half-way.
	if err := os.RemoveAll(dir); err != nil {
		return "", fmt.Errorf("remove incomplete control-plane build %s: %w", dir, err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", fmt.Errorf("publish control-plane build %s: %w", dir, err)
	}
	return dir, nil
}

// completeMarker is written last, so a cache dir that has it holds both
// binaries.
const completeMarker = "complete"

func complete(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, completeMarker))
	return err == nil
}

// CacheDir is where Build keeps its builds: $VEIL_CACHE/controlplane when
// VEIL_CACHE is set, else the user cache dir's veil/controlplane
// (~/.cache/veil/controlplane on Linux), else, for a CI job without HOME,
// veil-cache/controlplane in the temp dir.
func CacheDir() string {
	if dir := os.Getenv("VEIL_CACHE"); dir != "" {
		return filepath.Join(dir, "controlplane")
	}
	if dir, err := os.UserCacheDir(); err == nil {
		return filepath.Join(dir, "veil", "controlplane")
	}
	return filepath.Join(os.TempDir(), "veil-cache", "controlplane")
}

// cacheKey hashes a set's recipe and key files and the toolchain.
func cacheKey(src string, set buildSet, toolchain string) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "recipe %s\ntoolchain %s\n", set.recipe, toolchain)
	for _, name := range set.keyFiles {
		data, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			return "", fmt.Errorf("hash control-plane pins: %w", err)
		}
		fmt.Fprintf(h, "%s %d\n", name, len(data))
		h.Write(data)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// sourceDir finds lab/controlplane/build of the Veil checkout that holds
// the working directory: go test runs in the package's dir, make in the
// repository root.
func sourceDir() (string, error) {
	dir, err := repoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, "lab", "controlplane", "build"), nil
}

const modulePath = "github.com/veilmesh/veil"

var moduleLine = regexp.MustCompile(`(?m)^module\s+` + regexp.QuoteMeta(modulePath) + `\s*$`)

// repoRoot returns the nearest directory at or above the working directory
// whose go.mod declares Veil's main module.
func repoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find the Veil checkout: %w", err)
	}
	for dir := wd; ; {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && moduleLine.Match(data) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("find the Veil checkout: no go.mod of %s at or above %s", modulePath, wd)
		}
		dir = parent
	}
}

func buildWrapper(ctx context.Context, modDir, out string, w wrapper, tags string) error {
	ldflags := "-s -w"
	if w.ldflags != nil {
		extra, err := w.ldflags(ctx, modDir)
		if err != nil {
			return err
		}
		ldflags += " " + extra
	}
	args := []string{"build", "-trimpath", "-ldflags", ldflags}
	if w.test {
		args = []string{"test", "-c", "-trimpath", "-ldflags", ldflags}
	}
	if tags != "" {
		args = append(args, "-tags", tags)
	}
	cmd := exec.CommandContext(ctx, "go", append(args, "-o", out, w.pkg)...)
	cmd.Dir = modDir
	cmd.Env = buildEnv()
	var output bytes.Buffer
	cmd.Stdout = &output
	cmd.Stderr = &output
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("build %s in %s: %w\n%s", w.name, modDir, err, tail(output.Bytes(), 4096))
	}
	return nil
}

// buildEnv makes the build independent of the caller's module settings: the
// wrapper modules are built exactly as their go.mod and go.sum pin them, and
// statically, as upstream ships these binaries. Only the caller's -p is
// kept, so a build on a shared machine can be told to use fewer cores.
func buildEnv() []string {
	env := make([]string, 0, len(os.Environ())+3)
	goflags := "-mod=readonly -buildvcs=false"
	for _, kv := range os.Environ() {
		switch {
		case strings.HasPrefix(kv, "GOFLAGS="):
			for _, f := range strings.Fields(strings.TrimPrefix(kv, "GOFLAGS=")) {
				if strings.HasPrefix(f, "-p=") {
					goflags += " " + f
				}
			}
		case strings.HasPrefix(kv, "GOWORK="), strings.HasPrefix(kv, "CGO_ENABLED="):
		default:
			env = append(env, kv)
		}
	}
	return append(env, "GOFLAGS="+goflags, "GOWORK=off", "CGO_ENABLED=0")
}

// containerdVersionLDFlags stamps the pinned containerd release into the
// binaries, as upstream's build does; kubelet logs the runtime's version.
func containerdVersionLDFlags(ctx context.Context, modDir string) (string, error) {
	version, err := pinnedVersion(ctx, modDir, "github.com/containerd/containerd/v2")
	if err != nil {
		return "", err
	}
	const pkg = "github.com/containerd/containerd/v2/version"
	return fmt.Sprintf("-X %[1]s.Version=%[2]s -X %[1]s.Package=github.com/containerd/containerd/v2", pkg, version), nil
}

// kubeVersionLDFlags stamps the pinned k8s.io/kubernetes release into the
// binary, as upstream's build does, so /version reports it instead of
// v0.0.0-master.
func kubeVersionLDFlags(ctx context.Context, modDir string) (string, error) {
	version, err := pinnedVersion(ctx, modDir, "k8s.io/kubernetes")
	if err != nil {
		return "", err
	}
	m := regexp.MustCompile(`^v(\d+)\.(\d+)\.\d+`).FindStringSubmatch(version)
	if m == nil {
		return "", fmt.Errorf("read the pinned k8s.io/kubernetes version: unexpected %q", version)
	}
	const pkg = "k8s.io/component-base/version"
	return fmt.Sprintf("-X %[1]s.gitVersion=%[2]s -X %[1]s.gitMajor=%[3]s -X %[1]s.gitMinor=%[4]s -X %[1]s.gitTreeState=clean",
		pkg, version, m[1], m[2]), nil
}

// pinnedVersion returns the version of module that the wrapper module in
// modDir builds with.
func pinnedVersion(ctx context.Context, modDir, module string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Version}}", module)
	cmd.Dir = modDir
	cmd.Env = buildEnv()
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("read the pinned %s version: %w%s", module, err, exitStderr(err))
	}
	return strings.TrimSpace(string(out)), nil
}

func goEnv(ctx context.Context, name string) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", name).Output()
	if err != nil {
		return "", fmt.Errorf("go env %s: %w%s", name, err, exitStderr(err))
	}
	return strings.TrimSpace(string(out)), nil
}

func exitStderr(err error) string {
	var exit *exec.ExitError
	if errors.As(err, &exit) && len(exit.Stderr) > 0 {
		return ": " + strings.TrimSpace(string(exit.Stderr))
	}
	return ""
}

// lockFile takes an exclusive flock on path, waiting for another build to
// finish or ctx to end; the lock dies with its process, so a killed build
// never leaves the cache locked.
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open control-plane build lock: %w", err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for the control-plane build lock %s: %w", path, ctx.Err())
		case <-time.After(time.Second):
		}
	}
	return func() {
		syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

// tail returns at most the last n bytes of b, which is where a failing
// build or server says why.
func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// RepoRoot returns the root of the Veil checkout that holds the working
// directory, where the lab finds the chart, the CRDs and the packages of
// its images.
func RepoRoot() (string, error) { return repoRoot() }
