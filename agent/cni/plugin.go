package cni

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
)

// About is what veil-cni prints when run without CNI_COMMAND.
const About = "veil-cni: Veil's CNI plugin; it forwards ADD, DEL and CHECK to veil-agent over its unix socket"

// Plugin is veil-cni, the binary kubelet's runtime runs: it forwards each
// call to the agent and prints the agent's answer.
//
// DEL fails with a retryable error (code 11) while the agent is unreachable,
// so the runtime retries it and the pod's address is not leaked.
type Plugin struct {
	// Stdout receives the result of ADD.
	Stdout io.Writer
}

// Funcs are the plugin's commands for skel.PluginMainFuncs.
func (p *Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: p.add, Del: p.del, Check: p.check, Status: p.status}
}

// VersionInfo is what VERSION reports.
func VersionInfo() version.PluginInfo {
	return version.PluginSupports(SupportedVersions...)
}

func (p *Plugin) add(args *skel.CmdArgs) error {
	resp, conf, err := p.call(args, agentv1.AgentClient.CNIAdd)
	if err != nil {
		return err
	}
	if len(resp.GetResultJson()) == 0 {
		return types.NewError(types.ErrInternal, "veil-agent answered ADD without a result", "agent socket "+conf.AgentSocket)
	}
	res, err := types100.NewResult(resp.GetResultJson())
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode veil-agent's ADD result: %v", err), "")
	}
	out, err := res.GetAsVersion(conf.CNIVersion)
	if err != nil {
		return types.NewError(types.ErrIncompatibleCNIVersion, fmt.Sprintf("convert the result to CNI %s: %v", conf.CNIVersion, err), "")
	}
	if err := out.PrintTo(p.Stdout); err != nil {
		return types.NewError(types.ErrIOFailure, fmt.Sprintf("print result: %v", err), "")
	}
	return nil
}

func (p *Plugin) del(args *skel.CmdArgs) error {
	_, _, err := p.call(args, agentv1.AgentClient.CNIDel)
	return err
}

func (p *Plugin) check(args *skel.CmdArgs) error {
	_, _, err := p.call(args, agentv1.AgentClient.CNICheck)
	return err
}

// status (CNI 1.1 STATUS) reports whether pods can be wired: the runtime
// marks the node's network not ready while the agent does not answer.
func (p *Plugin) status(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	err = withAgent(conf, func(ctx context.Context, c agentv1.AgentClient) error {
		_, err := c.Status(ctx, &agentv1.StatusRequest{})
		return err
	})
	if err != nil {
		msg := err.Error()
		var ce *types.Error
		if errors.As(err, &ce) {
			msg = ce.Msg
		}
		return types.NewError(types.ErrPluginNotAvailable, msg, "agent socket "+conf.AgentSocket)
	}
	return nil
}

type rpc func(agentv1.AgentClient, context.Context, *agentv1.CNIRequest, ...grpc.CallOption) (*agentv1.CNIResponse, error)

// call validates the config, forwards the call within the config's timeout
// and turns failures into CNI errors.
func (p *Plugin) call(args *skel.CmdArgs, method rpc) (*agentv1.CNIResponse, *NetConf, error) {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return nil, nil, types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	var resp *agentv1.CNIResponse
	err = withAgent(conf, func(ctx context.Context, c agentv1.AgentClient) error {
		var err error
		resp, err = method(c, ctx, &agentv1.CNIRequest{
			ContainerId: args.ContainerID,
			Netns:       args.Netns,
			Ifname:      args.IfName,
			Args:        args.Args,
			Config:      args.StdinData,
		})
		return err
	})
	if err != nil {
		return nil, conf, err
	}
	return resp, conf, nil
}

// withAgent runs fn against the agent within the config's timeout; its
// error is always a *types.Error.
func withAgent(conf *NetConf, fn func(context.Context, agentv1.AgentClient) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), conf.Timeout())
	defer cancel()

	// The dialer remembers why the socket could not be reached, so that
	// "agent not running" is told apart from an agent that answers badly.
	var (
		mu      sync.Mutex
		dialErr error
	)
	dialer := func(ctx context.Context, _ string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, "unix", conf.AgentSocket)
		mu.Lock()
		dialErr = err
		mu.Unlock()
		return c, err
	}
	conn, err := grpc.NewClient("passthrough:///veil-agent",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(dialer))
	if err != nil {
		return types.NewError(types.ErrInternal, fmt.Sprintf("create agent client: %v", err), "")
	}
	defer conn.Close()

	if err := fn(ctx, agentv1.NewAgentClient(conn)); err != nil {
		mu.Lock()
		de := dialErr
		mu.Unlock()
		return toCNIError(err, de, conf)
	}
	return nil
}

// toCNIError maps the agent's gRPC status to a CNI error code: 7 for bad
// input, 11 (try again later) for anything that may pass on its own, 999
// with the agent's message for the rest.
func toCNIError(err, dialErr error, conf *NetConf) *types.Error {
	socket := "agent socket " + conf.AgentSocket
	st, _ := status.FromError(err)
	if dialErr != nil && (st.Code() == codes.Unavailable || st.Code() == codes.DeadlineExceeded) {
		return types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("cannot reach veil-agent: is veil-agent running on this node? socket %s: %v", conf.AgentSocket, unwrapDial(dialErr)), "")
	}
	switch st.Code() {
	case codes.InvalidArgument:
		return types.NewError(types.ErrInvalidNetworkConfig, st.Message(), "")
	case codes.ResourceExhausted:
		return types.NewError(types.ErrTryAgainLater, st.Message(), socket)
	case codes.Unavailable:
		return types.NewError(types.ErrTryAgainLater, "veil-agent is not ready: "+st.Message(), socket)
	case codes.DeadlineExceeded:
		return types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("veil-agent did not finish within %s (timeoutSeconds in the network config): %s", conf.Timeout(), st.Message()), socket)
	default:
		return types.NewError(types.ErrInternal, st.Message(), fmt.Sprintf("veil-agent answered %s; %s", st.Code(), socket))
	}
}

// unwrapDial drops net.OpError's "dial unix /path:" prefix, which the
// message already says.
func unwrapDial(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return op.Err
	}
	return err
}
