package cli

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
)

func newLabExecCommand(o *labOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "exec NS/POD -- CMD [ARG...]",
		Short: "Run a command inside a lab pod (its network namespace and cgroup)",
		Long: `Run CMD inside the lab pod NS/POD: in its network namespace and in its
node's cgroup (where the node's agent attaches its socket programs), with
stdin, stdout and stderr attached. meshctl exits with CMD's exit code.

The lab's pods run no container image: CMD is a program of this host (for
example socat, curl, bash or ip), and only the network is the
pod's. Every demo pod runs an echo server on 80/TCP and 81/UDP.`,
		Example: `  echo hi | meshctl lab exec demo/frontend -- socat -T1 - TCP:10.244.2.2:80,connect-timeout=2
  meshctl lab exec other/client -- timeout 2 bash -c 'exec 3<>/dev/tcp/10.244.2.2/80'
  meshctl lab exec demo/backend -- ip addr`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ns, pod, argv, err := parseLabExecArgs(args)
			if err != nil {
				return err
			}
			if err := o.requireRoot("exec"); err != nil {
				return err
			}
			dir, err := o.labDir()
			if err != nil {
				return err
			}
			r, err := readLab(dir)
			if err != nil {
				return &exitError{code: ExitFailure, err: err}
			}
			if err := r.requireRunning(); err != nil {
				return err
			}
			return labExec(o.deps, r, ns+"/"+pod, argv)
		},
	}
	// Everything after NS/POD is CMD's, flags included.
	cmd.Flags().SetInterspersed(false)
	return cmd
}

// parseLabExecArgs splits NS/POD [--] CMD ARG...
func parseLabExecArgs(args []string) (ns, pod string, argv []string, err error) {
	if len(args) == 0 {
		return "", "", nil, usageErrorf("lab exec: want NS/POD -- CMD [ARG...]")
	}
	ns, pod, ok := strings.Cut(args[0], "/")
	if !ok || ns == "" || pod == "" || strings.Contains(pod, "/") {
		return "", "", nil, usageErrorf("lab exec: pod %q: want NAMESPACE/NAME", args[0])
	}
	argv = args[1:]
	if len(argv) > 0 && argv[0] == "--" {
		argv = argv[1:]
	}
	if len(argv) == 0 {
		return "", "", nil, usageErrorf("lab exec %s: no command (want NS/POD -- CMD [ARG...])", args[0])
	}
	return ns, pod, argv, nil
}

// labExec joins the pod's node cgroup and replaces meshctl with
// nsenter --net=POD_NETNS -- CMD…, so CMD's exit code, signals and
// terminal are meshctl's.
func labExec(d labDeps, r labReading, key string, argv []string) error {
	var netns, node string
	var pods []string
	for _, p := range r.state.Pods {
		if p.Pod == key {
			netns, node = p.Netns, p.Node
		}
		pods = append(pods, p.Pod)
	}
	if netns == "" {
		return usageErrorf("lab exec: no pod %s in the lab (pods: %s)", key, strings.Join(pods, ", "))
	}
	nsPath := filepath.Join(d.netnsDir, netns)
	if _, err := os.Stat(nsPath); err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("lab exec %s: network namespace: %w", key, err)}
	}
	mount, err := d.cgroupMount()
	if err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("lab exec %s: %w", key, err)}
	}
	cg := filepath.Join(mount, r.state.Prefix, node)
	if _, err := os.Stat(cg); err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("lab exec %s: cgroup of node %s: %w", key, node, err)}
	}
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("lab exec: find nsenter (util-linux): %w", err)}
	}
	if err := d.joinCgroup(cg); err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("lab exec %s: %w", key, err)}
	}
	full := append([]string{"nsenter", "--net=" + nsPath, "--"}, argv...)
	if err := d.execve(nsenter, full, os.Environ()); err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("lab exec %s: run nsenter: %w", key, err)}
	}
	return nil
}
