package conformance

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/tests/testenv"
)

// report is a ginkgo v2 JSON report as e2e.test writes it, cut to the
// fields read: a passed spec, a failed one, one that skipped itself, one
// the focus left out, and a failed suite setup.
const report = `[{
  "SuitePath": "/tmp",
  "PreRunStats": {"TotalSpecs": 3206, "SpecsThatWillRun": 5},
  "SpecReports": [
    {"ContainerHierarchyTexts": ["[sig-network] Services"], "LeafNodeText": "should serve a basic endpoint from pods", "LeafNodeType": "It", "State": "passed", "RunTime": 12000000000},
    {"ContainerHierarchyTexts": ["[sig-network] Services"], "LeafNodeText": "should be able to create a functioning NodePort service", "LeafNodeType": "It", "State": "failed", "RunTime": 3000000000,
     "Failure": {"Message": "service is not reachable within 2m0s timeout on endpoint 10.250.0.11:31000 over TCP protocol\nmore detail", "Location": {"FileName": "/root/go/pkg/mod/k8s.io/kubernetes@v1.37.1/test/e2e/network/service.go", "LineNumber": 1290}}},
    {"ContainerHierarchyTexts": ["[sig-network] LoadBalancers"], "LeafNodeText": "should be able to change the type", "LeafNodeType": "It", "State": "skipped",
     "Failure": {"Message": "Only supported for providers [gce gke aws] (not skeleton)", "Location": {"FileName": "test/e2e/network/loadbalancer.go", "LineNumber": 10}}},
    {"ContainerHierarchyTexts": ["[sig-storage] Volumes"], "LeafNodeText": "should store data", "LeafNodeType": "It", "State": "skipped"},
    {"LeafNodeType": "SynchronizedBeforeSuite", "State": "passed"},
    {"LeafNodeType": "ReportAfterSuite", "State": "failed", "Failure": {"Message": "could not write summary", "Location": {"FileName": "e2e_test.go", "LineNumber": 3}}}
  ]
}]`

func TestParseReport(t *testing.T) {
	specs, planned, err := ParseReport(strings.NewReader(report))
	if err != nil {
		t.Fatal(err)
	}
	if planned != 5 {
		t.Errorf("planned %d; want 5", planned)
	}
	type row struct{ name, state, msg, loc string }
	var got []row
	for _, s := range specs {
		got = append(got, row{s.Name, s.State, s.Message, s.Location})
	}
	want := []row{
		{"[sig-network] Services should serve a basic endpoint from pods", "passed", "", ""},
		{"[sig-network] Services should be able to create a functioning NodePort service", "failed",
			"service is not reachable within 2m0s timeout on endpoint 10.250.0.11:31000 over TCP protocol", "test/e2e/network/service.go:1290"},
		{"[sig-network] LoadBalancers should be able to change the type", "skipped",
			"Only supported for providers [gce gke aws] (not skeleton)", "test/e2e/network/loadbalancer.go:10"},
		{"ReportAfterSuite", "failed", "could not write summary", "e2e_test.go:3"},
	}
	if len(got) != len(want) {
		t.Fatalf("ParseReport: %d specs %v; want %d %v", len(got), got, len(want), want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("spec %d: got %+v; want %+v", i, got[i], want[i])
		}
	}
	if specs[0].RunTime != 12*time.Second {
		t.Errorf("run time %s; want 12s", specs[0].RunTime)
	}
	s := Suite{Specs: specs}
	if p, f, sk := s.Counts(); p != 1 || f != 2 || sk != 1 {
		t.Errorf("Counts() = %d passed, %d failed, %d skipped; want 1, 2, 1", p, f, sk)
	}
}

func TestParseReportRejectsGarbage(t *testing.T) {
	if _, _, err := ParseReport(strings.NewReader("<testsuites/>")); err == nil {
		t.Error("ParseReport of XML: no error")
	}
}

func TestSuitesRoundTripAndMarkdown(t *testing.T) {
	specs, planned, err := ParseReport(strings.NewReader(report))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	in := Suite{Name: "[sig-network] [Conformance]", Mode: "kube-proxy | Veil", Specs: specs, RunTime: 90 * time.Second,
		Skips: NetpolSuite.Skips, Planned: planned}
	if err := SaveSuite(dir+"/a/m", in); err != nil {
		t.Fatal(err)
	}
	if err := SaveSuite(dir+"/b/m", Suite{Name: "netpol", Mode: "m", Err: "e2e.test wrote no report"}); err != nil {
		t.Fatal(err)
	}
	suites, err := LoadSuites(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(suites) != 2 || suites[0].Name != in.Name || len(suites[0].Specs) != len(specs) || suites[1].Err == "" {
		t.Fatalf("LoadSuites: %+v", suites)
	}
	var b bytes.Buffer
	if err := WriteMarkdown(&b, suites); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	for _, want := range []string{
		`| [sig-network] [Conformance] | kube-proxy \| Veil | 1 | 2 | 1 | 1 | 1m30s |`,
		"| netpol | m | 0 | 0 | 0 | 0 | 0s |",
		"- [sig-network] Services should be able to create a functioning NodePort service (failed, test/e2e/network/service.go:1290): service is not reachable",
		"- [sig-network] LoadBalancers should be able to change the type: Only supported for providers",
		"`" + NetpolSuite.Skips[0].Pattern + "`: " + NetpolSuite.Skips[0].Reason,
		"netpol, m: the run failed: e2e.test wrote no report",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("results.md lacks %q:\n%s", want, md)
		}
	}
}

