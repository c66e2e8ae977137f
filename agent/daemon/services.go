package daemon

import (
	"context"

	"github.com/veilmesh/veil/agent/services"
)

// startServices keeps the node's Service map (socket load balancing of
// ClusterIPs) from the shared informer factory, until ctx is done.
func (d *Daemon) startServices(ctx context.Context) {
	c, err := services.New(d.watch.KubeInformers(), d.dp, services.Config{NodeName: d.cfg.NodeName, Logger: d.log.With("component", "services")})
	if err != nil {
		d.log.Error("start service map sync", "err", err)
		return
	}
	d.services = c
	go func() {
		if err := c.Run(ctx); err != nil && ctx.Err() == nil {
			d.log.Error("service map sync stopped", "err", err)
		}
	}()
}
