package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/output"
)

var (
	xaLabels = []string{"meta:namespace=x", "meta:serviceaccount=default", "ns:ns=x", "pod:pod=a"}
	xbLabels = []string{"meta:namespace=x", "meta:serviceaccount=default", "ns:ns=x", "pod:pod=b"}
	ybLabels = []string{"meta:namespace=y", "meta:serviceaccount=default", "ns:ns=y", "pod:pod=b"}
	zaLabels = []string{"meta:namespace=z", "meta:serviceaccount=default", "ns:ns=z", "pod:pod=a"}
)

// at is a flow time relative to the test clock.
func at(d time.Duration) int64 { return testNow.Add(d).UnixNano() }

func storedFlows() []*agentv1.Flow {
	return []*agentv1.Flow{
		{TimeUnixNano: at(-50 * time.Second), Node: "node-1", SrcIp: "10.0.2.2", DstIp: "10.0.1.1", SrcPort: 43512, DstPort: 80, Protocol: "TCP",
			Verdict: "ALLOWED", ObservationPoint: "to-pod", SrcIdentity: 260, DstIdentity: 256, SrcLabels: ybLabels, DstLabels: xaLabels,
			SrcPod: "y/b", DstPod: "x/a", Rule: "NetworkPolicy x/allow-from-y ingress[0].from[0].ports[0]", Bytes: 74},
		{TimeUnixNano: at(-40 * time.Second), Node: "node-1", SrcIp: "10.0.1.2", DstIp: "10.0.1.1", SrcPort: 40001, DstPort: 80, Protocol: "TCP",
			Verdict: "DENIED", DropReason: "policy-denied-ingress", ObservationPoint: "from-pod", SrcIdentity: 257, DstIdentity: 256,
			SrcLabels: xbLabels, DstLabels: xaLabels, SrcPod: "x/b", DstPod: "x/a", Bytes: 74},
		{TimeUnixNano: at(-30 * time.Second), Node: "node-1", SrcIp: "10.0.3.1", DstIp: "10.0.2.2", SrcPort: 5353, DstPort: 81, Protocol: "UDP",
			Verdict: "AUDIT", ObservationPoint: "from-netdev", SrcIdentity: 262, DstIdentity: 260, SrcLabels: zaLabels, DstLabels: ybLabels,
			SrcPod: "z/a", DstPod: "y/b", Rule: "MeshPolicy y/deny-from-z ingressDeny[0].from[0]", Encrypted: true, Bytes: 60},
		{TimeUnixNano: at(-20 * time.Second), Node: "node-1", SrcIp: "192.0.2.1", DstIp: "10.0.2.1", DstPort: 8 << 8, Protocol: "ICMP",
			Verdict: "ALLOWED", ObservationPoint: "from-netdev", SrcIdentity: 2, DstIdentity: 259, SrcLabels: []string{"reserved:world"},
			DstPod: "y/a", Rule: "ClusterMeshPolicy icmp-to-ya ingress[0].ports[0]", Bytes: 84},
		{TimeUnixNano: at(-10 * time.Second), Node: "node-1", SrcIp: "10.9.9.9", DstIp: "10.0.2.2", SrcPort: 1234, DstPort: 80, Protocol: "TCP",
			Verdict: "DENIED", DropReason: "spoofed-source", ObservationPoint: "from-pod", SrcIdentity: 256, DstIdentity: 260,
			SrcLabels: xaLabels, DstLabels: ybLabels, DstPod: "y/b", Bytes: 60},
		// Not IP: the datapath has no addresses to report.
		{TimeUnixNano: at(-5 * time.Second), Node: "node-1", SrcIp: "0.0.0.0", DstIp: "0.0.0.0", Protocol: "any",
			Verdict: "DENIED", DropReason: "unsupported-l3", ObservationPoint: "from-pod", Bytes: 42},
	}
}

func liveFlows() []*agentv1.Flow {
	return []*agentv1.Flow{
		{TimeUnixNano: at(time.Second), Node: "node-1", SrcIp: "10.0.1.1", DstIp: "10.0.3.1", SrcPort: 50000, DstPort: 8080, Protocol: "SCTP",
			Verdict: "ALLOWED", ObservationPoint: "from-pod", SrcIdentity: 256, DstIdentity: 262, SrcLabels: xaLabels, DstLabels: zaLabels,
			SrcPod: "x/a", DstPod: "z/a", Encrypted: true, Bytes: 100},
		{TimeUnixNano: at(2 * time.Second), Node: "node-1", SrcIp: "10.0.1.2", DstIp: "10.0.1.1", SrcPort: 40002, DstPort: 81, Protocol: "UDP",
			Verdict: "DENIED", DropReason: "policy-denied-ingress", ObservationPoint: "from-pod", SrcIdentity: 257, DstIdentity: 256,
			SrcLabels: xbLabels, DstLabels: xaLabels, SrcPod: "x/b", DstPod: "x/a", Bytes: 60},
	}
}

