package bridge

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// echoSocket serves a unix socket that echoes each connection until the
// test ends.
func echoSocket(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	return path
}

func TestServeCarriesBytesBothWaysAfterHello(t *testing.T) {
	socket := echoSocket(t)
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- Serve(context.Background(), socket, inR, outW); outW.Close() }()

	if err := ReadHello(outR); err != nil {
		t.Fatalf("ReadHello: %v", err)
	}
	msg := []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	go inW.Write(msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(outR, got); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Errorf("echo = %q; want %q", got, msg)
	}
	// The caller closing stdin ends the bridge without an error.
	inW.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve after stdin closed = %v; want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not end after stdin closed")
	}
}

func TestServeWithoutAgentSaysWhyAndNoHello(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "agent.sock")
	var out bytes.Buffer
	err := Serve(context.Background(), socket, strings.NewReader(""), &out)
	if err == nil || !strings.Contains(err.Error(), socket) {
		t.Errorf("Serve without a socket = %v; want an error naming %s", err, socket)
	}
	if out.Len() != 0 {
		t.Errorf("Serve without a socket wrote %q to stdout; want nothing (no hello)", out.String())
	}
}

func TestReadHello(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		ok       bool
	}{
		{"hello", Hello, true},
		{"hello then data", Hello + "more", true},
		{"empty", "", false},
		{"short", Hello[:5], false},
		{"other", strings.Repeat("x", len(Hello)), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := strings.NewReader(tc.in)
			err := ReadHello(r)
			if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrNoHello)) {
				t.Fatalf("ReadHello(%q) = %v; want ok %v (else ErrNoHello)", tc.in, err, tc.ok)
			}
			if tc.ok {
				rest, _ := io.ReadAll(r)
				if want := strings.TrimPrefix(tc.in, Hello); string(rest) != want {
					t.Errorf("after ReadHello the stream holds %q; want %q", rest, want)
				}
			}
		})
	}
}
