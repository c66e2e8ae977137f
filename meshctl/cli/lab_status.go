package cli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	labcluster "github.com/veilmesh/veil/lab/cluster"
)

// labStatus is 'lab status -o json': the lab's record, whether it runs,
// and its nodes and pods as the API server has them.
type labStatus struct {
	Running bool   `json:"running"`
	Dir     string `json:"dir"`
	// Phase is the supervisor's: starting, ready, failed, stopping; or
	// "no lab".
	Phase string               `json:"phase"`
	Lab   *labcluster.LabState `json:"lab,omitempty"`
	Nodes []labStatusNode      `json:"nodes"`
	Pods  []labStatusPod       `json:"pods"`
	Error string               `json:"error,omitempty"`
}

type labStatusNode struct {
	Name    string `json:"name"`
	Ready   bool   `json:"ready"`
	IP      string `json:"ip"`
	PodCIDR string `json:"podCIDR"`
}

type labStatusPod struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Node      string `json:"node"`
	IP        string `json:"ip"`
	Phase     string `json:"phase"`
	Ready     bool   `json:"ready"`
}

func newLabStatusCommand(o *labOptions) *cobra.Command {
	var out outputFlag
	cmd := &cobra.Command{
		Use:   "status [-o table|json|yaml]",
		Short: "Show whether the lab runs, its bring-up, nodes and pods",
		Long: `Show whether the lab runs (its supervisor is alive and the lab ready),
how long each phase of its bring-up took, and its nodes and pods as the
lab's API server has them. -o json prints the same for scripts.

Exit codes:
  0  the lab runs
  1  there is no lab, or it is not running (starting, failed, crashed), or
     its API server does not answer
  2  usage error`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.check(); err != nil {
				return err
			}
			dir, err := o.labDir()
			if err != nil {
				return err
			}
			s, err := readLab(dir)
			if err != nil {
				return err
			}
			st := labStatus{Dir: dir, Phase: "no lab", Lab: s, Nodes: []labStatusNode{}, Pods: []labStatusPod{}}
			if s != nil {
				st.Phase = labPhase(s)
				st.Running = s.Phase == labcluster.LabReady && s.SupervisorRunning()
			}
			if st.Running {
				ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
				defer cancel()
				if err := st.fill(ctx, s.Kubeconfig); err != nil {
					st.Running, st.Error = false, err.Error()
				}
			}
			w := cmd.OutOrStdout()
			done, err := out.structured(w, st)
			if err != nil {
				return err
			}
			if !done {
				if err := writeLabStatus(w, st); err != nil {
					return err
				}
			}
			if !st.Running {
				return failed()
			}
			return nil
		},
	}
	addOutputFlag(cmd, &out)
	return cmd
}

// labClients connects to the lab's API server with its kubeconfig.
func labClients(kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("read the lab's kubeconfig: %w", err)
	}
	clients, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("create client: %w", err)
	}
	return clients, nil
}

// fill lists the lab's nodes and pods from its API server.
func (st *labStatus) fill(ctx context.Context, kubeconfig string) error {
	clients, err := labClients(kubeconfig)
	if err != nil {
		return err
	}
	nodes, err := clients.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list the lab's nodes: %w", err)
	}
	for _, n := range nodes.Items {
		sn := labStatusNode{Name: n.Name, PodCIDR: n.Spec.PodCIDR}
		for _, a := range n.Status.Addresses {
			if a.Type == corev1.NodeInternalIP {
				sn.IP = a.Address
			}
		}
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady {
				sn.Ready = c.Status == corev1.ConditionTrue
			}
		}
		st.Nodes = append(st.Nodes, sn)
	}
	pods, err := clients.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list the lab's pods: %w", err)
	}
	for _, p := range pods.Items {
		sp := labStatusPod{Namespace: p.Namespace, Name: p.Name, Node: p.Spec.NodeName, IP: p.Status.PodIP, Phase: string(p.Status.Phase)}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady {
				sp.Ready = c.Status == corev1.ConditionTrue
			}
		}
		st.Pods = append(st.Pods, sp)
	}
	return nil
}

func writeLabStatus(w io.Writer, st labStatus) error {
	if st.Lab == nil {
		fmt.Fprintf(w, "No lab in %s.\n", st.Dir)
		return nil
	}
	s := st.Lab
	what := "running"
	if !st.Running {
		what = "not running: " + st.Phase
		if st.Error != "" {
			what += ": " + st.Error
		}
	}
	fmt.Fprintf(w, "Lab %s in %s: %s (supervisor pid %d, kube-proxy %s, strict mode %v)\n", s.Prefix, st.Dir, what, s.Supervisor, s.KubeProxy, s.StrictMode)
	if s.Kubeconfig != "" {
		fmt.Fprintf(w, "Kubeconfig: %s\n", s.Kubeconfig)
	}
	fmt.Fprintln(w)
	if err := labPhasesTable(w, s); err != nil {
		return err
	}
	if !st.Running {
		return nil
	}
	fmt.Fprintln(w)
	return writeStatusTables(w, st)
}

// writeLabTables lists a running lab's nodes and pods (lab up's summary).
func writeLabTables(ctx context.Context, w io.Writer, s *labcluster.LabState) error {
	st := labStatus{}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := st.fill(ctx, s.Kubeconfig); err != nil {
		return &exitError{code: ExitFailure, err: err}
	}
	return writeStatusTables(w, st)
}

func writeStatusTables(w io.Writer, st labStatus) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tREADY\tINTERNAL IP\tPOD CIDR")
	for _, n := range st.Nodes {
		fmt.Fprintf(tw, "%s\t%v\t%s\t%s\n", n.Name, n.Ready, n.IP, n.PodCIDR)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write lab nodes: %w", err)
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tNODE\tIP\tSTATUS")
	for _, p := range st.Pods {
		status := p.Phase
		if p.Phase == string(corev1.PodRunning) && !p.Ready {
			status += ", not ready"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Namespace+"/"+p.Name, p.Node, p.IP, strings.TrimSpace(status))
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write lab pods: %w", err)
	}
	return nil
}
