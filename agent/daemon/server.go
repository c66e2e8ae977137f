package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/veilmesh/veil/agent/api/v1"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
)

// APIVersion is the major version of the agent API this agent serves.
const APIVersion = "v1"

// CNIService handles the CNI calls of the API (agent/cni implements it).
type CNIService interface {
	Add(context.Context, *agentv1.CNIRequest) (*agentv1.CNIResponse, error)
	Del(context.Context, *agentv1.CNIRequest) (*agentv1.CNIResponse, error)
	Check(context.Context, *agentv1.CNIRequest) (*agentv1.CNIResponse, error)
}

type apiServer struct {
	agentv1.UnimplementedAgentServer
	d *Daemon
}

// serveAPI listens on the unix socket, readable and writable by root only.
func (d *Daemon) serveAPI() (*grpc.Server, error) {
	if err := os.MkdirAll(filepath.Dir(d.cfg.SocketPath), 0o700); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if err := os.Remove(d.cfg.SocketPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket: %w", err)
	}
	ln, err := net.Listen("unix", d.cfg.SocketPath)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", d.cfg.SocketPath, err)
	}
	if err := os.Chmod(d.cfg.SocketPath, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("restrict socket: %w", err)
	}
	srv := grpc.NewServer()
	agentv1.RegisterAgentServer(srv, &apiServer{d: d})
	go func() {
		if err := srv.Serve(ln); err != nil {
			d.log.Error("API server stopped", "error", err)
		}
	}()
	d.log.Info("serving the agent API", "socket", d.cfg.SocketPath)
	return srv, nil
}

func (s *apiServer) Status(ctx context.Context, _ *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	d := s.d
	resp := &agentv1.StatusResponse{
		ApiVersion: APIVersion, AgentVersion: Version, Node: d.cfg.NodeName,
		ApiServerConnected: d.apiUp.Load(), LastSyncUnixNano: d.lastSync.Load(),
		StartedUnixNano: d.started.UnixNano(), SocketAcceleration: d.cfg.CgroupRoot != "",
		Converged: d.endpoints.Converged(),
	}
	if d.podCIDR.IsValid() {
		resp.PodCidr = d.podCIDR.String()
	}
	resp.Endpoints = int32(d.endpoints.Len())
	resp.Identities = int32(len(d.compiler.Identities()))
	resp.InvalidPolicies = int32(len(d.compiler.Invalid()))
	policies := map[policy.PolicyRef]bool{}
	for _, r := range d.compiler.Rules() {
		policies[r.Policy] = true
	}
	resp.Policies = int32(len(policies))
	eps, _ := d.dp.Endpoints()
	resp.Programs = []*agentv1.Program{
		{Name: "from-pod", AttachPoint: "tc ingress of pod veths", Attached: int32(len(eps))},
		{Name: "to-pod", AttachPoint: "tc egress of pod veths", Attached: int32(len(eps))},
		{Name: "from-netdev", AttachPoint: "tc ingress of the underlay", Attached: 1},
	}
	if on, _ := d.dp.Acceleration(); on {
		resp.Programs = append(resp.Programs,
			&agentv1.Program{Name: "sockops", AttachPoint: "cgroup " + d.cfg.CgroupRoot, Attached: 1},
			&agentv1.Program{Name: "sk_msg", AttachPoint: "veil_sockhash", Attached: 1})
	}
	if !d.endpoints.Converged() {
		d.setDegraded("sync", "not converged with the API server yet")
	} else {
		d.clearDegraded("sync")
	}
	for _, perr := range d.compiler.Invalid() {
		resp.Degraded = append(resp.Degraded, &agentv1.Degraded{Component: "policy " + perr.Policy.String(), Reason: perr.Error()})
	}
	d.degraded.Range(func(k, v any) bool {
		resp.Degraded = append(resp.Degraded, &agentv1.Degraded{Component: k.(string), Reason: v.(string)})
		return true
	})
	sort.Slice(resp.Degraded, func(i, j int) bool { return resp.Degraded[i].Component < resp.Degraded[j].Component })
	resp.Healthy = len(resp.Degraded) == 0
	if cs, err := d.dp.Counters(); err == nil {
		c := &agentv1.Counters{
			Drops:          map[string]uint64{},
			ForwardedLocal: cs.Local.Packets, ForwardedRemote: cs.Remote.Packets, ForwardedStack: cs.Stack.Packets,
			Established: cs.Established.Packets, Audit: cs.Audit.Packets, EventsLost: cs.EventsLost,
			SocketRedirectedBytes: cs.SocketRedirected.Bytes,
		}
		for r, v := range cs.Drops {
			c.Drops[r.String()] = v.Packets
		}
		if n, err := d.dp.AcceleratedSockets(); err == nil {
			c.AcceleratedSockets = int32(n)
		}
		resp.Counters = c
	}
	return resp, nil
}

// localCompiled returns the compiled endpoints of this node's pods.
func (d *Daemon) localCompiled() []policy.Endpoint {
	var out []policy.Endpoint
	for _, local := range d.endpoints.List() {
		if ep, ok := d.compiler.Endpoint(local.Pod); ok {
			out = append(out, ep)
		}
	}
	return out
}

func labelStrings(ls identity.Labels) []string {
	out := make([]string, len(ls))
	for i, l := range ls {
		out[i] = l.String()
	}
	return out
}

