package cli

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/meshctl/output"
)

func TestStatusGolden(t *testing.T) {
	for _, tc := range []struct {
		name     string
		status   *agentv1.StatusResponse
		args     []string
		wantCode int
	}{
		{"live-status-healthy.txt", healthyStatus(), nil, ExitOK},
		{"live-status-degraded.txt", degradedStatus(), nil, ExitFailure},
		{"live-status-degraded.json", degradedStatus(), []string{"-o", "json"}, ExitFailure},
		{"live-status-healthy.yaml", healthyStatus(), []string{"-o", "yaml"}, ExitOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fa := newFakeAgent(t)
			fa.status = tc.status
			out, stderr, code := runAgainst(t, serve(t, fa), append([]string{"status"}, tc.args...)...)
			if code != tc.wantCode {
				t.Errorf("exit code = %d; want %d\nstderr: %s", code, tc.wantCode, stderr)
			}
			if stderr != "" {
				t.Errorf("stderr = %q; want nothing (the output says what is degraded)", stderr)
			}
			golden(t, tc.name, out)
		})
	}
}

// TestStatusDegradedWithoutFlag: an agent listing degraded components is
// unhealthy even if its healthy flag says otherwise.
func TestStatusDegradedWithoutFlag(t *testing.T) {
	fa := newFakeAgent(t)
	fa.status = degradedStatus()
	fa.status.Healthy = true
	out, _, code := runAgainst(t, serve(t, fa), "status", "-o", "json")
	var r statusReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatal(err)
	}
	if code != ExitFailure || r.Healthy || len(r.Degraded) != 2 {
		t.Errorf("exit %d, healthy %v, %d degraded; want 1, false, 2", code, r.Healthy, len(r.Degraded))
	}
}

func TestStatusColourKeepsAlignment(t *testing.T) {
	r := newStatusReport(degradedStatus(), agentclient.Target{Socket: "/run/veil/agent.sock"})
	var plain, coloured bytes.Buffer
	if err := writeStatus(&plain, output.Palette{}, r, testNow); err != nil {
		t.Fatal(err)
	}
	if err := writeStatus(&coloured, output.Palette{On: true}, r, testNow); err != nil {
		t.Fatal(err)
	}
	if !ansi.Match(coloured.Bytes()) {
		t.Error("no colour with the output.Palette on")
	}
	if got := ansi.ReplaceAllString(coloured.String(), ""); got != plain.String() {
		t.Errorf("coloured output differs from plain once uncoloured:\n%s\n---\n%s", got, plain.String())
	}
}

func TestBytesString(t *testing.T) {
	for n, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 3 << 20: "3.0 MiB", 5 << 40: "5.0 TiB"} {
		if got := bytesString(n); got != want {
			t.Errorf("bytesString(%d) = %q; want %q", n, got, want)
		}
	}
	if got := since(testNow, testNow.Add(time.Minute)); got != "0s" {
		t.Errorf("since a future time = %q; want 0s", got)
	}
}
