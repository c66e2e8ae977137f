package netns

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Helper processes: the test binary re-executes itself inside a pod's
// namespace and cgroup to play a workload. A test package's TestMain calls
// MaybeRunHelper first thing.

const helperEnv = "VEIL_NETLAB_HELPER"

// MaybeRunHelper runs the requested helper mode and exits, when this process
// was started as a helper; otherwise it returns at once.
func MaybeRunHelper() {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		return
	}
	if err := runHelper(mode, os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "helper %s: %v\n", mode, err)
		os.Exit(1)
	}
	os.Exit(0)
}

func runHelper(mode string, args []string) error {
	arg := func(i int) string {
		if i < len(args) {
			return args[i]
		}
		return ""
	}
	switch mode {
	case "sink":
		return helperSink(arg(0))
	case "source":
		n, err := strconv.ParseInt(arg(1), 10, 64)
		if err != nil {
			return fmt.Errorf("byte count: %w", err)
		}
		pace, _ := time.ParseDuration(arg(2))
		return helperSource(arg(0), n, pace)
	case "checked-sink":
		pace, _ := time.ParseDuration(arg(1))
		return helperCheckedSink(arg(0), pace)
	case "soak-server":
		return helperSoakServer(arg(0))
	case "soak-client":
		d, err := time.ParseDuration(arg(1))
		if err != nil {
			return fmt.Errorf("duration: %w", err)
		}
		var n [3]int
		for i := range n {
			if n[i], err = strconv.Atoi(arg(2 + i)); err != nil {
				return fmt.Errorf("soak-client wants ADDR DURATION WORKERS LONG MAXCONNS: %w", err)
			}
		}
		return helperSoakClient(arg(0), d, n[0], n[1], n[2])
	case "reuse-server":
		return helperReuseServer(arg(0))
	case "reuse-client":
		return helperReuseClient(arg(0), arg(1), 200*time.Millisecond)
	case "rr-server":
		return helperRRServer(arg(0))
	case "discard":
		return helperDiscard(arg(0))
	case "serve":
		return helperServe(args)
	case "rr-client":
		d, err := time.ParseDuration(arg(1))
		if err != nil {
			return fmt.Errorf("duration: %w", err)
		}
		size, _ := strconv.Atoi(arg(2))
		return helperRRClient(arg(0), d, size)
	case "bulk-client":
		d, err := time.ParseDuration(arg(1))
		if err != nil {
			return fmt.Errorf("duration: %w", err)
		}
		return helperBulkClient(arg(0), d)
	}
	return fmt.Errorf("unknown helper mode %q", mode)
}

// Stream is deterministic pseudo-random data, so both ends can agree on a
// checksum without shipping the data around.
type Stream struct{ x uint64 }

func (s *Stream) Read(p []byte) (int, error) {
	i := 0
	for ; i+8 <= len(p); i += 8 {
		s.x ^= s.x << 13
		s.x ^= s.x >> 7
		s.x ^= s.x << 17
		binary.LittleEndian.PutUint64(p[i:], s.x)
	}
	return i, nil
}

// NewStream returns the stream every source sends.
func NewStream() *Stream { return &Stream{x: 0x9e3779b97f4a7c15} }

// helperSink accepts one connection and reads it to the end, printing
// "progress N" about every 100 ms and "done N SHA256" at the end.
func helperSink(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println("listening")
	c, err := ln.Accept()
	ln.Close()
	if err != nil {
		return err
	}
	defer c.Close()
	h := sha256.New()
	var total int64
	buf := make([]byte, 256<<10)
	last := time.Now()
	for {
		n, err := c.Read(buf)
		h.Write(buf[:n])
		total += int64(n)
		if time.Since(last) > 100*time.Millisecond {
			fmt.Printf("progress %d\n", total)
			last = time.Now()
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			fmt.Printf("error %d %v\n", total, err)
			return nil
		}
	}
	fmt.Printf("done %d %s\n", total, hex.EncodeToString(h.Sum(nil)))
	return nil
}

