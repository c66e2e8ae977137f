// Package agentclient reaches a node's veil-agent API for meshctl: it picks
// the agent from the user's choice (the local socket, VEIL_SOCKET, or
// --node through a NodeResolver), dials it, checks that it speaks API v1,
// and classifies what goes wrong so that the CLI can map it to its exit
// codes. It knows nothing of cobra.
//
//	t, err := agentclient.Selection{Socket: agentclient.DefaultSocket, Getenv: os.Getenv}.Target(ctx)
//	c, err := agentclient.Dial(ctx, t, 10*time.Second)
//	defer c.Close()
//	resp, err := agentclient.Unary(ctx, c, "list endpoints", func(ctx context.Context) (*agentv1.ListEndpointsResponse, error) {
//		return c.Client.ListEndpoints(ctx, &agentv1.ListEndpointsRequest{})
//	})
//
// Errors of reaching or asking an agent are *Error, whose Kind says whose
// fault they are.
package agentclient

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/output"
)

// Where meshctl finds the agent.
const (
	DefaultSocket = "/var/run/veil/agent.sock"
	EnvSocket     = "VEIL_SOCKET"
	// APIVersion is the major version of the agent API meshctl speaks.
	APIVersion = "v1"
)

// Kind is whose fault an Error is.
type Kind int

const (
	// Usage: the user asked for something that cannot be (an unknown
	// node, conflicting choices) or the agent refused the question.
	Usage Kind = iota + 1
	// Unreachable: the agent could not be reached or did not answer, or
	// speaks an API this meshctl does not.
	Unreachable
	// Forbidden: the API server's RBAC does not let the caller reach the
	// agent (see ForbiddenError).
	Forbidden
)

// Error is an error of reaching or asking an agent.
type Error struct {
	Kind Kind
	Err  error
}

func (e *Error) Error() string { return e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

func usageErrorf(format string, args ...any) error {
	return &Error{Kind: Usage, Err: fmt.Errorf(format, args...)}
}

func unreachableErr(err error) error { return &Error{Kind: Unreachable, Err: err} }

// Target is how to reach one agent's API.
type Target struct {
	// Where names the agent in messages: its socket, and its node if known.
	Where string
	// Socket is the unix socket path, when the agent is reached by one.
	Socket string
	Dial   func(ctx context.Context) (net.Conn, error)
}

// UnixTarget is the agent listening on socket, named where in messages.
func UnixTarget(where, socket string) Target {
	return Target{Where: where, Socket: socket, Dial: func(ctx context.Context) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}}
}

// NodeResolver finds the agent API of a node by the node's name.
//
// In a cluster the agent of a node is reached through the API server, by
// an exec into that node's veil-agent pod (ClusterResolver).
type NodeResolver interface {
	Resolve(ctx context.Context, node string) (Target, error)
}

// Selection is how the user chose the agent: the --socket and --node flags
// and the environment.
type Selection struct {
	Socket string
	// SocketSet is true when --socket was given, so that --node and
	// --socket are not both taken and --socket beats VEIL_SOCKET.
	SocketSet bool
	Node      string
	Getenv    func(string) string
	// Cluster makes the resolver of the cluster the kubeconfig names; nil,
	// or an error, when there is none.
	Cluster func(ctx context.Context) (NodeResolver, error)
}

// Target resolves the selection to the agent to talk to: --node through
// the cluster (the API server of the kubeconfig); without --node, the
// local socket (--socket, else VEIL_SOCKET, else the default).
func (s Selection) Target(ctx context.Context) (Target, error) {
	if s.Node != "" {
		if s.SocketSet {
			return Target{}, usageErrorf("give --node or --socket, not both")
		}
		if s.Cluster == nil {
			return Target{}, usageErrorf("--node %s: no cluster to find the node's agent in", s.Node)
		}
		r, err := s.Cluster(ctx)
		if err != nil {
			return Target{}, err
		}
		return r.Resolve(ctx, s.Node)
	}
	socket := s.Socket
	if !s.SocketSet {
		if e := s.Getenv(EnvSocket); e != "" {
			socket = e
		}
	}
	return UnixTarget(socket, socket), nil
}

// Conn is a checked connection to an agent: it answered Status with an API
// version meshctl speaks. It is safe for concurrent use.
type Conn struct {
	Client agentv1.AgentClient
	// Status is the agent's answer when the connection was checked.
	Status *agentv1.StatusResponse
	Target Target
	// Timeout bounds each call made through Unary.
	Timeout time.Duration

	conn *grpc.ClientConn
	// dialErr is why the last dial failed, to tell an agent that cannot be
	// reached from one that answers with an error.
	mu      sync.Mutex
	dialErr error
}

