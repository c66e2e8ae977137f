package main

import (
	"bytes"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/veilmesh/veil/api/agent/bridge"
)

func TestRunBridgeUsesVeilSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		io.Copy(c, c)
		c.Close()
	}()
	env := func(k string) (string, bool) {
		if k == "VEIL_SOCKET" {
			return path, true
		}
		return "", false
	}
	var out, errOut bytes.Buffer
	code := runBridge(nil, env, strings.NewReader("ping"), &out, &errOut)
	if code != 0 || out.String() != bridge.Hello+"ping" {
		t.Errorf("api-bridge = %d, stdout %q, stderr %q; want 0 and hello then the echo", code, out.String(), errOut.String())
	}
}

func TestRunBridgeErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "agent.sock")
	noEnv := func(string) (string, bool) { return "", false }
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no agent", []string{"--socket", missing}, 1, missing},
		{"extra argument", []string{"status"}, 2, "unexpected arguments"},
		{"unknown flag", []string{"--bogus"}, 2, "unknown flag"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			code := runBridge(tc.args, noEnv, strings.NewReader(""), &out, &errOut)
			if code != tc.code || !strings.Contains(errOut.String(), tc.want) || out.Len() != 0 {
				t.Errorf("api-bridge %v = %d, stdout %q, stderr %q; want %d, nothing on stdout, stderr saying %q",
					tc.args, code, out.String(), errOut.String(), tc.code, tc.want)
			}
		})
	}
}
