package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/lab/netns"
)

// A lab's relays and pod servers live in the process that started it, so a
// lab that outlives a command runs under a supervisor: a process that owns
// the Lab until it is told to stop (SIGTERM), and that records itself in
// SupervisorFile next to the state file.

// SupervisorFile is the supervisor's record in the lab directory.
const SupervisorFile = "supervisor.json"

// SupervisorLog is where the supervisor's output goes in the lab directory.
const SupervisorLog = "supervisor.log"

// Phases of a supervisor.
const (
	PhaseStarting = "starting"
	PhaseReady    = "ready"
	PhaseFailed   = "failed"
	PhaseStopping = "stopping"
	PhaseDown     = "down"
)

// Process is a process of the lab. Start (clock ticks after boot, field 22
// of /proc/PID/stat) tells it from a later process that reuses its PID.
type Process struct {
	PID   int    `json:"pid"`
	Start uint64 `json:"start"`
	Name  string `json:"name"`
}

// Running reports whether the process is still there (a zombie is not).
func (p Process) Running() bool {
	st, err := readStat(p.PID)
	return err == nil && st.state != 'Z' && (p.Start == 0 || st.start == p.Start)
}

// SupervisorState is the supervisor's record.
type SupervisorState struct {
	Process
	Prefix string `json:"prefix"`
	Dir    string `json:"dir"`
	Nodes  int    `json:"nodes"`
	// Phase is one of the Phase constants; Step says what a starting
	// supervisor is doing, Error why a failed one failed.
	Phase string `json:"phase"`
	Step  string `json:"step,omitempty"`
	Error string `json:"error,omitempty"`
	// Processes are the supervisor's children once the lab is ready:
	// etcd, kube-apiserver, the agents and the pods' servers.
	Processes []Process `json:"processes,omitempty"`
	Updated   time.Time `json:"updated"`
}

