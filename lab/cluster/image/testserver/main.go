// Command testserver is the lab's test workload, one static binary for the
// test image:
//
//	testserver serve SPEC...  echo on every SPEC: "tcp/ADDR" echoes every
//	                          line back on a TCP connection, "udp/ADDR"
//	                          every datagram back to its sender; a bare
//	                          ADDR is tcp/ADDR; "peer/ADDR" answers every
//	                          TCP connection with one line, "peer IP:PORT"
//	                          (the client's address as the server sees it),
//	                          and closes it
//	testserver probe ADDR     every 100 ms, dial ADDR, send a line, expect it
//	                          back; print "ok N t=UNIXNANO" (when the echo
//	                          came) or "fail N: why t=UNIXNANO" per attempt
//	testserver stream ADDR    connect to ADDR (retrying for up to 30 s, as a
//	                          new pod's first packets may wait for policy and
//	                          the tunnel) and, every 100 ms, send a line on
//	                          that one connection and expect it back, waiting
//	                          up to 60 s for each (TCP retransmits across a
//	                          gap in the path); print "connected LOCAL" once,
//	                          "stream ok N t=UNIXNANO" per echo, and on any
//	                          error "stream broken N: why" and exit 1
//
// A probe's log is what a test reads (through the API server) to see whether
// a pod reaches another, so each attempt is bounded by a 1 s timeout and
// printed on one line. There is no SCTP: Go's standard library has none, and
// the lab's kernels are built without it.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: testserver serve SPEC... | probe ADDR | stream ADDR")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "probe":
		probe(os.Args[2])
	case "stream":
		err = stream(os.Args[2])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "testserver:", err)
		os.Exit(1)
	}
}

// serve echoes on every spec until one of them fails.
func serve(specs []string) error {
	errs := make(chan error, len(specs))
	for _, spec := range specs {
		proto, addr, ok := strings.Cut(spec, "/")
		if !ok {
			proto, addr = "tcp", spec
		}
		switch proto {
		case "tcp":
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return fmt.Errorf("listen on tcp %s: %w", addr, err)
			}
			fmt.Println("serving tcp", ln.Addr())
			go func() { errs <- serveTCP(ln) }()
		case "peer":
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return fmt.Errorf("listen on tcp %s: %w", addr, err)
			}
			fmt.Println("serving peer", ln.Addr())
			go func() { errs <- servePeer(ln) }()
		case "udp":
			pc, err := net.ListenPacket("udp", addr)
			if err != nil {
				return fmt.Errorf("listen on udp %s: %w", addr, err)
			}
			fmt.Println("serving udp", pc.LocalAddr())
			go func() { errs <- serveUDP(pc) }()
		default:
			return fmt.Errorf("serve %q: want tcp/ADDR, udp/ADDR or peer/ADDR", spec)
		}
	}
	return <-errs
}

func serveTCP(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		go func() {
			defer c.Close()
			sc := bufio.NewScanner(c)
			for sc.Scan() {
				if _, err := fmt.Fprintln(c, sc.Text()); err != nil {
					return
				}
			}
		}()
	}
}

// servePeer tells every client the address it connects from.
func servePeer(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		fmt.Fprintf(c, "peer %s\n", c.RemoteAddr())
		c.Close()
	}
}

func serveUDP(pc net.PacketConn) error {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			continue
		}
		pc.WriteTo(buf[:n], from)
	}
}

// probeEvery paces probes; a pod's first allowed connection is seen
// within this of being possible.
const probeEvery = 100 * time.Millisecond

func probe(addr string) {
	for n := 1; ; n++ {
		if err := once(addr, n); err != nil {
			fmt.Printf("fail %d: %v t=%d\n", n, err, time.Now().UnixNano())
		} else {
			fmt.Printf("ok %d t=%d\n", n, time.Now().UnixNano())
		}
		time.Sleep(probeEvery)
	}
}

func once(addr string, n int) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	want := fmt.Sprintf("probe %d", n)
	if _, err := fmt.Fprintln(c, want); err != nil {
		return err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if got != want+"\n" {
		return fmt.Errorf("echo %q, want %q", got, want)
	}
	return nil
}

// streamWait bounds each echo of a stream: long enough for TCP to
// retransmit across an agent's restart, short enough that a dead
// connection is reported while a test still watches.
const streamWait = 60 * time.Second

// streamConnect bounds a stream's attempts to connect.
const streamConnect = 30 * time.Second

// stream keeps one connection exchanging lines until it breaks: the
// evidence that an established connection survives what happens to the
// path beneath it.
func stream(addr string) error {
	var c net.Conn
	var err error
	for deadline := time.Now().Add(streamConnect); ; time.Sleep(probeEvery) {
		if c, err = net.DialTimeout("tcp", addr, time.Second); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("stream broken 0: %w", err)
		}
	}
	defer c.Close()
	fmt.Printf("connected %s\n", c.LocalAddr())
	r := bufio.NewReader(c)
	for n := 1; ; n++ {
		c.SetDeadline(time.Now().Add(streamWait))
		want := fmt.Sprintf("probe stream %d", n)
		if _, err := fmt.Fprintln(c, want); err != nil {
			return fmt.Errorf("stream broken %d: %w", n, err)
		}
		got, err := r.ReadString('\n')
		if err != nil {
			return fmt.Errorf("stream broken %d: %w", n, err)
		}
		if got != want+"\n" {
			return fmt.Errorf("stream broken %d: echo %q, want %q", n, got, want)
		}
		fmt.Printf("stream ok %d t=%d\n", n, time.Now().UnixNano())
		time.Sleep(probeEvery)
	}
}
