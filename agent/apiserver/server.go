// Package apiserver serves the agent API on its unix socket: it answers
// meshctl and veil-cni from narrow views of the agent's components, and
// changes nothing but what an RPC asks for (CNI calls, key rotation).
package apiserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/endpoints"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// APIVersion is the major version of the agent API this agent serves.
const APIVersion = "v1"

// CNIService handles the CNI calls of the API (agent/cni implements it).
type CNIService interface {
	Add(context.Context, *agentv1.CNIRequest) (*agentv1.CNIResponse, error)
	Del(context.Context, *agentv1.CNIRequest) (*agentv1.CNIResponse, error)
	Check(context.Context, *agentv1.CNIRequest) (*agentv1.CNIResponse, error)
}

// Endpoints is the local endpoint registry (agent/endpoints).
type Endpoints interface {
	List() []endpoints.Endpoint
	Get(policy.EndpointID) (endpoints.Endpoint, bool)
}

// Policy is the compiler's view of policy.
type Policy interface {
	Endpoint(policy.EndpointID) (policy.Endpoint, bool)
	Rule(id uint32) (policy.Rule, bool)
	Rules() []policy.Rule
	Identities() []policy.IdentityInfo
	Invalid() []*policy.PolicyError
	Trace(from, to policy.Peer, proto uint8, port uint16) (policy.TraceResult, error)
}

// Datapath is what the API reads of the node's datapath.
type Datapath interface {
	Endpoints() ([]datapath.Endpoint, error)
	Acceleration() (on bool, reason string)
	Counters() (datapath.Counters, error)
	AcceleratedSockets() (int, error)
	PolicyCounters(ip netip.Addr) ([]datapath.PolicyCounter, error)
	Underlay() string
}

// Flows is the log of recent flows.
type Flows interface {
	// Snapshot returns the stored flows, oldest first, and (when follow) a
	// channel of new ones registered atomically with the snapshot.
	Snapshot(follow bool) ([]*agentv1.Flow, chan *agentv1.Flow)
	Unfollow(chan *agentv1.Flow)
}

// Health is the agent's own account of how it is doing.
type Health interface {
	APIServerConnected() bool
	// LastSync is when an object last synced, in Unix nanoseconds.
	LastSync() int64
	Converged() bool
	// Degraded maps a component to why it works worse than it should.
	Degraded() map[string]string
	// IdentityLabels names an identity's labels.
	IdentityLabels(identity.ID) []string
}

// Encryption is the node's WireGuard encryption.
type Encryption interface {
	// TunnelInterface names the WireGuard device; "" when encryption is off.
	TunnelInterface() string
	RotateKey(ctx context.Context) (oldFingerprint, newFingerprint string, err error)
}

// Config is what a Server needs.
type Config struct {
	SocketPath   string
	NodeName     string
	AgentVersion string
	// PodCIDR is this node's pod range; invalid when it has none.
	PodCIDR netip.Prefix
	// ClusterCIDR is every node's pod range, which captures count
	// plaintext pod frames of.
	ClusterCIDR netip.Prefix
	// CgroupRoot is where the socket programs attach; "" when they do not.
	CgroupRoot      string
	WireGuardPort   int
	StartedUnixNano int64

	Endpoints  Endpoints
	Policy     Policy
	Datapath   Datapath
	Flows      Flows
	Health     Health
	Encryption Encryption
	// Services is the Service map sync; nil when the agent has no datapath.
	Services Services
	// CNI serves the CNI calls; nil until the pod network is ready.
	CNI CNIService
	Log *slog.Logger
}

// Server is the agent API.
type Server struct {
	agentv1.UnimplementedAgentServer
	cfg Config
	srv *grpc.Server
}

var _ agentv1.AgentServer = (*Server)(nil)

// New returns a server over cfg's components; Start serves it.
func New(cfg Config) *Server {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg}
}

// Start listens on the unix socket, readable and writable by root only,
// and serves until Stop.
func (s *Server) Start() error {
	path := s.cfg.SocketPath
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("create socket directory: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("restrict socket: %w", err)
	}
	s.srv = grpc.NewServer()
	agentv1.RegisterAgentServer(s.srv, s)
	go func() {
		if err := s.srv.Serve(ln); err != nil {
			s.cfg.Log.Error("API server stopped", "error", err)
		}
	}()
	s.cfg.Log.Info("serving the agent API", "socket", path)
	return nil
}

// Stop closes the socket and ends every call.
func (s *Server) Stop() {
	if s.srv != nil {
		s.srv.Stop()
	}
}

