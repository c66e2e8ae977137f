package deps

import (
	"bufio"
	"bytes"
	"context"
	"maps"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const module = "github.com/veilmesh/veil"

// depRules are packages (go list patterns) and the import paths (a
// trailing "/" means the whole tree) none of their dependencies may be: the
// shipped binaries' packages, and the datapath, which takes compiled
// entries from the leaf policy/policytypes and never links the compiler.
var depRules = []struct {
	pattern   string
	forbidden []string
}{
	{"./meshctl/...", []string{module + "/agent/datapath", module + "/tests/"}},
	{"./agent/cmd/...", []string{module + "/tests/"}},
	{"./deploy/cmd/...", []string{module + "/tests/"}},
	{"./agent/datapath/...", []string{module + "/policy"}},
}

func TestDeps(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("find the go command in PATH: %v", err)
	}
	root := moduleRoot(t, goBin)
	for _, rule := range depRules {
		t.Run(rule.pattern, func(t *testing.T) {
			imports := listDeps(t, goBin, root, rule.pattern)
			if len(imports) == 0 {
				t.Fatalf("go list -deps %s listed no package", rule.pattern)
			}
			for _, pkg := range slices.Sorted(maps.Keys(imports)) {
				for _, bad := range rule.forbidden {
					if pkg == bad || (strings.HasSuffix(bad, "/") && strings.HasPrefix(pkg, bad)) {
						t.Errorf("%s depends on %s (imported by %s), which it must not",
							rule.pattern, pkg, strings.Join(importers(imports, pkg), ", "))
					}
				}
			}
		})
	}
}

// moduleRoot is the directory of Veil's go.mod: go test runs in the
// package's directory.
func moduleRoot(t *testing.T, goBin string) string {
	t.Helper()
	out, err := exec.Command(goBin, "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// listDeps returns every package the pattern's packages depend on, as
// built into binaries (no test files), with each one's imports.
func listDeps(t *testing.T, goBin, root, pattern string) map[string][]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "list", "-deps", "-test=false",
		"-f", `{{.ImportPath}}{{range .Imports}} {{.}}{{end}}`, pattern)
	cmd.Dir = root
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v: %s", pattern, err, stderr.Bytes())
	}
	deps := map[string][]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) > 0 {
			deps[f[0]] = f[1:]
		}
	}
	return deps
}

// importers names the packages that import pkg, so a failure says where
// the edge to cut is.
func importers(deps map[string][]string, pkg string) []string {
	var by []string
	for p, imps := range deps {
		if slices.Contains(imps, pkg) {
			by = append(by, p)
		}
	}
	slices.Sort(by)
	return by
}
