package cli

import (
	"bytes"
	"encoding/json"
	"flag"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/veilmesh/veil/meshctl/output"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/policytypes"
)

var update = flag.Bool("update", false, "rewrite the golden files in ../testdata/golden")

// run runs meshctl in-process, as the binary would.
func run(t *testing.T, stdin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	code = Main(args, Streams{In: strings.NewReader(stdin), Out: &out, Err: &errb})
	return out.String(), errb.String(), code
}

// golden compares got with testdata/golden/name, or rewrites it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("..", "testdata", "golden", name)
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read golden file (run go test -update to create it): %v", err)
	}
	if got != string(want) {
		t.Errorf("output differs from %s (run go test -update to accept):\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

const (
	e2e      = "../testdata/e2e"
	policies = "../testdata/policies"
	auditDir = "../testdata/audit"
	invalid  = "../testdata/invalid"
)

func TestGolden(t *testing.T) {
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
	}{
		{"validate-ok.txt", []string{"policy", "validate", "-f", e2e, "-f", policies, "-f", auditDir}, ExitOK},
		{"validate-invalid.txt", []string{"policy", "validate", "-f", invalid}, ExitFailure},
		{"validate-invalid.json", []string{"policy", "validate", "-f", invalid, "-o", "json"}, ExitFailure},
		{"trace-allowed.txt", []string{"policy", "trace", "-f", e2e, "-f", policies, "--from", "y/b", "--to", "x/a", "--port", "80"}, ExitOK},
		{"trace-denied.txt", []string{"policy", "trace", "-f", e2e, "-f", policies, "--from", "x/b", "--to", "x/a", "--port", "80/TCP"}, ExitOK},
		{"trace-denied-exit-code.txt", []string{"policy", "trace", "-f", e2e, "-f", policies, "--from", "x/b", "--to", "x/a", "--port", "80", "--exit-code"}, ExitFailure},
		{"trace-named-port-udp.txt", []string{"policy", "trace", "-f", e2e, "-f", policies, "--from", "10.0.2.3", "--to", "10.0.1.1", "--port", "80/UDP"}, ExitOK},
		{"trace-audit.txt", []string{"policy", "trace", "-f", e2e, "-f", auditDir, "--from", "z/a", "--to", "y/b", "--port", "81/UDP"}, ExitOK},
		{"trace-icmp-world.json", []string{"policy", "trace", "-f", e2e, "-f", auditDir, "--from", "192.0.2.1", "--to", "y/a", "--port", "8/ICMP", "-o", "json"}, ExitOK},
		{"trace-icmp-world.txt", []string{"policy", "trace", "-f", e2e, "-f", auditDir, "--from", "192.0.2.1", "--to", "y/a", "--port", "8/ICMP"}, ExitOK},
		{"trace-audit.yaml", []string{"policy", "trace", "-f", e2e, "-f", auditDir, "--from", "z/a", "--to", "y/b", "--port", "81/UDP", "-o", "yaml"}, ExitOK},
		{"matrix.txt", []string{"policy", "matrix", "-f", e2e, "-f", policies, "--port", "80/TCP", "--port", "81/UDP"}, ExitOK},
		{"matrix.json", []string{"policy", "matrix", "-f", e2e, "-f", policies, "--port", "80/TCP,81/UDP", "-o", "json"}, ExitOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, stderr, code := run(t, "", tc.args...)
			if code != tc.wantCode {
				t.Errorf("exit code = %d; want %d\nstderr: %s", code, tc.wantCode, stderr)
			}
			golden(t, tc.name, out)
		})
	}
}

