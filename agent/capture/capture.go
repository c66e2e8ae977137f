// Package capture watches a network device with an AF_PACKET socket and
// classifies what crossed it: the evidence behind Veil's encryption audit
// ("only WireGuard on the wire, never the marker in the clear").
package capture

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
)

// Summary is what a capture saw.
type Summary struct {
	Frames int
	// WireGuard counts UDP frames to or from the WireGuard port.
	WireGuard int
	// Marker counts frames holding the marker bytes.
	Marker int
	// PlainPod counts IPv4 frames whose source and destination are both in
	// the pod range: pod traffic in the clear.
	PlainPod int
}

// Options say what to look for.
type Options struct {
	Marker        []byte
	WireGuardPort uint16
	PodRange      netip.Prefix
	// L3 is true for devices without a link-layer header (WireGuard).
	L3 bool
}

// Capture holds a running capture.
type Capture struct {
	fd   int
	opts Options
	mu   sync.Mutex
	sum  Summary
	done chan struct{}
}

// Start opens a capture on dev in the calling thread's network namespace.
func Start(dev string, opts Options) (*Capture, error) {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return nil, fmt.Errorf("capture on %s: %w", dev, err)
	}
	proto := htons(syscall.ETH_P_ALL)
	fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, int(proto))
	if err != nil {
		return nil, fmt.Errorf("capture on %s: open packet socket: %w", dev, err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrLinklayer{Protocol: proto, Ifindex: l.Attrs().Index}); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("capture on %s: bind: %w", dev, err)
	}
	tv := syscall.NsecToTimeval(int64(100 * time.Millisecond))
	syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
	c := &Capture{fd: fd, opts: opts, done: make(chan struct{})}
	go c.read()
	return c, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (c *Capture) read() {
	defer close(c.done)
	buf := make([]byte, 65536)
	for {
		n, _, err := syscall.Recvfrom(c.fd, buf, 0)
		if errors.Is(err, syscall.EBADF) {
			return
		}
		if n > 0 {
			c.classify(buf[:n])
		}
	}
}

func (c *Capture) classify(f []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sum.Frames++
	if len(c.opts.Marker) > 0 && bytes.Contains(f, c.opts.Marker) {
		c.sum.Marker++
	}
	ip := f
	if !c.opts.L3 {
		if len(f) < 14 || binary.BigEndian.Uint16(f[12:14]) != 0x0800 {
			return
		}
		ip = f[14:]
	}
	if len(ip) < 20 || ip[0]>>4 != 4 {
		return
	}
	src, dst := netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
	ihl := int(ip[0]&0x0f) * 4
	if ip[9] == syscall.IPPROTO_UDP && len(ip) >= ihl+4 && c.opts.WireGuardPort != 0 {
		sport, dport := binary.BigEndian.Uint16(ip[ihl:]), binary.BigEndian.Uint16(ip[ihl+2:])
		if sport == c.opts.WireGuardPort || dport == c.opts.WireGuardPort {
			c.sum.WireGuard++
		}
	}
	if c.opts.PodRange.IsValid() && c.opts.PodRange.Contains(src) && c.opts.PodRange.Contains(dst) {
		c.sum.PlainPod++
	}
}

// Stop ends the capture and returns what it saw.
func (c *Capture) Stop() Summary {
	syscall.Close(c.fd)
	<-c.done
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sum
}

// For captures for d (or until ctx ends) and returns the summary.
func For(ctx context.Context, dev string, d time.Duration, opts Options) (Summary, error) {
	c, err := Start(dev, opts)
	if err != nil {
		return Summary{}, err
	}
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
	return c.Stop(), nil
}
