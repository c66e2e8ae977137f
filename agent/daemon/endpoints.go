package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"

	"github.com/veilmesh/veil/agent/endpoints"
	"github.com/veilmesh/veil/agent/ipam"
	"github.com/veilmesh/veil/policy"
)

// restoreEndpoints takes back the endpoints of the previous run. The pinned
// maps are the truth of what is enforced, so they are reconciled with the
// state file and the IPAM record rather than trusted to agree: an endpoint
// in the maps that the state file does not know (the agent died between
// writing the datapath and saving its state) is adopted when its veth still
// exists and IPAM names the container that holds its address, and kept as
// it is, still enforcing, when no owner is known. Only an endpoint whose
// interface is gone is removed: nothing can send through it any more. The
// API server has the last word once the agent has converged: an endpoint
// whose Pod no longer exists gets deny-all (converged).
func (d *Daemon) restoreEndpoints(st *endpoints.State, alloc *ipam.Allocator) error {
	known := map[netip.Addr]bool{}
	d.endpoints.Restore(st.Endpoints)
	for _, ep := range st.Endpoints {
		known[ep.IP] = true
	}
	owners := map[netip.Addr]ipam.Allocation{}
	if alloc != nil {
		for _, a := range alloc.List() {
			owners[a.IP] = a
		}
	}
	eps, err := d.dp.Endpoints()
	if err != nil {
		return err
	}
	var errs []error
	adopted := 0
	for _, ep := range eps {
		if known[ep.IP] {
			continue
		}
		veth, err := netlink.LinkByIndex(ep.Ifindex)
		if err != nil || !bytes.Equal(veth.Attrs().HardwareAddr, ep.HostMAC) {
			d.log.Warn("removing datapath endpoint whose interface is gone", "ip", ep.IP, "id", ep.ID, "ifindex", ep.Ifindex)
			errs = append(errs, d.dp.DeleteEndpoint(ep.IP))
			continue
		}
		owner, ok := owners[ep.IP]
		if !ok || owner.Namespace == "" || owner.Name == "" {
			d.log.Warn("datapath endpoint has a live interface but no known owner; leaving it enforcing as it is",
				"ip", ep.IP, "id", ep.ID, "interface", veth.Attrs().Name)
			d.degraded.Set("endpoint "+ep.IP.String(), "pinned endpoint on "+veth.Attrs().Name+" has no owner in IPAM; its policy is frozen")
			continue
		}
		le := endpoints.Endpoint{
			Pod: policy.EndpointID{Namespace: owner.Namespace, Name: owner.Name}, ContainerID: owner.ContainerID,
			ID: ep.ID, IP: ep.IP, HostVeth: veth.Attrs().Name, HostIfindex: ep.Ifindex,
			HostMAC: ep.HostMAC.String(), PodMAC: ep.MAC.String(),
			Identity: ep.Identity, NoAccel: ep.NoAcceleration,
		}
		if !d.endpoints.Adopt(le) {
			d.log.Warn("datapath endpoint claims a pod that the state file gives another address; leaving it enforcing as it is",
				"ip", ep.IP, "pod", le.Pod)
			continue
		}
		d.log.Info("adopted datapath endpoint missing from the state file", "ip", ep.IP, "pod", le.Pod, "container", le.ContainerID)
		adopted++
	}
	if adopted > 0 {
		d.endpoints.Changed()
	}
	if len(st.Endpoints)+adopted > 0 {
		d.log.Info("restored endpoints", "fromState", len(st.Endpoints), "adopted", adopted)
	}
	return errors.Join(errs...)
}

// deviceWithAddr names the interface that holds ip.
func deviceWithAddr(ip netip.Addr) (string, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return "", fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		if a.IP.Equal(ip.AsSlice()) {
			l, err := netlink.LinkByIndex(a.LinkIndex)
			if err != nil {
				return "", fmt.Errorf("find device of %s: %w", ip, err)
			}
			return l.Attrs().Name, nil
		}
	}
	return "", fmt.Errorf("no interface holds the node IP %s: set --underlay-interface or --node-ip", ip)
}
