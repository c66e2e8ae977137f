package netns

import (
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Forwarder accepts TCP connections on an address inside a namespace and
// relays each to a target reachable from the caller's namespace. It gives a
// lab node a way to reach, say, the API server on the host's loopback
// without any route out of the lab: the node sees only its own loopback.
type Forwarder struct {
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	open map[net.Conn]struct{}
}

// Forward starts relaying listen (inside ns) to target.
func Forward(ns *Netns, listen, target string) (*Forwarder, error) {
	var ln net.Listener
	if err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", listen)
		return err
	}); err != nil {
		return nil, fmt.Errorf("listen on %s in %s: %w", listen, ns.Name, err)
	}
	f := &Forwarder{ln: ln, open: map[net.Conn]struct{}{}}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				f.relay(c, target)
			}()
		}
	}()
	return f, nil
}

func (f *Forwarder) track(c net.Conn, add bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if add {
		f.open[c] = struct{}{}
	} else {
		delete(f.open, c)
	}
}

func (f *Forwarder) relay(c net.Conn, target string) {
	defer c.Close()
	up, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		return
	}
	defer up.Close()
	f.track(c, true)
	f.track(up, true)
	defer f.track(c, false)
	defer f.track(up, false)
	done := make(chan struct{}, 2)
	go func() { io.Copy(up, c); up.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	go func() { io.Copy(c, up); done <- struct{}{} }()
	<-done
	<-done
}

// Close stops accepting and cuts every relayed connection (as an API server
// going away would).
func (f *Forwarder) Close() {
	f.ln.Close()
	f.mu.Lock()
	for c := range f.open {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}
