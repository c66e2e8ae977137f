package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"k8s.io/client-go/kubernetes"
)

// The control plane's and the nodes' daemons by the names StopDaemon,
// StartDaemon and LogTails use.
const (
	// APIServerDaemon is the kube-apiserver on the hub.
	APIServerDaemon = "kube-apiserver"
)

// KubeletDaemon is the name of node's kubelet.
func KubeletDaemon(node string) string { return node + "-kubelet" }

// StopDaemon stops the cluster's process named name (APIServerDaemon,
// KubeletDaemon(node), …): SIGTERM, then SIGKILL after grace. What it
// served goes away as it would on a real cluster whose daemon stopped;
// StartDaemon starts it again.
func (c *Cluster) StopDaemon(name string, grace time.Duration) error {
	p, err := c.daemon(name)
	if err != nil {
		return err
	}
	p.stop(grace)
	return nil
}

// StartDaemon starts a daemon StopDaemon stopped again, with the same
// command line, namespaces and cgroups, and waits until it serves again:
// the API server until /readyz answers, a kubelet until it runs.
func (c *Cluster) StartDaemon(ctx context.Context, name string) error {
	old, err := c.daemon(name)
	if err != nil {
		return err
	}
	if !old.exited() {
		return fmt.Errorf("start %s: it is running", name)
	}
	ns, argv, err := splitNsenter(old.cmd.Args)
	if err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	p, err := c.startProc(name, ns, old.cgroup, argv...)
	if err != nil {
		return err
	}
	for _, nd := range c.Nodes {
		if nd.kubelet == old {
			nd.kubelet = p
		}
	}
	if name != APIServerDaemon {
		return nil
	}
	clients, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("create client: %w", err)
	}
	return waitFor(ctx, p, "kube-apiserver /readyz", func(ctx context.Context) error {
		_, err := clients.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	})
}

// daemon is the newest process named name.
func (c *Cluster) daemon(name string) (*proc, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var names []string
	for i := len(c.procs) - 1; i >= 0; i-- {
		if c.procs[i].name == name {
			return c.procs[i], nil
		}
		names = append(names, c.procs[i].name)
	}
	slices.Sort(names)
	return nil, fmt.Errorf("no cluster process %q (there are: %s)", name, strings.Join(slices.Compact(names), ", "))
}

// splitNsenter undoes startProc's command line: nsenter's namespace
// flags, then the daemon's argv after "--".
func splitNsenter(args []string) (namespaces, []string, error) {
	var ns namespaces
	for i, a := range args[1:] {
		switch {
		case a == "--":
			return ns, args[i+2:], nil
		case strings.HasPrefix(a, "--net="):
			ns.net = strings.TrimPrefix(a, "--net=")
		case strings.HasPrefix(a, "--mount="):
			ns.mnt = strings.TrimPrefix(a, "--mount=")
		case strings.HasPrefix(a, "--uts="):
			ns.uts = strings.TrimPrefix(a, "--uts=")
		default:
			return ns, nil, fmt.Errorf("unexpected nsenter argument %q", a)
		}
	}
	return ns, nil, fmt.Errorf("no command in %q", args)
}

var execSeq atomic.Uint64

// ContainerCommand returns a command that runs argv in container id (a
// pod's containerd container ID, without "containerd://") of the node, as
// `crictl exec` does: through the node's containerd, not the API server or
// the kubelet, so that it works while either is away. Its stdin, stdout
// and stderr are the process's in the container, and it exits with the
// process's exit code.
func (nd *Node) ContainerCommand(ctx context.Context, id string, argv ...string) *exec.Cmd {
	execID := "veil-exec-" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatUint(execSeq.Add(1), 10)
	args := append([]string{"--net=" + nd.ns.net, "--mount=" + nd.ns.mnt, "--uts=" + nd.ns.uts, "--",
		nd.c.bins.Ctr, "--address=" + containerdSocket, "--namespace=k8s.io", "tasks", "exec", "--exec-id", execID, id}, argv...)
	cmd := exec.CommandContext(ctx, "nsenter", args...)
	cmd.Env = []string{"PATH=" + nd.c.path}
	return cmd
}

// KillContainer kills container id's process with SIGKILL, as a crash
// would: its kubelet (if running) restarts it.
func (nd *Node) KillContainer(ctx context.Context, id string) error {
	if _, err := nd.Run(ctx, nd.c.bins.Ctr, "--address="+containerdSocket, "--namespace=k8s.io", "tasks", "kill", "--signal", "SIGKILL", id); err != nil {
		return fmt.Errorf("kill container %s on %s: %w", id, nd.Name, err)
	}
	return nil
}
