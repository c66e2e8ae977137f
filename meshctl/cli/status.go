package cli

import (
	"cmp"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/meshctl/output"
)

func newStatusCommand(agent *agentOptions) *cobra.Command {
	var out outputFlag
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the health of a node's agent, and what is degraded and why",
		Long: `Show the health of the veil-agent of this node (or of --node): its
version, API server connectivity, whether it has converged, the datapath
programs attached, endpoint, identity and policy counts, socket
acceleration, packet counters and drops by reason, and every degraded
component with the reason.

Troubleshooting when the agent cannot be reached:
  - Is veil-agent running on the node? (kubectl -n <namespace> get pods
    -o wide for the DaemonSet's pod on that node, or ps on the node)
  - The socket is root-only (mode 0600): run meshctl as root on the node,
    or inside the veil-agent pod.
  - Is the socket where meshctl looks? --socket PATH or VEIL_SOCKET
    (default ` + agentclient.DefaultSocket + `); the agent's --socket flag sets it.
  - --node NAME reaches another node's agent through the API server: an
    exec into that node's veil-agent pod runs 'veil-agent api-bridge',
    which carries the API over the exec's stdin and stdout. It needs a
    kubeconfig (--kubeconfig, KUBECONFIG or ~/.kube/config) whose user may
    list pods and create pods/exec in the agents' namespace (the
    veil-meshctl role); meshctl asks the API server first and names what
    is missing.

Exit codes:
  0  the agent is healthy
  1  the agent answered and is degraded (the reasons are listed)
  2  usage error
  3  the agent could not be reached or did not answer, or RBAC forbids
     reaching it through the API server`,
		Example: `  sudo meshctl status
  meshctl status --node node-2
  meshctl status --socket /run/veil/agent.sock -o json`,
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
			r := newStatusReport(c.Status, c.Target)
			w := cmd.OutOrStdout()
			done, err := out.structured(w, r)
			if err != nil {
				return err
			}
			if !done {
				if err := writeStatus(w, output.PaletteFor(w), r, agent.env.now()); err != nil {
					return err
				}
			}
			if !r.Healthy {
				return failed()
			}
			return nil
		},
	}
	addOutputFlag(cmd, &out)
	return cmd
}

// statusReport is the -o json|yaml output of status.
type statusReport struct {
	Node               string           `json:"node"`
	Socket             string           `json:"socket,omitempty"`
	AgentVersion       string           `json:"agentVersion"`
	APIVersion         string           `json:"apiVersion"`
	Healthy            bool             `json:"healthy"`
	Started            *time.Time       `json:"started,omitempty"`
	APIServerConnected bool             `json:"apiServerConnected"`
	LastSync           *time.Time       `json:"lastSync,omitempty"`
	Converged          bool             `json:"converged"`
	PodCIDR            string           `json:"podCIDR,omitempty"`
	Endpoints          int32            `json:"endpoints"`
	Identities         int32            `json:"identities"`
	Policies           int32            `json:"policies"`
	InvalidPolicies    int32            `json:"invalidPolicies"`
	SocketAcceleration bool             `json:"socketAcceleration"`
	Programs           []programReport  `json:"programs"`
	Counters           *countersReport  `json:"counters,omitempty"`
	Degraded           []degradedReport `json:"degraded"`
}

type programReport struct {
	Name        string `json:"name"`
	AttachPoint string `json:"attachPoint"`
	Attached    int32  `json:"attached"`
}

type countersReport struct {
	ForwardedLocal        uint64            `json:"forwardedLocal"`
	ForwardedRemote       uint64            `json:"forwardedRemote"`
	ForwardedStack        uint64            `json:"forwardedStack"`
	Established           uint64            `json:"established"`
	Audit                 uint64            `json:"audit"`
	EventsLost            uint64            `json:"eventsLost"`
	SocketRedirectedBytes uint64            `json:"socketRedirectedBytes"`
	AcceleratedSockets    int32             `json:"acceleratedSockets"`
	Drops                 map[string]uint64 `json:"drops"`
}

type degradedReport struct {
	Component string `json:"component"`
	Reason    string `json:"reason"`
}

// unixTime turns the API's Unix nanoseconds into a time, nil for "never".
func unixTime(ns int64) *time.Time {
	if ns == 0 {
		return nil
	}
	t := time.Unix(0, ns).UTC()
	return &t
}

func newStatusReport(st *agentv1.StatusResponse, t agentclient.Target) statusReport {
	r := statusReport{
		Node: st.Node, Socket: t.Socket, AgentVersion: st.AgentVersion, APIVersion: st.ApiVersion,
		Healthy: st.Healthy, Started: unixTime(st.StartedUnixNano),
		APIServerConnected: st.ApiServerConnected, LastSync: unixTime(st.LastSyncUnixNano),
		Converged: st.Converged, PodCIDR: st.PodCidr,
		Endpoints: st.Endpoints, Identities: st.Identities, Policies: st.Policies, InvalidPolicies: st.InvalidPolicies,
		SocketAcceleration: st.SocketAcceleration,
		Programs:           []programReport{},
		Degraded:           []degradedReport{},
	}
	// An agent that lists a degraded component is unhealthy whatever its
	// healthy flag says.
	if len(st.Degraded) > 0 {
		r.Healthy = false
	}
	for _, p := range st.Programs {
		r.Programs = append(r.Programs, programReport{Name: p.Name, AttachPoint: p.AttachPoint, Attached: p.Attached})
	}
	if c := st.Counters; c != nil {
		r.Counters = &countersReport{
			ForwardedLocal: c.ForwardedLocal, ForwardedRemote: c.ForwardedRemote, ForwardedStack: c.ForwardedStack,
			Established: c.Established, Audit: c.Audit, EventsLost: c.EventsLost,
			SocketRedirectedBytes: c.SocketRedirectedBytes, AcceleratedSockets: c.AcceleratedSockets,
			Drops: map[string]uint64{},
		}
		for reason, n := range c.Drops {
			r.Counters.Drops[reason] = n
		}
	}
	for _, d := range st.Degraded {
		r.Degraded = append(r.Degraded, degradedReport{Component: d.Component, Reason: d.Reason})
	}
	slices.SortStableFunc(r.Degraded, func(a, b degradedReport) int { return strings.Compare(a.Component, b.Component) })
	return r
}

