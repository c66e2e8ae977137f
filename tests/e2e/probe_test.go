package e2e

import "testing"

func TestWithoutCtrLogKeepsTheCommandsOwnOutput(t *testing.T) {
	in := `time="2026-11-30T09:32:06Z" level=warning msg="DEPRECATION: The support for cgroup v1 is deprecated"` + "\n" +
		"client: dial tcp 10.244.0.5:81: i/o timeout\n" +
		"ctr: exec failed\n"
	if got, want := withoutCtrLog(in), "client: dial tcp 10.244.0.5:81: i/o timeout\nctr: exec failed\n"; got != want {
		t.Errorf("withoutCtrLog = %q; want %q", got, want)
	}
}

func TestProbeExitTellsDeniedFromBroken(t *testing.T) {
	for _, tc := range []struct {
		out        string
		code       int
		ok, denied bool
	}{
		{"ok tcp 10.244.0.5:80\n", 0, true, false},
		{"client: dial tcp 10.244.0.5:81: i/o timeout\n", 1, false, true},
		{"ctr: container \"abc\" not found\n", 1, false, false},
		{"usage: client connect …\n", 2, false, false},
	} {
		err := probeExit("a -> b", tc.out, tc.code)
		if (err == nil) != tc.ok || isDenied(err) != tc.denied {
			t.Errorf("probeExit(%q, %d) = %v; want ok=%v denied=%v", tc.out, tc.code, err, tc.ok, tc.denied)
		}
	}
}