// helperSource sends n bytes of the stream, pausing pace between 64 KiB
// chunks when pace > 0, prints "sent N" about every 100 ms (N bytes were
// accepted by the kernel before the line was printed) and "done N SHA256".
func helperSource(addr string, n int64, pace time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	h := sha256.New()
	var src io.Reader = io.LimitReader(NewStream(), n)
	buf := make([]byte, 64<<10)
	var sent int64
	last := time.Now()
	for {
		k, rerr := io.ReadFull(src, buf)
		if k > 0 {
			h.Write(buf[:k])
			if _, err := c.Write(buf[:k]); err != nil {
				return fmt.Errorf("write after %d bytes: %w", sent, err)
			}
			sent += int64(k)
			if time.Since(last) > 100*time.Millisecond {
				fmt.Printf("sent %d\n", sent)
				last = time.Now()
			}
		}
		if rerr != nil {
			break
		}
		if pace > 0 {
			time.Sleep(pace)
		}
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
	fmt.Printf("done %d %s\n", sent, hex.EncodeToString(h.Sum(nil)))
	return nil
}

// helperRRServer echoes every message back, for request/response tests.
func helperRRServer(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println("listening")
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go echoLoop(c)
	}
}

// echoLoop echoes with blocking read/write system calls on the socket: no
// netpoller in the way of request/response timing, and no splice (io.Copy
// between TCP connections splices, which sockmap-redirected data does not
// reach on current kernels).
func echoLoop(c net.Conn) {
	defer c.Close()
	f, err := c.(*net.TCPConn).File()
	if err != nil {
		return
	}
	defer f.Close()
	fd := int(f.Fd())
	buf := make([]byte, 64<<10)
	for {
		n, err := syscall.Read(fd, buf)
		if n <= 0 || err != nil {
			return
		}
		if _, err := syscall.Write(fd, buf[:n]); err != nil {
			return
		}
	}
}

// helperServe echoes on every "tcp:PORT" and "udp:PORT" argument, on all
// addresses: a lab pod's test server.
func helperServe(specs []string) error {
	for _, spec := range specs {
		proto, port, ok := strings.Cut(spec, ":")
		if !ok {
			return fmt.Errorf("serve %q: want tcp:PORT or udp:PORT", spec)
		}
		switch proto {
		case "tcp":
			ln, err := net.Listen("tcp", ":"+port)
			if err != nil {
				return err
			}
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					go echoLoop(c)
				}
			}()
		case "udp":
			pc, err := net.ListenPacket("udp", ":"+port)
			if err != nil {
				return err
			}
			go func() {
				buf := make([]byte, 64<<10)
				for {
					n, addr, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					pc.WriteTo(buf[:n], addr)
				}
			}()
		default:
			return fmt.Errorf("serve %q: protocol must be tcp or udp", spec)
		}
	}
	fmt.Println("listening")
	select {}
}

// helperDiscard accepts connections and throws their data away: the sink of
// throughput benchmarks, where hashing would be the bottleneck.
func helperDiscard(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println("listening")
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			io.Copy(io.Discard, c)
		}()
	}
}

// helperRRClient does request/response round trips of size bytes for d and
// prints "rr COUNT SECONDS".
func helperRRClient(addr string, d time.Duration, size int) error {
	if size <= 0 {
		size = 1
	}
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	// Blocking system calls on the raw socket, as a C client would make.
	f, err := c.(*net.TCPConn).File()
	if err != nil {
		return err
	}
	defer f.Close()
	fd := int(f.Fd())
	buf := make([]byte, size)
	start := time.Now()
	deadline := start.Add(d)
	count := 0
	for time.Now().Before(deadline) {
		for i := 0; i < 100; i++ {
			if _, err := syscall.Write(fd, buf); err != nil {
				return fmt.Errorf("request: %w", err)
			}
			for got := 0; got < size; {
				n, err := syscall.Read(fd, buf[got:])
				if err != nil || n <= 0 {
					return fmt.Errorf("response: %v", err)
				}
				got += n
			}
		}
		count += 100
	}
	fmt.Printf("rr %d %f\n", count, time.Since(start).Seconds())
	return nil
}