func writeStatus(w io.Writer, pal output.Palette, r statusReport, now time.Time) error {
	yes := func(ok bool, good, bad string) string {
		if ok {
			return pal.Green(good)
		}
		return pal.Red(bad)
	}
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	health := pal.Green("OK")
	if !r.Healthy {
		health = pal.Red("DEGRADED")
	}
	fmt.Fprintf(tw, "Node:\t%s\n", output.OrUnknown(r.Node))
	fmt.Fprintf(tw, "Health:\t%s\n", health)
	agent := fmt.Sprintf("%s (API %s)", output.OrUnknown(r.AgentVersion), r.APIVersion)
	if r.Started != nil {
		agent += ", up " + since(now, *r.Started)
	}
	fmt.Fprintf(tw, "Agent:\t%s\n", agent)
	if r.Socket != "" {
		fmt.Fprintf(tw, "Socket:\t%s\n", r.Socket)
	}
	apiServer := yes(r.APIServerConnected, "connected", "disconnected")
	if r.LastSync != nil {
		apiServer += ", last sync " + since(now, *r.LastSync) + " ago"
	} else {
		apiServer += ", never synced"
	}
	fmt.Fprintf(tw, "API server:\t%s\n", apiServer)
	fmt.Fprintf(tw, "Converged:\t%s\n", yes(r.Converged, "yes", "no"))
	if r.PodCIDR != "" {
		fmt.Fprintf(tw, "Pod CIDR:\t%s\n", r.PodCIDR)
	}
	fmt.Fprintf(tw, "Endpoints:\t%d\n", r.Endpoints)
	fmt.Fprintf(tw, "Identities:\t%d\n", r.Identities)
	policies := fmt.Sprintf("%d", r.Policies)
	if r.InvalidPolicies > 0 {
		policies += ", " + pal.Red(output.Plural(int(r.InvalidPolicies), "invalid policy")+" (not enforced)")
	}
	fmt.Fprintf(tw, "Policies:\t%s\n", policies)
	accel := "off"
	if r.SocketAcceleration {
		accel = "on"
		if r.Counters != nil {
			accel += fmt.Sprintf(", %s, %s redirected", output.Plural(int(r.Counters.AcceleratedSockets), "socket"), bytesString(r.Counters.SocketRedirectedBytes))
		}
	}
	fmt.Fprintf(tw, "Socket acceleration:\t%s\n", accel)
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}

	b.WriteString("\nPrograms:\n")
	if len(r.Programs) == 0 {
		b.WriteString("  none attached\n")
	}
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	for _, p := range r.Programs {
		fmt.Fprintf(tw, "  %s\t%s\t%d attached\n", p.Name, p.AttachPoint, p.Attached)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}

	if c := r.Counters; c != nil {
		b.WriteString("\nCounters (packets):\n")
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "  forwarded\tlocal %d, remote %d, to the stack %d\n", c.ForwardedLocal, c.ForwardedRemote, c.ForwardedStack)
		fmt.Fprintf(tw, "  established\t%d\n", c.Established)
		fmt.Fprintf(tw, "  audit\t%d (allowed, an audit-mode policy would deny)\n", c.Audit)
		lost := fmt.Sprintf("%d", c.EventsLost)
		if c.EventsLost > 0 {
			lost = pal.Yellow(lost)
		}
		fmt.Fprintf(tw, "  events lost\t%s\n", lost)
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write status: %w", err)
		}
		var total uint64
		type drop struct {
			reason string
			n      uint64
		}
		var drops []drop
		for reason, n := range c.Drops {
			total += n
			drops = append(drops, drop{reason, n})
		}
		// The biggest cause first.
		slices.SortFunc(drops, func(a, b drop) int {
			return cmp.Or(cmp.Compare(b.n, a.n), strings.Compare(a.reason, b.reason))
		})
		fmt.Fprintf(&b, "\nDrops: %d\n", total)
		width := 0
		for _, d := range drops {
			width = max(width, len(fmt.Sprint(d.n)))
		}
		for _, d := range drops {
			fmt.Fprintf(&b, "  %*d  %s\n", width, d.n, d.reason)
		}
	}

	if len(r.Degraded) > 0 {
		fmt.Fprintf(&b, "\n%s\n", pal.Bold(pal.Red("Degraded:")))
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		for _, d := range r.Degraded {
			fmt.Fprintf(tw, "  %s\t%s\n", d.Component, d.Reason)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write status: %w", err)
		}
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}

// since renders how long ago t was, to the second.
func since(now, t time.Time) string {
	d := now.Sub(t)
	if d < 0 {
		d = 0
	}
	return d.Truncate(time.Second).String()
}

// bytesString renders a byte count in binary units.
func bytesString(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
