package datapath

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// The acceleration self-test. Socket redirection (sockmap, sk_msg) has
// changed behaviour, and regressed, across kernels; a kernel that loses or
// reorders redirected bytes would corrupt pods' connections silently. So
// before sockets of pods are accelerated, the datapath runs a short
// accelerated transfer of its own and checks every byte. It uses private
// copies of the socket programs and maps, attached to a child cgroup of the
// acceleration cgroup that it creates and removes: pods' sockets and the
// pinned state are not involved, and no other cgroup is touched.

// socketHelperEnv marks a process started by the self-test to create its
// sockets inside the test cgroup, and names that cgroup.
const socketHelperEnv = "VEIL_DATAPATH_SOCKET_HELPER"

// MaybeRunSocketHelper serves the acceleration self-test and exits, when
// this process was started as its helper; otherwise it returns at once.
// Every binary that loads a Datapath with acceleration calls it first thing
// in main (a process is the only way to create sockets in another cgroup).
func MaybeRunSocketHelper() {
	cg := os.Getenv(socketHelperEnv)
	if cg == "" {
		return
	}
	if err := socketHelper(cg); err != nil {
		fmt.Fprintf(os.Stderr, "socket helper: %v\n", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// socketHelper joins cgroup cg, connects a TCP pair on loopback there, so
// that both sockets join the test's sockhash, and sends both to the parent
// over file descriptor 3. The process moves itself (rather than being
// started in the cgroup with clone3, which container runtimes' default
// seccomp profiles refuse).
func socketHelper(cg string) error {
	if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte("0"), 0); err != nil {
		return fmt.Errorf("join test cgroup: %w", err)
	}
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	c, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer c.Close()
	s, err := ln.AcceptTCP()
	if err != nil {
		return fmt.Errorf("accept: %w", err)
	}
	defer s.Close()
	cf, err := c.File()
	if err != nil {
		return err
	}
	defer cf.Close()
	sf, err := s.File()
	if err != nil {
		return err
	}
	defer sf.Close()
	ctl := os.NewFile(3, "self-test control")
	defer ctl.Close()
	return unix.Sendmsg(int(ctl.Fd()), []byte{1}, unix.UnixRights(int(cf.Fd()), int(sf.Fd())), nil, 0)
}

// selfTest is how the self-test runs; the zero value is the real test.
// Tests of this package change it to inject a misbehaving kernel.
type selfTest struct {
	// write sends p on c; nil is c.Write.
	write func(ctx context.Context, c net.Conn, p []byte) (int, error)
	// timeout bounds the whole test; zero is selfTestTimeout.
	timeout time.Duration
}

// selfTestTimeout bounds the self-test: a kernel that hangs a redirected
// transfer fails it.
const selfTestTimeout = 10 * time.Second

// selfTestBytes is how much the self-test sends each way.
const selfTestBytes = 4 << 20

// errSelfTestNotRun marks a self-test that could not be set up: it says
// nothing about the kernel.
var errSelfTestNotRun = errors.New("the self-test could not run")

// testAcceleration runs the self-test and returns why acceleration must stay
// off, or, wrapping errSelfTestNotRun, why it could not tell.
func (d *Datapath) testAcceleration() error {
	timeout := d.cfg.selfTest.timeout
	if timeout == 0 {
		timeout = selfTestTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	notRun := func(err error) error { return fmt.Errorf("%w: %w", errSelfTestNotRun, err) }

	spec, err := loadSock()
	if err != nil {
		return notRun(fmt.Errorf("parse sock object: %w", err))
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		return notRun(explainLoadError("sock (self-test)", err))
	}
	defer coll.Close()
	loopback, err := epKey(netip.MustParseAddr("127.0.0.1"))
	if err != nil {
		return notRun(err)
	}
	if err := coll.Maps["veil_endpoints"].Put(loopback, &podEndpointInfo{Id: 1}); err != nil {
		return notRun(fmt.Errorf("register loopback endpoint: %w", err))
	}
	// sk_msg first: a socket takes the map's programs when it joins.
	sockhash := coll.Maps["veil_sockhash"]
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target: sockhash.FD(), Program: coll.Programs["veil_sk_msg"], Attach: ebpf.AttachSkMsgVerdict,
	}); err != nil {
		return notRun(fmt.Errorf("attach sk_msg to the test sockhash: %w", err))
	}

	// An agent in a cgroup namespace may place processes only below its
	// own cgroup: then the test cgroup goes there, if that is inside the
	// acceleration cgroup.
	a, b, done, err := d.socketsInTestCgroup(ctx, d.cfg.CgroupPath, coll.Programs["veil_sockops"])
	if err != nil {
		own, ownErr := ownCgroup(d.cfg.CgroupPath)
		if ownErr != nil {
			return notRun(fmt.Errorf("%w; and no cgroup of this process below %s: %w", err, d.cfg.CgroupPath, ownErr))
		}
		if a, b, done, err = d.socketsInTestCgroup(ctx, own, coll.Programs["veil_sockops"]); err != nil {
			return notRun(err)
		}
	}
	defer done()
	var (
		k      podSockKey
		cookie uint64
		joined int
	)
	for it := sockhash.Iterate(); it.Next(&k, &cookie); {
		joined++
	}
	if joined != 2 {
		return fmt.Errorf("sockops put %d of 2 connected test sockets in the sockhash", joined)
	}
	if err := exchange(ctx, a, b, selfTestBytes, d.cfg.selfTest.write); err != nil {
		return err
	}
	redirected, err := d.sumPerCPU(coll.Maps["veil_sockstats"], uint32(podSockstatSOCKSTAT_REDIRECTED))
	if err != nil {
		return notRun(err)
	}
	if redirected.Bytes < 2*selfTestBytes {
		return fmt.Errorf("sk_msg redirected %d of %d bytes: the kernel did not accelerate the test connection", redirected.Bytes, 2*selfTestBytes)
	}
	return nil
}

// socketsInTestCgroup creates the test cgroup below parent, attaches
// sockops to it and returns a connection made in it; done closes the
// connection and removes the cgroup.
func (d *Datapath) socketsInTestCgroup(ctx context.Context, parent string, sockops *ebpf.Program) (a, b net.Conn, done func(), err error) {
	cg := filepath.Join(parent, fmt.Sprintf("veil-selftest-%d", os.Getpid()))
	if err := os.Mkdir(cg, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, nil, nil, fmt.Errorf("create test cgroup: %w", err)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: ebpf.AttachCGroupSockOps, Program: sockops})
	if err != nil {
		removeCgroup(cg, d.log)
		return nil, nil, nil, fmt.Errorf("attach sockops to test cgroup %s: %w", cg, err)
	}
	a, b, err = socketsInCgroup(ctx, cg)
	if err != nil {
		l.Close()
		removeCgroup(cg, d.log)
		return nil, nil, nil, err
	}
	return a, b, func() {
		a.Close()
		b.Close()
		l.Close()
		removeCgroup(cg, d.log)
	}, nil
}