// Dial connects to the agent at t and checks its API version, each call
// bounded by timeout. The caller closes the connection.
func Dial(ctx context.Context, t Target, timeout time.Duration) (*Conn, error) {
	if timeout <= 0 {
		return nil, usageErrorf("--timeout must be positive")
	}
	c := &Conn{Target: t, Timeout: timeout}
	dialer := func(ctx context.Context, _ string) (net.Conn, error) {
		conn, err := t.Dial(ctx)
		c.mu.Lock()
		c.dialErr = err
		c.mu.Unlock()
		return conn, err
	}
	// The target's dialer decides where bytes go; the address is only a
	// name for gRPC.
	var err error
	c.conn, err = grpc.NewClient("passthrough:///veil-agent",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(dialer))
	if err != nil {
		return nil, fmt.Errorf("create agent client: %w", err)
	}
	c.Client = agentv1.NewAgentClient(c.conn)
	st, err := Unary(ctx, c, "get agent status", func(ctx context.Context) (*agentv1.StatusResponse, error) {
		return c.Client.Status(ctx, &agentv1.StatusRequest{})
	})
	if err != nil {
		c.conn.Close()
		return nil, err
	}
	if st.ApiVersion != APIVersion {
		c.conn.Close()
		v := st.ApiVersion
		if v == "" {
			v = "(none)"
		}
		return nil, unreachableErr(fmt.Errorf(
			"the agent at %s serves API version %s, this meshctl speaks %s: use the meshctl release that matches the agent (agent version %s)",
			t.Where, v, APIVersion, output.OrUnknown(st.AgentVersion)))
	}
	c.Status = st
	return c, nil
}

func (c *Conn) Close() error { return c.conn.Close() }

// Unary calls fn within the connection's timeout and classifies its error
// (CallError).
func Unary[T any](ctx context.Context, c *Conn, op string, fn func(context.Context) (T, error)) (T, error) {
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()
	v, err := fn(ctx)
	if err != nil {
		var zero T
		return zero, c.CallError(op, err)
	}
	return v, nil
}

// CallError classifies the error of the RPC op: the agent could not be
// reached or did not answer (Unreachable), or it refused the question
// (Usage).
func (c *Conn) CallError(op string, err error) error {
	st, _ := status.FromError(err)
	c.mu.Lock()
	dialErr := c.dialErr
	c.mu.Unlock()
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded:
		if dialErr != nil {
			return unreachableErr(unreachable(c.Target, dialErr))
		}
		if st.Code() == codes.DeadlineExceeded {
			return unreachableErr(fmt.Errorf(
				"%s: the agent at %s did not answer within %s (--timeout); see 'meshctl status --help' for troubleshooting",
				op, c.Target.Where, c.Timeout))
		}
		return unreachableErr(fmt.Errorf("%s: the agent at %s is unavailable: %s", op, c.Target.Where, st.Message()))
	case codes.InvalidArgument, codes.NotFound, codes.FailedPrecondition, codes.OutOfRange:
		return usageErrorf("%s: %s", op, st.Message())
	case codes.Unimplemented:
		return unreachableErr(fmt.Errorf(
			"%s: the agent at %s does not implement it (agent version %s): use the meshctl release that matches the agent",
			op, c.Target.Where, output.OrUnknown(c.agentVersion())))
	case codes.Canceled:
		return unreachableErr(fmt.Errorf("%s: canceled", op))
	}
	return unreachableErr(fmt.Errorf("%s: the agent at %s failed: %s: %s", op, c.Target.Where, st.Code(), st.Message()))
}

func (c *Conn) agentVersion() string {
	if c.Status == nil {
		return ""
	}
	return c.Status.AgentVersion
}

// unreachable explains why the agent's socket could not be reached, and
// what to check.
func unreachable(t Target, dialErr error) error {
	if isBridgeError(dialErr) {
		return fmt.Errorf("cannot reach veil-agent: %w\n  See 'meshctl status --help' for troubleshooting.", dialErr)
	}
	var hint string
	switch {
	case errors.Is(dialErr, os.ErrNotExist):
		hint = "no socket there: is veil-agent running on this node? Is --socket (or " + EnvSocket + ") right?"
	case errors.Is(dialErr, os.ErrPermission):
		hint = "permission denied: the socket is root-only (mode 0600); run meshctl as root (sudo meshctl …) or in the veil-agent pod"
	case errors.Is(dialErr, syscall.ECONNREFUSED):
		hint = "nothing listens on the socket: veil-agent is not running or is restarting"
	case errors.Is(dialErr, context.DeadlineExceeded):
		hint = "the socket did not accept the connection in time: is the agent overloaded?"
	default:
		hint = "is veil-agent running on this node?"
	}
	return fmt.Errorf("cannot reach veil-agent at %s: %v\n  %s\n  See 'meshctl status --help' for troubleshooting.", t.Where, unwrapOpError(dialErr), hint)
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
