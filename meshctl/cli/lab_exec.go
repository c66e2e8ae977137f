package cli

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/term"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/clientcmd"

	labcluster "github.com/veilmesh/veil/lab/cluster"
)

func newLabExecCommand(o *labOptions) *cobra.Command {
	var stdin, tty bool
	var container string
	cmd := &cobra.Command{
		Use:   "exec NS/POD -- CMD [ARG...]",
		Short: "Run a command in a lab pod, through the API server (as kubectl exec)",
		Long: `Run CMD in a container of the lab pod NS/POD through the lab's API
server, as 'kubectl exec' does, and exit with CMD's exit code. POD is a
pod's name, or the name of a Deployment of the demo (its pods carry
app=POD): demo/frontend, demo/backend, other/client.

The demo's pods run the lab's echo server; their image also holds /client
(connect [-udp] HOST:PORT, resolve [-tcp] NAME). -i attaches stdin, -t a
terminal.`,
		Example: `  meshctl lab exec demo/frontend -- /client connect backend.demo:80
  meshctl lab exec other/client -- /client connect -udp frontend.demo:81
  meshctl lab exec demo/frontend -- /client resolve -tcp backend.demo.svc.cluster.local`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ns, pod, argv, err := parseLabExecArgs(args)
			if err != nil {
				return err
			}
			_, s, err := o.runningLab()
			if err != nil {
				return err
			}
			streams := labcluster.ExecIO{Stdout: cmd.OutOrStdout(), Stderr: cmd.ErrOrStderr(), TTY: tty}
			if stdin {
				streams.Stdin = cmd.InOrStdin()
			}
			if tty && !term.IsTerminal(int(os.Stdin.Fd())) {
				return usageErrorf("lab exec -t: stdin is not a terminal")
			}
			return labExec(cmd.Context(), s, ns, pod, container, argv, streams)
		},
	}
	// Everything after NS/POD is CMD's, flags included.
	cmd.Flags().SetInterspersed(false)
	cmd.Flags().BoolVarP(&stdin, "stdin", "i", false, "pass stdin to the command")
	cmd.Flags().BoolVarP(&tty, "tty", "t", false, "allocate a terminal for the command (with -i)")
	cmd.Flags().StringVarP(&container, "container", "c", "", "the container (default: the pod's first)")
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

// labExec finds the pod (by name, else by app=name) and runs argv in it.
func labExec(ctx context.Context, s *labcluster.LabState, ns, name, container string, argv []string, streams labcluster.ExecIO) error {
	cfg, err := clientcmd.BuildConfigFromFlags("", s.Kubeconfig)
	if err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("read the lab's kubeconfig: %w", err)}
	}
	clients, err := labClients(s.Kubeconfig)
	if err != nil {
		return &exitError{code: ExitFailure, err: err}
	}
	pod := name
	if _, err := clients.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{}); apierrors.IsNotFound(err) {
		pods, err := clients.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: labels.Set{"app": name}.String()})
		if err != nil {
			return &exitError{code: ExitFailure, err: fmt.Errorf("lab exec: list pods of %s/%s: %w", ns, name, err)}
		}
		pod = ""
		for _, p := range pods.Items {
			if p.Status.Phase == corev1.PodRunning && p.DeletionTimestamp == nil {
				pod = p.Name
				break
			}
		}
		if pod == "" {
			return usageErrorf("lab exec: no pod %s/%s, and no running pod with app=%s in %s", ns, name, name, ns)
		}
	} else if err != nil {
		return &exitError{code: ExitFailure, err: fmt.Errorf("lab exec: get pod %s/%s: %w", ns, name, err)}
	}
	code, err := labcluster.ExecStreams(ctx, cfg, ns, pod, container, argv, streams)
	if err != nil {
		return &exitError{code: ExitFailure, err: err}
	}
	if code != 0 {
		return &exitError{code: code}
	}
	return nil
}