func flowAgent(t *testing.T) *fakeAgent {
	fa := newFakeAgent(t)
	fa.flows, fa.live = storedFlows(), liveFlows()
	return fa
}

func TestObserveGolden(t *testing.T) {
	for _, tc := range []struct {
		name     string
		args     []string
		wantLast uint32
	}{
		{"live-observe.txt", nil, 20},
		{"live-observe-last2.txt", []string{"--last", "2"}, 2},
		{"live-observe.jsonl", []string{"-o", "json"}, 20},
		{"live-observe-last1.yaml", []string{"--last", "1", "-o", "yaml"}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fa := flowAgent(t)
			out, stderr, code := runAgainst(t, serve(t, fa), append([]string{"observe"}, tc.args...)...)
			if code != ExitOK {
				t.Errorf("exit code = %d; want 0\nstderr: %s", code, stderr)
			}
			if reqs := fa.observed(); len(reqs) != 1 || reqs[0].Last != tc.wantLast || reqs[0].Follow {
				t.Errorf("requests %v; want one with last=%d and no follow", reqs, tc.wantLast)
			}
			golden(t, tc.name, out)
		})
	}
}

func TestObserveJSONLines(t *testing.T) {
	out, _, code := runAgainst(t, serve(t, flowAgent(t)), "observe", "-o", "json")
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if code != ExitOK || len(lines) != len(storedFlows()) {
		t.Fatalf("exit %d, %d lines; want %d:\n%s", code, len(lines), len(storedFlows()), out)
	}
	for i, l := range lines {
		var f flowReport
		dec := json.NewDecoder(strings.NewReader(l))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&f); err != nil {
			t.Fatalf("line %d is not one flow object: %v\n%s", i, err, l)
		}
		if want := storedFlows()[i]; f.Verdict != want.Verdict || f.Source.IP != want.SrcIp || f.Time.UnixNano() != want.TimeUnixNano {
			t.Errorf("line %d = %+v; want flow %v", i, f, want)
		}
	}
}

func TestObserveFilters(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want *agentv1.ObserveRequest
	}{
		{"none", nil, &agentv1.ObserveRequest{Last: 20}},
		{"all", []string{"--from-pod", "x/b", "--to-pod", "x/a", "-n", "x", "--label", "pod=a", "--label", "ns:ns=x",
			"--identity", "256", "--verdict", "denied", "--port", "80", "--protocol", "tcp", "--last", "5"},
			&agentv1.ObserveRequest{FromPod: "x/b", ToPod: "x/a", Namespace: "x", Labels: []string{"pod=a", "ns:ns=x"},
				Identity: 256, Verdict: "DENIED", Port: 80, Protocol: "TCP", Last: 5}},
		{"audit over sctp", []string{"--verdict", "AUDIT", "--protocol", "sctp"}, &agentv1.ObserveRequest{Verdict: "AUDIT", Protocol: "SCTP", Last: 20}},
		{"last 0 is all", []string{"--last", "0"}, &agentv1.ObserveRequest{Last: 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fa := flowAgent(t)
			_, stderr, code := runAgainst(t, serve(t, fa), append([]string{"observe"}, tc.args...)...)
			if code != ExitOK {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			reqs := fa.observed()
			if len(reqs) != 1 || !proto.Equal(reqs[0], tc.want) {
				t.Errorf("requests %v; want %v", reqs, tc.want)
			}
		})
	}
}

func TestObserveBadFlags(t *testing.T) {
	fa := flowAgent(t)
	socket := serve(t, fa)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--from-pod", "x"}, "--from-pod"},
		{[]string{"--to-pod", "10.0.0.1"}, "--to-pod"},
		{[]string{"--label", "app"}, "KEY=VALUE"},
		{[]string{"--verdict", "DROPPED"}, "ALLOWED, DENIED or AUDIT"},
		{[]string{"--protocol", "GRE"}, "--protocol"},
		{[]string{"--port", "70000"}, "--port"},
		{[]string{"--identity", "-1"}, "--identity"},
		{[]string{"--last", "-1"}, "--last"},
		{[]string{"-o", "xml"}, "invalid output format"},
	} {
		_, stderr, code := runAgainst(t, socket, append([]string{"observe"}, tc.args...)...)
		if code != ExitUsage || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: exit %d, stderr %q; want exit 2 and %q", tc.args, code, stderr, tc.want)
		}
	}
	if n := len(fa.observed()); n != 0 {
		t.Errorf("the agent was asked %d times; bad flags must stop meshctl first", n)
	}
}

