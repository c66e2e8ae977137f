package netns

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// The soak helpers: a client that opens many connections of several kinds
// to a server, both checking every byte the other sent. A connection starts
// with a header from the client (seed, bytes each way, kind); each side's
// payload is a stream derived from the seed, so the receiver can check any
// prefix. Kinds:
//
//	soakNormal: both send their byte count at once, in writes of random
//	  sizes, then half-close; each must receive exactly the other's count.
//	soakLarge: the same with writes of up to 4 MiB.
//	soakClientReset: the client aborts (SO_LINGER 0) halfway through.
//	soakServerReset: the server aborts halfway through.
//	soakLong: both stream, paced, until the client's deadline; the server
//	  prints how much it received ("long N"), the client what it sent.
//
// After a reset, the peer must have received a correct prefix and then an
// error or end of stream, never wrong bytes.
const (
	soakNormal byte = iota
	soakLarge
	soakClientReset
	soakServerReset
	soakLong
)

const soakHeaderLen = 8 + 8 + 8 + 1

// fillSoak writes the bytes of stream seed at offset off into p.
func fillSoak(p []byte, seed uint64, off int64) {
	for len(p) > 0 {
		v := splitmix(seed + uint64(off/8))
		for s := off % 8; s < 8 && len(p) > 0; s++ {
			p[0] = byte(v >> (8 * s))
			p = p[1:]
			off++
		}
	}
}

func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// soakReader reads c to its end, checking every byte against stream seed.
// It returns how many bytes matched and how the stream ended (nil for end
// of stream); a mismatch is an error naming the offset.
func soakReader(c net.Conn, seed uint64) (int64, error) {
	buf := make([]byte, 256<<10)
	want := make([]byte, len(buf))
	var off int64
	for {
		n, err := c.Read(buf)
		if n > 0 {
			fillSoak(want[:n], seed, off)
			for i := 0; i < n; i++ {
				if buf[i] != want[i] {
					return off, fmt.Errorf("%w at byte %d", errSoakMismatch, off+int64(i))
				}
			}
			off += int64(n)
		}
		if errors.Is(err, io.EOF) {
			return off, nil
		}
		if err != nil {
			return off, err
		}
	}
}

var errSoakMismatch = errors.New("received bytes differ from those sent")

// soakWriter sends n bytes of stream seed on c in writes of sizes drawn
// from sizes (n < 0: until stop is closed, pausing pace between writes).
// It returns how many bytes it wrote.
func soakWriter(c net.Conn, seed uint64, n int64, sizes func() int, pace time.Duration, stop <-chan struct{}) (int64, error) {
	var (
		buf []byte
		off int64
	)
	for n < 0 || off < n {
		if n < 0 {
			select {
			case <-stop:
				return off, nil
			default:
			}
		}
		k := int64(sizes())
		if n >= 0 {
			k = min(k, n-off)
		}
		if int64(cap(buf)) < k {
			buf = make([]byte, k)
		}
		p := buf[:k]
		fillSoak(p, seed, off)
		w, err := c.Write(p)
		off += int64(w)
		if err != nil {
			return off, err
		}
		if pace > 0 {
			time.Sleep(pace)
		}
	}
	return off, nil
}

func reset(c net.Conn) {
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
}

// helperSoakServer serves soak connections until killed. It prints "fail
// ..." for every check that fails, "long N" for each long connection, and
// "served N" about every second.
func helperSoakServer(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println("listening")
	var served atomic.Int64
	var out sync.Mutex
	say := func(format string, a ...any) {
		out.Lock()
		defer out.Unlock()
		fmt.Printf(format+"\n", a...)
	}
	go func() {
		for range time.Tick(time.Second) {
			say("served %d", served.Load())
		}
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer served.Add(1)
			if err := soakServe(c, say); err != nil {
				say("fail %s: %v", c.RemoteAddr(), err)
			}
		}()
	}
}

func soakServe(c net.Conn, say func(string, ...any)) error {
	defer c.Close()
	var h [soakHeaderLen]byte
	if _, err := io.ReadFull(c, h[:]); err != nil {
		return fmt.Errorf("read header: %w", err)
	}
	seed := binary.BigEndian.Uint64(h[0:])
	toServer := int64(binary.BigEndian.Uint64(h[8:]))
	toClient := int64(binary.BigEndian.Uint64(h[16:]))
	kind := h[24]
	rng := rand.New(rand.NewPCG(seed, 2))
	var rngMu sync.Mutex
	sizes := soakSizes(kind, rng, &rngMu)

	stop := make(chan struct{})
	wrote := make(chan error, 1)
	go func() {
		switch kind {
		case soakServerReset:
			_, err := soakWriter(c, seed+1<<40, toClient/2, sizes, 0, nil)
			reset(c)
			wrote <- err
		case soakLong:
			_, err := soakWriter(c, seed+1<<40, -1, sizes, time.Millisecond, stop)
			if err == nil {
				err = c.(*net.TCPConn).CloseWrite()
			}
			wrote <- err
		default:
			_, err := soakWriter(c, seed+1<<40, toClient, sizes, 0, nil)
			if err == nil {
				err = c.(*net.TCPConn).CloseWrite()
			}
			wrote <- err
		}
	}()
	got, rerr := soakReader(c, seed)
	close(stop)
	werr := <-wrote
	if errors.Is(rerr, errSoakMismatch) {
		return fmt.Errorf("kind %d: %w", kind, rerr)
	}
	switch kind {
	case soakClientReset:
		return nil // any correct prefix, then reset or end
	case soakServerReset:
		return nil // we cut it ourselves
	case soakLong:
		if rerr != nil || werr != nil {
			return fmt.Errorf("long connection: read %v, write %v", rerr, werr)
		}
		say("long %d", got)
		return nil
	}
	if rerr != nil || got != toServer {
		return fmt.Errorf("kind %d: received %d of %d bytes, then %v", kind, got, toServer, rerr)
	}
	if werr != nil {
		return fmt.Errorf("kind %d: write: %w", kind, werr)
	}
	return nil
}

