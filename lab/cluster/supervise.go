package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A lab that outlives the command that started it (`meshctl lab up`)
// runs under a supervisor: a process that owns the cluster (its processes
// are the supervisor's children, and the API server's relay is in it)
// until SIGTERM, and records the lab in StateFile in the lab's dir. The
// cluster's working dir is ClusterDir below it.

// Files in a lab's dir.
const (
	StateFile     = "lab.json"
	SupervisorLog = "supervisor.log"
	// ClusterDir is the cluster's working dir (Options.Dir) in a lab's dir.
	ClusterDir = "cluster"
)

// Phases of a supervised lab.
const (
	LabStarting = "starting"
	LabReady    = "ready"
	LabFailed   = "failed"
	LabStopping = "stopping"
)

// LabState is a supervised lab's record.
type LabState struct {
	Prefix     string        `json:"prefix"`
	Dir        string        `json:"dir"`
	Kubeconfig string        `json:"kubeconfig,omitempty"`
	KubeProxy  KubeProxyMode `json:"kubeProxy"`
	StrictMode bool          `json:"strictMode"`
	// Supervisor is the supervisor's PID; SupervisorStart its start time
	// (clock ticks after boot), which tells it from a later process that
	// reuses the PID.
	Supervisor      int    `json:"supervisor"`
	SupervisorStart uint64 `json:"supervisorStart"`
	// Phase is one of the Lab* constants; Error says why a failed lab
	// failed.
	Phase string `json:"phase"`
	Error string `json:"error,omitempty"`
	// Phases are the bring-up's steps so far; Total the whole bring-up.
	Phases []Phase        `json:"phases"`
	Total  time.Duration  `json:"totalNs,omitempty"`
	Nodes  []LabNodeState `json:"nodes,omitempty"`
}

// LabNodeState is a node of a supervised lab.
type LabNodeState struct {
	Name    string `json:"name"`
	IP      string `json:"ip"`
	PodCIDR string `json:"podCIDR"`
	Netns   string `json:"netns"`
}

// ReadLabState reads the record of the lab in dir; the error wraps
// fs.ErrNotExist when there is none.
func ReadLabState(dir string) (*LabState, error) {
	raw, err := os.ReadFile(filepath.Join(dir, StateFile))
	if err != nil {
		return nil, fmt.Errorf("read lab state: %w", err)
	}
	var s LabState
	if err := json.Unmarshal(raw, &s); err != nil {
		return nil, fmt.Errorf("decode lab state %s: %w", filepath.Join(dir, StateFile), err)
	}
	return &s, nil
}

// write replaces the record atomically: readers never see half of it.
func (s *LabState) write() error {
	raw, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encode lab state: %w", err)
	}
	tmp := filepath.Join(s.Dir, StateFile+".tmp")
	if err := os.WriteFile(tmp, append(raw, '\n'), 0o600); err != nil {
		return fmt.Errorf("write lab state: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(s.Dir, StateFile)); err != nil {
		return fmt.Errorf("write lab state: %w", err)
	}
	return nil
}

// addNode records a node added to the running lab.
func (s *LabState) addNode(n LabNodeState) error {
	s.Nodes = append(s.Nodes, n)
	return s.write()
}

// SupervisorRunning reports whether the record's supervisor is alive: the
// same process (PID and start time), not a zombie.
func (s *LabState) SupervisorRunning() bool {
	if s == nil || s.Supervisor <= 0 {
		return false
	}
	start, state, err := procStat(s.Supervisor)
	return err == nil && state != 'Z' && start == s.SupervisorStart
}

// procStat returns a process's start time (clock ticks after boot) and
// state letter from /proc/PID/stat.
func procStat(pid int) (uint64, byte, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// pid (comm) state ppid … starttime is field 22; comm may hold spaces
	// and parentheses, so count from the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
	}
	return start, f[0][0], nil
}

