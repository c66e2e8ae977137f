package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/veilmesh/veil/lab/netns"
)

// namespaces are what a process of the cluster runs in: paths of namespace
// files, empty for the host's.
type namespaces struct {
	net, mnt, uts string
}

// proc is a long-running process the cluster started.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	cgroup  string        // relative, in every hierarchy (StartDaemon)
	done    chan struct{} // closed when the process has exited
	waitErr error         // set before done is closed
}

// startProc runs argv in ns and cgroup, logging to Dir/logs/name.log.
//
// Entering a mount namespace is not possible for a multi-threaded process
// (setns(2) refuses CLONE_NEWNS), and Go's SysProcAttr cannot join an
// existing one, so processes start through nsenter, which execs the binary
// after joining: the PID is the binary's.
func (c *Cluster) startProc(name string, ns namespaces, cgroup string, argv ...string) (*proc, error) {
	logPath := filepath.Join(c.Dir, "logs", name+".log")
	log, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create %s log: %w", name, err)
	}
	args := []string{}
	if ns.net != "" {
		args = append(args, "--net="+ns.net)
	}
	if ns.mnt != "" {
		args = append(args, "--mount="+ns.mnt)
	}
	if ns.uts != "" {
		args = append(args, "--uts="+ns.uts)
	}
	cmd := exec.Command("nsenter", append(append(args, "--"), argv...)...)
	cmd.Env = []string{"PATH=" + c.path}
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group keeps a terminal's ^C for the caller, who
		// then stops the cluster in order; Pdeathsig kills the process if
		// the caller dies without stopping it (Cleanup does the rest).
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL,
	}
	p := &proc{name: name, cmd: cmd, logPath: logPath, cgroup: cgroup, done: make(chan struct{})}
	if err := netns.StartPinned(cmd, func(err error) {
		p.waitErr = err
		log.Close()
		close(p.done)
	}); err != nil {
		log.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c.mu.Lock()
	c.procs = append(c.procs, p)
	c.mu.Unlock()
	if err := joinCgroup(cgroup, cmd.Process.Pid); err != nil {
		p.stop(0)
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to exactly this process, then SIGKILL after grace.
func (p *proc) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	if grace > 0 {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
			return
		case <-time.After(grace):
		}
	}
	p.cmd.Process.Kill()
	<-p.done
}

// logTail returns the last n bytes of the process's log.
func (p *proc) logTail(n int64) string {
	f, err := os.Open(p.logPath)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(st.Size()-n, 0)
	buf := make([]byte, st.Size()-off)
	f.ReadAt(buf, off)
	return string(buf)
}

// waitFor polls check every 200 ms until it succeeds, ctx ends or p exits;
// the error then carries check's last error and p's last log lines.
func waitFor(ctx context.Context, p *proc, what string, check func(context.Context) error) error {
	var last error
	for {
		if last = check(ctx); last == nil {
			return nil
		}
		if p != nil && p.exited() {
			return fmt.Errorf("wait for %s: %s exited (%v): %v\n%s", what, p.name, p.waitErr, last, p.logTail(2048))
		}
		select {
		case <-ctx.Done():
			tail := ""
			if p != nil {
				tail = "\n" + p.logTail(2048)
			}
			return fmt.Errorf("wait for %s: %w (last: %v)%s", what, ctx.Err(), last, tail)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// run runs argv to completion in ns and returns its combined output.
func run(ctx context.Context, ns namespaces, path string, argv ...string) (string, error) {
	return output(nsenterCommand(ctx, ns, path, argv...), argv)
}

// nsenterCommand is the command that runs argv in ns (nsenter joins the
// namespaces, then execs argv).
func nsenterCommand(ctx context.Context, ns namespaces, path string, argv ...string) *exec.Cmd {
	args := []string{}
	if ns.net != "" {
		args = append(args, "--net="+ns.net)
	}
	if ns.mnt != "" {
		args = append(args, "--mount="+ns.mnt)
	}
	if ns.uts != "" {
		args = append(args, "--uts="+ns.uts)
	}
	cmd := exec.CommandContext(ctx, "nsenter", append(append(args, "--"), argv...)...)
	cmd.Env = []string{"PATH=" + path}
	return cmd
}

// output runs cmd to completion and returns its combined output; errors
// name argv.
func output(cmd *exec.Cmd, argv []string) (string, error) {
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, out)
	}
	return string(out), nil
}

// rss returns the resident set size of pid in bytes.
func rss(pid int) (int64, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb * 1024, err
		}
	}
	return 0, errors.New("no VmRSS") // a kernel thread or a zombie
}

// procName is the command name of pid.
func procName(pid int) string {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(data))
}
