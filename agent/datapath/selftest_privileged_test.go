package datapath

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/policy/policytypes"
)

// The self-test passes on this kernel, and leaves no cgroup behind.
func TestPrivilegedAccelerationSelfTest(t *testing.T) {
	tn := newTestNet(t, "selftest", netOpts{sockets: true})
	if on, reason := tn.dp1.Acceleration(); !on {
		t.Fatalf("acceleration off after the self-test: %s", reason)
	}
	left, _ := filepath.Glob(filepath.Join(tn.cg.Path, "veil-selftest-*"))
	if len(left) > 0 {
		t.Errorf("self-test cgroups left behind: %v", left)
	}
}

// A kernel that corrupts or stalls redirected data turns acceleration off:
// the reason is reported, no socket joins the sockhash, and pods' data
// takes the TCP path intact.
func TestPrivilegedAccelerationSelfTestFailure(t *testing.T) {
	for _, tc := range []struct {
		name, reason string
		test         selfTest
	}{
		{"lost byte", "differs", selfTest{write: func(_ context.Context, c net.Conn, p []byte) (int, error) {
			// The kernel drops the first byte of every write.
			if _, err := c.Write(p[1:]); err != nil {
				return 0, err
			}
			return len(p), nil
		}}},
		{"stall", "stalled", selfTest{timeout: 2 * time.Second, write: func(ctx context.Context, c net.Conn, p []byte) (int, error) {
			<-ctx.Done()
			return 0, ctx.Err()
		}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tn := newTestNet(t, "stfail", netOpts{sockets: true, noLoad: true})
			cfg := tn.config1(netOpts{})
			cfg.selfTest = tc.test
			start := time.Now()
			tn.dp1 = tn.load(tn.n1, cfg)
			tn.register1(tn.dp1)
			on, reason := tn.dp1.Acceleration()
			t.Logf("after %v: on %v, reason %q", time.Since(start).Round(time.Millisecond), on, reason)
			if on || !strings.Contains(reason, "self-test") || !strings.Contains(reason, tc.reason) {
				t.Fatalf("Acceleration() = %v, %q; want off, naming the self-test and %q", on, reason, tc.reason)
			}
			if _, err := os.Stat(filepath.Join(tn.root1, "links", "sockops")); !os.IsNotExist(err) {
				t.Errorf("sockops link pinned although acceleration is off: %v", err)
			}

			if err := tn.dp1.SetPolicy(ipB, []policytypes.Entry{allow(policytypes.Ingress, idA, policytypes.ProtoTCP, 0, 0, 1)}, ingressDefaultDeny); err != nil {
				t.Fatal(err)
			}
			before, _ := tn.dp1.Counters()
			const size = 16 << 20
			_, sink := checkedTransfer(t, tn, 5013, size, 0, 0)
			if _, err := sink.WaitLine(ctxT(t, time.Minute), "done"); err != nil {
				t.Fatal(err)
			}
			if got := sink.LastLine("done"); got != "done 16777216" {
				t.Errorf("sink = %q, want every byte in order", got)
			}
			after, _ := tn.dp1.Counters()
			if got := after.SocketRedirected.Bytes - before.SocketRedirected.Bytes; got != 0 {
				t.Errorf("%d bytes redirected socket to socket with acceleration off", got)
			}
		})
	}
}

// An agent in a cgroup namespace (as container runtimes start it) passes
// the self-test. Where cgroup2 is mounted with nsdelegate (systemd's
// default; not this host's), it may place processes only below its own
// cgroup, and the self-test falls back to a cgroup there (ownCgroup).
func TestPrivilegedAccelerationSelfTestInCgroupNamespace(t *testing.T) {
	tn := newTestNet(t, "stcgns", netOpts{sockets: true, noLoad: true})
	agentCg, err := netns.NewCgroup(filepath.Join(filepath.Base(tn.cg.Path), "agent"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := agentCg.Delete(); err != nil {
			t.Error(err)
		}
	})
	spec := loaderSpec{Config: tn.config1(netOpts{})}
	raw, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", `echo $$ > "$AGENT_CGROUP/cgroup.procs" && exec unshare --cgroup nsenter --net="$AGENT_NETNS" -- "$0"`, exe)
	cmd.Env = append(os.Environ(), loaderEnv+"="+string(raw), "AGENT_CGROUP="+agentCg.Path, "AGENT_NETNS="+tn.n1.Path())
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 4)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	stop := func() {
		cmd.Process.Kill()
		cmd.Wait()
	}
	var state string
	timeout := time.After(time.Minute)
wait:
	for {
		select {
		case l, ok := <-lines:
			if !ok || strings.HasPrefix(l, "acceleration ") {
				state = l
				break wait
			}
		case <-timeout:
			break wait
		}
	}
	stop()
	if state != "acceleration true " {
		t.Errorf("agent in a cgroup namespace: %q (stderr %s), want acceleration on, tested", state, stderr.String())
	}
	// The test process adopts the datapath for cleanup.
	tn.dp1 = tn.load(tn.n1, spec.Config)
}
