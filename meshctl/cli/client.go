package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/lab"
	"github.com/veilmesh/veil/meshctl/output"
	"github.com/veilmesh/veil/policy"
)

// Where meshctl finds the agent.
const (
	defaultSocket = "/var/run/veil/agent.sock"
	envSocket     = "VEIL_SOCKET"
	// envLabState names the lab's state file, which maps node names to
	// agent sockets (see labResolver).
	envLabState = "VEIL_LAB_STATE"
	// apiVersion is the major version of the agent API meshctl speaks.
	apiVersion = "v1"
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
}

func newAgentOptions(root *cobra.Command, env agentEnv) *agentOptions {
	o := &agentOptions{env: env}
	fs := root.PersistentFlags()
	fs.StringVar(&o.socket, "socket", defaultSocket, "the local agent's API socket (env "+envSocket+")")
	fs.StringVar(&o.node, "node", "", "talk to the agent of node NAME instead of the local one")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Second, "how long to wait for the agent to answer (observe --follow waits as long as it runs)")
	o.socketSet = func() bool { return fs.Changed("socket") }
	return o
}

// agentTarget is how to reach one agent's API.
type agentTarget struct {
	// where names the agent in messages: its socket, and its node if known.
	where string
	// socket is the unix socket path, when the agent is reached by one.
	socket string
	dial   func(ctx context.Context) (net.Conn, error)
}

// NodeResolver finds the agent API of a node by the node's name.
//
// The lab resolves a node to its agent's socket on the same host
// (labResolver). In a cluster the agent of another node is reached through
// the API server, by a port-forward to that node's veil-agent pod; that
// resolver is not implemented yet (clusterResolver says so).
type NodeResolver interface {
	Resolve(ctx context.Context, node string) (agentTarget, error)
}

func unixTarget(where, socket string) agentTarget {
	return agentTarget{where: where, socket: socket, dial: func(ctx context.Context) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}}
}

// labResolver reads the lab's state file (lab.State) and reaches a node's
// agent through the socket it lists.
type labResolver struct{ path string }

var _ NodeResolver = labResolver{}

func (r labResolver) Resolve(_ context.Context, node string) (agentTarget, error) {
	st, err := lab.ReadStateFile(r.path)
	if err != nil {
		return agentTarget{}, usageErrorf("%s: %w", envLabState, err)
	}
	var names []string
	for _, n := range st.Nodes {
		if n.Name == node {
			if n.Socket == "" {
				return agentTarget{}, usageErrorf("lab state %s: node %s has no socket", r.path, node)
			}
			return unixTarget(fmt.Sprintf("%s (node %s)", n.Socket, node), n.Socket), nil
		}
		names = append(names, n.Name)
	}
	slices.Sort(names)
	return agentTarget{}, usageErrorf("node %q is not in the lab (%s lists: %s)", node, r.path, strings.Join(names, ", "))
}

// clusterResolver would reach another node's agent through the API server.
type clusterResolver struct{}

var _ NodeResolver = clusterResolver{}

func (clusterResolver) Resolve(_ context.Context, node string) (agentTarget, error) {
	return agentTarget{}, usageErrorf("--node %s: reaching another node's agent in a cluster goes through the API server to that node's veil-agent pod, "+
		"which meshctl does not implement yet; run meshctl on that node (e.g. kubectl exec into its veil-agent pod), "+
		"or set %s to a lab state file", node, envLabState)
}

// target resolves the flags to the agent to talk to.
func (o *agentOptions) target(ctx context.Context) (agentTarget, error) {
	if o.node != "" {
		if o.socketSet() {
			return agentTarget{}, usageErrorf("give --node or --socket, not both")
		}
		var r NodeResolver = clusterResolver{}
		if p := o.env.getenv(envLabState); p != "" {
			r = labResolver{path: p}
		}
		return r.Resolve(ctx, o.node)
	}
	socket := o.socket
	if !o.socketSet() {
		if s := o.env.getenv(envSocket); s != "" {
			socket = s
		}
	}
	return unixTarget(socket, socket), nil
}

// agentConn is a checked connection to an agent: it answered Status with
// an API version meshctl speaks.
type agentConn struct {
	client  agentv1.AgentClient
	conn    *grpc.ClientConn
	status  *agentv1.StatusResponse
	target  agentTarget
	timeout time.Duration

	// dialErr is why the last dial failed, to tell an agent that cannot be
	// reached from one that answers with an error.
	mu      sync.Mutex
	dialErr error
}

