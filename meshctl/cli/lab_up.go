package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/veilmesh/veil/lab"
)

func newLabUpCommand(o *labOptions) *cobra.Command {
	var (
		nodes  int
		prefix string
		wait   time.Duration
		strict bool
	)
	cmd := &cobra.Command{
		Use:   "up [--nodes N] [--dir DIR] [--prefix P]",
		Short: "Start the lab: control plane, nodes, agents, demo pods and policy",
		Long: `Start the lab and leave it running in the background: a supervisor
process (its log is DIR/` + lab.SupervisorLog + `) owns it until 'meshctl lab down'.

up builds veil-agent and veil-cni from the checkout it runs in and, on the
first run only, etcd and kube-apiserver from source (up to 30 minutes on two
cores; later runs take seconds). It then starts the control plane, N nodes
with one agent each, the demo pods

  demo/frontend  on node-1
  demo/backend   on node-2 (node-1 with --nodes 1)
  other/client   on node-1

each serving an echo server on 80/TCP and 81/UDP, and a sample policy: a
NetworkPolicy by which demo/backend accepts only demo/frontend on 80/TCP,
and an audit-mode MeshPolicy. up returns once the datapath enforces the
policy, and prints what runs and what to try next.

The agents run with the DaemonSet's command, arguments and environment;
the one setting the lab changes is the ConfigMap's strict-mode, set to true
(--strict-mode=false keeps the chart's default, false).`,
		Example: `  sudo meshctl lab up
  sudo meshctl lab up --nodes 3 --dir /tmp/lab --prefix veil-lab-b`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkLabUpFlags(nodes, prefix, wait); err != nil {
				return err
			}
			if err := o.requireRoot("up"); err != nil {
				return err
			}
			dir, err := o.labDir()
			if err != nil {
				return err
			}
			if err := checkLabFree(o.deps.netnsDir, dir, prefix); err != nil {
				return err
			}
			if err := checkLabSources(); err != nil {
				return err
			}
			return labUp(cmd, o, dir, prefix, nodes, strict, wait)
		},
	}
	cmd.Flags().IntVar(&nodes, "nodes", 2, fmt.Sprintf("number of nodes (1 to %d)", labMaxNodes))
	cmd.Flags().StringVar(&prefix, "prefix", defaultLabPrefix, "names everything the lab creates on the host (8 to 32 of a-z, 0-9, '-')")
	cmd.Flags().BoolVar(&strict, "strict-mode", true, "run the agents with the ConfigMap's strict-mode set to true (Helm value encryption.strictMode), as 'audit encryption' expects; false keeps the chart's default")
	cmd.Flags().DurationVar(&wait, "wait", 30*time.Minute, "how long to wait for the lab to be ready (the first run builds the control plane)")
	return cmd
}

func checkLabUpFlags(nodes int, prefix string, wait time.Duration) error {
	if nodes < 1 || nodes > labMaxNodes {
		return usageErrorf("--nodes %d: want 1 to %d", nodes, labMaxNodes)
	}
	if !labPrefixRE.MatchString(prefix) {
		return usageErrorf("--prefix %q: want 8 to 32 of a-z, 0-9 and '-', starting with a letter and not ending with '-'", prefix)
	}
	if wait <= 0 {
		return usageErrorf("--wait must be positive")
	}
	return nil
}

// checkLabFree refuses to start over a lab: one running in dir, one that
// crashed there, or any lab on the host with the same prefix (starting
// would remove its namespaces).
func checkLabFree(netnsDir, dir, prefix string) error {
	r, err := readLab(dir)
	if err != nil {
		return &exitError{code: ExitFailure, err: err}
	}
	switch {
	case r.sup.IsSupervisor():
		return &exitError{code: ExitFailure, err: fmt.Errorf("a lab is already up in %s (prefix %s, supervisor pid %d): see meshctl lab status, or take it down with meshctl lab down", dir, r.sup.Prefix, r.sup.PID)}
	case r.exists():
		return &exitError{code: ExitFailure, err: fmt.Errorf("the lab in %s did not shut down cleanly (%s): run meshctl lab down first", dir, r.phase())}
	}
	// Every lab has an underlay namespace <prefix>-ul. Cleanup goes by
	// prefix, so a prefix that extends another lab's (or that another
	// lab's extends) would reach into that lab.
	entries, err := os.ReadDir(netnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return &exitError{code: ExitFailure, err: fmt.Errorf("list network namespaces: %w", err)}
	}
	for _, e := range entries {
		other, ok := strings.CutSuffix(e.Name(), "-ul")
		if !ok {
			continue
		}
		switch {
		case other == prefix:
			return &exitError{code: ExitFailure, err: fmt.Errorf("prefix %s is in use on this host (network namespace %s exists): take that lab down (meshctl lab down --dir ITS_DIR, or --prefix %s) or choose another --prefix", prefix, e.Name(), prefix)}
		case strings.HasPrefix(other, prefix+"-") || strings.HasPrefix(prefix, other+"-"):
			return &exitError{code: ExitFailure, err: fmt.Errorf("prefix %s overlaps the prefix %s of a lab on this host (network namespace %s): the lab removes what carries its prefix, so choose a --prefix that neither starts the other nor starts with it", prefix, other, e.Name())}
		}
	}
	return nil
}