func (s *apiServer) ListEndpoints(ctx context.Context, _ *agentv1.ListEndpointsRequest) (*agentv1.ListEndpointsResponse, error) {
	d := s.d
	resp := &agentv1.ListEndpointsResponse{}
	for _, e := range d.endpoints.List() {
		out := &agentv1.Endpoint{
			Namespace: e.Pod.Namespace, Name: e.Pod.Name, Ip: e.IP.String(), Id: e.ID,
			Identity: uint32(e.Identity), Interface: e.HostVeth, ContainerId: e.ContainerID,
		}
		ce, ok := d.compiler.Endpoint(e.Pod)
		if ok {
			out.PolicyEntries = int32(len(ce.Entries))
			out.IngressEnforced = ce.Defaults.IngressEnforce == policy.Deny
			out.EgressEnforced = ce.Defaults.EgressEnforce == policy.Deny
		}
		if !ok || e.Pending {
			// writeEndpoint gave it deny-all.
			out.PolicyEntries, out.IngressEnforced, out.EgressEnforced = 0, true, true
		}
		out.Labels = d.identityLabels(e.Identity)
		resp.Endpoints = append(resp.Endpoints, out)
	}
	sort.Slice(resp.Endpoints, func(i, j int) bool {
		a, b := resp.Endpoints[i], resp.Endpoints[j]
		return a.Namespace+"/"+a.Name < b.Namespace+"/"+b.Name
	})
	return resp, nil
}

func (s *apiServer) ListIdentities(ctx context.Context, _ *agentv1.ListIdentitiesRequest) (*agentv1.ListIdentitiesResponse, error) {
	d := s.d
	count := map[identity.ID]int32{}
	for _, e := range d.endpoints.List() {
		count[e.Identity]++
	}
	resp := &agentv1.ListIdentitiesResponse{}
	for _, id := range []identity.ID{identity.Host, identity.World, identity.Unmanaged, identity.Health, identity.RemoteNode} {
		resp.Identities = append(resp.Identities, &agentv1.Identity{
			Id: uint32(id), Labels: []string{"reserved:" + id.ReservedName()}, Reserved: true, Endpoints: count[id],
		})
	}
	for _, info := range d.compiler.Identities() {
		resp.Identities = append(resp.Identities, &agentv1.Identity{
			Id: uint32(info.ID), Labels: labelStrings(info.Labels), Endpoints: count[info.ID],
		})
	}
	return resp, nil
}

func (s *apiServer) GetPolicy(ctx context.Context, req *agentv1.GetPolicyRequest) (*agentv1.GetPolicyResponse, error) {
	d := s.d
	id := policy.EndpointID{Namespace: req.Namespace, Name: req.Name}
	ep, ok := d.compiler.Endpoint(id)
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
		if r, ok := d.compiler.Rule(e.RuleID); ok {
			rules = append(rules, r)
		}
	}
	rulesJSON, err := json.Marshal(rules)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encode rules: %v", err)
	}
	resp := &agentv1.GetPolicyResponse{EndpointJson: epJSON, RulesJson: rulesJSON}
	if local, ok := d.endpoints.Get(id); ok {
		counters, err := d.dp.PolicyCounters(local.IP)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "read counters: %v", err)
		}
		for _, c := range counters {
			resp.Counters = append(resp.Counters, &agentv1.PolicyCounter{
				RuleId: c.RuleID, Direction: c.Key.Direction.String(), Identity: uint32(c.Key.Identity),
				Protocol: policy.ProtoName(c.Key.Proto), Port: uint32(c.Key.Port), PortPrefixLen: uint32(c.Key.PortPrefixLen),
				Hits: c.Hits, Bytes: c.Bytes,
			})
		}
	}
	return resp, nil
}

func (s *apiServer) Trace(ctx context.Context, req *agentv1.TraceRequest) (*agentv1.TraceResponse, error) {
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
	tr, err := s.d.compiler.Trace(from, to, pp.Proto, pp.Port)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	raw, err := json.Marshal(tr)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encode trace: %v", err)
	}
	return &agentv1.TraceResponse{ResultJson: raw}, nil
}

func (s *apiServer) Observe(req *agentv1.ObserveRequest, stream agentv1.Agent_ObserveServer) error {
	past, ch := s.d.flows.snapshot(req.Follow)
	if ch != nil {
		defer s.d.flows.unfollow(ch)
	}
	var selected []*agentv1.Flow
	for _, f := range past {
		if matches(req, f) {
			selected = append(selected, f)
		}
	}
	if req.Last > 0 && int(req.Last) < len(selected) {
		selected = selected[len(selected)-int(req.Last):]
	}
	for _, f := range selected {
		if err := stream.Send(f); err != nil {
			return err
		}
	}
	if ch == nil {
		return nil
	}
	for {
		select {
		case <-stream.Context().Done():
			return nil
		case f := <-ch:
			if matches(req, f) {
				if err := stream.Send(f); err != nil {
					return err
				}
			}
		}
	}
}

func (s *apiServer) cniService() (CNIService, error) {
	if s.d.cni == nil {
		return nil, status.Error(codes.Unavailable, "the agent's CNI service is not running yet")
	}
	return s.d.cni, nil
}

func (s *apiServer) CNIAdd(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	c, err := s.cniService()
	if err != nil {
		return nil, err
	}
	return c.Add(ctx, req)
}

func (s *apiServer) CNIDel(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	c, err := s.cniService()
	if err != nil {
		return nil, err
	}
	return c.Del(ctx, req)
}

func (s *apiServer) CNICheck(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	c, err := s.cniService()
	if err != nil {
		return nil, err
	}
	return c.Check(ctx, req)
}

var _ agentv1.AgentServer = (*apiServer)(nil)
