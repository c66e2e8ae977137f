// Package nsthread runs a function inside another network namespace on an
// OS thread of its own that is thrown away afterwards.
//
// setns(2) changes only the calling thread. The goroutine that switched
// namespace therefore locks its thread and exits still locked, so the Go
// runtime terminates that thread instead of handing it, still in the foreign
// namespace, to other goroutines.
package nsthread

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs fn in the namespace ns and returns fn's error, or the error of
// entering ns. ns stays open: the caller owns it.
func Do(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// DoPath runs fn in the network namespace bound at path (for example
// /proc/PID/ns/net or a bind mount under /run/netns).
func DoPath(path string, fn func() error) error {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	if err := Do(ns, fn); err != nil {
		return fmt.Errorf("in netns %s: %w", path, err)
	}
	return nil
}
