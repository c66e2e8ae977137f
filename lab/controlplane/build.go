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

// wrapper is a module under build/ whose main is one control-plane binary.
type wrapper struct {
	name string
	// ldflags beyond the defaults, computed from the module's pins.
	ldflags func(ctx context.Context, dir string) (string, error)
}

var wrappers = []wrapper{
	{name: "etcd"},
	{name: "kube-apiserver", ldflags: kubeVersionLDFlags},
}

// recipe is hashed into the cache key; bump it when the way Build builds
// (flags, environment) changes, so caches built the old way are not reused.
const recipe = "1: -trimpath -ldflags=-s -w +version, CGO_ENABLED=0"

// keyFiles are hashed, per wrapper module, into the cache key: a change of a
// pinned version or of the wrapper's main means a new build.
var keyFiles = []string{"go.mod", "go.sum", "main.go"}

// Build returns the etcd and kube-apiserver binaries built from the modules
// pinned under lab/controlplane/build/. They are built once per set of
// pins and Go toolchain into CacheDir()/<key>/; later calls, from any process,
// return the cached binaries. Concurrent callers wait for one build.
func Build(ctx context.Context) (Binaries, error) {
	src, err := sourceDir()
	if err != nil {
		return Binaries{}, err
	}
	goVersion, err := goEnv(ctx, "GOVERSION")
	if err != nil {
		return Binaries{}, err
	}
	key, err := cacheKey(src, goVersion+" "+runtime.GOOS+"/"+runtime.GOARCH)
	if err != nil {
		return Binaries{}, err
	}
	root := CacheDir()
	dir := filepath.Join(root, key)
	bins := Binaries{
		Etcd:          filepath.Join(dir, "etcd"),
		KubeAPIServer: filepath.Join(dir, "kube-apiserver"),
		Dir:           dir,
	}
	if complete(dir) {
		return bins, nil
	}

	if err := os.MkdirAll(root, 0o755); err != nil {
		return Binaries{}, fmt.Errorf("create control-plane cache %s: %w", root, err)
	}
	unlock, err := lockFile(ctx, filepath.Join(root, key+".lock"))
	if err != nil {
		return Binaries{}, err
	}
	defer unlock()
	if complete(dir) {
		return bins, nil
	}

	tmp, err := os.MkdirTemp(root, key+".tmp-")
	if err != nil {
		return Binaries{}, fmt.Errorf("create control-plane build dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	// MkdirTemp's 0700 would hide a shared cache from other users.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return Binaries{}, fmt.Errorf("create control-plane build dir: %w", err)
	}
	for _, w := range wrappers {
		if err := buildWrapper(ctx, filepath.Join(src, w.name), filepath.Join(tmp, w.name), w); err != nil {
			return Binaries{}, err
		}
	}
	if err := os.WriteFile(filepath.Join(tmp, completeMarker), []byte(goVersion+"\n"), 0o644); err != nil {
		return Binaries{}, fmt.Errorf("mark control-plane build complete: %w", err)
	}
	// A leftover dir without the marker is a build that died half-way.
	if err := os.RemoveAll(dir); err != nil {
		return Binaries{}, fmt.Errorf("remove incomplete control-plane build %s: %w", dir, err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return Binaries{}, fmt.Errorf("publish control-plane build %s: %w", dir, err)
	}
	return bins, nil
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

// cacheKey hashes the wrapper modules' key files and the toolchain.
func cacheKey(src, toolchain string) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "recipe %s\ntoolchain %s\n", recipe, toolchain)
	for _, w := range wrappers {
		for _, name := range keyFiles {
			path := filepath.Join(src, w.name, name)
			data, err := os.ReadFile(path)
			if err != nil {
				return "", fmt.Errorf("hash control-plane pins: %w", err)
			}
			fmt.Fprintf(h, "%s/%s %d\n", w.name, name, len(data))
			h.Write(data)
		}
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

func buildWrapper(ctx context.Context, modDir, out string, w wrapper) error {
	ldflags := "-s -w"
	if w.ldflags != nil {
		extra, err := w.ldflags(ctx, modDir)
		if err != nil {
			return err
		}
		ldflags += " " + extra
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", ldflags, "-o", out, ".")
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
// statically, as upstream ships these binaries.
func buildEnv() []string {
	env := make([]string, 0, len(os.Environ())+3)
	for _, kv := range os.Environ() {
		switch {
		case strings.HasPrefix(kv, "GOFLAGS="), strings.HasPrefix(kv, "GOWORK="), strings.HasPrefix(kv, "CGO_ENABLED="):
		default:
			env = append(env, kv)
		}
	}
	return append(env, "GOFLAGS=-mod=readonly -buildvcs=false", "GOWORK=off", "CGO_ENABLED=0")
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
