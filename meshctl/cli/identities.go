package cli

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/meshctl/output"
)

func newIdentitiesCommand(agent *agentOptions) *cobra.Command {
	var out outputFlag
	cmd := &cobra.Command{
		Use:     "identities [ID...]",
		Aliases: []string{"identity", "id"},
		Short:   "List the identities known on the node, with their label sets",
		Long: `List the identities the agent of this node (or of --node) knows: the
reserved ones (host, world, unmanaged, health, remote-node) and one per
distinct label set of the cluster's pods (the pod's labels, its namespace's
name and labels, its service account). ENDPOINTS counts the pods of this
node that carry the identity. Give IDs to show only those.

Numeric ids are node-local: the same label set may have another number on
another node, so compare label sets, not numbers.

Exit codes:
  0  success
  2  usage error, or an ID the agent does not know
  3  the agent could not be reached or did not answer`,
		Example: `  meshctl identities
  meshctl identities 260 -o yaml`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := out.check(); err != nil {
				return err
			}
			want := map[uint32]bool{}
			for _, a := range args {
				id, err := strconv.ParseUint(a, 10, 32)
				if err != nil {
					return usageErrorf("identity %q: want a number", a)
				}
				want[uint32(id)] = true
			}
			c, err := agent.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer c.Close()
			resp, err := listIdentities(cmd.Context(), c)
			if err != nil {
				return err
			}
			r := identitiesReport{Node: c.Status.Node, Identities: []identityReport{}}
			found := map[uint32]bool{}
			for _, id := range resp.Identities {
				if len(want) > 0 && !want[id.Id] {
					continue
				}
				found[id.Id] = true
				r.Identities = append(r.Identities, identityReport{ID: id.Id, Labels: id.Labels, Endpoints: id.Endpoints, Reserved: id.Reserved})
			}
			var missing []string
			for id := range want {
				if !found[id] {
					missing = append(missing, strconv.FormatUint(uint64(id), 10))
				}
			}
			if len(missing) > 0 {
				slices.Sort(missing)
				return usageErrorf("no identity %s on node %s", strings.Join(missing, ", "), output.OrUnknown(c.Status.Node))
			}
			slices.SortFunc(r.Identities, func(a, b identityReport) int { return cmp.Compare(a.ID, b.ID) })
			w := cmd.OutOrStdout()
			done, err := out.structured(w, r)
			if err != nil || done {
				return err
			}
			return writeIdentities(w, r)
		},
	}
	addOutputFlag(cmd, &out)
	return cmd
}

func listIdentities(ctx context.Context, c *agentclient.Conn) (*agentv1.ListIdentitiesResponse, error) {
	return unary(ctx, c, "list identities", func(ctx context.Context) (*agentv1.ListIdentitiesResponse, error) {
		return c.Client.ListIdentities(ctx, &agentv1.ListIdentitiesRequest{})
	})
}

// identitiesReport is the -o json|yaml output of identities.
type identitiesReport struct {
	Node       string           `json:"node"`
	Identities []identityReport `json:"identities"`
}

type identityReport struct {
	ID        uint32   `json:"id"`
	Labels    []string `json:"labels"`
	Endpoints int32    `json:"endpoints"`
	Reserved  bool     `json:"reserved"`
}

func writeIdentities(w io.Writer, r identitiesReport) error {
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tENDPOINTS\tLABELS")
	for _, id := range r.Identities {
		fmt.Fprintf(tw, "%d\t%d\t%s\n", id.ID, id.Endpoints, labelList(id.Labels))
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write identities: %w", err)
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write identities: %w", err)
	}
	return nil
}
