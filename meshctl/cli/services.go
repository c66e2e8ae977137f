package cli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/output"
)

func newServicesCommand(agent *agentOptions) *cobra.Command {
	var (
		out       outputFlag
		namespace string
		wide      bool
	)
	cmd := &cobra.Command{
		Use:     "services",
		Aliases: []string{"service", "svc"},
		Short:   "List the Services the node load-balances, with their backends",
		Long: `List the Services this node (or --node) load-balances at the socket
level, as its agent sees them: type, cluster IPs, ports (port/protocol and
target port), session affinity, and per Service how many backends are
ready and how many terminating (terminating backends get connections only
while no ready one is left). A Service without ready backends is shown in
red (clients are refused at once); a port without backends although the
Service has endpoints is explained below the table. --wide lists every
backend with its port, node and pod. -o json always includes the backends.

Exit codes:
  0  success
  2  usage error
  3  the agent could not be reached or did not answer`,
		Example: `  meshctl services
  meshctl services -n demo --wide
  meshctl services -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.check(); err != nil {
				return err
			}
			c, err := agent.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer c.Close()
			resp, err := unary(cmd.Context(), c, "list services", func(ctx context.Context) (*agentv1.ListServicesResponse, error) {
				return c.Client.ListServices(ctx, &agentv1.ListServicesRequest{Namespace: namespace})
			})
			if err != nil {
				return err
			}
			r := servicesReportFrom(c.Status.Node, resp)
			w := cmd.OutOrStdout()
			done, err := out.structured(w, r)
			if err != nil || done {
				return err
			}
			return writeServices(w, output.PaletteFor(w), r, wide)
		},
	}
	addOutputFlag(cmd, &out)
	cmd.Flags().StringVarP(&namespace, "namespace", "n", "", "only the Services of this namespace")
	cmd.Flags().BoolVar(&wide, "wide", false, "list every backend with its node and pod")
	return cmd
}

// servicesReport is the -o json|yaml output of services.
type servicesReport struct {
	Node     string          `json:"node"`
	Services []serviceReport `json:"services"`
}

type serviceReport struct {
	Namespace  string   `json:"namespace"`
	Name       string   `json:"name"`
	Type       string   `json:"type"`
	ClusterIPs []string `json:"clusterIPs"`
	// SessionAffinitySeconds: ClientIP affinity's timeout; 0 without.
	SessionAffinitySeconds uint32 `json:"sessionAffinitySeconds,omitempty"`
	InternalTrafficLocal   bool   `json:"internalTrafficLocal,omitempty"`
	// Ready and Terminating count distinct backend addresses over the
	// Service's ports.
	Ready       int                 `json:"ready"`
	Terminating int                 `json:"terminating"`
	Ports       []servicePortReport `json:"ports"`
}

type servicePortReport struct {
	Name       string                 `json:"name,omitempty"`
	Port       uint32                 `json:"port"`
	Protocol   string                 `json:"protocol"`
	TargetPort string                 `json:"targetPort"`
	Backends   []serviceBackendReport `json:"backends"`
	Problem    string                 `json:"problem,omitempty"`
}

type serviceBackendReport struct {
	IP          string `json:"ip"`
	Port        uint32 `json:"port"`
	Node        string `json:"node,omitempty"`
	Pod         string `json:"pod,omitempty"`
	Terminating bool   `json:"terminating"`
}

func servicesReportFrom(node string, resp *agentv1.ListServicesResponse) servicesReport {
	r := servicesReport{Node: node, Services: []serviceReport{}}
	for _, s := range resp.Services {
		sr := serviceReport{
			Namespace: s.Namespace, Name: s.Name, Type: s.Type, ClusterIPs: s.ClusterIps,
			SessionAffinitySeconds: s.SessionAffinitySeconds, InternalTrafficLocal: s.InternalLocal,
			Ports: []servicePortReport{},
		}
		// A backend terminating on one port and ready on another counts
		// as ready.
		state := map[string]bool{} // ip -> terminating
		for _, p := range s.Ports {
			pr := servicePortReport{Name: p.Name, Port: p.Port, Protocol: p.Protocol, TargetPort: p.TargetPort,
				Problem: p.Problem, Backends: []serviceBackendReport{}}
			for _, b := range p.Backends {
				pr.Backends = append(pr.Backends, serviceBackendReport{IP: b.Ip, Port: b.Port, Node: b.Node, Pod: b.Pod, Terminating: b.Terminating})
				if term, seen := state[b.Ip]; !seen || term {
					state[b.Ip] = b.Terminating
				}
			}
			sr.Ports = append(sr.Ports, pr)
		}
		for _, term := range state {
			if term {
				sr.Terminating++
			} else {
				sr.Ready++
			}
		}
		r.Services = append(r.Services, sr)
	}
	return r
}

func writeServices(w io.Writer, pal output.Palette, r servicesReport, wide bool) error {
	if len(r.Services) == 0 {
		_, err := fmt.Fprintf(w, "No Services on node %s.\n", output.OrUnknown(r.Node))
		return err
	}
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "SERVICE\tTYPE\tCLUSTER-IP\tPORTS\t%s\tAFFINITY\n", pal.Plain("BACKENDS"))
	var problems []string
	for _, s := range r.Services {
		var ports []string
		for _, p := range s.Ports {
			ports = append(ports, portCell(p))
			if p.Problem != "" {
				problems = append(problems, fmt.Sprintf("%s/%s %d/%s: %s", s.Namespace, s.Name, p.Port, p.Protocol, p.Problem))
			}
		}
		backends := fmt.Sprintf("%d/%d", s.Ready, s.Terminating)
		switch {
		case s.Ready == 0 && s.Terminating == 0:
			backends = pal.Red(backends)
		case s.Ready == 0:
			backends = pal.Yellow(backends)
		default:
			backends = pal.Plain(backends)
		}
		affinity := "-"
		if s.SessionAffinitySeconds > 0 {
			affinity = "ClientIP " + output.ShortDuration(time.Duration(s.SessionAffinitySeconds)*time.Second)
		}
		fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%s\t%s\n", s.Namespace, s.Name, s.Type,
			output.Dash(strings.Join(s.ClusterIPs, ",")), output.Dash(strings.Join(ports, ",")), backends, affinity)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write services: %w", err)
	}
	for _, p := range problems {
		fmt.Fprintf(&b, "%s %s\n", pal.Yellow("!"), p)
	}
	fmt.Fprintf(&b, "BACKENDS is ready/terminating. Node %s.\n", output.OrUnknown(r.Node))
	if wide {
		fmt.Fprintf(tw, "\nSERVICE\tPORT\tBACKEND\tNODE\tPOD\t%s\n", pal.Plain("STATE"))
		for _, s := range r.Services {
			for _, p := range s.Ports {
				for _, be := range p.Backends {
					st := pal.Plain("ready")
					if be.Terminating {
						st = pal.Yellow("terminating")
					}
					fmt.Fprintf(tw, "%s/%s\t%d/%s\t%s:%d\t%s\t%s\t%s\n", s.Namespace, s.Name, p.Port, p.Protocol,
						be.IP, be.Port, output.Dash(be.Node), output.Dash(be.Pod), st)
				}
			}
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write services: %w", err)
		}
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write services: %w", err)
	}
	return nil
}

// portCell is "80/TCP" or, when the target differs, "80/TCP->8080".
func portCell(p servicePortReport) string {
	s := fmt.Sprintf("%d/%s", p.Port, p.Protocol)
	if p.TargetPort != "" && p.TargetPort != fmt.Sprint(p.Port) {
		s += "->" + p.TargetPort
	}
	return s
}
