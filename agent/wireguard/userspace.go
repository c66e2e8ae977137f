package wireguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/veilmesh/veil/agent/nsthread"
)

// SocketDir is where userspace devices put their UAPI sockets, the place
// wgctrl and wireguard-tools look for them.
const SocketDir = "/var/run/wireguard"

// userspace is an embedded wireguard-go device: TUN, UDP bind, UAPI socket.
type userspace struct {
	dev      *device.Device
	ns       netns.NsHandle // our own copy, for the bind and the TUN wrapper
	sockPath string
	ln       *net.UnixListener

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup // accept loop and UAPI handlers
	once   sync.Once
	err    error
}

// openUserspace creates the TUN in the current thread's namespace (Open has
// locked it) and starts wireguard-go on it with its UAPI socket listening.
func (d *Device) openUserspace() (err error) {
	name := d.cfg.Interface
	// CreateTUN would attach to an existing TUN of that name, or fail
	// obscurely on another kind of link: say what is in the way instead.
	if l, lerr := d.nl.LinkByName(name); lerr == nil {
		return fmt.Errorf("open userspace wireguard device %s: an interface of type %q already has that name", name, l.Type())
	}
	nsFd, err := unix.Dup(int(d.ns))
	if err != nil {
		return fmt.Errorf("open userspace wireguard device %s: dup netns handle: %w", name, err)
	}
	us := &userspace{ns: netns.NsHandle(nsFd), sockPath: filepath.Join(SocketDir, name+".sock"), conns: map[net.Conn]struct{}{}}
	defer func() {
		if err != nil {
			us.close()
		}
	}()
	tdev, err := tun.CreateTUN(name, d.cfg.mtu())
	if err != nil {
		return fmt.Errorf("open userspace wireguard device %s: create TUN: %w", name, err)
	}
	us.dev = device.NewDevice(&nsTUN{Device: tdev, ns: us.ns}, &nsBind{Bind: conn.NewDefaultBind(), ns: us.ns}, wgLogger(d.log))
	if us.ln, err = listenUAPI(us.sockPath); err != nil {
		return fmt.Errorf("open userspace wireguard device %s: %w", name, err)
	}
	us.wg.Add(1)
	go us.serve()
	d.us = us
	d.mode = ModeUserspace
	return nil
}

// listenUAPI opens the UAPI socket as wireguard-go's ipc.UAPIOpen does (a
// stale socket is replaced, a live one is not), but without ipc.UAPIListen,
// whose helper goroutines can block forever after Close.
func listenUAPI(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("uapi socket directory: %w", err)
	}
	addr := &net.UnixAddr{Name: path, Net: "unix"}
	ln, err := net.ListenUnix("unix", addr)
	if errors.Is(err, unix.EADDRINUSE) {
		if c, derr := net.Dial("unix", path); derr == nil {
			c.Close()
			return nil, fmt.Errorf("uapi socket %s: in use by another device", path)
		}
		if rerr := os.Remove(path); rerr != nil {
			return nil, fmt.Errorf("uapi socket %s: remove stale: %w", path, rerr)
		}
		ln, err = net.ListenUnix("unix", addr)
	}
	if err != nil {
		return nil, fmt.Errorf("uapi socket %s: %w", path, err)
	}
	// The socket hands out and accepts private keys: root only.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("uapi socket %s: %w", path, err)
	}
	return ln, nil
}

func (us *userspace) serve() {
	defer us.wg.Done()
	for {
		c, err := us.ln.Accept()
		if err != nil {
			return
		}
		us.mu.Lock()
		if us.closed {
			us.mu.Unlock()
			c.Close()
			return
		}
		us.conns[c] = struct{}{}
		us.wg.Add(1)
		us.mu.Unlock()
		go func() {
			defer us.wg.Done()
			us.dev.IpcHandle(c) // closes c
			us.mu.Lock()
			delete(us.conns, c)
			us.mu.Unlock()
		}()
	}
}

// close stops the UAPI socket (removing it), then the device, whose TUN
// closing removes the interface, and waits for every goroutine it started.
func (us *userspace) close() error {
	us.once.Do(func() {
		var errs []error
		us.mu.Lock()
		us.closed = true
		for c := range us.conns {
			c.Close()
		}
		us.mu.Unlock()
		if us.ln != nil {
			us.ln.Close() // unlinks the socket: it was made by Listen
		}
		if us.dev != nil {
			us.dev.Close()
			<-us.dev.Wait()
		}
		us.wg.Wait()
		// Only a socket this device made is removed: otherwise the path may
		// belong to a live device elsewhere.
		if us.ln != nil {
			if err := os.Remove(us.sockPath); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove uapi socket: %w", err))
			}
		}
		if us.ns.IsOpen() {
			errs = append(errs, us.ns.Close())
		}
		us.err = errors.Join(errs...)
	})
	return us.err
}

// nsBind opens wireguard-go's UDP sockets inside the device's namespace.
// wireguard-go reopens them from whatever goroutine brings the device up or
// changes its port (a TUN event, a UAPI request), and those goroutines run in
// the process's namespace, not necessarily the device's.
//
// Being a wrapper, it also turns off wireguard-go's sticky-socket route
// listener (it only runs for *conn.StdNetBind), which would otherwise watch
// the wrong namespace's routes; endpoints still learn their source address
// from incoming packets.
type nsBind struct {
	conn.Bind
	ns netns.NsHandle
}

var (
	_ conn.Bind  = (*nsBind)(nil)
	_ tun.Device = (*nsTUN)(nil)
)

func (b *nsBind) Open(port uint16) (fns []conn.ReceiveFunc, actual uint16, err error) {
	err = nsthread.Do(b.ns, func() error {
		var oerr error
		fns, actual, oerr = b.Bind.Open(port)
		return oerr
	})
	return fns, actual, err
}

// nsTUN reads the TUN's MTU inside the device's namespace: wireguard-go asks
// for it by interface name on every link event, from a goroutine in the
// process's namespace, where the name means nothing or another interface.
type nsTUN struct {
	tun.Device
	ns netns.NsHandle
}

func (t *nsTUN) MTU() (int, error) {
	name, err := t.Device.Name()
	if err != nil {
		return 0, err
	}
	var mtu int
	err = nsthread.Do(t.ns, func() error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return fmt.Errorf("read MTU of %s: %w", name, err)
		}
		mtu = l.Attrs().MTU
		return nil
	})
	return mtu, err
}

// wgLogger sends wireguard-go's logs to slog: errors as warnings (they are
// mostly about single packets), chatter at debug, formatted only if enabled.
func wgLogger(log *slog.Logger) *device.Logger {
	log = log.With("component", "wireguard-go")
	return &device.Logger{
		Verbosef: func(format string, args ...any) {
			if log.Enabled(context.Background(), slog.LevelDebug) {
				log.Debug(fmt.Sprintf(format, args...))
			}
		},
		Errorf: func(format string, args ...any) {
			log.Warn(fmt.Sprintf(format, args...))
		},
	}
}