// IsSupervisor reports whether the record's process is running and is a
// supervisor (its command line holds "lab supervise"), not a process that
// reused its PID.
func (s *SupervisorState) IsSupervisor() bool {
	if s == nil || s.PID <= 0 || !s.Running() {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", s.PID))
	return err == nil && bytes.Contains(cmdline, []byte("lab\x00supervise"))
}

// ReadSupervisor reads the supervisor's record in dir; the error wraps
// os.ErrNotExist when there is none.
func ReadSupervisor(dir string) (*SupervisorState, error) {
	raw, err := os.ReadFile(filepath.Join(dir, SupervisorFile))
	if err != nil {
		return nil, fmt.Errorf("read lab supervisor record: %w", err)
	}
	var s SupervisorState
	if err := json.Unmarshal(raw, &s); err != nil {
		return nil, fmt.Errorf("decode lab supervisor record %s: %w", filepath.Join(dir, SupervisorFile), err)
	}
	return &s, nil
}

// SuperviseOptions configure Supervise.
type SuperviseOptions struct {
	Prefix string
	Nodes  int
	// Dir is the lab directory; the binaries are built into Dir/bin.
	Dir string
	// StrictMode sets the ConfigMap's strict-mode (Helm value
	// encryption.strictMode) to true for the agents.
	StrictMode bool
	Log        *slog.Logger
}

// Supervise builds the binaries, starts a lab with its demo and runs it
// until ctx ends, then stops it. Its progress is in Dir/SupervisorFile.
func Supervise(ctx context.Context, opts SuperviseOptions) error {
	log := opts.Log
	if log == nil {
		log = slog.Default()
	}
	self, err := readStat(os.Getpid())
	if err != nil {
		return err
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return fmt.Errorf("create lab dir: %w", err)
	}
	s := &SupervisorState{
		Process: Process{PID: os.Getpid(), Start: self.start, Name: "supervisor"},
		Prefix:  opts.Prefix, Dir: opts.Dir, Nodes: opts.Nodes, Phase: PhaseStarting,
	}
	step := func(what string) error {
		log.Info("lab supervisor", "step", what)
		s.Step = what
		return s.write()
	}
	l, err := superviseStart(ctx, opts, step)
	if err != nil {
		log.Error("lab supervisor: start failed", "err", err)
		s.Phase, s.Error = PhaseFailed, err.Error()
		return errors.Join(err, s.write())
	}
	s.Phase, s.Step, s.Processes = PhaseReady, "", children(os.Getpid())
	if err := s.write(); err != nil {
		return errors.Join(err, l.Stop())
	}
	log.Info("lab supervisor: ready", "prefix", opts.Prefix, "dir", opts.Dir, "processes", len(s.Processes))
	<-ctx.Done()
	log.Info("lab supervisor: stopping", "cause", context.Cause(ctx))
	s.Phase = PhaseStopping
	werr := s.write()
	stopErr := l.Stop()
	s.Phase = PhaseDown
	if stopErr != nil {
		s.Error = stopErr.Error()
	}
	log.Info("lab supervisor: stopped", "err", stopErr)
	return errors.Join(stopErr, werr, s.write())
}

func superviseStart(ctx context.Context, opts SuperviseOptions, step func(string) error) (*Lab, error) {
	if err := step("building veil-agent and veil-cni"); err != nil {
		return nil, err
	}
	binDir := filepath.Join(opts.Dir, "bin")
	if err := os.MkdirAll(binDir, 0o700); err != nil {
		return nil, fmt.Errorf("create lab bin dir: %w", err)
	}
	agentBin, cniBin, err := Build(ctx, binDir)
	if err != nil {
		return nil, err
	}
	if err := step("building etcd and kube-apiserver (cached after the first run, which takes up to 30 minutes)"); err != nil {
		return nil, err
	}
	if _, err := controlplane.Build(ctx); err != nil {
		return nil, err
	}
	if err := step(fmt.Sprintf("starting the control plane and %d nodes", opts.Nodes)); err != nil {
		return nil, err
	}
	lo := Options{Prefix: opts.Prefix, Nodes: opts.Nodes, Dir: opts.Dir, AgentBin: agentBin, CNIBin: cniBin}
	if opts.StrictMode {
		lo.AgentEnv = func(*Node) map[string]string { return map[string]string{"VEIL_STRICT_MODE": "true"} }
	}
	l, err := Start(ctx, lo)
	if err != nil {
		return nil, err
	}
	if err := step("starting the demo pods and policy"); err != nil {
		return nil, errors.Join(err, l.Stop())
	}
	if err := l.StartDemo(ctx); err != nil {
		return nil, errors.Join(err, l.Stop())
	}
	return l, nil
}

func (s *SupervisorState) write() error {
	s.Updated = time.Now().UTC()
	raw, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encode lab supervisor record: %w", err)
	}
	path := filepath.Join(s.Dir, SupervisorFile)
	if err := os.WriteFile(path+".tmp", append(raw, '\n'), 0o600); err != nil {
		return fmt.Errorf("write lab supervisor record: %w", err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		return fmt.Errorf("write lab supervisor record: %w", err)
	}
	return nil
}

// children lists the running children of pid, from every thread's list.
func children(pid int) []Process {
	lists, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	var out []Process
	seen := map[int]bool{}
	for _, l := range lists {
		raw, err := os.ReadFile(l)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(raw)) {
			c, err := strconv.Atoi(f)
			if err != nil || seen[c] {
				continue
			}
			seen[c] = true
			st, err := readStat(c)
			if err != nil || st.state == 'Z' {
				continue
			}
			out = append(out, Process{PID: c, Start: st.start, Name: processName(c, st.comm)})
		}
	}
	return out
}

// processName is the base name of the program a process runs.
func processName(pid int, comm string) string {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err == nil {
		if argv0, _, _ := bytes.Cut(cmdline, []byte{0}); len(argv0) > 0 {
			return filepath.Base(string(argv0))
		}
	}
	return comm
}

type procStat struct {
	comm  string
	state byte
	start uint64
}

// readStat reads a process's name, state and start time from
// /proc/PID/stat; the error wraps os.ErrNotExist when it is gone.
func readStat(pid int) (procStat, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, fmt.Errorf("read process %d: %w", pid, err)
	}
	// The name is in parentheses and may hold anything, spaces included.
	open, end := bytes.IndexByte(raw, '('), bytes.LastIndexByte(raw, ')')
	if open < 0 || end < open {
		return procStat{}, fmt.Errorf("read process %d: malformed stat %q", pid, raw)
	}
	fields := strings.Fields(string(raw[end+1:]))
	// fields[0] is field 3 (state); the start time is field 22.
	if len(fields) < 20 || len(fields[0]) != 1 {
		return procStat{}, fmt.Errorf("read process %d: malformed stat %q", pid, raw)
	}
	start, err := strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("read process %d: start time: %w", pid, err)
	}
	return procStat{comm: string(raw[open+1 : end]), state: fields[0][0], start: start}, nil
}

