// Package netns builds small networks out of network namespaces and veth
// pairs for the local lab and Veil's privileged tests: nodes, pods, an
// underlay between nodes, and helper processes that run inside a pod's
// namespace and cgroup. Everything it creates carries a caller-chosen prefix
// and is removed by exact name; nothing gets a route out of the lab.
package netns

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
)

// NetnsDir is where named namespaces are bind-mounted (as iproute2 does).
const NetnsDir = "/run/netns"

// Netns is a named network namespace.
type Netns struct {
	Name string
}

// Path is the namespace's bind mount, for nsenter --net=PATH.
func (n *Netns) Path() string { return filepath.Join(NetnsDir, n.Name) }

// NewNetns creates a named namespace with loopback up. It fails if the name
// is taken: the lab never adopts a namespace it did not create.
func NewNetns(name string) (*Netns, error) {
	if len(name) == 0 || strings.ContainsAny(name, "/ ") {
		return nil, fmt.Errorf("create netns %q: invalid name", name)
	}
	if _, err := os.Stat(filepath.Join(NetnsDir, name)); err == nil {
		return nil, fmt.Errorf("create netns %q: already exists", name)
	}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("create netns %q: %v: %s", name, err, out)
	}
	ns := &Netns{Name: name}
	if err := ns.Do(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	}); err != nil {
		ns.Delete()
		return nil, fmt.Errorf("bring up loopback in %q: %w", name, err)
	}
	return ns, nil
}

// Delete removes the namespace (and with it every interface inside).
func (n *Netns) Delete() error {
	if _, err := os.Stat(n.Path()); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil {
		return fmt.Errorf("delete netns %q: %v: %s", n.Name, err, out)
	}
	return nil
}

// Do runs fn on an OS thread switched into the namespace. Sockets and
// netlink handles created inside fn belong to the namespace.
func (n *Netns) Do(fn func() error) error {
	errc := make(chan error, 1)
	// A fresh goroutine whose thread is thrown away afterwards: a thread
	// left in another namespace must never serve other goroutines.
	go func() {
		runtime.LockOSThread()
		target, err := vnetns.GetFromPath(n.Path())
		if err != nil {
			errc <- fmt.Errorf("open netns %q: %w", n.Name, err)
			return
		}
		defer target.Close()
		if err := vnetns.Set(target); err != nil {
			errc <- fmt.Errorf("enter netns %q: %w", n.Name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// Run runs a command inside the namespace (nsenter --net, so /sys stays the
// host's and bpffs remains visible) and returns its combined output.
func (n *Netns) Run(name string, args ...string) (string, error) {
	cmd := exec.Command("nsenter", append([]string{"--net=" + n.Path(), "--", name}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), n.Name, err, out)
	}
	return string(out), nil
}

// Sysctl sets a sysctl inside the namespace.
func (n *Netns) Sysctl(key, value string) error {
	path := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
	return n.Do(func() error {
		// /proc/sys/net follows the writing thread's namespace.
		if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%s in %s: %w", key, value, n.Name, err)
		}
		return nil
	})
}

// CleanupPrefix deletes every namespace whose name starts with prefix: the
// way to clean up after a crashed run. The prefix must be specific (at least
// 8 characters) so that nothing else is touched.
func CleanupPrefix(prefix string) error {
	if len(prefix) < 8 {
		return fmt.Errorf("cleanup: prefix %q is too short to be safe", prefix)
	}
	return CleanupMatching(func(name string) bool { return strings.HasPrefix(name, prefix) })
}

// CleanupMatching deletes every named namespace for which match is true.
func CleanupMatching(match func(name string) bool) error {
	entries, err := os.ReadDir(NetnsDir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("list %s: %w", NetnsDir, err)
	}
	var errs []error
	for _, e := range entries {
		if match(e.Name()) {
			errs = append(errs, (&Netns{Name: e.Name()}).Delete())
		}
	}
	return errors.Join(errs...)
}
