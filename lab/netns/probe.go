package netns

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"
)

// TCPEcho connects from inside ns to addr, sends a message and checks that
// the same comes back, all within timeout.
func TCPEcho(ns *Netns, addr string, timeout time.Duration) error {
	return TCPEchoFrom(ns, netip.Addr{}, addr, timeout)
}

// TCPEchoFrom is TCPEcho from a given local address (when valid), e.g. to
// claim an address that is not the pod's own.
func TCPEchoFrom(ns *Netns, local netip.Addr, addr string, timeout time.Duration) error {
	var c net.Conn
	if err := ns.Do(func() (err error) {
		d := net.Dialer{Timeout: timeout}
		if local.IsValid() {
			d.LocalAddr = &net.TCPAddr{IP: local.AsSlice()}
		}
		c, err = d.Dial("tcp", addr)
		return err
	}); err != nil {
		return err
	}
	defer c.Close()
	return echoOnce(c, timeout)
}

// UDPEcho does the same over UDP.
func UDPEcho(ns *Netns, addr string, timeout time.Duration) error {
	var c net.Conn
	if err := ns.Do(func() (err error) {
		c, err = net.Dial("udp", addr)
		return err
	}); err != nil {
		return err
	}
	defer c.Close()
	return echoOnce(c, timeout)
}

func echoOnce(c net.Conn, timeout time.Duration) error {
	c.SetDeadline(time.Now().Add(timeout))
	msg := []byte("veil-probe")
	if _, err := c.Write(msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != string(msg) {
		return fmt.Errorf("echo mismatch: %q", buf)
	}
	return nil
}
