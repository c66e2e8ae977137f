package netns

import (
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
	"syscall"
	"time"
)

// The reuse helpers: two connections with the same four-tuple, one after
// the other. The client opens the first, sends "first" and resets it
// (SO_LINGER 0), so the port is free at once (no TIME_WAIT); then it opens
// the second from the same port, sends "second" and half-closes. The server
// keeps the first connection's socket open, unread, while it serves the
// second: a reset socket that its process has not closed yet is still a
// socket, and nothing meant for the second connection may land in it.

// helperReuseServer accepts two connections on addr. It prints "first N"
// once the first connection has delivered N bytes of "first", then holds
// that socket open without reading it, and prints "second QUOTED" with
// what the second connection delivered before its end.
func helperReuseServer(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	fmt.Println("listening")
	first, err := ln.Accept()
	if err != nil {
		return fmt.Errorf("accept first: %w", err)
	}
	defer first.Close() // only when done with the second
	buf := make([]byte, len("first"))
	n, err := io.ReadFull(first, buf)
	if err != nil {
		return fmt.Errorf("read first: %w", err)
	}
	fmt.Printf("first %d\n", n)
	second, err := ln.Accept()
	if err != nil {
		return fmt.Errorf("accept second: %w", err)
	}
	defer second.Close()
	second.SetDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(second)
	if err != nil {
		return fmt.Errorf("read second: %w", err)
	}
	fmt.Printf("second %q\n", got)
	return nil
}

// helperReuseClient opens the two connections to addr from local port
// lport (see above), pausing settle before the reset (for the server to
// read "first") and after it (for the reset to reach the server).
func helperReuseClient(addr, lport string, settle time.Duration) error {
	port, err := strconv.Atoi(lport)
	if err != nil {
		return fmt.Errorf("local port: %w", err)
	}
	d := net.Dialer{
		LocalAddr: &net.TCPAddr{Port: port},
		Timeout:   5 * time.Second,
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
			}); err != nil {
				return err
			}
			return serr
		},
	}
	ctx := context.Background()
	c1, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("first connection: %w", err)
	}
	if _, err := c1.Write([]byte("first")); err != nil {
		return fmt.Errorf("write first: %w", err)
	}
	fmt.Printf("first %s\n", c1.LocalAddr())
	time.Sleep(settle)
	reset(c1)
	fmt.Println("reset")
	time.Sleep(settle)
	c2, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("second connection: %w", err)
	}
	defer c2.Close()
	fmt.Printf("second %s\n", c2.LocalAddr())
	if _, err := c2.Write([]byte("second")); err != nil {
		return fmt.Errorf("write second: %w", err)
	}
	if err := c2.(*net.TCPConn).CloseWrite(); err != nil {
		return fmt.Errorf("half-close second: %w", err)
	}
	c2.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, c2); err != nil {
		return fmt.Errorf("read second: %w", err)
	}
	fmt.Println("done")
	return nil
}