// connect dials the agent and checks its API version. The caller closes
// the connection.
func (o *agentOptions) connect(ctx context.Context) (*agentConn, error) {
	t, err := o.target(ctx)
	if err != nil {
		return nil, err
	}
	if o.timeout <= 0 {
		return nil, usageErrorf("--timeout must be positive")
	}
	c := &agentConn{target: t, timeout: o.timeout}
	dialer := func(ctx context.Context, _ string) (net.Conn, error) {
		conn, err := t.dial(ctx)
		c.mu.Lock()
		c.dialErr = err
		c.mu.Unlock()
		return conn, err
	}
	// The target's dialer decides where bytes go; the address is only a
	// name for gRPC.
	c.conn, err = grpc.NewClient("passthrough:///veil-agent",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(dialer))
	if err != nil {
		return nil, fmt.Errorf("create agent client: %w", err)
	}
	c.client = agentv1.NewAgentClient(c.conn)
	st, err := unary(ctx, c, "get agent status", func(ctx context.Context) (*agentv1.StatusResponse, error) {
		return c.client.Status(ctx, &agentv1.StatusRequest{})
	})
	if err != nil {
		c.conn.Close()
		return nil, err
	}
	if st.ApiVersion != apiVersion {
		c.conn.Close()
		v := st.ApiVersion
		if v == "" {
			v = "(none)"
		}
		return nil, &exitError{code: ExitUnreachable, err: fmt.Errorf(
			"the agent at %s serves API version %s, this meshctl speaks %s: use the meshctl release that matches the agent (agent version %s)",
			t.where, v, apiVersion, output.OrUnknown(st.AgentVersion))}
	}
	c.status = st
	return c, nil
}

func (c *agentConn) Close() error { return c.conn.Close() }

// unary calls fn within the connection's timeout and turns its error into
// one with the exit code meshctl documents.
func unary[T any](ctx context.Context, c *agentConn, op string, fn func(context.Context) (T, error)) (T, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	v, err := fn(ctx)
	if err != nil {
		var zero T
		return zero, c.callError(op, err)
	}
	return v, nil
}

// callError classifies an RPC error: the agent could not be reached or did
// not answer (exit 3), or it refused the question (exit 2).
func (c *agentConn) callError(op string, err error) error {
	st, _ := status.FromError(err)
	c.mu.Lock()
	dialErr := c.dialErr
	c.mu.Unlock()
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded:
		if dialErr != nil {
			return &exitError{code: ExitUnreachable, err: unreachable(c.target, dialErr)}
		}
		if st.Code() == codes.DeadlineExceeded {
			return &exitError{code: ExitUnreachable, err: fmt.Errorf(
				"%s: the agent at %s did not answer within %s (--timeout); see 'meshctl status --help' for troubleshooting",
				op, c.target.where, c.timeout)}
		}
		return &exitError{code: ExitUnreachable, err: fmt.Errorf("%s: the agent at %s is unavailable: %s", op, c.target.where, st.Message())}
	case codes.InvalidArgument, codes.NotFound, codes.FailedPrecondition, codes.OutOfRange:
		return usageErrorf("%s: %s", op, st.Message())
	case codes.Unimplemented:
		return &exitError{code: ExitUnreachable, err: fmt.Errorf(
			"%s: the agent at %s does not implement it (agent version %s): use the meshctl release that matches the agent",
			op, c.target.where, output.OrUnknown(c.agentVersion()))}
	case codes.Canceled:
		return &exitError{code: ExitUnreachable, err: fmt.Errorf("%s: canceled", op)}
	}
	return &exitError{code: ExitUnreachable, err: fmt.Errorf("%s: the agent at %s failed: %s: %s", op, c.target.where, st.Code(), st.Message())}
}

func (c *agentConn) agentVersion() string {
	if c.status == nil {
		return ""
	}
	return c.status.AgentVersion
}

// unreachable explains why the agent's socket could not be reached, and
// what to check.
func unreachable(t agentTarget, dialErr error) error {
	var hint string
	switch {
	case errors.Is(dialErr, os.ErrNotExist):
		hint = "no socket there: is veil-agent running on this node? Is --socket (or " + envSocket + ") right?"
	case errors.Is(dialErr, os.ErrPermission):
		hint = "permission denied: the socket is root-only (mode 0600); run meshctl as root (sudo meshctl …) or in the veil-agent pod"
	case errors.Is(dialErr, syscall.ECONNREFUSED):
		hint = "nothing listens on the socket: veil-agent is not running or is restarting"
	case errors.Is(dialErr, context.DeadlineExceeded):
		hint = "the socket did not accept the connection in time: is the agent overloaded?"
	default:
		hint = "is veil-agent running on this node?"
	}
	return fmt.Errorf("cannot reach veil-agent at %s: %v\n  %s\n  See 'meshctl status --help' for troubleshooting.", t.where, unwrapOpError(dialErr), hint)
}

// unwrapOpError drops net.OpError's "dial unix PATH:" prefix, which the
// message says already.
func unwrapOpError(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return op.Err
	}
	return err
}

// agentSource answers trace questions from the agent's live compiled state.
type agentSource struct{ c *agentConn }

var _ tracer = agentSource{}

func (a agentSource) Trace(ctx context.Context, from, to policy.Peer, port policy.PortProto) (policy.TraceResult, error) {
	resp, err := unary(ctx, a.c, "trace", func(ctx context.Context) (*agentv1.TraceResponse, error) {
		return a.c.client.Trace(ctx, &agentv1.TraceRequest{From: from.String(), To: to.String(), Port: portString(port)})
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