// lineWriter is a concurrency-safe buffer that reports when it holds n
// lines.
type lineWriter struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	n    int
	full chan struct{}
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if w.full != nil && strings.Count(w.buf.String(), "\n") >= w.n {
		close(w.full)
		w.full = nil
	}
	return len(p), nil
}

func (w *lineWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// TestObserveFollow follows until interrupted: without --last only flows
// newer than the start are shown, with --last the stored ones first; the
// interruption ends meshctl with exit code 0.
func TestObserveFollow(t *testing.T) {
	for _, tc := range []struct {
		name     string
		args     []string
		lines    int
		wantLast uint32
	}{
		{"live-observe-follow.txt", []string{"--follow"}, 3, 0},
		{"live-observe-follow-last1.jsonl", []string{"-f", "--last", "1", "-o", "json"}, 3, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fa := flowAgent(t)
			socket := serve(t, fa)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			out := &lineWriter{n: tc.lines, full: make(chan struct{})}
			full := out.full
			var stderr bytes.Buffer
			code := make(chan int, 1)
			go func() {
				code <- mainWith(ctx, append([]string{"observe", "--socket", socket}, tc.args...), Streams{Out: out, Err: &stderr}, testEnv(nil))
			}()
			select {
			case <-full:
			case c := <-code:
				t.Fatalf("observe --follow ended by itself (exit %d): %s", c, stderr.String())
			case <-time.After(10 * time.Second):
				t.Fatalf("observe --follow printed only:\n%s", out.String())
			}
			cancel()
			select {
			case c := <-code:
				if c != ExitOK {
					t.Errorf("exit code after interruption = %d; want 0 (stderr %q)", c, stderr.String())
				}
			case <-time.After(10 * time.Second):
				t.Fatal("observe --follow did not end when interrupted")
			}
			if reqs := fa.observed(); len(reqs) != 1 || !reqs[0].Follow || reqs[0].Last != tc.wantLast {
				t.Errorf("requests %v; want one with follow and last=%d", reqs, tc.wantLast)
			}
			golden(t, tc.name, out.String())
		})
	}
}

func TestObserveColourKeepsAlignment(t *testing.T) {
	for _, follow := range []bool{false, true} {
		render := func(pal output.Palette) string {
			var b bytes.Buffer
			p := newFlowPrinter(&b, output.Table, pal, time.UTC, follow, false)
			for _, f := range append(storedFlows(), liveFlows()...) {
				if err := p.print(f); err != nil {
					t.Fatal(err)
				}
			}
			if err := p.done(); err != nil {
				t.Fatal(err)
			}
			return b.String()
		}
		plain, coloured := render(output.Palette{}), render(output.Palette{On: true})
		if !ansi.MatchString(coloured) {
			t.Error("no colour with the output.Palette on")
		}
		if got := ansi.ReplaceAllString(coloured, ""); got != plain {
			t.Errorf("follow=%v: coloured output differs from plain once uncoloured:\n%s\n---\n%s", follow, got, plain)
		}
	}
}

func TestObserveNoFlows(t *testing.T) {
	out, _, code := runAgainst(t, serve(t, newFakeAgent(t)), "observe")
	if code != ExitOK || out != "No flows matched.\n" {
		t.Errorf("exit %d, output %q", code, out)
	}
	out, _, _ = runAgainst(t, serve(t, newFakeAgent(t)), "observe", "-o", "json")
	if out != "" {
		t.Errorf("-o json with no flows printed %q; want nothing", out)
	}
}

// TestMain lets a test run meshctl as a process of its own (the test
// binary re-executed), to send it real signals.
func TestMain(m *testing.M) {
	if os.Getenv("MESHCTL_TEST_MAIN") == "1" {
		os.Exit(Main(os.Args[1:], Streams{In: os.Stdin, Out: os.Stdout, Err: os.Stderr}))
	}
	os.Exit(m.Run())
}

// TestObserveFollowCtrlC interrupts a meshctl process following flows, as
// Ctrl-C does: it ends cleanly, with exit code 0 and the flows it printed.
func TestObserveFollowCtrlC(t *testing.T) {
	socket := serve(t, flowAgent(t))
	cmd := exec.CommandContext(t.Context(), os.Args[0], "observe", "--follow", "--last", "1", "-o", "json", "--socket", socket)
	cmd.Env = append(os.Environ(), "MESHCTL_TEST_MAIN=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	var lines int
	for lines < 3 && sc.Scan() {
		lines++
	}
	if lines < 3 {
		t.Fatalf("got %d lines before the output ended; stderr: %s", lines, stderr.String())
	}
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	for sc.Scan() {
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("meshctl observe --follow after Ctrl-C: %v; want exit code 0 (stderr %q)", err, stderr.String())
	}
}
