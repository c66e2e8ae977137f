package netns

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// StreamChecker compares what arrives with the stream every source sends,
// so a receiver can tell lost, duplicated or reordered bytes at any prefix,
// not only from a checksum at the end.
type StreamChecker struct {
	want   *Stream
	buf    []byte
	offset int64
}

// NewStreamChecker returns a checker positioned at the stream's first byte.
func NewStreamChecker() *StreamChecker { return &StreamChecker{want: NewStream()} }

// Check compares p with the next len(p) bytes of the stream and returns the
// stream offset of the first byte that differs, or -1.
func (c *StreamChecker) Check(p []byte) int64 {
	for len(p) > 0 {
		if len(c.buf) == 0 {
			c.buf = make([]byte, 64<<10)
			c.want.Read(c.buf)
		}
		n := min(len(p), len(c.buf))
		for i := 0; i < n; i++ {
			if p[i] != c.buf[i] {
				return c.offset + int64(i)
			}
		}
		c.offset += int64(n)
		p, c.buf = p[n:], c.buf[n:]
	}
	return -1
}

// Offset is how many bytes matched so far.
func (c *StreamChecker) Offset() int64 { return c.offset }

// helperCheckedSink accepts one connection and checks every byte against the
// stream as it arrives, sleeping pace after each read of up to 256 KiB (a
// slow reader leaves data queued at its socket). It prints "progress N"
// about every 100 ms, then one of "done N", "mismatch OFFSET" or
// "error N ERR". While no data comes, it still prints "progress N" every
// 100 ms, so a stalled connection shows its final count.
func helperCheckedSink(addr string, pace time.Duration) error {
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
	chk := NewStreamChecker()
	buf := make([]byte, 256<<10)
	last := time.Now()
	for {
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		n, err := c.Read(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = nil
		}
		if off := chk.Check(buf[:n]); off >= 0 {
			fmt.Printf("mismatch %d\n", off)
			return nil
		}
		if time.Since(last) > 100*time.Millisecond {
			fmt.Printf("progress %d\n", chk.Offset())
			last = time.Now()
		}
		if errors.Is(err, io.EOF) {
			fmt.Printf("done %d\n", chk.Offset())
			return nil
		}
		if err != nil {
			fmt.Printf("error %d %v\n", chk.Offset(), err)
			return nil
		}
		if pace > 0 {
			time.Sleep(pace)
		}
	}
}
