// Package e2e runs Veil end to end on the local lab: a real API server, real
// agents, real packets between network namespaces.
package e2e

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/lab"
	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/tests/testenv"
)

func TestMain(m *testing.M) {
	netns.MaybeRunHelper()
	os.Exit(m.Run())
}

// requirePrivileged is the gate of every e2e test: privileged, and not
// under -short.
func requirePrivileged(t testing.TB) {
	t.Helper()
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("the lab builds a control plane from source: skipped with -short")
	}
}

// startLab builds the binaries and starts a lab that t tears down.
func startLab(t *testing.T, name string, nodes int) *lab.Lab {
	t.Helper()
	return startLabWith(t, name, lab.Options{Nodes: nodes})
}

func startLabWith(t *testing.T, name string, opts lab.Options) *lab.Lab {
	t.Helper()
	requirePrivileged(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	dir := t.TempDir()
	agentBin, cniBin, err := lab.Build(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	opts.Prefix = fmt.Sprintf("veile2e-%d-%s", os.Getpid(), name)
	opts.Dir, opts.AgentBin, opts.CNIBin = dir, agentBin, cniBin
	l, err := lab.Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range l.Nodes {
				t.Logf("agent log of %s:\n%s", n.Name, n.AgentLogTail(6000))
			}
		}
		if err := l.Stop(); err != nil {
			t.Errorf("stop lab: %v", err)
		}
	})
	return l
}

const probeTimeout = 700 * time.Millisecond

// eventually waits, polling every 100ms, until cond holds; a failure names
// what was awaited.
func eventually(t *testing.T, what string, within time.Duration, cond func() error) {
	t.Helper()
	testenv.Eventually(t, within, 100*time.Millisecond, func() error {
		if err := cond(); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	})
}

// stream is a checksummed TCP transfer between two pods, paced so that it
// is still running while a test disturbs the mesh.
type stream struct {
	t         *testing.T
	size      int
	src, sink *netns.Proc
}

// startStream starts sending size bytes from one pod to a port of another
// (in their node cgroups when cgroup is set, so sockets may be accelerated)
// and waits until data flows.
func startStream(t *testing.T, from, to *lab.Pod, port, size int, pace time.Duration, cgroups bool) *stream {
	t.Helper()
	addr := fmt.Sprintf("%s:%d", to.IP, port)
	var fromCG, toCG *netns.Cgroup
	if cgroups {
		fromCG, toCG = from.Node.Cgroup, to.Node.Cgroup
	}
	sink, err := netns.StartHelper(to.Netns, toCG, -1, "sink", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sink.Kill)
	if _, err := sink.WaitLine(ctxFor(t, 10*time.Second), "listening"); err != nil {
		t.Fatal(err)
	}
	src, err := netns.StartHelper(from.Netns, fromCG, -1, "source", addr, strconv.Itoa(size), pace.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(src.Kill)
	eventually(t, "stream started", 10*time.Second, func() error {
		// A fast stream may finish before its first progress report.
		if sink.LastLine("progress") == "" && sink.LastLine("done") == "" {
			return fmt.Errorf("no progress yet")
		}
		return nil
	})
	return &stream{t: t, size: size, src: src, sink: sink}
}

// finish waits for the transfer to end and checks every byte arrived.
func (s *stream) finish(what string) {
	s.t.Helper()
	srcDone, err := s.src.WaitLine(ctxFor(s.t, 2*time.Minute), "done")
	if err != nil {
		s.t.Fatal(err)
	}
	sinkDone, err := s.sink.WaitLine(ctxFor(s.t, 2*time.Minute), "done")
	if err != nil {
		s.t.Fatal(err)
	}
	if sf, kf := strings.Fields(srcDone), strings.Fields(sinkDone); kf[1] != strconv.Itoa(s.size) || kf[2] != sf[2] {
		s.t.Errorf("stream %s: source %q, sink %q", what, srcDone, sinkDone)
	}
}
