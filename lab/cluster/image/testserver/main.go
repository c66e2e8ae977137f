// Command testserver is the lab's test workload, one static binary for the
// test image:
//
//	testserver serve ADDR   echo every line back on TCP ADDR
//	testserver probe ADDR   every 250 ms, dial ADDR, send a line, expect it
//	                        back; print "ok N" or "fail N: why" per attempt
//
// A probe's log is what a test reads (through the API server) to see whether
// a pod reaches another, so each attempt is bounded by a 1 s timeout and
// printed on one line.
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"time"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: testserver serve|probe ADDR")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2])
	case "probe":
		probe(os.Args[2])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "testserver:", err)
		os.Exit(1)
	}
}

func serve(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", addr, err)
	}
	fmt.Println("serving", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accept on %s: %w", addr, err)
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

func probe(addr string) {
	for n := 1; ; n++ {
		if err := once(addr, n); err != nil {
			fmt.Printf("fail %d: %v\n", n, err)
		} else {
			fmt.Printf("ok %d\n", n)
		}
		time.Sleep(250 * time.Millisecond)
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