func TestAnyOf(t *testing.T) {
	re := regexp.MustCompile(AnyOf("[sig-network] Services should serve a basic endpoint from pods", "a (b) c"))
	for name, want := range map[string]bool{
		"[sig-network] Services should serve a basic endpoint from pods [Conformance]": true,
		"a (b) c": true,
		"[sig-network] Services should serve a basic endpoint from pods with a twist":         true,
		"Kubernetes e2e suite [sig-network] Services should serve a basic endpoint from pods": true,
		"s Services should serve a basic endpoint from pods":                                  false,
		"a b c": false,
	} {
		if got := re.MatchString(name); got != want {
			t.Errorf("AnyOf matches %q: %v; want %v", name, got, want)
		}
	}
}

func TestKindOf(t *testing.T) {
	for ref, want := range map[string]imageKind{
		"example.test/e2e-test-images/agnhost:2.66.1":   kindAgnhost,
		"example.test/e2e-test-images/busybox:1.37.0-2": kindBusyBox,
		"example.test/pause:3.10.2":                     kindPause,
		"example.test/e2e-test-images/nginx:1.27.0-2":   kindNone,
		// The DNS tests' glibc resolver: the same Debian (glibc) tree.
		"example.test/e2e-test-images/glibc-dns-testing:2.1.1": kindGlibcDNS,
		"localhost:5000/agnhost":                               kindAgnhost,
		"agnhost-private:1":                                    kindNone,
	} {
		if got := kindOf(ref); got != want {
			t.Errorf("kindOf(%q) = %d; want %d", ref, got, want)
		}
	}
}

func TestStandIns(t *testing.T) {
	refs := []string{
		"example.test/e2e-test-images/agnhost:2.55",
		"example.test/pause:3.10.2",
		"example.test/e2e-test-images/busybox:1.37.0-2",
		"private.example.test/authenticated/agnhost:2.6",
		"example.test/e2e-test-images/agnhost:2.66.1",
		"example.test/e2e-test-images/nginx:1.27.0-2",
	}
	got := standIns(refs)
	want := []imageKind{kindAgnhost, kindPause, kindBusyBox, kindNone, kindAgnhost, kindNone}
	if !slices.Equal(got, want) {
		t.Errorf("standIns = %v; want %v", got, want)
	}
}

// TestPrivilegedAgnhostRootfs lays out the agnhost image's tree and runs,
// chrooted into it with its own /proc, the commands the e2e framework runs in agnhost pods:
// the shell, curl, nc with -u/-v, ss and dig must all start.
func TestPrivilegedAgnhostRootfs(t *testing.T) {
	testenv.RequirePrivileged(t)
	// Any static binary stands in for agnhost: the test is about the
	// tools around it.
	source := t.TempDir()
	porter := filepath.Join(source, "test", "images", "agnhost", "porter")
	if err := os.MkdirAll(porter, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"localhost.crt", "localhost.key"} {
		if err := os.WriteFile(filepath.Join(porter, name), []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	r, err := agnhostRootfs(t.Context(), "/usr/bin/busybox", source)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := r.writeTree(dir); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		cmd, want string
	}{
		{"/bin/sh -x -c 'echo hello' 2>&1", "hello"},
		{"curl --version", "curl"},
		// The framework's UDP and TCP probes, as RunHostCmd runs them
		// (kubectl exec … /bin/sh -x -c): nc must be netcat's, with -v,
		// -t and -u, not busybox's.
		{"nc -h 2>&1; true", "OpenBSD netcat"},
		{"echo hostName | nc -v -t -w 1 127.0.0.1 1 2>&1; true", "refused"},
		{"ss -V", "iproute2"},
		{"dig -v 2>&1", "DiG"},
		// The DNS tests' glibc querier looks up /etc/hosts (kubelet's)
		// with glibc's getent.
		{"getent --version", "GLIBC"},
		{"wget --help 2>&1; true", "wget"},
		{"test -L /agnhost-2 && test -d /uploads && test -k /tmp && echo layout ok", "layout ok"},
		{"cat /localhost.crt /localhost.key", "localhost.crtlocalhost.key"},
	} {
		// With /proc, as in a container: busybox finds itself there and,
		// built to prefer its applets, would run its own nc.
		out, err := exec.Command("unshare", "--fork", "--pid", "--mount", "--mount-proc", "--root="+dir,
			"/bin/sh", "-c", c.cmd).CombinedOutput()
		if err != nil || !strings.Contains(string(out), c.want) {
			t.Errorf("in the agnhost tree, %s: %v; want output with %q, got:\n%s", c.cmd, err, c.want, out)
		}
	}
	if _, err := os.Stat(dir + "/lib64"); err != nil {
		t.Errorf("no dynamic loader in the tree: %v", err)
	}
}