var veilModule = regexp.MustCompile(`(?m)^module\s+github\.com/veilmesh/veil\s*$`)

// checkLabSources fails early when the lab cannot be built here: it builds
// the agent and the control plane from the Veil checkout that holds the
// working directory, with the go command.
func checkLabSources() error {
	if _, err := exec.LookPath("go"); err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("lab up builds Veil from source and needs the go command in PATH (%w); sudo resets PATH: sudo env PATH=\"$PATH\" meshctl lab up, or make lab", err)}
	}
	wd, err := os.Getwd()
	if err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("lab up: working directory: %w", err)}
	}
	for d := wd; ; d = filepath.Dir(d) {
		if mod, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && veilModule.Match(mod) {
			return nil
		}
		if filepath.Dir(d) == d {
			return &exitError{code: ExitFailure, err: fmt.Errorf("lab up builds Veil from source: run it inside a Veil checkout (%s is not)", wd)}
		}
	}
}

// labUp starts the supervisor and waits until it is ready or failed.
func labUp(cmd *cobra.Command, o *labOptions, dir, prefix string, nodes int, strict bool, wait time.Duration) error {
	out, errw := cmd.OutOrStdout(), cmd.ErrOrStderr()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("create lab dir: %w", err)}
	}
	exe, err := o.deps.executable()
	if err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("find the meshctl binary: %w", err)}
	}
	logPath := filepath.Join(dir, lab.SupervisorLog)
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("create supervisor log: %w", err)}
	}
	defer logf.Close()
	sup := exec.Command(exe, "lab", "supervise", "--dir", dir, "--prefix", prefix, "--nodes", strconv.Itoa(nodes), "--strict-mode="+strconv.FormatBool(strict))
	sup.Stdout, sup.Stderr = logf, logf
	// Its own session: the terminal's ^C and hang-up do not reach it, and
	// it outlives this command.
	sup.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := sup.Start(); err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("start lab supervisor: %w", err)}
	}
	exited := make(chan error, 1)
	go func() { exited <- sup.Wait() }()
	fmt.Fprintf(out, "Starting lab %s in %s (supervisor pid %d, log %s).\n", prefix, dir, sup.Process.Pid, logPath)
	fmt.Fprintf(out, "The first run builds etcd and kube-apiserver from source: up to 30 minutes; later runs take seconds.\n")

	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	// abort stops a supervisor that up gives up on, which stops the lab.
	// After a timeout the files stay for a look at the log; an interrupted
	// up leaves nothing.
	abort := func(why error, interrupted bool) error {
		fmt.Fprintf(errw, "meshctl: %v; stopping the lab\n", why)
		sup.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(3 * time.Minute):
			sup.Process.Kill()
			<-exited
		}
		if interrupted {
			dctx, dcancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer dcancel()
			if err := lab.Down(dctx, dir, prefix, time.Minute); err != nil && !errors.Is(err, lab.ErrNoLab) {
				return &exitError{code: ExitFailure, err: fmt.Errorf("lab up: %w; removing the lab: %w", why, err)}
			}
			return &exitError{code: ExitFailure, err: fmt.Errorf("lab up: %w; the lab was removed", why)}
		}
		fmt.Fprintf(errw, "last lines of %s:\n%s\n", logPath, fileTail(logPath, 40))
		return &exitError{code: ExitFailure, err: fmt.Errorf("lab up: %w; meshctl lab down%s removes what is left", why, o.dirFlag(dir))}
	}
	lastStep := ""
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-exited:
			r, _ := readLab(dir)
			why := fmt.Errorf("supervisor exited: %v", err)
			if r.sup != nil && r.sup.Error != "" {
				// Its first line; the log has the rest.
				first, _, _ := strings.Cut(r.sup.Error, "\n")
				why = errors.New(first)
			}
			fmt.Fprintf(errw, "last lines of %s:\n%s\n", logPath, fileTail(logPath, 40))
			return &exitError{code: ExitFailure, err: fmt.Errorf("lab up failed: %w; meshctl lab down%s removes what is left", why, o.dirFlag(dir))}
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return abort(fmt.Errorf("the lab was not ready within %s (--wait)", wait), false)
			}
			return abort(errors.New("interrupted"), true)
		case <-tick.C:
		}
		r, err := readLab(dir)
		if err != nil || r.sup == nil {
			continue
		}
		if r.sup.Step != "" && r.sup.Step != lastStep {
			lastStep = r.sup.Step
			fmt.Fprintf(out, "  … %s\n", lastStep)
		}
		if r.sup.Phase == lab.PhaseReady && r.state != nil {
			fmt.Fprintln(out)
			return writeLabSummary(out, r, o.dirFlag(dir))
		}
	}
}

