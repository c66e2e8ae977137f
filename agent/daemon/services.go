package daemon

import (
	"context"
	"net/netip"

	"github.com/veilmesh/veil/agent/services"
)

// startServices keeps the node's Service map (socket load balancing of
// ClusterIPs) from the shared informer factory, until ctx is done. It runs
// before the flow log starts, which then names flows' Services.
func (d *Daemon) startServices(ctx context.Context) {
	log := d.log.With("component", "services")
	c, err := services.New(d.watch.KubeInformers(), d.dp, services.Config{NodeName: d.cfg.NodeName, NodePort: d.cfg.KubeProxyReplacement, Logger: log})
	if err != nil {
		d.log.Error("start service map sync", "err", err)
		return
	}
	d.services = c
	d.flowNamer = &services.FlowNamer{Translations: d.dp, Services: c, Netns: d.podNetns, Log: log}
	d.metrics.reg.MustRegister(services.NewCollector(c, d.dp))
	go func() {
		if err := c.Run(ctx); err != nil && ctx.Err() == nil {
			d.log.Error("service map sync stopped", "err", err)
		}
	}()
}

// podNetns is the network namespace path of the local pod with address ip.
func (d *Daemon) podNetns(ip netip.Addr) (string, bool) {
	for _, e := range d.endpoints.List() {
		if e.IP == ip && e.Netns != "" {
			return e.Netns, true
		}
	}
	return "", false
}

// serviceFlows is the Daemon as the flow log's Service namer.
type serviceFlows Daemon

func (s *serviceFlows) ServiceVia(client netip.Addr, backend netip.AddrPort, proto uint8) string {
	if s.flowNamer == nil {
		return ""
	}
	return s.flowNamer.ServiceVia(client, backend, proto)
}
