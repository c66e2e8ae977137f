package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/spf13/cobra"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/policy"
)

// agentEnv is what the agent commands take from the process: environment
// variables and the clock. Tests substitute their own.
type agentEnv struct {
	getenv func(string) string
	now    func() time.Time
	// loc is the time zone flow times are shown in.
	loc *time.Location
}

func processEnv() agentEnv {
	return agentEnv{getenv: os.Getenv, now: time.Now, loc: time.Local}
}

// agentOptions are the global flags that say which agent to talk to, shared
// by every command that talks to one.
type agentOptions struct {
	env     agentEnv
	socket  string
	node    string
	timeout time.Duration
	// socketSet is true when --socket was given, so that --node and
	// --socket are not both taken.
	socketSet func() bool
	// kube reaches the cluster, whose API server leads to other nodes'
	// agents.
	kube *kubeOptions
	// purpose names, in a refusal by RBAC, what needed the cluster's
	// agents; commands that reach many set their own.
	purpose string

	mu       sync.Mutex
	resolver *agentclient.ClusterResolver
}

func newAgentOptions(root *cobra.Command, env agentEnv, kube *kubeOptions) *agentOptions {
	o := &agentOptions{env: env, kube: kube, purpose: "--node"}
	fs := root.PersistentFlags()
	fs.StringVar(&o.socket, "socket", agentclient.DefaultSocket, "the local agent's API socket (env "+agentclient.EnvSocket+")")
	fs.StringVar(&o.node, "node", "", "talk to the agent of node NAME instead of the local one, through the API server (exec into its veil-agent pod)")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Second, "how long to wait for the agent to answer (observe --follow waits as long as it runs)")
	o.socketSet = func() bool { return fs.Changed("socket") }
	return o
}

// connect dials the agent the flags name and checks its API version. The
// caller closes the connection.
func (o *agentOptions) connect(ctx context.Context) (*agentclient.Conn, error) {
	return o.dial(ctx, agentclient.Selection{Socket: o.socket, SocketSet: o.socketSet(), Node: o.node, Getenv: o.env.getenv, Cluster: o.cluster})
}

func (o *agentOptions) dial(ctx context.Context, sel agentclient.Selection) (*agentclient.Conn, error) {
	t, err := sel.Target(ctx)
	if err != nil {
		return nil, exitFor(err)
	}
	c, err := agentclient.Dial(ctx, t, o.timeout)
	return c, exitFor(err)
}

// connectNode dials the agent of node through the --node resolver, for
// commands that talk to many agents. It is safe for concurrent use.
func (o *agentOptions) connectNode(ctx context.Context, node string) (*agentclient.Conn, error) {
	return o.dial(ctx, agentclient.Selection{Node: node, Getenv: o.env.getenv, Cluster: o.cluster})
}

// cluster is the resolver of the cluster the kubeconfig names, made once
// per command so that RBAC is asked once.
func (o *agentOptions) cluster(context.Context) (agentclient.NodeResolver, error) {
	r, err := o.clusterResolver()
	if err != nil {
		return nil, err
	}
	return r, nil
}

func (o *agentOptions) clusterResolver() (*agentclient.ClusterResolver, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.resolver != nil {
		return o.resolver, nil
	}
	kc, err := o.kube.connect()
	if err != nil {
		return nil, err
	}
	o.resolver = agentclient.NewClusterResolver(kc.core, kc.exec, deploy.Namespace, o.purpose)
	return o.resolver, nil
}

// checkClusterAccess fails, with the missing permission named, when the
// caller may not reach agents through the API server.
func (o *agentOptions) checkClusterAccess(ctx context.Context) error {
	r, err := o.clusterResolver()
	if err != nil {
		return err
	}
	return exitFor(r.CheckAccess(ctx))
}

// unary is agentclient.Unary with its error turned into meshctl's exit
// code.
func unary[T any](ctx context.Context, c *agentclient.Conn, op string, fn func(context.Context) (T, error)) (T, error) {
	v, err := agentclient.Unary(ctx, c, op, fn)
	return v, exitFor(err)
}

// callError is Conn.CallError with meshctl's exit code.
func callError(c *agentclient.Conn, op string, err error) error {
	return exitFor(c.CallError(op, err))
}

// exitFor gives an agentclient error the exit code meshctl documents:
// 2 for a usage error, 3 for an agent that cannot be reached or answered
// and for an API server that refuses to lead to it (RBAC).
func exitFor(err error) error {
	var ae *agentclient.Error
	if !errors.As(err, &ae) {
		return err
	}
	code := ExitUnreachable
	if ae.Kind == agentclient.Usage {
		code = ExitUsage
	}
	return &exitError{code: code, err: ae.Err}
}

// agentSource answers trace questions from the agent's live compiled state.
type agentSource struct{ c *agentclient.Conn }

var _ tracer = agentSource{}

func (a agentSource) Trace(ctx context.Context, from, to policy.Peer, port policy.PortProto) (policy.TraceResult, error) {
	resp, err := unary(ctx, a.c, "trace", func(ctx context.Context) (*agentv1.TraceResponse, error) {
		return a.c.Client.Trace(ctx, &agentv1.TraceRequest{From: from.String(), To: to.String(), Port: portString(port)})
	})
	if err != nil {
		return policy.TraceResult{}, err
	}
	var tr policy.TraceResult
	if err := json.Unmarshal(resp.ResultJson, &tr); err != nil {
		return policy.TraceResult{}, &exitError{code: ExitUnreachable, err: fmt.Errorf("decode the agent's trace: %w", err)}
	}
	return tr, nil
}
