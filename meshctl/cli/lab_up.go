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

	labcluster "github.com/veilmesh/veil/lab/cluster"
)

// labPrefixRE is lab/cluster's: names of namespaces and cgroups derive
// from it.
var labPrefixRE = regexp.MustCompile(`^[a-z0-9]{3,12}$`)

// labUpFlags are lab up's flags.
type labUpFlags struct {
	nodes     int
	prefix    string
	kubeProxy string
	strict    bool
	image     string
	wait      time.Duration
}

func newLabUpCommand(o *labOptions) *cobra.Command {
	f := labUpFlags{}
	cmd := &cobra.Command{
		Use:   "up [--nodes N] [--kube-proxy none|iptables|nftables] [--strict-mode] [--dir DIR]",
		Short: "Start the lab: a real cluster with Veil, cluster DNS and the demo",
		Long: `Start the lab and leave it running in the background: a supervisor
process (its log is DIR/` + labcluster.SupervisorLog + `) owns it until 'meshctl lab down'.

up brings up the control plane and N nodes (kubelet, containerd and, unless
--kube-proxy none, kube-proxy in the given mode), imports the lab's images
and Veil's (--image, which 'make image' builds), installs Veil from its
Helm chart in deploy/ (strict mode on unless --strict-mode=false), the
cluster DNS (CoreDNS, Service kube-system/kube-dns at ` + labcluster.DNSServiceIP.String() + `), and the demo:

  demo/frontend  on node-1
  demo/backend   on node-2 (node-1 with --nodes 1)
  other/client   on node-1

Deployments of an echo server on 80/TCP and 81/UDP with a Service each, a
NetworkPolicy by which demo/backend accepts only demo/frontend on 80/TCP,
and an audit-mode MeshPolicy. up returns once the agents are ready, the DNS
answers and the datapath enforces the policy; it prints each phase's time.

The first run builds Kubernetes, containerd and CoreDNS from source (make
controlplane; up to 30 minutes on two cores); later runs take a minute.`,
		Example: `  sudo meshctl lab up
  sudo meshctl lab up --nodes 3 --kube-proxy none --dir /tmp/lab-b --prefix labb`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.check(); err != nil {
				return err
			}
			if err := o.requireRoot("up"); err != nil {
				return err
			}
			dir, err := o.labDir()
			if err != nil {
				return err
			}
			if err := checkLabFree(dir, f.prefix); err != nil {
				return err
			}
			if err := checkLabSources(); err != nil {
				return err
			}
			image, err := filepath.Abs(f.image)
			if err != nil {
				return usageErrorf("--image %q: %w", f.image, err)
			}
			if _, err := os.Stat(image); err != nil {
				return usageErrorf("--image: %v: build it with make image (make lab does)", err)
			}
			f.image = image
			return labUp(cmd, o, dir, f)
		},
	}
	cmd.Flags().IntVar(&f.nodes, "nodes", 2, fmt.Sprintf("number of nodes (1 to %d)", labMaxNodes))
	cmd.Flags().StringVar(&f.prefix, "prefix", defaultLabPrefix, "names everything the lab creates on the host (3 to 12 of a-z, 0-9)")
	cmd.Flags().StringVar(&f.kubeProxy, "kube-proxy", string(labcluster.KubeProxyNFTables), "kube-proxy on the nodes: none, iptables or nftables (inside each node's network namespace)")
	cmd.Flags().BoolVar(&f.strict, "strict-mode", true, "install Veil with encryption.strictMode=true, as 'audit encryption' expects; false keeps the chart's default")
	cmd.Flags().StringVar(&f.image, "image", filepath.Join("bin", "veil-image.tar"), "Veil's image, an OCI tarball (make image)")
	cmd.Flags().DurationVar(&f.wait, "wait", 30*time.Minute, "how long to wait for the lab to be ready (the first run builds the cluster's binaries)")
	return cmd
}

func (f labUpFlags) check() error {
	if f.nodes < 1 || f.nodes > labMaxNodes {
		return usageErrorf("--nodes %d: want 1 to %d", f.nodes, labMaxNodes)
	}
	if !labPrefixRE.MatchString(f.prefix) {
		return usageErrorf("--prefix %q: want 3 to 12 of a-z and 0-9", f.prefix)
	}
	_, err := labcluster.ParseKubeProxyMode(f.kubeProxy)
	if err != nil || f.kubeProxy == "" {
		return usageErrorf("--kube-proxy %q: want none, iptables or nftables", f.kubeProxy)
	}
	if f.wait <= 0 {
		return usageErrorf("--wait must be positive")
	}
	return nil
}

// checkLabFree refuses to start over a lab: one running in dir, one that
// failed or crashed there, or a cluster on the host with the same prefix
// (starting would remove it).
func checkLabFree(dir, prefix string) error {
	s, err := readLab(dir)
	if err != nil {
		return err
	}
	switch {
	case s != nil && s.SupervisorRunning():
		return &exitError{code: ExitFailure, err: fmt.Errorf("a lab is already up in %s (prefix %s, supervisor pid %d): see meshctl lab status, or take it down with meshctl lab down", dir, s.Prefix, s.Supervisor)}
	case s != nil:
		return &exitError{code: ExitFailure, err: fmt.Errorf("the lab in %s did not shut down cleanly (%s): run meshctl lab down first", dir, labPhase(s))}
	}
	if _, err := os.Stat(filepath.Join("/run/netns", prefix+"-hub")); err == nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("prefix %s is in use on this host (network namespace %s-hub exists): take that lab down (meshctl lab down --dir ITS_DIR) or choose another --prefix", prefix, prefix)}
	}
	return nil
}

var veilModule = regexp.MustCompile(`(?m)^module\s+github\.com/veilmesh/veil\s*$`)