// TestMatrixByHand checks the matrix of two policies against expectations
// worked out by hand from the NetworkPolicy rules, independently of the
// golden file: x denies all ingress, and x/a accepts 80/TCP (the named port
// serve-80-tcp) from namespace y.
func TestMatrixByHand(t *testing.T) {
	out, stderr, code := run(t, "", "policy", "matrix", "-f", e2e, "-f", policies, "--port", "80/TCP", "--port", "81/UDP", "-o", "json")
	if code != ExitOK {
		t.Fatalf("exit code = %d; stderr: %s", code, stderr)
	}
	var m struct {
		Ports []string `json:"ports"`
		Pods  []string `json:"pods"`
		Cells []struct {
			From, To, Port           string
			Allowed, Egress, Ingress bool
		} `json:"cells"`
	}
	if !strings.HasPrefix(out, `{"ports":["80/TCP","81/UDP"],"pods":["x/a",`) || strings.Count(out, "\n") != 1 {
		t.Errorf("matrix JSON is not one line in the contract's form: %.80s…", out)
	}
	dec := json.NewDecoder(strings.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("matrix JSON does not have the contracted shape: %v\n%s", err, out)
	}
	pods := []string{"x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"}
	if strings.Join(m.Ports, ",") != "80/TCP,81/UDP" || strings.Join(m.Pods, ",") != strings.Join(pods, ",") {
		t.Fatalf("ports = %v, pods = %v", m.Ports, m.Pods)
	}
	want := func(from, to, port string) bool {
		switch {
		case !strings.HasPrefix(to, "x/"):
			return true
		case to == "x/a" && port == "80/TCP":
			return strings.HasPrefix(from, "y/")
		}
		return false
	}
	i := 0
	for _, port := range m.Ports {
		for _, from := range pods {
			for _, to := range pods {
				if from == to {
					continue
				}
				if i >= len(m.Cells) {
					t.Fatalf("only %d cells", len(m.Cells))
				}
				c := m.Cells[i]
				i++
				if c.From != from || c.To != to || c.Port != port {
					t.Fatalf("cell %d is %s→%s %s; want %s→%s %s (order: port, from, to)", i-1, c.From, c.To, c.Port, from, to, port)
				}
				if w := want(from, to, port); c.Allowed != w || c.Ingress != w || !c.Egress {
					t.Errorf("%s→%s %s: allowed=%v egress=%v ingress=%v; want allowed=ingress=%v, egress=true", from, to, port, c.Allowed, c.Egress, c.Ingress, w)
				}
			}
		}
	}
	if i != len(m.Cells) {
		t.Errorf("%d cells; want %d", len(m.Cells), i)
	}
}

func TestExitCodes(t *testing.T) {
	for _, tc := range []struct {
		name       string
		args       []string
		wantCode   int
		wantStderr string
	}{
		{"no args", nil, ExitOK, ""},
		{"unknown command", []string{"polcy"}, ExitUsage, "unknown command"},
		{"unknown flag", []string{"policy", "validate", "--nope"}, ExitUsage, "unknown flag"},
		{"no manifests", []string{"policy", "validate"}, ExitUsage, "no manifests"},
		{"missing file", []string{"policy", "validate", "-f", "../testdata/nope.yaml"}, ExitUsage, "nope.yaml"},
		{"bad output", []string{"policy", "validate", "-f", e2e, "-o", "xml"}, ExitUsage, "invalid output format"},
		{"trace without -f asks the agent", []string{"policy", "trace", "--socket", "../testdata/no-agent.sock", "--from", "x/a", "--to", "x/b", "--port", "80"}, ExitUnreachable, "cannot reach veil-agent at ../testdata/no-agent.sock"},
		{"trace missing --to", []string{"policy", "trace", "-f", e2e, "--from", "x/a", "--port", "80"}, ExitUsage, `"to" not set`},
		{"trace bad peer", []string{"policy", "trace", "-f", e2e, "--from", "a", "--to", "x/b", "--port", "80"}, ExitUsage, "--from"},
		{"trace bad port", []string{"policy", "trace", "-f", e2e, "--from", "x/a", "--to", "x/b", "--port", "80/GRE"}, ExitUsage, "--port"},
		{"trace port 0", []string{"policy", "trace", "-f", e2e, "--from", "x/a", "--to", "x/b", "--port", "0"}, ExitUsage, "1..65535"},
		{"trace unknown pod", []string{"policy", "trace", "-f", e2e, "--from", "x/q", "--to", "x/b", "--port", "80"}, ExitUsage, "x/q"},
		{"trace invalid input", []string{"policy", "trace", "-f", invalid, "--from", "x/a", "--to", "x/b", "--port", "80"}, ExitUsage, "policy validate"},
		{"matrix invalid input", []string{"policy", "matrix", "-f", invalid, "--port", "80"}, ExitUsage, "unknown field"},
		{"matrix without port", []string{"policy", "matrix", "-f", e2e}, ExitUsage, `"port" not set`},
		{"version", []string{"version"}, ExitOK, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, stderr, code := run(t, "", tc.args...)
			if code != tc.wantCode {
				t.Errorf("exit code = %d; want %d\nstderr: %s", code, tc.wantCode, stderr)
			}
			if !strings.Contains(stderr, tc.wantStderr) {
				t.Errorf("stderr = %q; want it to contain %q", stderr, tc.wantStderr)
			}
		})
	}
}

