package cli

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/veilmesh/veil/lab"
)

// labStatus is 'lab status -o json': the lab's state file and whether the
// lab runs.
type labStatus struct {
	Running bool   `json:"running"`
	Dir     string `json:"dir"`
	// Phase is the supervisor's: starting, ready, failed, stopping, down.
	Phase         string `json:"phase,omitempty"`
	SupervisorPID int    `json:"supervisorPID,omitempty"`
	lab.State
}

func newLabStatusReport(r labReading) labStatus {
	s := labStatus{Running: r.running(), Dir: r.dir}
	if r.sup != nil {
		s.Phase, s.SupervisorPID = r.sup.Phase, r.sup.PID
		if !r.sup.IsSupervisor() && r.sup.Phase != lab.PhaseDown {
			s.Phase = lab.PhaseFailed
		}
	}
	if r.state != nil {
		s.State = *r.state
	}
	if s.Nodes == nil {
		s.Nodes = []lab.NodeState{}
	}
	if s.Pods == nil {
		s.Pods = []lab.PodState{}
	}
	return s
}

func newLabStatusCommand(o *labOptions) *cobra.Command {
	var out outputFlag
	cmd := &cobra.Command{
		Use:   "status [-o table|json|yaml]",
		Short: "Show whether the lab runs, its nodes and its pods",
		Long: `Show whether the lab runs (its supervisor is alive and the lab ready),
its nodes (network namespace, underlay interface and address, pod CIDR,
agent PID and socket) and its pods (namespace/name, node, IP, network
namespace). -o json prints the lab's state file with "running" added, for
scripts.

Exit codes:
  0  the lab runs
  1  there is no lab, or it is not running (starting, failed, crashed)
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
			r, err := readLab(dir)
			if err != nil {
				return &exitError{code: ExitFailure, err: err}
			}
			s := newLabStatusReport(r)
			w := cmd.OutOrStdout()
			done, err := out.structured(w, s)
			if err != nil {
				return err
			}
			if !done {
				if err := writeLabStatus(w, r); err != nil {
					return err
				}
			}
			if !s.Running {
				return failed()
			}
			return nil
		},
	}
	addOutputFlag(cmd, &out)
	return cmd
}

func writeLabStatus(w io.Writer, r labReading) error {
	if !r.exists() {
		fmt.Fprintf(w, "No lab in %s.\n", r.dir)
		return nil
	}
	what := "running"
	if !r.running() {
		what = "not running: " + r.phase()
	}
	prefix := ""
	if r.state != nil {
		prefix = r.state.Prefix
	} else if r.sup != nil {
		prefix = r.sup.Prefix
	}
	fmt.Fprintf(w, "Lab %s in %s: %s", prefix, r.dir, what)
	if r.sup != nil && r.sup.IsSupervisor() {
		fmt.Fprintf(w, " (supervisor pid %d)", r.sup.PID)
	}
	fmt.Fprintln(w)
	if r.state == nil {
		return nil
	}
	fmt.Fprintf(w, "Kubeconfig: %s\n\n", r.state.Kubeconfig)
	return writeLabTables(w, r.state, func(pid int) bool { return lab.Process{PID: pid}.Running() })
}
