package cli

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"

	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/meshctl/audit"
	"github.com/veilmesh/veil/meshctl/output"
)

func newAuditEncryptionCommand(agent *agentOptions, kube *kubeOptions) *cobra.Command {
	var (
		out  outputFlag
		opts audit.Options
		view audit.View
	)
	cmd := &cobra.Command{
		Use:   "encryption",
		Short: "Prove that pod traffic between nodes is encrypted: PASS or FAIL, with reasons",
		Long: `Audit transparent encryption across the cluster from the MeshNodes the
agents write and the Nodes' WireGuard annotations. Every check is a row
with its scope (a node, or an ordered node pair A→B), result and reason:

  per node
    status-fresh         the node has a MeshNode written within --stale-after
    encryption-enabled   WireGuard is up (kernel or userspace), not disabled
    key-present          the node has a public key
    key-published        the key matches the Node's wireguard.veil.dev/public-key
    claims               no other node already holds a pod CIDR, address,
                         endpoint or key the node claims (the agents give it
                         to the established owner; both nodes are named)
    key-age              the key is younger than --max-key-age
    strict-mode          strict mode is on (fail closed)
    guard                in strict mode, every device that leads off the node
                         has the guard that drops pod plaintext (a NIC or VLAN
                         without it would be a way around the tunnel)
    leaks                strict mode dropped no pod packet headed out unencrypted
    unencrypted-packets  no pod packet was sent to another node unencrypted
  per ordered node pair A→B
    peer                 A peers with B: A's view of B's key and endpoint
                         equals what B publishes (its Node's annotations) and
                         what B reports about itself (its MeshNode); A's
                         allowed IPs for B cover B's spec.podCIDRs and hold
                         nothing else (but B's InternalIPs, with
                         node-to-node encryption or strict mode)
    handshake            A's last handshake with B is within --max-handshake-age
    active               (--active) a marker sent from a pod on A to a pod on
                         B arrives through the tunnel and is never seen in the
                         clear on either node's underlay

--active asks A's agent to send a fresh random marker (UDP, to --marker-port
or a UDP port the pod declares, else 9) to a pod on B while both agents capture their underlay and tunnel devices
for --capture-duration. It PASSes when neither underlay carries the marker
or plaintext pod frames, both carry WireGuard, and B's tunnel shows the
marker arrived. Pairs where a node runs no pod are listed as not tested.
Each node's agent is reached through the API server, as --node does (an
exec into its veil-agent pod, which your RBAC must allow: the veil-meshctl
role), several nodes at a time; a pair whose agent cannot be reached
FAILs and says why.

What the audit trusts, as the agents do: the API server; spec.podCIDRs
(the control plane sets them, not the node); a node's wireguard.veil.dev/*
annotations and its MeshNode status only because admission policies let
nobody but that node's own agent write them; and, for --active, the
agents' captures. What it does not trust: one source alone. Every pair's
view is cross-checked against what the other node publishes and reports,
so a forged status or annotation FAILs, naming both nodes. (On the wire,
likewise, a packet's source address is believed only when it comes out of
the tunnel of the node that holds it.)

The default output is a summary whatever the cluster's size: the verdict,
the counts of nodes (reported, with tunnels up, with consistent keys) and
of node pairs, each check's passes and failures, then the failures (the
first --max-failures of them, and how many more). --details lists every
check; --node NAME lists one node's checks and those of the pairs it is on.

Pairs are judged from the first node's own peer view. Its MeshNode counts
its peers by health and lists only the unhealthy ones (no handshake within
3m, not configured, a key of no node) with their keys, endpoints and
allowed IPs, at most 100; each listed pair is judged as above. The healthy
peers are summed in a digest of their keys, endpoints and allowed IPs,
which the audit computes from what those nodes publish: when it matches,
every unlisted pair passes "peer"; when it does not (a view differs, or
the node lists fewer unhealthy peers than it has), every unlisted pair of
that node FAILs as not confirmed, since the digest cannot say which. Their
"handshake" passes when the node's oldest healthy handshake is within
--max-handshake-age. MeshNodes of older agents list every peer and are
judged pair by pair. Memory and time grow with the nodes and the unhealthy
pairs, not with the n·(n-1) pairs.

-o json is the evidence: verdict, generation time, meshctl version, API
server, thresholds, the summary, every node's MeshNode status (with its
update time and agent version) and the first --max-failures failures (with
failuresNotListed counting the rest); with --details also every check,
written as it is made, in a stable order.

Exit codes:
  0  PASS: every check passed
  1  FAIL: a check failed (each failure is listed with its reason)
  2  usage error, no kubeconfig
  3  the API server could not be reached or refused meshctl (with
     --active: RBAC forbids reaching the agents)`,
		Example: `  meshctl audit encryption
  meshctl audit encryption --node node-2
  meshctl audit encryption --details
  meshctl audit encryption -o json > encryption-audit.json
  meshctl audit encryption --max-handshake-age 3m --max-key-age 720h
  meshctl audit encryption --active`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.check(); err != nil {
				return err
			}
			if err := checkAuditOptions(opts); err != nil {
				return err
			}
			if view.MaxFailures <= 0 {
				return usageErrorf("--max-failures must be positive")
			}
			kc, err := kube.connect()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			timeout := withTimeout(agent.timeout)
			prog := newProgress(cmd.ErrOrStderr())
			prog.step("reading Nodes and MeshNodes")
			cs, err := readCluster(ctx, kc, timeout)
			prog.done()
			if err != nil {
				return err
			}
			view.Node = agent.node
			if view.Node != "" && !slices.ContainsFunc(cs.Nodes, func(n corev1.Node) bool { return n.Name == view.Node }) {
				return usageErrorf("node %q is not in the cluster (%s)", view.Node, output.Plural(len(cs.Nodes), "node"))
			}
			now := agent.env.now()
			prog.step("judging %s and %s", output.Plural(len(cs.Nodes), "node"), output.Plural(max(len(cs.Nodes)*(len(cs.Nodes)-1), 0), "node pair"))
			r := audit.New(cs, now, opts, buildVersion().Version)
			prog.done()
			if opts.Active {
				pods := map[string][]corev1.Pod{}
				for _, n := range cs.Nodes {
					if pods[n.Name], err = nodePods(ctx, kc, timeout, n.Name); err != nil {
						return err
					}
				}
				agent.purpose = "audit encryption --active"
				names := make([]string, len(cs.Nodes))
				for i, n := range cs.Nodes {
					names[i] = n.Name
				}
				conns := connectNodes(ctx, agent, names)
				defer conns.close()
				if err := conns.refused(); err != nil {
					return err
				}
				a := audit.NewActive(opts, conns.dial)
				defer a.Close()
				a.Run(ctx, &r, cs, pods)
			}
			prog.step("counting the checks")
			r.Finish(view.MaxFailures)
			prog.done()
			w := cmd.OutOrStdout()
			done, err := audit.WriteStructured(w, out.format, r, view)
			if err != nil {
				return err
			}
			if !done {
				if err := audit.Write(w, output.PaletteFor(w), r, view); err != nil {
					return err
				}
			}
			if r.Verdict != audit.Pass {
				return failed()
			}
			return nil
		},
	}
	fs := cmd.Flags()
	fs.DurationVar(&opts.MaxHandshakeAge, "max-handshake-age", 5*time.Minute, "FAIL a node pair whose last WireGuard handshake is older")
	fs.DurationVar(&opts.MaxKeyAge, "max-key-age", 2160*time.Hour, "FAIL a node whose key is older (rotate it with meshctl encryption rotate-key)")
	fs.DurationVar(&opts.StaleAfter, "stale-after", audit.DefaultStaleAfter, "FAIL a node whose MeshNode status is older (its agent is not running)")
	fs.BoolVar(&opts.Active, "active", false, "also send a marker between pods on every node pair and have the agents capture the wire")
	fs.DurationVar(&opts.CaptureDuration, "capture-duration", 2*time.Second, "how long each agent captures per node pair with --active")
	fs.Uint32Var(&opts.MarkerPort, "marker-port", 0, "the UDP port the --active marker is sent to (default: a UDP port the destination pod declares, else 9; the pod need not listen)")
	fs.BoolVar(&view.Details, "details", false, "list every check, not only the summary and the failures")
	fs.IntVar(&view.MaxFailures, "max-failures", audit.DefaultMaxFailures, "list at most this many failures, also in -o json (the rest are counted; --details lists them all)")
	addOutputFlag(cmd, &out)
	return cmd
}