// Supervise brings up a lab in dir (Up, with opts.Dir set to dir's
// ClusterDir), records its progress in dir's StateFile, and runs it until
// ctx ends; then it stops the lab and removes the record. A failed
// bring-up is recorded (Phase LabFailed) and returned.
func Supervise(ctx context.Context, dir string, opts UpOptions, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	start, _, err := procStat(os.Getpid())
	if err != nil {
		return fmt.Errorf("lab supervisor: %w", err)
	}
	opts.Dir = filepath.Join(dir, ClusterDir)
	mode, err := ParseKubeProxyMode(string(opts.KubeProxy))
	if err != nil {
		return err
	}
	s := &LabState{
		Prefix: opts.Prefix, Dir: dir, KubeProxy: mode, StrictMode: opts.StrictMode,
		Supervisor: os.Getpid(), SupervisorStart: start, Phase: LabStarting, Phases: []Phase{},
	}
	if err := s.write(); err != nil {
		return err
	}
	progress := opts.Progress
	opts.Progress = func(p Phase) {
		log.Info("lab bring-up", "phase", p.Name, "took", p.Took.Round(time.Millisecond))
		s.Phases = append(s.Phases, p)
		if err := s.write(); err != nil {
			log.Error("lab supervisor: record progress", "err", err)
		}
		if progress != nil {
			progress(p)
		}
	}
	if opts.Logger == nil {
		opts.Logger = log
	}
	c, err := Up(ctx, opts)
	if err != nil {
		s.Phase, s.Error = LabFailed, err.Error()
		return errors.Join(err, s.write())
	}
	s.Phase, s.Total, s.Kubeconfig = LabReady, c.Startup, c.Kubeconfig
	for _, nd := range c.Nodes {
		s.Nodes = append(s.Nodes, labNode(nd))
	}
	// Requests (lab node add) on the control socket, until ctx ends. It
	// listens before the record says ready: a client that reads ready
	// finds it. A lab without it (say, a dir whose path is too long for a
	// socket) still runs; it only cannot add nodes.
	sock := filepath.Join(dir, ControlSocket)
	l, lerr := ListenControl(sock)
	if lerr != nil {
		log.Warn("lab supervisor: no control socket: lab node add will not reach this lab", "err", lerr)
	}
	if err := s.write(); err != nil {
		if l != nil {
			l.Close()
			os.Remove(sock)
		}
		return errors.Join(err, c.Stop())
	}
	served := make(chan struct{})
	go func() {
		// The record is this goroutine's until it ends: Supervise touches
		// it again only after <-served.
		defer close(served)
		if l == nil {
			return
		}
		if err := ServeControl(ctx, l, ControlHandler{AddNode: ClusterNodeAdder(c, s.addNode)}, log); err != nil {
			log.Error("lab supervisor: control socket", "err", err)
		}
	}()
	log.Info("lab ready", "prefix", s.Prefix, "dir", dir, "took", c.Startup.Round(time.Millisecond))
	<-ctx.Done()
	log.Info("lab stopping", "cause", context.Cause(ctx))
	<-served
	s.Phase = LabStopping
	werr := s.write()
	if err := c.Stop(); err != nil {
		s.Phase, s.Error = LabFailed, "stop: "+err.Error()
		return errors.Join(err, werr, s.write())
	}
	if err := os.Remove(filepath.Join(dir, StateFile)); err != nil {
		return fmt.Errorf("remove lab state: %w", err)
	}
	return werr
}

// ErrNoLab is Down's answer for a dir that holds no lab.
var ErrNoLab = errors.New("no lab")

// Down stops the lab in dir: SIGTERM to its supervisor (which stops the
// cluster), SIGKILL after grace; then Cleanup of whatever the cluster left
// (also after a crash), and the lab's files. prefix, when the record is
// missing, names the cluster to clean up after a crash before the record
// was written.
func Down(ctx context.Context, dir, prefix string, grace time.Duration) error {
	s, err := ReadLabState(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if prefix == "" {
			if _, err := os.Stat(filepath.Join(dir, ClusterDir)); errors.Is(err, fs.ErrNotExist) {
				return ErrNoLab
			}
			return fmt.Errorf("lab in %s has no record (%s): say which with --prefix", dir, StateFile)
		}
	case err != nil:
		return err
	default:
		prefix = s.Prefix
	}
	if s.SupervisorRunning() {
		p, err := os.FindProcess(s.Supervisor)
		if err == nil {
			p.Signal(syscall.SIGTERM)
		}
		deadline := time.Now().Add(grace)
		for s.SupervisorRunning() && time.Now().Before(deadline) && ctx.Err() == nil {
			time.Sleep(200 * time.Millisecond)
		}
		if s.SupervisorRunning() {
			// Its children die with it (Pdeathsig); Cleanup gets the rest.
			p.Signal(syscall.SIGKILL)
		}
	}
	if err := Cleanup(prefix, filepath.Join(dir, ClusterDir)); err != nil {
		return fmt.Errorf("clean up lab %s: %w", prefix, err)
	}
	for _, f := range []string{StateFile, StateFile + ".tmp", SupervisorLog, ControlSocket} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove lab file: %w", err)
		}
	}
	// The dir only if nothing else is in it: it may be the caller's.
	if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("remove lab dir: %w", err)
	}
	return nil
}