func (s *Server) Status(ctx context.Context, _ *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	c := s.cfg
	resp := &agentv1.StatusResponse{
		ApiVersion: APIVersion, AgentVersion: c.AgentVersion, Node: c.NodeName,
		ApiServerConnected: c.Health.APIServerConnected(), LastSyncUnixNano: c.Health.LastSync(),
		StartedUnixNano: c.StartedUnixNano, SocketAcceleration: c.CgroupRoot != "",
		Converged: c.Health.Converged(),
	}
	if c.PodCIDR.IsValid() {
		resp.PodCidr = c.PodCIDR.String()
	}
	resp.Endpoints = int32(len(c.Endpoints.List()))
	resp.Identities = int32(len(c.Policy.Identities()))
	resp.InvalidPolicies = int32(len(c.Policy.Invalid()))
	policies := map[policy.PolicyRef]bool{}
	for _, r := range c.Policy.Rules() {
		policies[r.Policy] = true
	}
	resp.Policies = int32(len(policies))
	eps, _ := c.Datapath.Endpoints()
	resp.Programs = []*agentv1.Program{
		{Name: "from-pod", AttachPoint: "tc ingress of pod veths", Attached: int32(len(eps))},
		{Name: "to-pod", AttachPoint: "tc egress of pod veths", Attached: int32(len(eps))},
		{Name: "from-netdev", AttachPoint: "tc ingress of the underlay", Attached: 1},
	}
	if on, _ := c.Datapath.Acceleration(); on {
		resp.Programs = append(resp.Programs,
			&agentv1.Program{Name: "sockops", AttachPoint: "cgroup " + c.CgroupRoot, Attached: 1},
			&agentv1.Program{Name: "sk_msg", AttachPoint: "veil_sockhash", Attached: 1})
	}
	// Reported, not recorded: asking for status changes nothing.
	if !resp.Converged {
		resp.Degraded = append(resp.Degraded, &agentv1.Degraded{Component: "sync", Reason: "not converged with the API server yet"})
	}
	for _, perr := range c.Policy.Invalid() {
		resp.Degraded = append(resp.Degraded, &agentv1.Degraded{Component: "policy " + perr.Policy.String(), Reason: perr.Error()})
	}
	for component, reason := range c.Health.Degraded() {
		resp.Degraded = append(resp.Degraded, &agentv1.Degraded{Component: component, Reason: reason})
	}
	sort.Slice(resp.Degraded, func(i, j int) bool { return resp.Degraded[i].Component < resp.Degraded[j].Component })
	resp.Healthy = len(resp.Degraded) == 0
	if cs, err := c.Datapath.Counters(); err == nil {
		counters := &agentv1.Counters{
			Drops:          map[string]uint64{},
			ForwardedLocal: cs.Local.Packets, ForwardedRemote: cs.Remote.Packets, ForwardedStack: cs.Stack.Packets,
			Established: cs.Established.Packets, Audit: cs.Audit.Packets, EventsLost: cs.EventsLost,
			SocketRedirectedBytes: cs.SocketRedirected.Bytes,
		}
		for r, v := range cs.Drops {
			counters.Drops[r.String()] = v.Packets
		}
		if n, err := c.Datapath.AcceleratedSockets(); err == nil {
			counters.AcceleratedSockets = int32(n)
		}
		resp.Counters = counters
	}
	return resp, nil
}

func labelStrings(ls identity.Labels) []string {
	out := make([]string, len(ls))
	for i, l := range ls {
		out[i] = l.String()
	}
	return out
}

func (s *Server) ListEndpoints(ctx context.Context, _ *agentv1.ListEndpointsRequest) (*agentv1.ListEndpointsResponse, error) {
	c := s.cfg
	resp := &agentv1.ListEndpointsResponse{}
	for _, e := range c.Endpoints.List() {
		out := &agentv1.Endpoint{
			Namespace: e.Pod.Namespace, Name: e.Pod.Name, Ip: e.IP.String(), Id: e.ID,
			Identity: uint32(e.Identity), Interface: e.HostVeth, ContainerId: e.ContainerID,
		}
		ce, ok := c.Policy.Endpoint(e.Pod)
		if ok {
			out.PolicyEntries = int32(len(ce.Entries))
			out.IngressEnforced = ce.Defaults.IngressEnforce == policytypes.Deny
			out.EgressEnforced = ce.Defaults.EgressEnforce == policytypes.Deny
		}
		if !ok || e.Pending {
			// writeEndpoint gave it deny-all.
			out.PolicyEntries, out.IngressEnforced, out.EgressEnforced = 0, true, true
		}
		out.Labels = c.Health.IdentityLabels(e.Identity)
		resp.Endpoints = append(resp.Endpoints, out)
	}
	sort.Slice(resp.Endpoints, func(i, j int) bool {
		a, b := resp.Endpoints[i], resp.Endpoints[j]
		return a.Namespace+"/"+a.Name < b.Namespace+"/"+b.Name
	})
	return resp, nil
}

