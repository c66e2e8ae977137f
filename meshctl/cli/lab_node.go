package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/veilmesh/veil/deploy"
	labcluster "github.com/veilmesh/veil/lab/cluster"
)

// labNodeAdded is 'lab node add -o json'.
type labNodeAdded struct {
	Name    string        `json:"name"`
	IP      string        `json:"ip"`
	PodCIDR string        `json:"podCIDR"`
	Netns   string        `json:"netns"`
	Took    time.Duration `json:"tookNs"`
	// AgentReady says the Veil agent on the node is Ready (--wait-ready),
	// AgentPod names it.
	AgentReady bool   `json:"agentReady,omitempty"`
	AgentPod   string `json:"agentPod,omitempty"`
}

func newLabNodeCommand(o *labOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Change the running lab's nodes",
		Args:  cobra.NoArgs,
		RunE:  func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newLabNodeAddCommand(o))
	return cmd
}

func newLabNodeAddCommand(o *labOptions) *cobra.Command {
	var out outputFlag
	wait := labcluster.DefaultAddNodeTimeout
	waitReady := false
	cmd := &cobra.Command{
		Use:   "add [--wait DURATION] [--wait-ready] [-o table|json|yaml]",
		Short: "Join one more node to the running lab",
		Long: `Join one more node (node-N+1) to the running lab, as a new machine joins
a real cluster: the lab's supervisor gives it kubelet certificates from the
cluster's CA, its namespaces on the lab's network, containerd with the
lab's images, kubelet and (in the lab's mode) kube-proxy. add returns once
the node is registered with a pod CIDR; Veil's DaemonSet puts an agent on
it by itself (--wait-ready waits until that agent is Ready). The lab's
record, and so 'lab status', lists the node; 'lab down' removes it with
the rest.

Exit codes:
  0  the node joined (and with --wait-ready its agent is Ready)
  1  there is no running lab, or the node did not join in time
  2  usage error: bad flags, not root`,
		Example: `  sudo meshctl lab node add
  sudo meshctl lab node add --wait-ready -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.check(); err != nil {
				return err
			}
			if wait <= 0 || wait > labcluster.MaxAddNodeTimeout {
				return usageErrorf("--wait %s: want more than 0 and at most %s", wait, labcluster.MaxAddNodeTimeout)
			}
			if err := o.requireRoot("node add"); err != nil {
				return err
			}
			dir, s, err := o.runningLab()
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			// The supervisor's bound is wait; its answer may take a little
			// longer to come.
			addCtx, cancel := context.WithTimeout(ctx, wait+15*time.Second)
			defer cancel()
			errw := cmd.ErrOrStderr()
			fmt.Fprintf(errw, "Adding %s to lab %s …\n", labcluster.NodeName(len(s.Nodes)+1), s.Prefix)
			added, err := labcluster.RequestAddNode(addCtx, filepath.Join(dir, labcluster.ControlSocket), wait)
			if err != nil {
				return &exitError{code: ExitFailure, err: err}
			}
			res := labNodeAdded{Name: added.Node.Name, IP: added.Node.IP, PodCIDR: added.Node.PodCIDR, Netns: added.Node.Netns, Took: added.Took}
			if waitReady {
				fmt.Fprintf(errw, "%s joined in %s; waiting for its Veil agent …\n", res.Name, res.Took.Round(100*time.Millisecond))
				clients, err := labClients(s.Kubeconfig)
				if err != nil {
					return &exitError{code: ExitFailure, err: err}
				}
				readyCtx, cancel := context.WithTimeout(ctx, wait)
				defer cancel()
				pod, err := waitAgentReady(readyCtx, clients, res.Name)
				if err != nil {
					return &exitError{code: ExitFailure, err: err}
				}
				res.AgentReady, res.AgentPod = true, pod
			}
			w := cmd.OutOrStdout()
			done, err := out.structured(w, res)
			if err != nil || done {
				return err
			}
			return writeLabNodeAdded(w, res)
		},
	}
	cmd.Flags().DurationVar(&wait, "wait", wait, "how long the node may take to join (and, with --wait-ready, its agent to become Ready)")
	cmd.Flags().BoolVar(&waitReady, "wait-ready", false, "also wait until the Veil agent on the node is Ready")
	addOutputFlag(cmd, &out)
	return cmd
}

func writeLabNodeAdded(w io.Writer, n labNodeAdded) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	header, row := "NODE\tINTERNAL IP\tPOD CIDR\tTOOK", fmt.Sprintf("%s\t%s\t%s\t%s", n.Name, n.IP, n.PodCIDR, n.Took.Round(100*time.Millisecond))
	if n.AgentPod != "" {
		header += "\tVEIL AGENT"
		row += "\t" + n.AgentPod + " (ready)"
	}
	fmt.Fprintln(tw, header)
	fmt.Fprintln(tw, row)
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write the added node: %w", err)
	}
	return nil
}

// waitAgentReady waits until the pod of Veil's DaemonSet on node is Ready
// and returns its name.
func waitAgentReady(ctx context.Context, clients kubernetes.Interface, node string) (string, error) {
	for {
		name, err := agentReady(ctx, clients, node)
		if err == nil {
			return name, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("wait for the Veil agent on %s: %w (last: %w)", node, context.Cause(ctx), err)
		case <-time.After(time.Second):
		}
	}
}

// agentReady returns the name of the Ready agent pod on node, or why
// there is none.
func agentReady(ctx context.Context, clients kubernetes.Interface, node string) (string, error) {
	ds, err := clients.AppsV1().DaemonSets(deploy.Namespace).Get(ctx, deploy.DaemonSetName, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("get daemonset %s/%s: %w", deploy.Namespace, deploy.DaemonSetName, err)
	}
	sel, err := metav1.LabelSelectorAsSelector(ds.Spec.Selector)
	if err != nil {
		return "", fmt.Errorf("daemonset %s's selector: %w", ds.Name, err)
	}
	pods, err := clients.CoreV1().Pods(deploy.Namespace).List(ctx, metav1.ListOptions{LabelSelector: sel.String(), FieldSelector: "spec.nodeName=" + node})
	if err != nil {
		return "", fmt.Errorf("list agent pods on %s: %w", node, err)
	}
	for _, p := range pods.Items {
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return p.Name, nil
			}
		}
	}
	if len(pods.Items) == 0 {
		return "", fmt.Errorf("no agent pod on %s yet", node)
	}
	return "", fmt.Errorf("agent pod %s on %s: %s, not ready", pods.Items[0].Name, node, pods.Items[0].Status.Phase)
}