// ErrNoLab is returned by Down when dir holds no lab and no prefix is given.
var ErrNoLab = errors.New("no lab")

// Down stops the lab of dir and removes everything it created, also when
// its supervisor crashed: the supervisor is stopped (SIGTERM, then SIGKILL
// after stopGrace), the lab's processes that outlived it are killed by PID
// (the supervisor's recorded children, the state file's agents, whatever
// runs in the lab's cgroups), then Cleanup removes what carries the prefix,
// and the lab's files go from dir. prefix, when set, overrides the one the
// lab recorded. Down returns an error naming what is left, if anything.
func Down(ctx context.Context, dir, prefix string, stopGrace time.Duration) error {
	sup, supErr := ReadSupervisor(dir)
	if supErr != nil && !errors.Is(supErr, os.ErrNotExist) {
		return supErr
	}
	st, stErr := ReadState(dir)
	if stErr != nil && !errors.Is(stErr, os.ErrNotExist) {
		return stErr
	}
	if prefix == "" && sup != nil {
		prefix = sup.Prefix
	}
	if prefix == "" && st != nil {
		prefix = st.Prefix
	}
	if prefix == "" {
		return fmt.Errorf("lab down: %w in %s (no %s, no %s)", ErrNoLab, dir, SupervisorFile, StateFile)
	}
	if len(prefix) < 8 {
		return fmt.Errorf("lab down: prefix %q is too short to be safe", prefix)
	}
	var errs []error
	if sup.IsSupervisor() {
		errs = append(errs, stopProcess(ctx, sup.Process, stopGrace))
	}
	errs = append(errs, killLeftovers(ctx, dir, prefix, sup, st))
	errs = append(errs, cleanupWithLabAgent(ctx, dir, prefix))
	if sup != nil || st != nil {
		errs = append(errs, removeFiles(dir, st))
	}
	if left := Leftovers(prefix); len(left) > 0 {
		errs = append(errs, fmt.Errorf("lab down: left behind: %s", strings.Join(left, ", ")))
	}
	return errors.Join(errs...)
}

// cleanupWithLabAgent runs Cleanup with the lab's own veil-agent binary
// (DIR/bin). When that is gone (a lab that crashed before building it, or
// down --prefix with another dir) and a node left pins, a veil-agent is
// built from the checkout into a scratch directory for the cleanup.
func cleanupWithLabAgent(ctx context.Context, dir, prefix string) error {
	agentBin := filepath.Join(dir, "bin", "veil-agent")
	if _, err := os.Stat(agentBin); err != nil {
		agentBin = ""
	}
	if agentBin == "" && len(pinnedNodes(prefix)) > 0 {
		scratch, err := os.MkdirTemp("", "veil-lab-agent-")
		if err != nil {
			return fmt.Errorf("lab down: build veil-agent for cleanup: %w", err)
		}
		defer os.RemoveAll(scratch)
		agentBin = filepath.Join(scratch, "veil-agent")
		if err := build(ctx, map[string]string{agentBin: "./agent/cmd/veil-agent"}); err != nil {
			return fmt.Errorf("lab down: build veil-agent for cleanup: %w", err)
		}
	}
	return Cleanup(ctx, prefix, agentBin)
}

// stopProcess sends SIGTERM and waits up to grace, then SIGKILLs.
func stopProcess(ctx context.Context, p Process, grace time.Duration) error {
	if err := syscall.Kill(p.PID, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("stop %s (pid %d): %w", p.Name, p.PID, err)
	}
	if waitGone(ctx, []Process{p}, grace) {
		return nil
	}
	if p.Running() {
		if err := syscall.Kill(p.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("kill %s (pid %d): %w", p.Name, p.PID, err)
		}
	}
	if !waitGone(ctx, []Process{p}, 10*time.Second) {
		return fmt.Errorf("stop %s (pid %d): still running after SIGKILL", p.Name, p.PID)
	}
	return nil
}