// checkLabSources fails early when the lab cannot be built here: it builds
// the lab's images and the cluster's binaries from the Veil checkout that
// holds the working directory, with the go command.
func checkLabSources() error {
	if _, err := exec.LookPath("go"); err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("lab up builds the lab's images from source and needs the go command in PATH (%w); sudo resets PATH: sudo env PATH=\"$PATH\" meshctl lab up, or make lab", err)}
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
			return &exitError{code: ExitFailure, err: fmt.Errorf("lab up builds the lab from source: run it inside a Veil checkout (%s is not)", wd)}
		}
	}
}

// labUp starts the supervisor and reports its phases until the lab is
// ready or failed.
func labUp(cmd *cobra.Command, o *labOptions, dir string, f labUpFlags) error {
	out, errw := cmd.OutOrStdout(), cmd.ErrOrStderr()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("create lab dir: %w", err)}
	}
	exe, err := o.deps.executable()
	if err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("find the meshctl binary: %w", err)}
	}
	logPath := filepath.Join(dir, labcluster.SupervisorLog)
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("create supervisor log: %w", err)}
	}
	defer logf.Close()
	sup := exec.Command(exe, "lab", "supervise", "--dir", dir, "--prefix", f.prefix, "--nodes", strconv.Itoa(f.nodes),
		"--kube-proxy", f.kubeProxy, "--strict-mode="+strconv.FormatBool(f.strict), "--image", f.image)
	sup.Stdout, sup.Stderr = logf, logf
	// Its own session: the terminal's ^C and hang-up do not reach it, and
	// it outlives this command.
	sup.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	began := time.Now()
	if err := sup.Start(); err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("start lab supervisor: %w", err)}
	}
	exited := make(chan error, 1)
	go func() { exited <- sup.Wait() }()
	fmt.Fprintf(out, "Starting lab %s in %s: %d nodes, kube-proxy %s, strict mode %v (supervisor pid %d, log %s).\n",
		f.prefix, dir, f.nodes, f.kubeProxy, f.strict, sup.Process.Pid, logPath)

	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, f.wait)
	defer cancel()
	// abort stops a supervisor that up gives up on, and whatever it left.
	abort := func(why error) error {
		fmt.Fprintf(errw, "meshctl: %v; stopping the lab\n", why)
		dctx, dcancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer dcancel()
		if err := labcluster.Down(dctx, dir, f.prefix, 2*time.Minute); err != nil && !errors.Is(err, labcluster.ErrNoLab) {
			fmt.Fprintf(errw, "meshctl: lab down: %v\n", err)
		}
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
		}
		return &exitError{code: ExitFailure, err: why}
	}
	shown := 0
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		s, err := labcluster.ReadLabState(dir)
		if err == nil {
			for ; shown < len(s.Phases); shown++ {
				p := s.Phases[shown]
				fmt.Fprintf(out, "  %-34s %8s\n", p.Name, p.Took.Round(100*time.Millisecond))
			}
			switch s.Phase {
			case labcluster.LabReady:
				fmt.Fprintf(out, "  %-34s %8s\n", "total", s.Total.Round(100*time.Millisecond))
				return writeLabSummary(ctx, out, o.dirFlag(dir), s)
			case labcluster.LabFailed:
				return abort(fmt.Errorf("lab up failed after %s: %s\n--- last lines of %s:\n%s",
					time.Since(began).Round(time.Second), s.Error, logPath, fileTail(logPath, 20)))
			}
		}
		select {
		case err := <-exited:
			return abort(fmt.Errorf("the lab supervisor exited (%v) before the lab was ready\n--- last lines of %s:\n%s", err, logPath, fileTail(logPath, 20)))
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return abort(fmt.Errorf("the lab was not ready within --wait %s (see %s)", f.wait, logPath))
			}
			return abort(errors.New("interrupted"))
		case <-tick.C:
		}
	}
}

// writeLabSummary prints what runs and what to try next.
func writeLabSummary(ctx context.Context, w io.Writer, dirFlag string, s *labcluster.LabState) error {
	fmt.Fprintf(w, "\nLab %s is up: %d nodes, kube-proxy %s, Veil strict mode %v.\n\n", s.Prefix, len(s.Nodes), s.KubeProxy, s.StrictMode)
	if err := writeLabTables(ctx, w, s); err != nil {
		return err
	}
	fmt.Fprintln(w, "\nDemo policy:")
	for _, p := range labcluster.DemoPolicies() {
		fmt.Fprintf(w, "  %s %s: %s\n", p.Kind, p.Name, p.Says)
	}
	fmt.Fprintf(w, `
Try next (as root):
  eval $(meshctl lab env%[1]s)
  kubectl get pods,services,networkpolicies,meshpolicies -A
  meshctl lab exec%[1]s demo/frontend -- /client connect backend.demo:80   # allowed: ok
  meshctl lab exec%[1]s other/client -- /client connect backend.demo:80    # denied: times out
  meshctl lab exec%[1]s demo/frontend -- /client resolve backend.demo.svc.cluster.local
  meshctl encryption status
  meshctl audit encryption
  meshctl lab status%[1]s
  meshctl lab down%[1]s
`, dirFlag)
	return nil
}

// labPhasesTable renders a lab's bring-up phases.
func labPhasesTable(w io.Writer, s *labcluster.LabState) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PHASE\tTOOK")
	for _, p := range s.Phases {
		fmt.Fprintf(tw, "%s\t%s\n", p.Name, p.Took.Round(100*time.Millisecond))
	}
	if s.Total > 0 {
		fmt.Fprintf(tw, "total\t%s\n", s.Total.Round(100*time.Millisecond))
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write lab phases: %w", err)
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
