package cluster

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/veilmesh/veil/deploy"
)

// UpOptions tune Up: a cluster's Options and what runs on it.
type UpOptions struct {
	Options
	// StrictMode sets the chart's encryption.strictMode.
	StrictMode bool
	// Values are chart values set over Cluster.Values (top-level keys
	// replace the lab's), as `helm install --set` would.
	Values map[string]any
	// NoDNS leaves the cluster DNS out; NoDemo the demo.
	NoDNS, NoDemo bool
	// Progress, when set, is called as each phase ends.
	Progress func(Phase)
}

// Up brings up what `meshctl lab up` runs: the cluster (Start), Veil from
// its chart (strict mode as asked), the cluster DNS and the demo, and
// returns once the agents are ready on every node, the DNS answers and the
// demo's pods run with their policy enforced. Phases records each step's
// time (Start's steps, then Up's). On error, everything is removed.
func Up(ctx context.Context, opts UpOptions) (*Cluster, error) {
	began := time.Now()
	progress := func(p Phase) {
		if opts.Progress != nil {
			opts.Progress(p)
		}
	}
	c, err := Start(ctx, opts.Options)
	if err != nil {
		return nil, err
	}
	for _, p := range c.Phases {
		progress(p)
	}
	step := time.Now()
	phase := func(name string) {
		c.phase(name, &step)
		progress(c.Phases[len(c.Phases)-1])
	}
	if err := c.up(ctx, opts, phase); err != nil {
		if stopErr := c.Stop(); stopErr != nil {
			err = errors.Join(err, fmt.Errorf("stop the cluster: %w", stopErr))
		}
		return nil, err
	}
	c.Startup = time.Since(began)
	return c, nil
}

func (c *Cluster) up(ctx context.Context, opts UpOptions, phase func(string)) error {
	values := c.Values()
	if opts.StrictMode {
		values["encryption"] = map[string]any{"strictMode": true}
	}
	maps.Copy(values, opts.Values)
	if err := c.InstallVeil(ctx, values); err != nil {
		return err
	}
	if err := c.WaitNodesReady(ctx); err != nil {
		return err
	}
	phase("Veil installed, nodes Ready")
	if err := c.WaitDaemonSetReady(ctx, deploy.Namespace, deploy.DaemonSetName); err != nil {
		return err
	}
	if err := c.WaitMeshNodes(ctx); err != nil {
		return err
	}
	phase("agents ready, WireGuard peers up")
	if !opts.NoDNS {
		if err := c.InstallDNS(ctx); err != nil {
			return err
		}
		phase("cluster DNS ready")
	}
	if !opts.NoDemo {
		if err := c.StartDemo(ctx); err != nil {
			return err
		}
		phase("demo running, policy enforced")
	}
	return nil
}
