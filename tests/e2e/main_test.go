// Package e2e runs Veil end to end on the local lab: a real API server, real
// agents, real packets between network namespaces.
package e2e

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/veilmesh/veil/tests/lab"
	"github.com/veilmesh/veil/tests/netlab"
)

func TestMain(m *testing.M) {
	netlab.MaybeRunHelper()
	os.Exit(m.Run())
}

func requirePrivileged(t testing.TB) {
	t.Helper()
	if os.Getenv("VEIL_PRIVILEGED") != "1" {
		t.Skip("privileged test: set VEIL_PRIVILEGED=1 (root, bpffs, cgroup v2) to run")
	}
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

// eventually polls cond (bounded in count and time) until it holds.
func eventually(t *testing.T, what string, within time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	var err error
	for tries := 0; tries < 200; tries++ {
		if err = cond(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s: %v", what, within, err)
}
