package cli

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"

	"github.com/spf13/cobra"

	labcluster "github.com/veilmesh/veil/lab/cluster"
)

// Where the lab lives unless told otherwise.
const (
	envLabDir        = "VEIL_LAB_DIR"
	defaultLabPrefix = "veillab"
	// labMaxNodes bounds --nodes: each node runs containerd, kubelet and
	// an agent on this host.
	labMaxNodes = 16
)

// defaultLabDir is the lab's directory without --dir or $VEIL_LAB_DIR. Not
// below /var/lib or /run: the lab's nodes mount their own there.
func defaultLabDir() string { return filepath.Join(os.TempDir(), "veil-lab") }

// shellSafe is what a POSIX shell takes unquoted.
var shellSafe = regexp.MustCompile(`^[A-Za-z0-9_@%+=:,./-]+$`)

// labDeps is what the lab commands take from the process; tests
// substitute their own.
type labDeps struct {
	getenv     func(string) string
	geteuid    func() int
	executable func() (string, error)
}

func processLabDeps(env agentEnv) labDeps {
	return labDeps{getenv: env.getenv, geteuid: os.Geteuid, executable: os.Executable}
}

// labOptions are the flags every lab command shares.
type labOptions struct {
	deps labDeps
	dir  string
}

// labDir is --dir, else $VEIL_LAB_DIR, else the default, made absolute.
func (o *labOptions) labDir() (string, error) {
	dir := o.dir
	if dir == "" {
		dir = o.deps.getenv(envLabDir)
	}
	if dir == "" {
		dir = defaultLabDir()
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
		def = defaultLabDir()
	}
	if abs, err := filepath.Abs(def); err == nil && abs == dir {
		return ""
	}
	return " --dir " + shellQuote(dir)
}

func (o *labOptions) requireRoot(what string) error {
	if o.deps.geteuid() != 0 {
		return usageErrorf("lab %s needs root: the lab creates network and mount namespaces, cgroups and bpffs pins (run it with sudo)", what)
	}
	return nil
}

// readLab reads dir's lab record; nil without error when there is none.
func readLab(dir string) (*labcluster.LabState, error) {
	s, err := labcluster.ReadLabState(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, &exitError{code: ExitFailure, err: err}
	}
	return s, nil
}

// labPhase says in a few words where the lab is.
func labPhase(s *labcluster.LabState) string {
	switch {
	case s == nil:
		return "no lab"
	case s.Phase == labcluster.LabFailed:
		return "failed: " + s.Error + "; meshctl lab down cleans up"
	case !s.SupervisorRunning():
		return fmt.Sprintf("its supervisor (pid %d) is gone; meshctl lab down cleans up", s.Supervisor)
	}
	return s.Phase
}

// runningLab is the lab directory and its state; it fails (exit 1)
// unless a lab is up and ready there.
func (o *labOptions) runningLab() (string, *labcluster.LabState, error) {
	dir, err := o.labDir()
	if err != nil {
		return "", nil, err
	}
	s, err := readLab(dir)
	if err != nil {
		return "", nil, err
	}
	if s == nil {
		return "", nil, &exitError{code: ExitFailure, err: fmt.Errorf("no lab in %s: start one with meshctl lab up", dir)}
	}
	if s.Phase != labcluster.LabReady || !s.SupervisorRunning() {
		return "", nil, &exitError{code: ExitFailure, err: fmt.Errorf("the lab in %s is not running (%s): see meshctl lab status", dir, labPhase(s))}
	}
	return dir, s, nil
}

func newLabCommand(env agentEnv) *cobra.Command {
	return newLabCommandWith(processLabDeps(env))
}

func newLabCommandWith(deps labDeps) *cobra.Command {
	o := &labOptions{deps: deps}
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "Run Veil in a real Kubernetes cluster on this Linux host",
		Long: `The lab is a real Kubernetes cluster on one Linux host, as root, without
Docker or a registry: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler in a hub network namespace, and N nodes, each a network,
mount and UTS namespace with its own containerd, runc, kubelet and
(optionally) kube-proxy. Everything the project builds comes from the
checkout (Kubernetes, containerd and CoreDNS from pinned sources on the
first run, then cached). Veil is installed from its Helm chart in deploy/,
with the image of 'make image'; the cluster DNS and a demo (Deployments,
Services and policies) are applied through the API server.

The lab has no route out of itself and touches nothing of the host but
what it creates, all named after --prefix; 'lab down' removes all of it,
also after a crash.

The lab's directory (--dir, else $` + envLabDir + `, else ` + defaultLabDir() + `) holds its
record (` + labcluster.StateFile + `), the supervisor's log and socket (` + labcluster.ControlSocket + `),
and the cluster's kubeconfig, certificates, configs and logs.

Exit codes:
  0  success
  1  the lab failed: 'up' could not start it, 'down' left something behind,
     'status', 'env' and 'node add' found no running lab, 'node add' could
     not add the node
  2  usage error: bad flags or arguments, not root, no such pod
  'lab exec' exits with the command's exit code`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.PersistentFlags().StringVar(&o.dir, "dir", "", "the lab's directory (default $"+envLabDir+", else "+defaultLabDir()+")")
	cmd.AddCommand(newLabUpCommand(o), newLabDownCommand(o), newLabStatusCommand(o),
		newLabEnvCommand(o), newLabExecCommand(o), newLabNodeCommand(o), newLabSuperviseCommand(o))
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