func TestValidateStdin(t *testing.T) {
	data, err := os.ReadFile("../testdata/policies/deny-all-x.yaml")
	if err != nil {
		t.Fatal(err)
	}
	out, stderr, code := run(t, string(data), "policy", "validate", "-f", "-", "-o", "json")
	if code != ExitOK {
		t.Fatalf("exit code = %d; stderr: %s", code, stderr)
	}
	// Only warnings: namespace x is not in the input and selects no pod.
	var r validateReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatal(err)
	}
	if r.Errors != 0 || r.Warnings != 2 || r.Problems[0].File != "<stdin>" {
		t.Errorf("report = %+v; want 0 errors and 2 warnings about <stdin>", r)
	}
}

func TestVersion(t *testing.T) {
	out, _, code := run(t, "", "version", "-o", "json")
	var v versionInfo
	if code != ExitOK || json.Unmarshal([]byte(out), &v) != nil || v.Version == "" || v.GoVersion == "" {
		t.Errorf("version -o json = %q (exit %d)", out, code)
	}
}

func TestHelpDocumentsExitCodes(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"policy", "validate", "--help"}, {"policy", "trace", "--help"}, {"policy", "matrix", "--help"}} {
		out, _, code := run(t, "", args...)
		if code != ExitOK || !strings.Contains(out, "Exit codes:") {
			t.Errorf("meshctl %s: exit %d, output lacks the exit codes:\n%s", strings.Join(args, " "), code, out)
		}
	}
	out, _, _ := run(t, "", "policy", "trace", "--help")
	if !strings.Contains(out, "8/ICMP") || !strings.Contains(out, "--exit-code") {
		t.Errorf("trace --help does not explain ICMP ports and --exit-code:\n%s", out)
	}
}

var ansi = regexp.MustCompile("\x1b\\[[0-9]+m")

// TestColourKeepsAlignment renders the tables with colour on and checks
// that, once the colour codes are removed, they are exactly the plain
// tables: colour must not shift columns.
func TestColourKeepsAlignment(t *testing.T) {
	set, _, problems, err := (&manifestFlags{paths: []string{invalid}}).load(nil)
	if err != nil {
		t.Fatal(err)
	}
	files := manifestFlags{paths: []string{e2e, policies}}
	src, err := files.openSource(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	m, err := src.Matrix(t.Context(), []policy.PortProto{{Proto: policytypes.ProtoTCP, Port: 80}})
	if err != nil {
		t.Fatal(err)
	}
	tr, err := src.Trace(t.Context(), policy.PodPeer("x", "b"), policy.PodPeer("x", "a"), policy.PortProto{Proto: policytypes.ProtoTCP, Port: 80})
	if err != nil {
		t.Fatal(err)
	}
	for name, render := range map[string]func(io.Writer, output.Palette) error{
		"validate": func(w io.Writer, p output.Palette) error { return writeProblemsTable(w, p, set, problems) },
		"matrix":   func(w io.Writer, p output.Palette) error { return writeMatrix(w, p, newMatrixReport(m)) },
		"trace":    func(w io.Writer, p output.Palette) error { return writeTrace(w, p, newTraceReport(tr)) },
	} {
		var plain, coloured bytes.Buffer
		if err := render(&plain, output.Palette{}); err != nil {
			t.Fatal(err)
		}
		if err := render(&coloured, output.Palette{On: true}); err != nil {
			t.Fatal(err)
		}
		if !ansi.Match(coloured.Bytes()) {
			t.Errorf("%s: no colour with the output.Palette on", name)
		}
		if got := ansi.ReplaceAllString(coloured.String(), ""); got != plain.String() {
			t.Errorf("%s: coloured output differs from plain once uncoloured:\n%s\n---\n%s", name, got, plain.String())
		}
	}
}
