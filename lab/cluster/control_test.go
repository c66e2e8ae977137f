package cluster

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// serveFake serves h on a socket in a fresh dir until the test ends, and
// returns the socket's path.
func serveFake(t *testing.T, h ControlHandler) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), ControlSocket)
	l, err := ListenControl(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeControl(ctx, l, h, slog.New(slog.DiscardHandler)) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ServeControl: %v", err)
		}
		if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("socket %s left behind after ServeControl: %v", path, err)
		}
	})
	return path
}

var node3 = LabNodeState{Name: "node-3", IP: "10.250.0.13", PodCIDR: "10.244.2.0/24", Netns: "veillab-node-3"}

func TestControlAddNode(t *testing.T) {
	var deadline atomic.Int64
	path := serveFake(t, ControlHandler{AddNode: func(ctx context.Context) (LabNodeState, error) {
		d, _ := ctx.Deadline()
		deadline.Store(int64(time.Until(d)))
		return node3, nil
	}})
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || fi.Mode().Type() != fs.ModeSocket {
		t.Errorf("socket mode %v; want a socket, 0600", fi.Mode())
	}
	got, err := RequestAddNode(context.Background(), path, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got.Node != node3 {
		t.Errorf("added %+v; want %+v", got.Node, node3)
	}
	if d := time.Duration(deadline.Load()); d <= DefaultAddNodeTimeout-time.Minute || d > DefaultAddNodeTimeout {
		t.Errorf("AddNode's deadline in %s; want the default %s", d, DefaultAddNodeTimeout)
	}
	// A request's timeout bounds the work, capped.
	if _, err := RequestAddNode(context.Background(), path, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if d := time.Duration(deadline.Load()); d <= 0 || d > 5*time.Second {
		t.Errorf("AddNode's deadline in %s; want within the request's 5s", d)
	}
	if _, err := RequestAddNode(context.Background(), path, time.Hour); err != nil {
		t.Fatal(err)
	}
	if d := time.Duration(deadline.Load()); d > MaxAddNodeTimeout {
		t.Errorf("AddNode's deadline in %s; want at most %s", d, MaxAddNodeTimeout)
	}
}

func TestControlErrorAnswer(t *testing.T) {
	path := serveFake(t, ControlHandler{AddNode: func(context.Context) (LabNodeState, error) {
		return LabNodeState{}, errors.New("add node node-3: start kubelet: exit status 1")
	}})
	_, err := RequestAddNode(context.Background(), path, 0)
	if err == nil || !strings.Contains(err.Error(), "the lab supervisor: add node node-3: start kubelet: exit status 1") {
		t.Errorf("error answer: %v; want the supervisor's error", err)
	}
	// The supervisor still answers after a failed request.
	if _, err := RequestAddNode(context.Background(), path, 0); err == nil {
		t.Error("second request: no error")
	}
}

func TestControlBadRequest(t *testing.T) {
	var calls atomic.Int32
	path := serveFake(t, ControlHandler{AddNode: func(context.Context) (LabNodeState, error) {
		calls.Add(1)
		return node3, nil
	}})
	for _, tc := range []struct {
		line, want string
	}{
		{"not json\n", "bad request"},
		{`{"op":"remove-node"}` + "\n", `unknown op \"remove-node`},
		{`{"op":"add-node","timeoutNs":-1}` + "\n", "bad request: timeout"},
		{strings.Repeat("x", maxControlLine+10) + "\n", "longer than"},
	} {
		conn, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := conn.Write([]byte(tc.line)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4096)
		n, _ := conn.Read(buf)
		conn.Close()
		if !strings.Contains(string(buf[:n]), tc.want) {
			t.Errorf("request %.40q: answer %q; want %q", tc.line, buf[:n], tc.want)
		}
	}
	// Control returns an error answer as the answer.
	resp, err := Control(context.Background(), path, ControlRequest{Op: "nothing"})
	if err != nil || !strings.Contains(resp.Error, "unknown op") {
		t.Errorf("Control with an unknown op: %+v, %v", resp, err)
	}
	if calls.Load() != 0 {
		t.Errorf("bad requests called AddNode %d times", calls.Load())
	}
}

func TestControlNoSupervisor(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, ControlSocket)
	_, err := RequestAddNode(context.Background(), path, 0)
	if !errors.Is(err, ErrNoSupervisor) || !strings.Contains(err.Error(), path) {
		t.Errorf("no socket: %v; want ErrNoSupervisor naming %s", err, path)
	}
	// A socket nobody listens on (a crashed supervisor's).
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	if _, err := RequestAddNode(context.Background(), path, 0); !errors.Is(err, ErrNoSupervisor) {
		t.Errorf("stale socket: %v; want ErrNoSupervisor", err)
	}
	// A new supervisor takes the stale socket over.
	l2, err := ListenControl(path)
	if err != nil {
		t.Fatalf("listen over a stale socket: %v", err)
	}
	defer l2.Close()
	// … but not a live one, nor a file that is not a socket.
	if _, err := ListenControl(path); err == nil || !strings.Contains(err.Error(), "another supervisor") {
		t.Errorf("listen over a live socket: %v; want refused", err)
	}
	other := filepath.Join(dir, "file")
	if err := os.WriteFile(other, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ListenControl(other); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("listen over a file: %v; want refused", err)
	}
}

func TestControlClientGivesUp(t *testing.T) {
	release := make(chan struct{})
	path := serveFake(t, ControlHandler{AddNode: func(ctx context.Context) (LabNodeState, error) {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return node3, nil
	}})
	defer close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := RequestAddNode(ctx, path, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("client deadline: %v; want DeadlineExceeded", err)
	}
}

func TestControlStopEndsRequest(t *testing.T) {
	path := filepath.Join(t.TempDir(), ControlSocket)
	l, err := ListenControl(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	started := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- ServeControl(ctx, l, ControlHandler{AddNode: func(ctx context.Context) (LabNodeState, error) {
			close(started)
			<-ctx.Done()
			return LabNodeState{}, ctx.Err()
		}}, slog.New(slog.DiscardHandler))
	}()
	answered := make(chan error, 1)
	go func() {
		_, err := RequestAddNode(context.Background(), path, 0)
		answered <- err
	}()
	<-started
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ServeControl: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeControl still runs 10s after its context ended, during a request")
	}
	if err := <-answered; err == nil {
		t.Error("request cut off by the supervisor's stop: no error")
	}
}
