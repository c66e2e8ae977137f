// Command client is the lab's test client, a static binary in the client
// image and beside the test server in the test-server image, so that
// `meshctl lab exec` and tests can probe from any lab pod:
//
//	client connect [-udp] [-timeout 2s] [-message M] HOST:PORT
//	    send a line (a datagram with -udp) and expect it echoed back, as the
//	    lab's test server does; HOST may be a name, resolved with the pod's
//	    resolv.conf; the line is M if given (a marker a capture looks for)
//	client resolve [-tcp] [-server IP:PORT] [-timeout 2s] NAME
//	    look NAME's addresses up over UDP (or TCP) and print one a line;
//	    the server defaults to the first nameserver of /etc/resolv.conf
//	client reach [-timeout 500ms] PROTO/HOST:PORT...
//	    connect to every target at once (PROTO tcp or udp) as connect does
//	    and print one line per target, in the order given:
//	    "PROTO/HOST:PORT ok" or "PROTO/HOST:PORT fail: why"; exit 0 whatever
//	    the targets answered
//	client sink ADDR
//	    listen on TCP ADDR, print "listening", take one connection and read
//	    it to its end, printing "progress BYTES" every 256 KiB and
//	    "done BYTES SHA256" at the end
//	client source [-pace D] ADDR BYTES
//	    send BYTES of a fixed pseudo-random stream to ADDR over TCP, pausing
//	    D after every 64 KiB; print "progress BYTES" every 256 KiB and
//	    "done BYTES SHA256" when all was sent (a sink that got every byte
//	    prints the same line)
//
// Exit codes: 0 success, 1 the probe failed (the reason on stderr), 2 usage.
package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "connect":
		err = connect(os.Args[2:])
	case "resolve":
		err = resolve(os.Args[2:])
	case "connrate":
		err = connRate(os.Args[2:])
	case "reach":
		err = reach(os.Args[2:])
	case "sink":
		err = sink(os.Args[2:])
	case "source":
		err = source(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "client:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: client connect [-udp] [-timeout D] [-message M] HOST:PORT | connrate [-duration D] HOST:PORT |\n"+
		"       resolve [-tcp] [-server IP:PORT] [-timeout D] NAME | reach [-timeout D] PROTO/HOST:PORT... | sink ADDR | source [-pace D] ADDR BYTES")
	os.Exit(2)
}

func connect(args []string) error {
	fs := flag.NewFlagSet("connect", flag.ExitOnError)
	udp := fs.Bool("udp", false, "send a UDP datagram instead of a TCP line")
	timeout := fs.Duration("timeout", 2*time.Second, "give up after this long")
	message := fs.String("message", "", "the line to send (default: a greeting naming the host)")
	fs.Parse(args)
	if fs.NArg() != 1 {
		usage()
	}
	network := "tcp"
	if *udp {
		network = "udp"
	}
	msg, err := echo(network, fs.Arg(0), *timeout, *message)
	if err != nil {
		return err
	}
	fmt.Println(msg)
	return nil
}

