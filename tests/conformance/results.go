package conformance

import (
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Spec is one e2e test's outcome.
type Spec struct {
	// Name is the spec's full text: its containers' texts and its own.
	Name string
	// State is ginkgo's: passed, failed, skipped, panicked, timedout,
	// interrupted, aborted, pending.
	State string
	// Message is the first line of a failure's or a skip's message.
	Message string
	// Location is where a failure happened (file:line).
	Location string
	RunTime  time.Duration
}

// Passed, Failed and Skipped sort a Spec.
func (s Spec) Passed() bool  { return s.State == "passed" }
func (s Spec) Skipped() bool { return s.State == "skipped" || s.State == "pending" }
func (s Spec) Failed() bool  { return !s.Passed() && !s.Skipped() }

// Suite is one e2e.test run: a focus, in one mode of the lab.
type Suite struct {
	Name  string // e.g. "[sig-network] [Conformance]"
	Mode  string // e.g. "kube-proxy nftables + Veil"
	Specs []Spec
	// RunTime is the whole run's, suite setup included.
	RunTime time.Duration
	// Err is why the run did not produce results, if it did not.
	Err string
	// Skips are the specs the harness left out, with why.
	Skips []Skip
	// Planned is how many specs the focus selected; more than ran when
	// the run hit its timeout.
	Planned int
}

// Skip is a ginkgo skip pattern and its reason.
type Skip struct{ Pattern, Reason string }

// SkipRegexp joins the skips' patterns for --ginkgo.skip.
func SkipRegexp(skips []Skip) string {
	var ps []string
	for _, s := range skips {
		ps = append(ps, s.Pattern)
	}
	return strings.Join(ps, "|")
}

// SaveSuite writes s into dir as suite.json, where LoadSuites finds it.
func SaveSuite(dir string, s Suite) error {
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encode suite results: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("save suite results: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "suite.json"), data, 0o644); err != nil {
		return fmt.Errorf("save suite results: %w", err)
	}
	return nil
}

// LoadSuites reads every suite.json below root, in path order: the results
// of every suite and mode run so far, each run in its own dir.
func LoadSuites(root string) ([]Suite, error) {
	var suites []Suite
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "suite.json" {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		var s Suite
		if err := json.Unmarshal(data, &s); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		suites = append(suites, s)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("load suite results: %w", err)
	}
	return suites, nil
}

// Counts returns how many specs passed, failed and were skipped.
func (s Suite) Counts() (passed, failed, skipped int) {
	for _, sp := range s.Specs {
		switch {
		case sp.Passed():
			passed++
		case sp.Skipped():
			skipped++
		default:
			failed++
		}
	}
	return passed, failed, skipped
}

// ginkgoReport is the part of ginkgo v2's JSON report (--ginkgo.json-report)
// that the results need.
type ginkgoReport struct {
	PreRunStats struct{ SpecsThatWillRun int }
	SpecReports []struct {
		ContainerHierarchyTexts []string
		LeafNodeText            string
		LeafNodeType            string
		State                   string
		RunTime                 time.Duration
		Failure                 *struct {
			Message  string
			Location struct {
				FileName   string
				LineNumber int
			}
		}
	}
}

// ParseReport reads ginkgo's JSON report of one run, and how many specs
// the run's focus selected. Specs the focus left out, or that a timeout
// kept from running, are not in the result: ginkgo reports them as skipped
// with no message, whereas a spec that ran and skipped itself (e2eskipper)
// says why.
func ParseReport(r io.Reader) (specs []Spec, planned int, err error) {
	var reports []ginkgoReport
	if err := json.NewDecoder(r).Decode(&reports); err != nil {
		return nil, 0, fmt.Errorf("decode ginkgo report: %w", err)
	}
	for _, rep := range reports {
		planned += rep.PreRunStats.SpecsThatWillRun
		for _, sr := range rep.SpecReports {
			if sr.LeafNodeType != "It" {
				// Suite setup and teardown: their failure fails the
				// specs that depend on them, which are reported.
				if sr.State == "passed" || sr.Failure == nil {
					continue
				}
			}
			s := Spec{
				Name:    strings.TrimSpace(strings.Join(append(slices.Clone(sr.ContainerHierarchyTexts), sr.LeafNodeText), " ")),
				State:   sr.State,
				RunTime: sr.RunTime,
			}
			if s.Name == "" {
				s.Name = sr.LeafNodeType
			}
			if sr.Failure != nil {
				s.Message = firstLine(sr.Failure.Message)
				if sr.Failure.Location.FileName != "" {
					s.Location = fmt.Sprintf("%s:%d", trimModPath(sr.Failure.Location.FileName), sr.Failure.Location.LineNumber)
				}
			}
			if s.State == "skipped" && s.Message == "" {
				continue
			}
			specs = append(specs, s)
		}
	}
	return specs, planned, nil
}

// ReadReport is ParseReport of a file.
func ReadReport(path string) ([]Spec, int, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("read ginkgo report: %w", err)
	}
	defer f.Close()
	return ParseReport(f)
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = strings.TrimSpace(s[:i])
	}
	const max = 300
	if len(s) > max {
		s = s[:max] + "…"
	}
	return s
}