// soakSizes returns the write sizes of a connection of kind: partial
// writes of a byte to 256 KiB, large ones of up to 4 MiB, or (long
// connections, which stream all along) up to 64 KiB.
func soakSizes(kind byte, rng *rand.Rand, mu *sync.Mutex) func() int {
	limit := 256 << 10
	switch kind {
	case soakLarge:
		limit = 4 << 20
	case soakLong:
		limit = 64 << 10
	}
	return func() int {
		mu.Lock()
		defer mu.Unlock()
		if rng.IntN(4) == 0 {
			return 1 + rng.IntN(16)
		}
		return 1 + rng.IntN(limit)
	}
}

// helperSoakClient runs workers connections at a time to addr for d, at most
// maxConns in all, plus longConns that last the whole run. It prints "fail
// ..." for every failed check, "long N" for the bytes each long connection
// sent, and at the end "soak CONNS BYTES RESETS".
func helperSoakClient(addr string, d time.Duration, workers, longConns, maxConns int) error {
	deadline := time.Now().Add(d)
	var (
		conns, bytes, resets atomic.Int64
		out                  sync.Mutex
		wg                   sync.WaitGroup
	)
	say := func(format string, a ...any) {
		out.Lock()
		defer out.Unlock()
		fmt.Printf(format+"\n", a...)
	}
	stop := make(chan struct{})
	time.AfterFunc(d, func() { close(stop) })
	for i := 0; i < longConns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sent, got, err := soakDial(addr, uint64(i+1)<<48, 0, 0, soakLong, stop)
			bytes.Add(sent + got)
			conns.Add(1)
			if err != nil {
				say("fail long %d: %v", i, err)
				return
			}
			say("long %d", sent)
		}()
	}
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for time.Now().Before(deadline) {
				n := conns.Add(1)
				if n > int64(maxConns) {
					conns.Add(-1)
					return
				}
				seed := uint64(w+1)<<32 | uint64(n)<<8
				kind := soakNormal
				toServer, toClient := int64(rng.IntN(256<<10)), int64(rng.IntN(256<<10))
				switch r := rng.IntN(20); {
				case r == 0:
					kind, toServer, toClient = soakLarge, int64(4<<20+rng.IntN(4<<20)), int64(rng.IntN(4<<20))
				case r < 3:
					kind = soakClientReset
				case r < 5:
					kind = soakServerReset
				}
				if kind == soakClientReset || kind == soakServerReset {
					resets.Add(1)
				}
				sent, got, err := soakDial(addr, seed, toServer, toClient, kind, nil)
				bytes.Add(sent + got)
				if err != nil {
					say("fail kind %d seed %#x: %v", kind, seed, err)
				}
			}
		}()
	}
	wg.Wait()
	say("soak %d %d %d", conns.Load(), bytes.Load(), resets.Load())
	return nil
}

// soakDial runs one client connection and returns the bytes it sent and
// received.
func soakDial(addr string, seed uint64, toServer, toClient int64, kind byte, stop <-chan struct{}) (int64, int64, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return 0, 0, fmt.Errorf("connect: %w", err)
	}
	defer c.Close()
	// Nothing in a soak may hang: a stuck connection is a failure.
	c.SetDeadline(time.Now().Add(time.Minute))
	var h [soakHeaderLen]byte
	binary.BigEndian.PutUint64(h[0:], seed)
	binary.BigEndian.PutUint64(h[8:], uint64(toServer))
	binary.BigEndian.PutUint64(h[16:], uint64(toClient))
	h[24] = kind
	if _, err := c.Write(h[:]); err != nil {
		return 0, 0, fmt.Errorf("write header: %w", err)
	}
	rng := rand.New(rand.NewPCG(seed, 3))
	var rngMu sync.Mutex
	sizes := soakSizes(kind, rng, &rngMu)

	type wrote struct {
		n   int64
		err error
	}
	done := make(chan wrote, 1)
	go func() {
		switch kind {
		case soakClientReset:
			n, err := soakWriter(c, seed, toServer/2, sizes, 0, nil)
			reset(c)
			done <- wrote{n, err}
		case soakLong:
			n, err := soakWriter(c, seed, -1, sizes, time.Millisecond, stop)
			if err == nil {
				err = c.(*net.TCPConn).CloseWrite()
			}
			done <- wrote{n, err}
		default:
			n, err := soakWriter(c, seed, toServer, sizes, 0, nil)
			if err == nil {
				err = c.(*net.TCPConn).CloseWrite()
			}
			done <- wrote{n, err}
		}
	}()
	got, rerr := soakReader(c, seed+1<<40)
	w := <-done
	if errors.Is(rerr, errSoakMismatch) {
		return w.n, got, rerr
	}
	switch kind {
	case soakClientReset, soakServerReset:
		return w.n, got, nil // a correct prefix, then reset or end
	case soakLong:
		if rerr != nil || w.err != nil {
			return w.n, got, fmt.Errorf("read %v, write %v", rerr, w.err)
		}
		return w.n, got, nil
	}
	if rerr != nil || got != toClient {
		return w.n, got, fmt.Errorf("received %d of %d bytes, then %v", got, toClient, rerr)
	}
	if w.err != nil {
		return w.n, got, fmt.Errorf("write: %w", w.err)
	}
	return w.n, got, nil
}