// checkAuditOptions refuses thresholds the audit cannot use.
func checkAuditOptions(o audit.Options) error {
	for _, f := range []struct {
		name string
		d    time.Duration
	}{{"--max-handshake-age", o.MaxHandshakeAge}, {"--max-key-age", o.MaxKeyAge}, {"--stale-after", o.StaleAfter}, {"--capture-duration", o.CaptureDuration}} {
		if f.d <= 0 {
			return usageErrorf("%s must be positive", f.name)
		}
	}
	// The agent refuses captures longer than 10s.
	if o.CaptureDuration > 10*time.Second {
		return usageErrorf("--capture-duration must be at most 10s")
	}
	if o.MarkerPort > 65535 {
		return usageErrorf("--marker-port must be 1..65535")
	}
	return nil
}

// nodeConns are the connections to many nodes' agents, dialled a few at a
// time, or why each could not be made.
type nodeConns struct {
	conns map[string]*agentclient.Conn
	errs  map[string]error
	nodes []string
}

// connectNodes dials the agents of nodes, at most maxParallelAgents at once.
func connectNodes(ctx context.Context, agent *agentOptions, nodes []string) *nodeConns {
	nc := &nodeConns{conns: map[string]*agentclient.Conn{}, errs: map[string]error{}, nodes: nodes}
	var (
		mu  sync.Mutex
		wg  sync.WaitGroup
		sem = make(chan struct{}, maxParallelAgents)
	)
	for _, n := range nodes {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			c, err := agent.connectNode(ctx, n)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				nc.errs[n] = err
				return
			}
			nc.conns[n] = c
		})
	}
	wg.Wait()
	return nc
}

// dial is an audit.Dialer over the connections made.
func (nc *nodeConns) dial(_ context.Context, node string) (*agentclient.Conn, error) {
	if c, ok := nc.conns[node]; ok {
		return c, nil
	}
	if err, ok := nc.errs[node]; ok {
		return nil, err
	}
	return nil, fmt.Errorf("node %s was not dialled", node)
}

// refused is the refusal by RBAC that kept meshctl from every agent: one
// fact about the caller, not a finding about the nodes.
func (nc *nodeConns) refused() error {
	if len(nc.nodes) == 0 || len(nc.errs) != len(nc.nodes) {
		return nil
	}
	var forbidden *agentclient.ForbiddenError
	if err := nc.errs[nc.nodes[0]]; errors.As(err, &forbidden) {
		return err
	}
	return nil
}

func (nc *nodeConns) close() {
	for _, c := range nc.conns {
		c.Close()
	}
}