// helperBulkClient sends as fast as it can for d and prints "bulk BYTES SECONDS".
func helperBulkClient(addr string, d time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 128<<10)
	NewStream().Read(buf)
	start := time.Now()
	deadline := start.Add(d)
	var total int64
	for time.Now().Before(deadline) {
		n, err := c.Write(buf)
		total += int64(n)
		if err != nil {
			return err
		}
	}
	fmt.Printf("bulk %d %f\n", total, time.Since(start).Seconds())
	return nil
}

// Proc is a running helper process.
type Proc struct {
	cmd   *exec.Cmd
	mu    sync.Mutex
	lines []string
	done  chan struct{}
	err   error
}

// StartHelper runs this test binary as helper mode inside the pod's network
// namespace, and inside cgroup when it is not nil, optionally pinned to cpu
// (-1 for any).
func StartHelper(ns *Netns, cg *Cgroup, cpu int, mode string, args ...string) (*Proc, error) {
	return StartProc(ns, cg, cpu, []string{helperEnv + "=" + mode}, args...)
}

// StartProc runs this test binary with extra environment env inside the
// namespace (and cgroup, and pinned to cpu, as for StartHelper). The test
// binary's TestMain decides what to do from the environment.
func StartProc(ns *Netns, cg *Cgroup, cpu int, env []string, args ...string) (*Proc, error) {
	mode := strings.Join(env, " ")
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find test binary: %w", err)
	}
	inner := []string{"nsenter", "--net=" + ns.Path(), "--", exe}
	inner = append(inner, args...)
	if cpu >= 0 {
		inner = append([]string{"taskset", "-c", strconv.Itoa(cpu)}, inner...)
	}
	// The shell joins the cgroup before exec'ing, so every socket of the
	// workload is created inside it.
	script := `exec "$@"`
	if cg != nil {
		script = `echo $$ > "$VEIL_CGROUP/cgroup.procs" && exec "$@"`
	}
	cmd := exec.Command("sh", append([]string{"-c", script, "sh"}, inner...)...)
	cmd.Env = append(os.Environ(), env...)
	if cg != nil {
		cmd.Env = append(cmd.Env, "VEIL_CGROUP="+cg.Path)
	}
	// No Pdeathsig: it fires when the forking OS thread exits, and Netns.Do
	// retires threads on purpose. Callers stop helpers by PID (Kill).
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start helper %s: %w", mode, err)
	}
	p := &Proc{cmd: cmd, done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
		}
		err := cmd.Wait()
		if err != nil {
			err = fmt.Errorf("helper %s: %w: %s", mode, err, stderr.String())
		}
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.done)
	}()
	return p, nil
}

// WaitLine waits until the helper printed a line starting with prefix and
// returns it.
func (p *Proc) WaitLine(ctx context.Context, prefix string) (string, error) {
	for {
		p.mu.Lock()
		for i := len(p.lines) - 1; i >= 0; i-- {
			if strings.HasPrefix(p.lines[i], prefix) {
				l := p.lines[i]
				p.mu.Unlock()
				return l, nil
			}
		}
		p.mu.Unlock()
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("wait for %q from helper: %w (lines %v, exit %v)", prefix, ctx.Err(), p.Lines(), p.exitErr())
		case <-p.done:
			p.mu.Lock()
			for i := len(p.lines) - 1; i >= 0; i-- {
				if strings.HasPrefix(p.lines[i], prefix) {
					l := p.lines[i]
					p.mu.Unlock()
					return l, nil
				}
			}
			err := p.err
			p.mu.Unlock()
			return "", fmt.Errorf("helper exited before printing %q: %v", prefix, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// LastLine returns the newest line starting with prefix, or "".
func (p *Proc) LastLine(prefix string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := len(p.lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(p.lines[i], prefix) {
			return p.lines[i]
		}
	}
	return ""
}

// Lines returns everything printed so far.
func (p *Proc) Lines() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.lines...)
}

func (p *Proc) exitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Wait waits for the helper to exit.
func (p *Proc) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.exitErr()
	case <-ctx.Done():
		return fmt.Errorf("wait for helper: %w", ctx.Err())
	}
}

// Kill stops the helper (by its PID) and waits for it.
func (p *Proc) Kill() {
	if p.cmd.Process != nil {
		p.cmd.Process.Kill()
	}
	<-p.done
}

// PID is the helper's process id.
func (p *Proc) PID() int { return p.cmd.Process.Pid }