// echo sends a line to addr and expects it back, as the test server echoes.
// An empty want sends a greeting naming the host.
func echo(network, addr string, timeout time.Duration, want string) (string, error) {
	c, err := net.DialTimeout(network, addr, timeout)
	if err != nil {
		return "", fmt.Errorf("dial %s %s: %w", network, addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if want == "" {
		host, _ := os.Hostname()
		want = fmt.Sprintf("hello from %s at %d", host, time.Now().UnixNano())
	}
	if _, err := fmt.Fprintln(c, want); err != nil {
		return "", fmt.Errorf("send to %s %s: %w", network, addr, err)
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read the echo from %s %s (%s): %w", network, addr, c.RemoteAddr(), err)
	}
	if strings.TrimSpace(got) != want {
		return "", fmt.Errorf("echo from %s %s: %q, want %q", network, addr, got, want)
	}
	return fmt.Sprintf("ok %s %s (%s)", network, addr, c.RemoteAddr()), nil
}

func reach(args []string) error {
	fs := flag.NewFlagSet("reach", flag.ExitOnError)
	timeout := fs.Duration("timeout", 500*time.Millisecond, "give up on a target after this long")
	fs.Parse(args)
	if fs.NArg() == 0 {
		usage()
	}
	results := make([]string, fs.NArg())
	var wg sync.WaitGroup
	for i, target := range fs.Args() {
		network, addr, ok := strings.Cut(target, "/")
		if !ok || (network != "tcp" && network != "udp") {
			return fmt.Errorf("target %q: want tcp/HOST:PORT or udp/HOST:PORT", target)
		}
		wg.Go(func() {
			if _, err := echo(network, addr, *timeout, ""); err != nil {
				results[i] = target + " fail: " + err.Error()
			} else {
				results[i] = target + " ok"
			}
		})
	}
	wg.Wait()
	for _, r := range results {
		fmt.Println(r)
	}
	return nil
}

// progressEvery is how often sink and source report the bytes so far.
const progressEvery = 256 << 10

// stream is the fixed pseudo-random byte stream source sends (splitmix64),
// so that a sink's digest says whether every byte arrived in order.
type stream struct{ x uint64 }

func (s *stream) fill(p []byte) {
	for i := range p {
		if i%8 == 0 {
			s.x += 0x9e3779b97f4a7c15
		}
		z := s.x
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
		z = (z ^ (z >> 27)) * 0x94d049bb133111eb
		z ^= z >> 31
		p[i] = byte(z >> (8 * (i % 8)))
	}
}

func sink(args []string) error {
	if len(args) != 1 {
		usage()
	}
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		return fmt.Errorf("listen on %s: %w", args[0], err)
	}
	fmt.Println("listening", ln.Addr())
	c, err := ln.Accept()
	if err != nil {
		return fmt.Errorf("accept on %s: %w", args[0], err)
	}
	defer c.Close()
	h := sha256.New()
	buf := make([]byte, 64<<10)
	var n, reported int64
	for {
		k, err := c.Read(buf)
		h.Write(buf[:k])
		n += int64(k)
		if n-reported >= progressEvery {
			fmt.Println("progress", n)
			reported = n
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read from %s after %d bytes: %w", c.RemoteAddr(), n, err)
		}
	}
	fmt.Printf("done %d %x\n", n, h.Sum(nil))
	return nil
}

func source(args []string) error {
	fs := flag.NewFlagSet("source", flag.ExitOnError)
	pace := fs.Duration("pace", 0, "pause this long after every 64 KiB")
	fs.Parse(args)
	if fs.NArg() != 2 {
		usage()
	}
	size, err := strconv.ParseInt(fs.Arg(1), 10, 64)
	if err != nil || size < 0 {
		return fmt.Errorf("bytes %q: want a count", fs.Arg(1))
	}
	c, err := net.DialTimeout("tcp", fs.Arg(0), 5*time.Second)
	if err != nil {
		return fmt.Errorf("dial %s: %w", fs.Arg(0), err)
	}
	defer c.Close()
	h := sha256.New()
	var st stream
	buf := make([]byte, 64<<10)
	var n, reported int64
	for n < size {
		chunk := buf[:min(int64(len(buf)), size-n)]
		st.fill(chunk)
		if _, err := c.Write(chunk); err != nil {
			return fmt.Errorf("send to %s after %d bytes: %w", fs.Arg(0), n, err)
		}
		h.Write(chunk)
		n += int64(len(chunk))
		if n-reported >= progressEvery {
			fmt.Println("progress", n)
			reported = n
		}
		time.Sleep(*pace)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return fmt.Errorf("end the stream to %s: %w", fs.Arg(0), err)
	}
	// The sink closes once it read everything.
	c.SetReadDeadline(time.Now().Add(time.Minute))
	io.Copy(io.Discard, c)
	fmt.Printf("done %d %x\n", n, h.Sum(nil))
	return nil
}

// connRate opens and resets TCP connections to addr one after another for
// the duration and prints "ok CONNECTS SECONDS": the rate of connects
// whatever translates the address. Each connection is closed with RST (no
// TIME_WAIT), so the client's ports are not used up.
func connRate(args []string) error {
	fs := flag.NewFlagSet("connrate", flag.ExitOnError)
	d := fs.Duration("duration", 3*time.Second, "how long to connect")
	fs.Parse(args)
	if fs.NArg() != 1 {
		usage()
	}
	addr := fs.Arg(0)
	n := 0
	start := time.Now()
	for time.Since(start) < *d {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return fmt.Errorf("connect %d to %s: %w", n+1, addr, err)
		}
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		n++
	}
	fmt.Printf("ok %d %.3f\n", n, time.Since(start).Seconds())
	return nil
}

func resolve(args []string) error {
	fs := flag.NewFlagSet("resolve", flag.ExitOnError)
	tcp := fs.Bool("tcp", false, "query over TCP instead of UDP")
	server := fs.String("server", "", "DNS server IP:PORT (default: the first nameserver of /etc/resolv.conf)")
	timeout := fs.Duration("timeout", 2*time.Second, "give up after this long")
	fs.Parse(args)
	if fs.NArg() != 1 {
		usage()
	}
	if *server == "" {
		ns, err := firstNameserver("/etc/resolv.conf")
		if err != nil {
			return err
		}
		*server = net.JoinHostPort(ns, "53")
	}
	network := "udp"
	if *tcp {
		network = "tcp"
	}
	// Go's own resolver, every query sent to server over network: the
	// standard library resolves search domains and both record types.
	r := &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, *server)
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	addrs, err := r.LookupHost(ctx, fs.Arg(0))
	if err != nil {
		return fmt.Errorf("resolve %s over %s at %s: %w", fs.Arg(0), network, *server, err)
	}
	for _, a := range addrs {
		fmt.Println(a)
	}
	return nil
}

func firstNameserver(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read nameserver: %w", err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "nameserver" {
			return f[1], nil
		}
	}
	return "", errors.New("no nameserver in " + path)
}
