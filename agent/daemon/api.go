package daemon

import (
	"net/netip"

	"github.com/veilmesh/veil/agent/apiserver"
	"github.com/veilmesh/veil/policy/identity"
)

// newAPIServer hands the API server its views of the agent.
func (d *Daemon) newAPIServer() *apiserver.Server {
	cfg := apiserver.Config{
		SocketPath: d.cfg.SocketPath, NodeName: d.cfg.NodeName, AgentVersion: Version,
		PodCIDR: d.podCIDR, CgroupRoot: d.cfg.CgroupRoot, WireGuardPort: d.cfg.WireGuardPort,
		StartedUnixNano: d.started.UnixNano(),
		Endpoints:       d.endpoints, Policy: d.compiler, Datapath: d.dp, Flows: d.flows,
		Health: (*apiHealth)(d), Encryption: d.enc, CNI: d.cni, Log: d.log,
	}
	if d.services != nil {
		cfg.Services = d.services
	}
	// Validated at start (config.Validate).
	if p, err := netip.ParsePrefix(d.cfg.ClusterCIDR); err == nil {
		cfg.ClusterCIDR = p
	}
	return apiserver.New(cfg)
}

// apiHealth is the Daemon as the API server's Health.
type apiHealth Daemon

func (h *apiHealth) APIServerConnected() bool    { return h.apiUp.Load() }
func (h *apiHealth) LastSync() int64             { return h.policy.LastSync() }
func (h *apiHealth) Converged() bool             { return h.endpoints.Converged() }
func (h *apiHealth) Degraded() map[string]string { return h.degraded.All() }
func (h *apiHealth) IdentityLabels(id identity.ID) []string {
	return h.flows.IdentityLabels(id)
}

var _ apiserver.Health = (*apiHealth)(nil)
