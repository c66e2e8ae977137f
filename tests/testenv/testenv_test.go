package testenv

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// fakeTB records what a helper does to its test; it runs on, where a real
// test would stop at Fatal or Skip.
type fakeTB struct {
	testing.TB
	name             string
	fatal, skip      string
	fataled, skipped bool
}

func (f *fakeTB) Helper()      {}
func (f *fakeTB) Name() string { return f.name }
func (f *fakeTB) Fatalf(format string, args ...any) {
	f.fataled, f.fatal = true, fmt.Sprintf(format, args...)
}
func (f *fakeTB) Skipf(format string, args ...any) {
	f.skipped, f.skip = true, fmt.Sprintf(format, args...)
}

func TestRequirePrivileged(t *testing.T) {
	for _, tc := range []struct {
		name, env  string
		fail, skip bool
	}{
		{"TestPrivilegedTunnel", "", false, true},
		{"TestPrivilegedTunnel/rotation", "", false, true},
		{"TestPrivilegedTunnel", "1", false, false},
		{"BenchmarkDatapath", "", false, true},
		{"BenchmarkPrivilegedPluginAdd", "1", false, false},
		// Misnamed: fails whether or not the machine allows it.
		{"TestTunnel", "", true, true},
		{"TestTunnel", "1", true, false},
		{"TestPrivileged", "0", false, true},
	} {
		t.Run(tc.name+"/env="+tc.env, func(t *testing.T) {
			t.Setenv(PrivilegedEnv, tc.env)
			f := &fakeTB{name: tc.name}
			RequirePrivileged(f)
			if f.fataled != tc.fail || f.skipped != tc.skip {
				t.Errorf("RequirePrivileged(%s) with %s=%q: failed %v (%q), skipped %v; want failed %v, skipped %v",
					tc.name, PrivilegedEnv, tc.env, f.fataled, f.fatal, f.skipped, tc.fail, tc.skip)
			}
			if f.fataled && !strings.Contains(f.fatal, "TestPrivileged") {
				t.Errorf("failure %q does not say how to name the test", f.fatal)
			}
		})
	}
}

func TestEventually(t *testing.T) {
	t.Run("holds after a few tries", func(t *testing.T) {
		calls := 0
		f := &fakeTB{name: t.Name()}
		Eventually(f, time.Minute, time.Millisecond, func() error {
			if calls++; calls < 3 {
				return errors.New("not yet")
			}
			return nil
		})
		if f.fataled || calls != 3 {
			t.Errorf("failed %v (%q) after %d calls; want success after 3", f.fataled, f.fatal, calls)
		}
	})
	t.Run("times out with the last error", func(t *testing.T) {
		calls := 0
		f := &fakeTB{name: t.Name()}
		start := time.Now()
		Eventually(f, 30*time.Millisecond, 5*time.Millisecond, func() error {
			calls++
			return fmt.Errorf("try %d", calls)
		})
		if !f.fataled || !strings.Contains(f.fatal, fmt.Sprintf("try %d", calls)) {
			t.Errorf("failure %q (failed %v); want one naming the last error, try %d", f.fatal, f.fataled, calls)
		}
		if d := time.Since(start); d < 30*time.Millisecond {
			t.Errorf("gave up after %s; want at least the 30ms timeout", d)
		}
	})
	t.Run("runs cond at least once", func(t *testing.T) {
		calls := 0
		f := &fakeTB{name: t.Name()}
		Eventually(f, 0, time.Millisecond, func() error { calls++; return nil })
		if f.fataled || calls != 1 {
			t.Errorf("failed %v after %d calls; want success after 1", f.fataled, calls)
		}
	})
}