func (s *Server) ListIdentities(ctx context.Context, _ *agentv1.ListIdentitiesRequest) (*agentv1.ListIdentitiesResponse, error) {
	c := s.cfg
	count := map[identity.ID]int32{}
	for _, e := range c.Endpoints.List() {
		count[e.Identity]++
	}
	resp := &agentv1.ListIdentitiesResponse{}
	for _, id := range []identity.ID{identity.Host, identity.World, identity.Unmanaged, identity.Health, identity.RemoteNode} {
		resp.Identities = append(resp.Identities, &agentv1.Identity{
			Id: uint32(id), Labels: []string{"reserved:" + id.ReservedName()}, Reserved: true, Endpoints: count[id],
		})
	}
	for _, info := range c.Policy.Identities() {
		resp.Identities = append(resp.Identities, &agentv1.Identity{
			Id: uint32(info.ID), Labels: labelStrings(info.Labels), Endpoints: count[info.ID],
		})
	}
	return resp, nil
}

func (s *Server) GetPolicy(ctx context.Context, req *agentv1.GetPolicyRequest) (*agentv1.GetPolicyResponse, error) {
	c := s.cfg
	id := policy.EndpointID{Namespace: req.Namespace, Name: req.Name}
	ep, ok := c.Policy.Endpoint(id)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no endpoint %s known to this agent", id)
	}
	epJSON, err := json.Marshal(ep)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encode endpoint: %v", err)
	}
	var rules []policy.Rule
	seen := map[uint32]bool{}
	for _, e := range ep.Entries {
		if e.RuleID == 0 || seen[e.RuleID] {
			continue
		}
		seen[e.RuleID] = true
		if r, ok := c.Policy.Rule(e.RuleID); ok {
			rules = append(rules, r)
		}
	}
	rulesJSON, err := json.Marshal(rules)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encode rules: %v", err)
	}
	resp := &agentv1.GetPolicyResponse{EndpointJson: epJSON, RulesJson: rulesJSON}
	if local, ok := c.Endpoints.Get(id); ok {
		counters, err := c.Datapath.PolicyCounters(local.IP)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "read counters: %v", err)
		}
		for _, pc := range counters {
			resp.Counters = append(resp.Counters, &agentv1.PolicyCounter{
				RuleId: pc.RuleID, Direction: pc.Key.Direction.String(), Identity: uint32(pc.Key.Identity),
				Protocol: policy.ProtoName(pc.Key.Proto), Port: uint32(pc.Key.Port), PortPrefixLen: uint32(pc.Key.PortPrefixLen),
				Hits: pc.Hits, Bytes: pc.Bytes,
			})
		}
	}
	return resp, nil
}

func (s *Server) Trace(ctx context.Context, req *agentv1.TraceRequest) (*agentv1.TraceResponse, error) {
	from, err := policy.ParsePeer(req.From)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	to, err := policy.ParsePeer(req.To)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	pp, err := policy.ParsePortProto(req.Port)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	tr, err := s.cfg.Policy.Trace(from, to, pp.Proto, pp.Port)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	raw, err := json.Marshal(tr)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encode trace: %v", err)
	}
	return &agentv1.TraceResponse{ResultJson: raw}, nil
}

func (s *Server) cniService() (CNIService, error) {
	if s.cfg.CNI == nil {
		return nil, status.Error(codes.Unavailable, "the agent's CNI service is not running yet")
	}
	return s.cfg.CNI, nil
}

func (s *Server) CNIAdd(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	c, err := s.cniService()
	if err != nil {
		return nil, err
	}
	return c.Add(ctx, req)
}

func (s *Server) CNIDel(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	c, err := s.cniService()
	if err != nil {
		return nil, err
	}
	return c.Del(ctx, req)
}

func (s *Server) CNICheck(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	c, err := s.cniService()
	if err != nil {
		return nil, err
	}
	return c.Check(ctx, req)
}
