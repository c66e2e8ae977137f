package daemon

import (
	"context"
	"time"

	"github.com/vishvananda/netlink"
)

// guardResync bounds how long a device can go unguarded when a link
// notification is lost (the netlink socket overflowed, or was re-opened).
const guardResync = 30 * time.Second

// guardLoop keeps the strict-mode guard on every device that leads off the
// node: a NIC, VLAN or bond added while the agent runs is guarded as soon as
// the kernel announces it, and again at every resync.
func (d *Daemon) guardLoop(ctx context.Context) {
	updates := make(chan netlink.LinkUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) { d.log.Warn("link notifications", "error", err) },
	}); err != nil {
		d.log.Warn("subscribe to link changes; guarding devices on a timer only", "error", err)
		updates = nil
	}
	tick := time.NewTicker(guardResync)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-updates:
			if !ok {
				updates = nil
				continue
			}
			// Pod churn announces links in bursts: one pass covers them.
			for drained := false; !drained; {
				select {
				case <-updates:
				default:
					drained = true
				}
			}
		case <-tick.C:
		}
		if err := d.dp.GuardDevices(); err != nil {
			d.log.Error("guard devices", "error", err)
			d.degraded.Set("strict-guard", err.Error())
			continue
		}
		d.degraded.Clear("strict-guard")
	}
}
