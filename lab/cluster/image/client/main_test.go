package main

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// client runs this test binary as the client command.
func client(t *testing.T, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "VEIL_CLIENT_TEST_MAIN=1")
	return cmd
}

func TestMain(m *testing.M) {
	if os.Getenv("VEIL_CLIENT_TEST_MAIN") == "1" {
		os.Args = append([]string{"client"}, os.Args[1:]...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// echoServer echoes every line back, as the test server does, and passes
// each on to got.
func echoServer(t *testing.T) (addr string, got <-chan string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	lines := make(chan string, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					select {
					case lines <- strings.TrimSpace(line):
					default:
					}
					c.Write([]byte(line))
				}
			}()
		}
	}()
	return ln.Addr().String(), lines
}

func TestSinkGetsWhatSourceSent(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	sink := client(t, "sink", addr)
	out, err := sink.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := sink.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	if !sc.Scan() || !strings.HasPrefix(sc.Text(), "listening") {
		t.Fatalf("sink said %q first", sc.Text())
	}
	src, err := client(t, "source", "-pace", "1ms", addr, "1000000").Output()
	if err != nil {
		t.Fatal(err)
	}
	var sinkLines []string
	for sc.Scan() {
		sinkLines = append(sinkLines, sc.Text())
	}
	sink.Wait()
	srcLines := strings.Split(strings.TrimSpace(string(src)), "\n")
	srcDone, sinkDone := srcLines[len(srcLines)-1], sinkLines[len(sinkLines)-1]
	if !strings.HasPrefix(srcDone, "done 1000000 ") || srcDone != sinkDone {
		t.Errorf("source ended %q, sink %q", srcDone, sinkDone)
	}
	if !strings.HasPrefix(sinkLines[0], "progress ") {
		t.Errorf("sink reported no progress: %q", sinkLines)
	}
}

func TestReachReportsEveryTargetInOrder(t *testing.T) {
	up, _ := echoServer(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := ln.Addr().String()
	ln.Close()
	out, err := client(t, "reach", "-timeout", "2s", "tcp/"+down, "tcp/"+up).Output()
	if err != nil {
		t.Fatalf("reach: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "tcp/"+down+" fail: ") || lines[1] != "tcp/"+up+" ok" {
		t.Errorf("reach printed %q", lines)
	}
	if err := client(t, "reach", "sctp/"+up).Run(); err == nil {
		t.Errorf("reach took an unknown protocol")
	}
}

func TestConnectSendsTheMessage(t *testing.T) {
	up, got := echoServer(t)
	out, err := client(t, "connect", "-message", "VEIL-MARKER-1", up).CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "ok tcp "+up) {
		t.Fatalf("connect -message: %v: %s", err, out)
	}
	if line := <-got; line != "VEIL-MARKER-1" {
		t.Errorf("the server got %q; want the message", line)
	}
}
