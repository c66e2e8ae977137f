package cli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/output"
)

func newEndpointsCommand(agent *agentOptions) *cobra.Command {
	var (
		out       outputFlag
		namespace string
	)
	cmd := &cobra.Command{
		Use:     "endpoints",
		Aliases: []string{"endpoint", "ep"},
		Short:   "List the node's pods as the datapath sees them",
		Long: `List the endpoints (pods) of this node (or of --node) as the agent has
programmed them: IP, endpoint id, identity and its label set, host-side
interface, whether ingress and egress are policy-enforced (default deny)
and how many policy-map entries the endpoint has.

Exit codes:
  0  success
  2  usage error
  3  the agent could not be reached or did not answer`,
		Example: `  meshctl endpoints
  meshctl endpoints -n x -o json`,
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
			resp, err := unary(cmd.Context(), c, "list endpoints", func(ctx context.Context) (*agentv1.ListEndpointsResponse, error) {
				return c.Client.ListEndpoints(ctx, &agentv1.ListEndpointsRequest{})
			})
			if err != nil {
				return err
			}
			r := endpointsReport{Node: c.Status.Node, Endpoints: []endpointReport{}}
			for _, e := range resp.Endpoints {
				if namespace != "" && e.Namespace != namespace {
					continue
				}
				r.Endpoints = append(r.Endpoints, endpointReport{
					Namespace: e.Namespace, Name: e.Name, IP: e.Ip, ID: e.Id,
					Identity: e.Identity, Labels: e.Labels, Interface: e.Interface,
					PolicyEntries: e.PolicyEntries, IngressEnforced: e.IngressEnforced, EgressEnforced: e.EgressEnforced,
					ContainerID: e.ContainerId,
				})
			}
			w := cmd.OutOrStdout()
			done, err := out.structured(w, r)
			if err != nil || done {
				return err
			}
			return writeEndpoints(w, output.PaletteFor(w), r)
		},
	}
	addOutputFlag(cmd, &out)
	cmd.Flags().StringVarP(&namespace, "namespace", "n", "", "only the endpoints of this namespace")
	return cmd
}

// endpointsReport is the -o json|yaml output of endpoints.
type endpointsReport struct {
	Node      string           `json:"node"`
	Endpoints []endpointReport `json:"endpoints"`
}

type endpointReport struct {
	Namespace       string   `json:"namespace"`
	Name            string   `json:"name"`
	IP              string   `json:"ip"`
	ID              uint32   `json:"id"`
	Identity        uint32   `json:"identity"`
	Labels          []string `json:"labels"`
	Interface       string   `json:"interface"`
	PolicyEntries   int32    `json:"policyEntries"`
	IngressEnforced bool     `json:"ingressEnforced"`
	EgressEnforced  bool     `json:"egressEnforced"`
	ContainerID     string   `json:"containerID,omitempty"`
}

func writeEndpoints(w io.Writer, pal output.Palette, r endpointsReport) error {
	if len(r.Endpoints) == 0 {
		_, err := fmt.Fprintf(w, "No endpoints on node %s.\n", output.OrUnknown(r.Node))
		return err
	}
	enforced := func(on bool) string {
		if on {
			return pal.Yellow("enforced")
		}
		return pal.Plain("open")
	}
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "ENDPOINT\tIP\tID\tIDENTITY\tINTERFACE\t%s\t%s\tENTRIES\tLABELS\n", pal.Plain("INGRESS"), pal.Plain("EGRESS"))
	for _, e := range r.Endpoints {
		fmt.Fprintf(tw, "%s/%s\t%s\t%d\t%d\t%s\t%s\t%s\t%d\t%s\n", e.Namespace, e.Name, e.IP, e.ID, e.Identity,
			output.Dash(e.Interface), enforced(e.IngressEnforced), enforced(e.EgressEnforced), e.PolicyEntries, labelList(e.Labels))
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write endpoints: %w", err)
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write endpoints: %w", err)
	}
	return nil
}

// labelList renders a label set in one table cell.
func labelList(ls []string) string {
	if len(ls) == 0 {
		return "-"
	}
	return strings.Join(ls, ",")
}
