package apiserver

import (
	"context"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/veilmesh/veil/agent/services"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
)

// Services is the node's Service map sync (agent/services).
type Services interface {
	// View lists the Services of a namespace ("" for all) as this node
	// load-balances them.
	View(namespace string) ([]services.ServiceView, error)
}

var _ Services = (*services.Controller)(nil)

func (s *Server) ListServices(ctx context.Context, req *agentv1.ListServicesRequest) (*agentv1.ListServicesResponse, error) {
	if s.cfg.Services == nil {
		return nil, status.Error(codes.Unavailable, "the agent does not load-balance Services (no datapath)")
	}
	views, err := s.cfg.Services.View(req.Namespace)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "list services: %v", err)
	}
	resp := &agentv1.ListServicesResponse{}
	for _, v := range views {
		resp.Services = append(resp.Services, serviceToAPI(v))
	}
	return resp, nil
}

func serviceToAPI(v services.ServiceView) *agentv1.Service {
	out := &agentv1.Service{
		Namespace: v.Namespace, Name: v.Name, Type: v.Type, ClusterIps: v.ClusterIPs,
		SessionAffinitySeconds: uint32(v.Affinity / time.Second), InternalLocal: v.InternalLocal,
	}
	for _, p := range v.Ports {
		port := &agentv1.ServicePort{
			Name: p.Name, Port: uint32(p.Port), Protocol: p.Protocol, TargetPort: p.TargetPort, Problem: p.Problem,
		}
		for _, b := range p.Backends {
			port.Backends = append(port.Backends, &agentv1.ServiceBackend{
				Ip: b.IP.String(), Port: uint32(b.Port), Node: b.Node, Pod: b.Pod, Terminating: b.Terminating,
			})
		}
		out.Ports = append(out.Ports, port)
	}
	return out
}
