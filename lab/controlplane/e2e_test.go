package controlplane

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeGo puts a `go` on PATH that knows one module, k8s.io/kubernetes: `go
// list -m` prints its directory only once `go mod download` has fetched it
// (or at once when present is true). Calls are logged to the returned file.
func fakeGo(t *testing.T, present bool) (moduleDir, calls string) {
	t.Helper()
	dir := t.TempDir()
	moduleDir = filepath.Join(dir, "mod", "k8s.io", "kubernetes@v1.37.1")
	calls = filepath.Join(dir, "calls")
	if present {
		if err := os.MkdirAll(moduleDir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	script := `#!/bin/sh
echo "$*" >> ` + calls + `
case "$1 $2 " in
"list -m "*) if [ -d ` + moduleDir + ` ]; then echo ` + moduleDir + `; else echo; fi ;;
"mod download "*) if [ "$3" = k8s.io/kubernetes ]; then mkdir -p ` + moduleDir + `; else echo "unknown module $3" >&2; exit 1; fi ;;
*) echo "unexpected: $*" >&2; exit 1 ;;
esac
`
	bin := filepath.Join(dir, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bin, "go"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	return moduleDir, calls
}

// TestModuleDirDownloadsWhatTheModuleCacheLost: with the e2e binaries
// cached but the module cache emptied since (CI with a fresh GOMODCACHE),
// the sources agnhost's image takes files from are downloaded again, not
// reported missing.
func TestModuleDirDownloadsWhatTheModuleCacheLost(t *testing.T) {
	want, calls := fakeGo(t, false)
	got, err := moduleDir(context.Background(), t.TempDir(), "k8s.io/kubernetes")
	if err != nil {
		t.Fatalf("moduleDir: %v", err)
	}
	if got != want {
		t.Errorf("moduleDir = %q; want %q", got, want)
	}
	log, err := os.ReadFile(calls)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "mod download k8s.io/kubernetes") {
		t.Errorf("no download among the go calls:\n%s", log)
	}
}

// TestModuleDirPresentDownloadsNothing: sources already in the module
// cache are used as they are.
func TestModuleDirPresentDownloadsNothing(t *testing.T) {
	want, calls := fakeGo(t, true)
	got, err := moduleDir(context.Background(), t.TempDir(), "k8s.io/kubernetes")
	if err != nil || got != want {
		t.Fatalf("moduleDir = %q, %v; want %q", got, err, want)
	}
	log, err := os.ReadFile(calls)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(log), "mod download") {
		t.Errorf("downloaded although present:\n%s", log)
	}
}

// TestModuleDirNamesAFailedDownload: a download that fails is an error that
// says what could not be fetched.
func TestModuleDirNamesAFailedDownload(t *testing.T) {
	fakeGo(t, false)
	_, err := moduleDir(context.Background(), t.TempDir(), "example.com/other")
	if err == nil || !strings.Contains(err.Error(), "download the pinned example.com/other sources") {
		t.Fatalf("moduleDir = %v; want an error naming the download of example.com/other", err)
	}
}
