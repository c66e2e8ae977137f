package datapath

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// tcpPair returns both ends of a plain TCP connection on loopback.
func tcpPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// The self-test's transfer passes on a sound path and names what a kernel
// got wrong: lost bytes, reordered bytes, a stall.
func TestExchangeChecksEveryByte(t *testing.T) {
	var (
		mu   sync.Mutex
		held = map[net.Conn][]byte{}
	)
	for _, tc := range []struct {
		name  string
		write func(context.Context, net.Conn, []byte) (int, error)
		want  string
	}{
		{"sound", nil, ""},
		{"lost byte", func(_ context.Context, c net.Conn, p []byte) (int, error) {
			if len(p) > 1000 {
				if _, err := c.Write(p[:len(p)-1]); err != nil {
					return 0, err
				}
				return len(p), nil
			}
			return c.Write(p)
		}, "differs"},
		{"reordered writes", func(_ context.Context, c net.Conn, p []byte) (int, error) {
			// Hold every 1500-byte write back and send it after the next.
			mu.Lock()
			defer mu.Unlock()
			if len(p) == 1500 {
				held[c] = append([]byte(nil), p...)
				return len(p), nil
			}
			n, err := c.Write(p)
			if h := held[c]; err == nil && h != nil {
				delete(held, c)
				_, err = c.Write(h)
			}
			return n, err
		}, "differs"},
		{"stall", func(ctx context.Context, c net.Conn, p []byte) (int, error) {
			<-ctx.Done()
			return 0, ctx.Err()
		}, "stalled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := tcpPair(t)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			err := exchange(ctx, a, b, 1<<20, tc.write)
			if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Errorf("exchange = %v; want an error containing %q", err, tc.want)
			}
		})
	}
}

// ownCgroup finds this process's cgroup below a root by process lists,
// which is all an agent in a cgroup namespace can go by.
func TestOwnCgroup(t *testing.T) {
	root := t.TempDir()
	write := func(dir, procs string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(root, dir), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, dir, "cgroup.procs"), []byte(procs), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	pid := strconv.Itoa(os.Getpid())
	write(".", "")
	write("kubepods/pod1", "1\n"+pid+"1\n")
	write("kubepods/pod2/agent", "7\n"+pid+"\n")
	if got, err := ownCgroup(root); err != nil || got != filepath.Join(root, "kubepods/pod2/agent") {
		t.Errorf("ownCgroup = %q, %v; want the agent's cgroup", got, err)
	}
	if got, err := ownCgroup(filepath.Join(root, "kubepods/pod1")); err == nil {
		t.Errorf("ownCgroup outside the process's cgroup = %q; want an error", got)
	}
}
