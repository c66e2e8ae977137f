package agentclient

import (
	"context"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
)

// TestUnreachableHints checks the advice for each way a dial fails,
// including those a test running as root cannot provoke (permissions).
func TestUnreachableHints(t *testing.T) {
	target := UnixTarget("/run/veil/agent.sock", "/run/veil/agent.sock")
	dial := func(errno error) error {
		return &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", errno)}
	}
	for _, tc := range []struct {
		err  error
		want string
	}{
		{dial(syscall.ENOENT), "is veil-agent running on this node?"},
		{dial(syscall.EACCES), "the socket is root-only (mode 0600); run meshctl as root"},
		{dial(syscall.EPERM), "the socket is root-only"},
		{dial(syscall.ECONNREFUSED), "nothing listens on the socket"},
		{context.DeadlineExceeded, "did not accept the connection in time"},
	} {
		msg := unreachable(target, tc.err).Error()
		if !strings.Contains(msg, tc.want) || !strings.Contains(msg, "/run/veil/agent.sock") || strings.Contains(msg, "dial unix") {
			t.Errorf("unreachable(%v) = %q; want it to name the socket once and say %q", tc.err, msg, tc.want)
		}
	}
}
