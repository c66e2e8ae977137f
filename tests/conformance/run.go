package conformance

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"
)

// Run is one e2e.test invocation.
type Run struct {
	// E2ETest and Kubectl are controlplane.BuildE2E's.
	E2ETest, Kubectl string
	// Netns is the network namespace the tests run in (the lab's hub), so
	// that they reach nodes and pods as a test machine beside a cluster
	// does; empty runs them in the caller's.
	Netns string
	// Kubeconfig reaches the API server from Netns.
	Kubeconfig string
	// Focus and Skip are ginkgo regexps over the specs' full texts.
	Focus, Skip string
	// Nodes is the cluster's node count (--num-nodes).
	Nodes int
	// Timeout bounds the ginkgo run (--ginkgo.timeout); the process is
	// killed a minute after it, if it has not ended by itself.
	Timeout time.Duration
	// ReportDir receives ginkgo's JSON report (report.json), the JUnit
	// report (junit_01.xml) and the run's log (e2e.log).
	ReportDir string
}

// Args are e2e.test's arguments for r.
func (r Run) Args() []string {
	args := []string{
		"--kubeconfig=" + r.Kubeconfig,
		// No cloud: LoadBalancer and provider-specific tests skip
		// themselves, saying so.
		"--provider=skeleton",
		"--kubectl-path=" + r.Kubectl,
		"--num-nodes=" + strconv.Itoa(r.Nodes),
		"--report-dir=" + r.ReportDir,
		"--ginkgo.json-report=" + filepath.Join(r.ReportDir, "report.json"),
		"--ginkgo.focus=" + r.Focus,
		"--ginkgo.timeout=" + r.Timeout.String(),
		"--ginkgo.no-color",
		"--ginkgo.v",
		// Cluster logs are the lab's (Dir/logs), not a cloud's.
		"--dump-logs-on-failure=false",
	}
	if r.Skip != "" {
		args = append(args, "--ginkgo.skip="+r.Skip)
	}
	return args
}

// Execute runs e2e.test and returns the specs that ran. A run whose specs
// failed is no error: the specs say so; an error means there are no
// results (the binary could not start, or wrote no report).
func (r Run) Execute(ctx context.Context) (specs []Spec, planned int, err error) {
	if err := os.MkdirAll(r.ReportDir, 0o755); err != nil {
		return nil, 0, fmt.Errorf("create report dir: %w", err)
	}
	logf, err := os.Create(filepath.Join(r.ReportDir, "e2e.log"))
	if err != nil {
		return nil, 0, fmt.Errorf("create e2e log: %w", err)
	}
	defer logf.Close()
	ctx, cancel := context.WithTimeout(ctx, r.Timeout+time.Minute)
	defer cancel()
	argv := append([]string{r.E2ETest}, r.Args()...)
	if r.Netns != "" {
		argv = append([]string{"nsenter", "--net=" + r.Netns, "--"}, argv...)
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Dir = r.ReportDir
	cmd.Env = append(os.Environ(), "KUBECONFIG="+r.Kubeconfig)
	cmd.Stdout, cmd.Stderr = logf, logf
	// ginkgo's interrupt handling writes the report of what ran so far.
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 30 * time.Second
	runErr := cmd.Run()
	specs, planned, err = ReadReport(filepath.Join(r.ReportDir, "report.json"))
	if err != nil {
		var exit *exec.ExitError
		if runErr != nil && !errors.As(runErr, &exit) {
			return nil, 0, fmt.Errorf("run e2e.test: %w", runErr)
		}
		return nil, 0, fmt.Errorf("e2e.test (%v) wrote no report: %w; its log: %s", runErr, err, tailFile(logf.Name(), 2000))
	}
	return specs, planned, nil
}

func tailFile(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > n {
		f.Seek(st.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}
