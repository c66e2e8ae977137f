// Package testenv is the environment Veil's tests share: the one gate of
// privileged tests and the one way to wait for a condition.
//
// A privileged test changes the machine (network namespaces, bpffs pins,
// cgroups, WireGuard devices) or starts a real control plane. It is named
// TestPrivileged… (a benchmark that needs root may be any Benchmark…), so
// that `go test -run TestPrivileged` selects exactly those, and calls
// RequirePrivileged first:
//
//	func TestPrivilegedTunnel(t *testing.T) {
//		testenv.RequirePrivileged(t)
//		…
//		testenv.Eventually(t, 5*time.Second, 50*time.Millisecond, func() error {
//			return probe()
//		})
//	}
//
// This is test code: shipped binaries never import it (tests/deps checks
// that), and packages outside tests/ import it from _test.go files only.
package testenv

import (
	"bytes"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// PrivilegedEnv is the environment variable that allows privileged tests:
// they run when it is "1" (as root) and are skipped otherwise.
const PrivilegedEnv = "VEIL_PRIVILEGED"

// RequirePrivileged skips tb unless VEIL_PRIVILEGED=1. It fails tb, also
// when it would be skipped, unless tb's name starts with TestPrivileged
// (or Benchmark, for benchmarks): a privileged test that -run TestPrivileged
// does not select would silently never run.
func RequirePrivileged(tb testing.TB) {
	tb.Helper()
	if name := tb.Name(); !privilegedName(name) {
		tb.Fatalf("%s calls RequirePrivileged: name it TestPrivileged… (benchmarks Benchmark…), so that -run TestPrivileged selects it", name)
	}
	if os.Getenv(PrivilegedEnv) != "1" {
		tb.Skipf("privileged test (root; changes namespaces, bpffs, cgroups or starts a control plane): set %s=1 to run", PrivilegedEnv)
	}
}

// privilegedName reports whether a test of that name (subtests included)
// may be privileged.
func privilegedName(name string) bool {
	return strings.HasPrefix(name, "TestPrivileged") || strings.HasPrefix(name, "Benchmark")
}

// Eventually calls cond every interval until it returns nil, and fails tb
// with cond's last error once timeout has passed. cond runs at least once;
// its error should say what is still missing.
func Eventually(tb testing.TB, timeout, interval time.Duration, cond func() error) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("not within %s: %v", timeout, err)
			return
		}
		time.Sleep(interval)
	}
}

// SyncBuffer is a bytes.Buffer that goroutines (a component's workers, a
// command's output) write while the test reads it.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String is what was written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
