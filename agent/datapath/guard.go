package datapath

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
)

// Pin names of the strict-mode guard: "netdev_<ifname>_egress".
const guardPrefix = "netdev_"

// GuardDevices attaches the strict-mode guard to the egress of every device
// of the node's network namespace that could carry a pod's packet to another
// node — not only the underlay: a second NIC, a VLAN or a bond added later
// is a way around the tunnel too. Skipped are loopback, the WireGuard device
// (its output is the tunnel's own UDP) and pods' host-side veths (what leaves
// by them enters a local pod). Guards of devices that are gone are unpinned.
// Without strict mode every guard is removed. Call it again when devices
// change; it is idempotent.
func (d *Datapath) GuardDevices() error {
	want, err := d.guardCandidates()
	if err != nil {
		return err
	}
	// Pin names write dots as dashes (linkPinName): compare in that form.
	pinned := make(map[string]int, len(want))
	for name, ifindex := range want {
		pinned[strings.ReplaceAll(name, ".", "-")] = ifindex
	}
	var errs []error
	if d.cfg.StrictMode {
		for name, ifindex := range want {
			if err := d.attachTC(ifindex, guardPrefix+name, egress, d.toNetdev); err != nil {
				errs = append(errs, fmt.Errorf("guard %s: %w", name, err))
			}
		}
	}
	entries, err := os.ReadDir(linksDir(d.cfg.BPFFSRoot))
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("list pinned links: %w", err))...)
	}
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), "_"+egress.String())
		if !ok || !strings.HasPrefix(name, guardPrefix) {
			continue
		}
		dev := strings.TrimPrefix(name, guardPrefix)
		if _, ok := pinned[dev]; ok && d.cfg.StrictMode {
			continue
		}
		if err := d.detachTC(pinned[dev], name, egress); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// guardCandidates are the devices that could carry a pod's packet to another
// node, by name.
func (d *Datapath) guardCandidates() (map[string]int, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list devices to guard: %w", err)
	}
	pods := map[int]bool{}
	if eps, err := d.Endpoints(); err == nil {
		for _, ep := range eps {
			pods[ep.Ifindex] = true
		}
	}
	want := map[string]int{}
	for _, l := range links {
		a := l.Attrs()
		switch {
		case a.Flags&net.FlagLoopback != 0, a.Index == d.wgIfindex, pods[a.Index],
			d.cfg.PodDevice != nil && d.cfg.PodDevice(a.Name):
			continue
		}
		want[a.Name] = a.Index
	}
	return want, nil
}

// UnguardedDevices lists the devices that lead off the node and that the
// strict-mode guard does not hold (a device added since the last
// GuardDevices, or one the guard could not attach to): ways around the
// tunnel, which the encryption audit reports.
func (d *Datapath) UnguardedDevices() ([]string, error) {
	want, err := d.guardCandidates()
	if err != nil {
		return nil, err
	}
	guarded, err := d.GuardedDevices()
	if err != nil {
		return nil, err
	}
	var out []string
	for name := range want {
		if !slices.Contains(guarded, strings.ReplaceAll(name, ".", "-")) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out, nil
}

// GuardedDevices lists the devices whose egress the strict-mode guard holds.
func (d *Datapath) GuardedDevices() ([]string, error) {
	entries, err := os.ReadDir(linksDir(d.cfg.BPFFSRoot))
	if err != nil {
		return nil, fmt.Errorf("list pinned links: %w", err)
	}
	var out []string
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), "_"+egress.String())
		if ok && strings.HasPrefix(name, guardPrefix) {
			out = append(out, strings.TrimPrefix(name, guardPrefix))
		}
	}
	return out, nil
}
