// Command client is the lab's test client, a static binary in the client
// image and beside the test server in the test-server image, so that
// `meshctl lab exec` and tests can probe from any lab pod:
//
//	client connect [-udp] [-timeout 2s] HOST:PORT
//	    send a line (a datagram with -udp) and expect it echoed back, as the
//	    lab's test server does; HOST may be a name, resolved with the pod's
//	    resolv.conf
//	client resolve [-tcp] [-server IP:PORT] [-timeout 2s] NAME
//	    look NAME's addresses up over UDP (or TCP) and print one a line;
//	    the server defaults to the first nameserver of /etc/resolv.conf
//
// Exit codes: 0 success, 1 the probe failed (the reason on stderr), 2 usage.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
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
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "client:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: client connect [-udp] [-timeout D] HOST:PORT | connrate [-duration D] HOST:PORT | resolve [-tcp] [-server IP:PORT] [-timeout D] NAME")
	os.Exit(2)
}

func connect(args []string) error {
	fs := flag.NewFlagSet("connect", flag.ExitOnError)
	udp := fs.Bool("udp", false, "send a UDP datagram instead of a TCP line")
	timeout := fs.Duration("timeout", 2*time.Second, "give up after this long")
	fs.Parse(args)
	if fs.NArg() != 1 {
		usage()
	}
	network := "tcp"
	if *udp {
		network = "udp"
	}
	addr := fs.Arg(0)
	c, err := net.DialTimeout(network, addr, *timeout)
	if err != nil {
		return fmt.Errorf("dial %s %s: %w", network, addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(*timeout))
	host, _ := os.Hostname()
	want := fmt.Sprintf("hello from %s at %d", host, time.Now().UnixNano())
	if _, err := fmt.Fprintln(c, want); err != nil {
		return fmt.Errorf("send to %s %s: %w", network, addr, err)
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read the echo from %s %s (%s): %w", network, addr, c.RemoteAddr(), err)
	}
	if strings.TrimSpace(got) != want {
		return fmt.Errorf("echo from %s %s: %q, want %q", network, addr, got, want)
	}
	fmt.Printf("ok %s %s (%s)\n", network, addr, c.RemoteAddr())
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