// trimModPath shortens a path in the module cache to the path in its
// module (k8s.io/kubernetes@v1.37.1/test/e2e/… → test/e2e/…).
func trimModPath(p string) string {
	if i := strings.Index(p, "@"); i >= 0 {
		if j := strings.IndexByte(p[i:], '/'); j >= 0 {
			return p[i+j+1:]
		}
	}
	return p
}

// WriteMarkdown writes the results table: one row per suite and mode, then
// each failure with its first error line, then the skips with their
// reasons.
func WriteMarkdown(w io.Writer, suites []Suite) error {
	var b strings.Builder
	b.WriteString("| suite | mode | passed | failed | skipped | not reached | run time |\n|---|---|---:|---:|---:|---:|---:|\n")
	for _, s := range suites {
		p, f, sk := s.Counts()
		fmt.Fprintf(&b, "| %s | %s | %d | %d | %d | %d | %s |\n", mdEscape(s.Name), mdEscape(s.Mode), p, f, sk,
			max(0, s.Planned-len(s.Specs)), s.RunTime.Round(time.Second))
	}
	for _, s := range suites {
		if s.Err != "" {
			fmt.Fprintf(&b, "\n%s, %s: the run failed: %s\n", s.Name, s.Mode, mdEscape(s.Err))
		}
		if len(s.Skips) > 0 {
			fmt.Fprintf(&b, "\n### Left out: %s, %s\n\n", s.Name, s.Mode)
			for _, sk := range s.Skips {
				fmt.Fprintf(&b, "- `%s`: %s\n", sk.Pattern, mdEscape(sk.Reason))
			}
		}
		var failed, skipped []Spec
		for _, sp := range s.Specs {
			switch {
			case sp.Failed():
				failed = append(failed, sp)
			case sp.Skipped():
				skipped = append(skipped, sp)
			}
		}
		if len(failed) > 0 {
			fmt.Fprintf(&b, "\n### Failed: %s, %s\n\n", s.Name, s.Mode)
			for _, sp := range failed {
				fmt.Fprintf(&b, "- %s (%s, %s): %s\n", mdEscape(sp.Name), sp.State, sp.Location, mdEscape(sp.Message))
			}
		}
		if len(skipped) > 0 {
			fmt.Fprintf(&b, "\n### Skipped: %s, %s\n\n", s.Name, s.Mode)
			for _, sp := range skipped {
				fmt.Fprintf(&b, "- %s: %s\n", mdEscape(sp.Name), mdEscape(sp.Message))
			}
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func mdEscape(s string) string { return strings.ReplaceAll(s, "|", `\|`) }