// waitGone polls until none of procs runs, for at most d.
func waitGone(ctx context.Context, procs []Process, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		running := false
		for _, p := range procs {
			if p.Running() {
				running = true
				break
			}
		}
		if !running {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// killLeftovers SIGKILLs the lab's processes that are still running: each
// is known by PID and checked to be the lab's (start time, agent binary, or
// membership of a cgroup the lab created).
func killLeftovers(ctx context.Context, dir, prefix string, sup *SupervisorState, st *State) error {
	var procs []Process
	if sup != nil {
		for _, p := range sup.Processes {
			if p.Running() {
				procs = append(procs, p)
			}
		}
	}
	if st != nil {
		agentBin := filepath.Join(dir, "bin", "veil-agent")
		for _, n := range st.Nodes {
			if n.AgentPID <= 0 {
				continue
			}
			s, err := readStat(n.AgentPID)
			if err != nil || s.state == 'Z' {
				continue
			}
			if argv0(n.AgentPID) == agentBin {
				procs = append(procs, Process{PID: n.AgentPID, Start: s.start, Name: "veil-agent"})
			}
		}
	}
	procs = append(procs, cgroupProcesses(prefix)...)
	var errs []error
	for _, p := range procs {
		if err := syscall.Kill(p.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("kill %s (pid %d): %w", p.Name, p.PID, err))
		}
	}
	if !waitGone(ctx, procs, 10*time.Second) {
		errs = append(errs, errors.New("lab down: processes of the lab still run after SIGKILL"))
	}
	return errors.Join(errs...)
}

func argv0(pid int) string {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return ""
	}
	a, _, _ := bytes.Cut(cmdline, []byte{0})
	return string(a)
}

// cgroupProcesses lists the processes in the lab's cgroup tree.
func cgroupProcesses(prefix string) []Process {
	mount, err := netns.Cgroup2Mount()
	if err != nil {
		return nil
	}
	var out []Process
	filepath.WalkDir(filepath.Join(mount, prefix), func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
			return nil
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			return nil
		}
		for _, f := range strings.Fields(string(raw)) {
			pid, err := strconv.Atoi(f)
			if err != nil {
				continue
			}
			if s, err := readStat(pid); err == nil {
				out = append(out, Process{PID: pid, Start: s.start, Name: processName(pid, s.comm)})
			}
		}
		return nil
	})
	return out
}

// removeFiles removes the lab's files from dir, by the names the lab gives
// them, then dir itself if that left it empty.
func removeFiles(dir string, st *State) error {
	var errs []error
	names := []string{StateFile, StateFile + ".tmp", SupervisorFile, SupervisorFile + ".tmp", SupervisorLog, "bin"}
	if st != nil {
		for _, n := range st.Nodes {
			names = append(names, n.Name)
		}
	}
	nodes, _ := filepath.Glob(filepath.Join(dir, "node-[0-9]*"))
	cps, _ := filepath.Glob(filepath.Join(dir, "veil-controlplane-*"))
	for _, p := range append(nodes, cps...) {
		names = append(names, filepath.Base(p))
	}
	for _, name := range names {
		if name == "" || strings.ContainsRune(name, os.PathSeparator) || name == "." || name == ".." {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, name)); err != nil {
			errs = append(errs, fmt.Errorf("remove lab file: %w", err))
		}
	}
	// Only an empty dir goes; anything else in it is not the lab's.
	if err := syscall.Rmdir(dir); err != nil && !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.EEXIST) {
		errs = append(errs, fmt.Errorf("remove lab dir %s: %w", dir, err))
	}
	return errors.Join(errs...)
}

// Leftovers lists what of a lab with prefix is on the host: network
// namespaces, bpffs roots, its cgroup, WireGuard control sockets.
func Leftovers(prefix string) []string {
	var left []string
	if entries, err := os.ReadDir(netns.NetnsDir); err == nil {
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), prefix+"-") {
				left = append(left, "netns "+e.Name())
			}
		}
	}
	pins, _ := filepath.Glob(filepath.Join(bpffsDir, prefix+"-*"))
	for _, p := range pins {
		left = append(left, "bpffs "+p)
	}
	if mount, err := netns.Cgroup2Mount(); err == nil {
		if _, err := os.Stat(filepath.Join(mount, prefix)); err == nil {
			left = append(left, "cgroup "+filepath.Join(mount, prefix))
		}
	}
	socks, _ := filepath.Glob(filepath.Join("/var/run/wireguard", wgName(prefix, "")+"*.sock"))
	for _, s := range socks {
		left = append(left, "wireguard socket "+s)
	}
	return left
}
