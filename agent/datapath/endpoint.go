package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/veilmesh/veil/policy/identity"
)

// Endpoint is a pod on this node as the datapath sees it.
type Endpoint struct {
	IP       netip.Addr
	ID       uint32
	Identity identity.ID
	// Ifindex is the host-side veth; HostMAC its address (the pod's gateway).
	Ifindex int
	HostMAC net.HardwareAddr
	// MAC is the pod's own interface address.
	MAC net.HardwareAddr
	// NoAcceleration keeps this pod's TCP connections on the TCP path
	// (never socket to socket), for applications that splice(2) sockets.
	NoAcceleration bool
}

// Endpoint flags (enum endpoint_flags).
const epFlagNoAccel = uint32(podEndpointFlagsEP_F_NO_ACCEL)

func epKey(ip netip.Addr) (uint32, error) {
	if !ip.Is4() {
		return 0, fmt.Errorf("endpoint address %s: only IPv4 endpoints are supported", ip)
	}
	return ip4ToU32(ip), nil
}

// UpsertEndpoint registers a pod and attaches the datapath to its veth. A new
// endpoint starts with no policy (allow); the agent sets its policy before
// traffic matters, or in the same breath. Updating an existing endpoint keeps
// its policy.
func (d *Datapath) UpsertEndpoint(ep Endpoint) error {
	return d.putEndpoint(ep, true)
}

// putEndpoint writes the endpoint record; with attach, the pod's veth
// programs are attached first. Packet-level tests write records only.
func (d *Datapath) putEndpoint(ep Endpoint, attach bool) error {
	key, err := epKey(ep.IP)
	if err != nil {
		return err
	}
	if ep.ID == 0 || ep.ID >= 1<<31 {
		return fmt.Errorf("endpoint %s: id %d out of range 1..2^31-1", ep.IP, ep.ID)
	}
	if len(ep.MAC) != 6 || len(ep.HostMAC) != 6 {
		return fmt.Errorf("endpoint %s: MAC addresses must be 6 bytes (pod %q, host %q)", ep.IP, ep.MAC, ep.HostMAC)
	}
	d.mu.Lock()
	defer d.mu.Unlock()

	var info podEndpointInfo
	err = d.endpoints.Lookup(key, &info)
	switch {
	case err == nil && info.Id != ep.ID:
		return fmt.Errorf("endpoint %s: address already held by endpoint %d", ep.IP, info.Id)
	case errors.Is(err, ebpf.ErrKeyNotExist):
		info = podEndpointInfo{PolicySlot: ep.ID << 1}
	case err != nil:
		return fmt.Errorf("look up endpoint %s: %w", ep.IP, err)
	}
	info.Ifindex = uint32(ep.Ifindex)
	info.Id = ep.ID
	info.Identity = uint32(ep.Identity)
	copy(info.Mac[:], ep.MAC)
	copy(info.HostMac[:], ep.HostMAC)
	wasAccelerated := err == nil && info.Flags&epFlagNoAccel == 0
	info.Flags &^= epFlagNoAccel
	if ep.NoAcceleration {
		info.Flags |= epFlagNoAccel
	}
	// Attach before the endpoint is visible, so the pod's first packet is
	// already policed by its own veth program.
	name := "ep_" + ep.IP.String()
	if attach {
		if err := d.attachTC(ep.Ifindex, name, ingress, d.fromPod); err != nil {
			return err
		}
		if err := d.attachTC(ep.Ifindex, name, egress, d.toPod); err != nil {
			return err
		}
	}
	if err := d.endpoints.Update(key, &info, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write endpoint %s: %w", ep.IP, d.mapFull(MapEndpoints, d.endpoints, err))
	}
	if wasAccelerated && ep.NoAcceleration {
		// sockops honours the flag for new connections only; the ones
		// already accelerated take the TCP path from their next message.
		n, err := d.fallBackToTCP(func(k podSockKey) bool { return k.Sip == key || k.Dip == key })
		if err != nil {
			return fmt.Errorf("endpoint %s opted out of acceleration: %w", ep.IP, err)
		}
		if n > 0 {
			d.log.Info("endpoint opted out of acceleration; its sockets take the TCP path", "endpoint", ep.IP, "sockets", n)
		}
	}
	return nil
}

// DeleteEndpoint removes a pod: its policy, its map entry and its links.
// Deleting an unknown endpoint is not an error.
func (d *Datapath) DeleteEndpoint(ip netip.Addr) error {
	key, err := epKey(ip)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var info podEndpointInfo
	if err := d.endpoints.Lookup(key, &info); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		return fmt.Errorf("look up endpoint %s: %w", ip, err)
	}
	if err := d.endpoints.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete endpoint %s: %w", ip, err)
	}
	var errs []error
	for _, slot := range []uint32{info.Id << 1, info.Id<<1 | 1} {
		errs = append(errs, d.deleteSlot(slot))
	}
	name := "ep_" + ip.String()
	errs = append(errs, d.detachTC(int(info.Ifindex), name, ingress), d.detachTC(int(info.Ifindex), name, egress))
	return errors.Join(errs...)
}

// Endpoints lists the registered endpoints.
func (d *Datapath) Endpoints() ([]Endpoint, error) {
	var (
		key  uint32
		info podEndpointInfo
		out  []Endpoint
	)
	it := d.endpoints.Iterate()
	for it.Next(&key, &info) {
		out = append(out, Endpoint{
			IP:       u32ToIP4(key),
			ID:       info.Id,
			Identity: identity.ID(info.Identity),
			Ifindex:  int(info.Ifindex),
			MAC:      append(net.HardwareAddr(nil), info.Mac[:]...),
			HostMAC:  append(net.HardwareAddr(nil), info.HostMac[:]...),

			NoAcceleration: info.Flags&epFlagNoAccel != 0,
		})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list endpoints: %w", err)
	}
	return out, nil
}