// ownCgroup finds the cgroup of this process below root by its process
// list: inside a cgroup namespace, /proc/self/cgroup names it only
// relative to the namespace.
func ownCgroup(root string) (string, error) {
	pid := strconv.Itoa(os.Getpid())
	var found string
	err := filepath.WalkDir(root, func(path string, e fs.DirEntry, err error) error {
		if err != nil || !e.IsDir() {
			return nil
		}
		procs, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
		if err != nil {
			return nil
		}
		if slices.Contains(strings.Fields(string(procs)), pid) {
			found = path
			return fs.SkipAll
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("search cgroups: %w", err)
	}
	if found == "" {
		return "", errors.New("not found")
	}
	return found, nil
}

// socketsInCgroup returns both ends of a TCP connection on loopback whose
// sockets were created in cgroup cg, by a helper process that joined it.
func socketsInCgroup(ctx context.Context, cg string) (net.Conn, net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socket pair for the self-test helper: %w", err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "self-test control"), os.NewFile(uintptr(fds[1]), "self-test control")
	defer ours.Close()
	defer theirs.Close()
	exe, err := os.Executable()
	if err != nil {
		return nil, nil, fmt.Errorf("find own executable: %w", err)
	}
	cmd := exec.CommandContext(ctx, exe)
	cmd.Env = append(os.Environ(), socketHelperEnv+"="+cg)
	cmd.ExtraFiles = []*os.File{theirs}
	var stderr limitedBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start self-test helper: %w", err)
	}
	theirs.Close()
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()

	type received struct {
		fds []int
		err error
	}
	got := make(chan received, 1)
	go func() {
		buf, oob := make([]byte, 1), make([]byte, unix.CmsgSpace(2*4))
		_, oobn, _, _, err := unix.Recvmsg(int(ours.Fd()), buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err != nil {
			got <- received{err: err}
			return
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) != 1 {
			got <- received{err: fmt.Errorf("control message: %v", err)}
			return
		}
		rights, err := unix.ParseUnixRights(&msgs[0])
		got <- received{fds: rights, err: err}
	}()
	var r received
	select {
	case r = <-got:
	case <-ctx.Done():
		// CommandContext kills the helper; its end of the pair closes, and
		// the receive returns.
		<-waited
		<-got
		return nil, nil, fmt.Errorf("self-test helper: %w", ctx.Err())
	}
	// A helper that exits without sending closes its end: the receive
	// returns no descriptors.
	helperErr := <-waited
	if r.err == nil && len(r.fds) != 2 {
		r.err = fmt.Errorf("got %d descriptors, want 2", len(r.fds))
	}
	if r.err != nil {
		for _, fd := range r.fds {
			unix.Close(fd)
		}
		return nil, nil, fmt.Errorf("receive sockets from the self-test helper (exit: %v, %s): %w", helperErr, stderr.String(), r.err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range r.fds {
		f := os.NewFile(uintptr(fd), "self-test socket")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			for _, c := range conns[:i] {
				c.Close()
			}
			for _, fd := range r.fds[i+1:] {
				unix.Close(fd)
			}
			return nil, nil, fmt.Errorf("adopt self-test socket: %w", err)
		}
		conns[i] = c
	}
	return conns[0], conns[1], nil
}

// limitedBuffer keeps the first KiB written to it: enough of a helper's
// stderr to explain its failure.
type limitedBuffer struct{ b []byte }

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := 1024 - len(l.b); room > 0 {
		l.b = append(l.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (l *limitedBuffer) String() string { return string(l.b) }

// removeCgroup removes the test cgroup once its helper has left it, which
// the kernel completes asynchronously after the helper exits.
func removeCgroup(path string, log interface{ Warn(string, ...any) }) {
	var err error
	for i := 0; i < 50; i++ {
		if err = os.Remove(path); err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	log.Warn("remove self-test cgroup", "path", path, "error", err)
}

// exchange sends n bytes each way between a and b at once, in writes of
// sizes from one byte to a MiB, half-closes both and checks that each side
// reads exactly the other's bytes, in order, then end of stream. A stall
// ends at ctx's deadline.
func exchange(ctx context.Context, a, b net.Conn, n int, write func(context.Context, net.Conn, []byte) (int, error)) error {
	if write == nil {
		write = func(_ context.Context, c net.Conn, p []byte) (int, error) { return c.Write(p) }
	}
	if dl, ok := ctx.Deadline(); ok {
		a.SetDeadline(dl)
		b.SetDeadline(dl)
	}
	errs := make(chan error, 4)
	send := func(name string, c net.Conn, seed uint64) {
		p := pattern(seed, n)
		sizes := []int{1, 7, 1500, 4096, 65536 + 13, 1 << 20}
		for off, i := 0, 0; off < n; i++ {
			end := min(off+sizes[i%len(sizes)], n)
			k, err := write(ctx, c, p[off:end])
			if err != nil {
				errs <- fmt.Errorf("%s: write at byte %d: %w", name, off, err)
				return
			}
			off += k
		}
		if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
			errs <- fmt.Errorf("%s: half-close: %w", name, err)
			return
		}
		errs <- nil
	}
	recv := func(name string, c net.Conn, seed uint64) {
		want := pattern(seed, n)
		got := make([]byte, 0, n+1)
		buf := make([]byte, 256<<10)
		for {
			k, err := c.Read(buf)
			got = append(got, buf[:k]...)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				errs <- fmt.Errorf("%s: read after %d of %d bytes: %w", name, len(got), n, err)
				return
			}
		}
		for i := range min(len(got), n) {
			if got[i] != want[i] {
				errs <- fmt.Errorf("%s: byte %d of %d differs: the kernel lost or reordered redirected data", name, i, n)
				return
			}
		}
		if len(got) != n {
			errs <- fmt.Errorf("%s: received %d bytes before end of stream, want %d", name, len(got), n)
			return
		}
		errs <- nil
	}
	go send("a to b", a, 1)
	go send("b to a", b, 2)
	go recv("a to b", b, 1)
	go recv("b to a", a, 2)
	var all []error
	for range 4 {
		if err := <-errs; err != nil {
			all = append(all, err)
			// The first failure ends the others rather than waiting for
			// the deadline.
			a.SetDeadline(time.Now())
			b.SetDeadline(time.Now())
		}
	}
	if len(all) == 0 {
		return nil
	}
	if ctx.Err() != nil || errors.Is(all[0], os.ErrDeadlineExceeded) {
		return fmt.Errorf("accelerated transfer on loopback stalled until the deadline: %w", all[0])
	}
	return fmt.Errorf("accelerated transfer on loopback: %w", all[0])
}

// pattern returns n pseudo-random bytes (xorshift) that depend on seed.
func pattern(seed uint64, n int) []byte {
	p := make([]byte, n)
	x := seed*0x9e3779b97f4a7c15 | 1
	for i := range p {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		p[i] = byte(x >> 32)
	}
	return p
}