// writeLabSummary says what runs and what to try next.
func writeLabSummary(w io.Writer, r labReading, dirFlag string) error {
	st := r.state
	fmt.Fprintf(w, "Lab %s is up (supervisor pid %d). Kubeconfig: %s\n\n", st.Prefix, r.sup.PID, st.Kubeconfig)
	if err := writeLabTables(w, st, nil); err != nil {
		return err
	}
	fmt.Fprintln(w, "\nPolicy:")
	for _, p := range lab.DemoPolicies() {
		fmt.Fprintf(w, "  %s %s: %s\n", p.Kind, p.Name, p.Says)
	}
	backend := "BACKEND_IP"
	for _, p := range st.Pods {
		if p.Pod == "demo/backend" && p.IP != "" {
			backend = p.IP
		}
	}
	fmt.Fprintf(w, `
Try next (as root; the commands after 'lab exec --' come from this host):
  eval $(meshctl lab env%[1]s)
  kubectl get pods,networkpolicies,meshpolicies -A
  meshctl --node node-1 status
  meshctl policy trace --from demo/frontend --to demo/backend --port 80    # ALLOWED by the NetworkPolicy
  meshctl policy trace --from other/client --to demo/backend --port 80     # DENIED
  meshctl policy trace --from other/client --to demo/frontend --port 80    # ALLOWED; the audit MeshPolicy would deny
  echo hi | meshctl lab exec%[1]s demo/frontend -- socat -T1 - TCP:%[2]s:80,connect-timeout=2   # allowed: echoes hi
  echo hi | meshctl lab exec%[1]s other/client -- socat -T1 - TCP:%[2]s:80,connect-timeout=2    # denied: times out
  meshctl observe --node %[3]s --verdict DENIED
  meshctl audit encryption --active
  meshctl lab status%[1]s
  meshctl lab down%[1]s
`, dirFlag, backend, backendNode(st))
	return nil
}

func backendNode(st *lab.State) string {
	for _, p := range st.Pods {
		if p.Pod == "demo/backend" {
			return p.Node
		}
	}
	return "node-1"
}

// writeLabTables renders the nodes and pods; alive, when set, says
// whether a process runs.
func writeLabTables(w io.Writer, st *lab.State, alive func(pid int) bool) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tNETNS\tUNDERLAY\tPOD CIDR\tAGENT PID\tSOCKET")
	for _, n := range st.Nodes {
		pid := strconv.Itoa(n.AgentPID)
		if alive != nil && !alive(n.AgentPID) {
			pid += " (gone)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s %s\t%s\t%s\t%s\n", n.Name, n.Netns, n.Underlay, n.IP, n.PodCIDR, pid, n.Socket)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write lab nodes: %w", err)
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tNODE\tIP\tNETNS")
	for _, p := range st.Pods {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Pod, p.Node, p.IP, p.Netns)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write lab pods: %w", err)
	}
	return nil
}

// fileTail is the last n lines of a file, for error messages.
func fileTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(read %s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
