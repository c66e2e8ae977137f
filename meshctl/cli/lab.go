package cli

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/veilmesh/veil/lab"
	"github.com/veilmesh/veil/lab/netns"
)

// Where the lab lives unless told otherwise.
const (
	envLabDir        = "VEIL_LAB_DIR"
	defaultLabDir    = "/var/lib/veil-lab"
	defaultLabPrefix = "veil-lab"
	// labMaxNodes bounds --nodes: each node runs an agent on this host.
	labMaxNodes = 32
)

// labPrefixRE keeps names derived from the prefix valid and distinct:
// network namespaces, cgroups and bpffs roots are named "<prefix>-…".
var labPrefixRE = regexp.MustCompile(`^[a-z][a-z0-9-]{6,30}[a-z0-9]$`)

// shellSafe is what a POSIX shell takes unquoted.
var shellSafe = regexp.MustCompile(`^[A-Za-z0-9_@%+=:,./-]+$`)

// labDeps is what the lab commands take from the process; tests
// substitute their own.
type labDeps struct {
	getenv     func(string) string
	geteuid    func() int
	executable func() (string, error)
	// cgroupMount finds the cgroup v2 mount; netnsDir is where named
	// network namespaces are.
	cgroupMount func() (string, error)
	netnsDir    string
	// joinCgroup moves this process into the cgroup at path; execve
	// replaces it with argv (lab exec).
	joinCgroup func(path string) error
	execve     func(path string, argv, env []string) error
}

func processLabDeps(env agentEnv) labDeps {
	return labDeps{
		getenv:      env.getenv,
		geteuid:     os.Geteuid,
		executable:  os.Executable,
		cgroupMount: netns.Cgroup2Mount,
		netnsDir:    netns.NetnsDir,
		joinCgroup: func(path string) error {
			procs := filepath.Join(path, "cgroup.procs")
			if err := os.WriteFile(procs, []byte(fmt.Sprint(os.Getpid())), 0); err != nil {
				return fmt.Errorf("join cgroup %s: %w", path, err)
			}
			return nil
		},
		execve: syscall.Exec,
	}
}

// labOptions are the flags every lab command shares.
type labOptions struct {
	deps labDeps
	dir  string
}

// labDir is --dir, else $VEIL_LAB_DIR, else the default, made absolute:
// the supervisor and the state file name it.
func (o *labOptions) labDir() (string, error) {
	dir := o.dir
	if dir == "" {
		dir = o.deps.getenv(envLabDir)
	}
	if dir == "" {
		dir = defaultLabDir
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", usageErrorf("lab dir %q: %w", dir, err)
	}
	return abs, nil
}

// dirFlag is what the printed commands need to reach a lab that is not in
// the default place.
func (o *labOptions) dirFlag(dir string) string {
	def := o.deps.getenv(envLabDir)
	if def == "" {
		def = defaultLabDir
	}
	if abs, err := filepath.Abs(def); err == nil && abs == dir {
		return ""
	}
	return " --dir " + shellQuote(dir)
}

func (o *labOptions) requireRoot(what string) error {
	if o.deps.geteuid() != 0 {
		return usageErrorf("lab %s needs root: the lab creates network namespaces, cgroups and bpffs pins (run it with sudo)", what)
	}
	return nil
}

// labReading is what a lab directory says about its lab.
type labReading struct {
	dir   string
	sup   *lab.SupervisorState
	state *lab.State
}

// readLab reads dir's supervisor record and state file; either may be
// missing.
func readLab(dir string) (labReading, error) {
	r := labReading{dir: dir}
	var err error
	if r.sup, err = lab.ReadSupervisor(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return r, err
	}
	if r.state, err = lab.ReadState(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return r, err
	}
	return r, nil
}

// exists says whether dir holds a lab, running or not.
func (r labReading) exists() bool { return r.sup != nil || r.state != nil }

// running says whether the lab's supervisor is alive and its lab ready.
func (r labReading) running() bool {
	return r.sup.IsSupervisor() && r.sup.Phase == lab.PhaseReady && r.state != nil
}

// requireRunning fails (exit 1) unless the lab is up.
func (r labReading) requireRunning() error {
	switch {
	case !r.exists():
		return &exitError{code: ExitFailure, err: fmt.Errorf("no lab in %s: start one with meshctl lab up", r.dir)}
	case !r.running():
		return &exitError{code: ExitFailure, err: fmt.Errorf("the lab in %s is not running (%s): see meshctl lab status", r.dir, r.phase())}
	}
	return nil
}

// phase says in a few words where the lab is.
func (r labReading) phase() string {
	switch {
	case !r.exists():
		return "no lab"
	case r.sup == nil:
		return "no supervisor record"
	case r.sup.Phase == lab.PhaseFailed:
		first, _, _ := strings.Cut(r.sup.Error, "\n")
		return "failed to start: " + first + "; meshctl lab down cleans up"
	case !r.sup.IsSupervisor():
		return fmt.Sprintf("supervisor (pid %d) is gone; meshctl lab down cleans up", r.sup.PID)
	case r.sup.Phase == lab.PhaseStarting && r.sup.Step != "":
		return "starting: " + r.sup.Step
	}
	return r.sup.Phase
}

func newLabCommand(env agentEnv) *cobra.Command {
	return newLabCommandWith(processLabDeps(env))
}

func newLabCommandWith(deps labDeps) *cobra.Command {
	o := &labOptions{deps: deps}
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "Run Veil on this Linux host: a control plane, nodes, agents and demo pods",
		Long: `The lab runs Veil for real on one Linux host, as root: etcd and
kube-apiserver (built from source on the first run, then cached), N nodes as
network namespaces on a bridged underlay, one veil-agent per node started
with exactly the command, arguments and environment of the DaemonSet in
deploy/, demo pods in two namespaces and a sample policy.

Run it from a Veil checkout (it builds the binaries and the control plane
from there). The lab has no route out of itself and touches nothing of the
host but what it creates, all named after --prefix; 'lab down' removes all
of it, also after a crash.

The lab's directory (--dir, else $` + envLabDir + `, else ` + defaultLabDir + `) holds
its state file, kubeconfigs, agent sockets and logs.

Exit codes:
  0  success
  1  the lab failed: 'up' could not start it, 'down' left something behind,
     'status' and 'env' found no running lab
  2  usage error: bad flags or arguments, not root, a pod the lab does not
     have
  'lab exec' exits with the command's exit code`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.PersistentFlags().StringVar(&o.dir, "dir", "", "the lab's directory (default $"+envLabDir+", else "+defaultLabDir+")")
	cmd.AddCommand(newLabUpCommand(o), newLabDownCommand(o), newLabStatusCommand(o),
		newLabEnvCommand(o), newLabExecCommand(o), newLabSuperviseCommand(o))
	return cmd
}

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if shellSafe.MatchString(s) {
		return s
	}
	out := "'"
	for _, r := range s {
		if r == '\'' {
			out += `'\''`
		} else {
			out += string(r)
		}
	}
	return out + "'"
}
