package netns

import (
	"os/exec"
	"runtime"
)

// StartPinned starts cmd and waits for it in the background, calling onExit
// with Wait's result. The fork happens on an OS thread locked for the
// child's whole life: Pdeathsig (which lab processes set, so they die with
// their parent) fires when the forking *thread* exits, and Go retires
// threads — tests that enter network namespaces do so on purpose.
func StartPinned(cmd *exec.Cmd, onExit func(error)) error {
	started := make(chan error)
	go func() {
		runtime.LockOSThread()
		err := cmd.Start()
		started <- err
		if err == nil {
			onExit(cmd.Wait())
		}
	}()
	return <-started
}
