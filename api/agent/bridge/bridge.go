// Package bridge carries the agent's gRPC API over a byte stream: the
// stdin and stdout of `veil-agent api-bridge`, which meshctl runs in a
// node's veil-agent pod through the API server (an exec, as kubectl exec
// does), so that reaching another node's agent needs no TCP listener on
// the node and the caller's own RBAC (create pods/exec) decides who may.
//
// The protocol is one line, then raw bytes: the bridge connects to the
// agent's unix socket and, once connected, writes Hello to its stdout;
// from then on every byte of stdin goes to the socket and every byte from
// the socket to stdout, until either side ends. A bridge that cannot
// connect writes why to stderr and exits non-zero without writing Hello,
// so the caller can tell "no agent" from "no exec".
//
//	// in the agent pod (veil-agent api-bridge):
//	err := bridge.Serve(ctx, "/var/run/veil/agent.sock", os.Stdin, os.Stdout)
//	// at the caller, on the exec's stdout:
//	err := bridge.ReadHello(stdout)
package bridge

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Hello is the line the bridge writes once it is connected to the agent's
// socket. Its version changes if the protocol ever does.
const Hello = "veil-agent-api-bridge/1 connected\n"

// Subcommand is the veil-agent argument that runs the bridge.
const Subcommand = "api-bridge"

// connectTimeout bounds connecting to the agent's socket.
const connectTimeout = 5 * time.Second

// drainTimeout bounds how long the agent's answers are still copied after
// the caller closed stdin.
const drainTimeout = 5 * time.Second

// Serve connects to the agent's API at socket and copies in to it and its
// answers to out until the agent closes the connection (after in ends, it
// is told so and has drainTimeout to finish) or ctx ends. An error means the socket could not be reached or a copy failed.
func Serve(ctx context.Context, socket string, in io.Reader, out io.Writer) error {
	dctx, cancel := context.WithTimeout(ctx, connectTimeout)
	conn, err := (&net.Dialer{}).DialContext(dctx, "unix", socket)
	cancel()
	if err != nil {
		return fmt.Errorf("connect to the agent's API socket %s: %w", socket, err)
	}
	defer conn.Close()
	if _, err := io.WriteString(out, Hello); err != nil {
		return fmt.Errorf("write hello: %w", err)
	}
	in2agent := make(chan error, 1)
	agent2out := make(chan error, 1)
	go func() {
		_, err := io.Copy(conn, in)
		in2agent <- copyErr("copy stdin to the agent", err)
	}()
	go func() {
		_, err := io.Copy(out, conn)
		agent2out <- copyErr("copy the agent's answers to stdout", err)
	}()
	select {
	case err := <-agent2out:
		// The agent closed the socket (it stopped or hung up).
		return err
	case err := <-in2agent:
		// The caller is done sending: pass the half-close on and let the
		// agent finish its answers, for a bounded time.
		if err != nil {
			return err
		}
		if uc, ok := conn.(*net.UnixConn); ok {
			uc.CloseWrite()
		}
		select {
		case err := <-agent2out:
			return err
		case <-time.After(drainTimeout):
			return nil
		case <-ctx.Done():
			return nil
		}
	case <-ctx.Done():
		return nil
	}
}

// copyErr drops the errors of a connection the other direction closed.
func copyErr(op string, err error) error {
	if err == nil || errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrClosedPipe) {
		return nil
	}
	return fmt.Errorf("%s: %w", op, err)
}

// ErrNoHello is returned by ReadHello when the stream carried something
// else, or ended, before the bridge said it was connected.
var ErrNoHello = errors.New("the api-bridge did not say it was connected")

// ReadHello reads exactly the bridge's hello line from r, and no byte
// after it.
func ReadHello(r io.Reader) error {
	buf := make([]byte, len(Hello))
	n, err := io.ReadFull(r, buf)
	if err != nil {
		if n == 0 && errors.Is(err, io.EOF) {
			return ErrNoHello
		}
		return fmt.Errorf("%w: read %q: %w", ErrNoHello, buf[:n], err)
	}
	if string(buf) != Hello {
		return fmt.Errorf("%w: got %q (is the agent image older than this meshctl?)", ErrNoHello, buf)
	}
	return nil
}
