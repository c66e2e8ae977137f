package datapath

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/veilmesh/veil/policy/identity"
)

// IPCacheEntry says who an address (or prefix) of the cluster belongs to.
type IPCacheEntry struct {
	Identity identity.ID
	// NodeIP is the underlay address of the node that hosts the prefix;
	// pod traffic toward it is forwarded there.
	NodeIP netip.Addr
	Kind   IPCacheKind
}

// IPCacheKind says what an ipcache prefix is.
type IPCacheKind uint32

const (
	// RemotePod is a pod on another node (a /32).
	RemotePod = IPCacheKind(podIpcacheFlagsIPCACHE_F_REMOTE_POD)
	// NodeAddr is a node's own address.
	NodeAddr = IPCacheKind(podIpcacheFlagsIPCACHE_F_NODE)
	// PodCIDR is another node's pod CIDR: routed there even before its
	// pods are known.
	PodCIDR = IPCacheKind(podIpcacheFlagsIPCACHE_F_POD_CIDR)
	// Tunnel marks a prefix whose node is a WireGuard peer: pod traffic to
	// it is encrypted.
	Tunnel = IPCacheKind(podIpcacheFlagsIPCACHE_F_TUNNEL)
)

func lpmKey(p netip.Prefix) (podLpmV4Key, error) {
	if !p.Addr().Is4() || !p.IsValid() {
		return podLpmV4Key{}, fmt.Errorf("prefix %s: only valid IPv4 prefixes are supported", p)
	}
	p = p.Masked()
	return podLpmV4Key{Prefixlen: uint32(p.Bits()), Addr: ip4ToU32(p.Addr())}, nil
}

// UpsertIPCache writes one ipcache prefix.
func (d *Datapath) UpsertIPCache(p netip.Prefix, e IPCacheEntry) error {
	k, err := lpmKey(p)
	if err != nil {
		return err
	}
	v := podIpcacheInfo{Identity: uint32(e.Identity), Flags: uint32(e.Kind)}
	if e.NodeIP.IsValid() {
		if !e.NodeIP.Is4() {
			return fmt.Errorf("ipcache %s: node address %s is not IPv4", p, e.NodeIP)
		}
		v.NodeIp = ip4ToU32(e.NodeIP)
	}
	if err := d.ipcache.Update(&k, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write ipcache %s: %w", p, d.mapFull(MapIPCache, d.ipcache, err))
	}
	return nil
}

// DeleteIPCache removes one ipcache prefix; a missing prefix is not an error.
func (d *Datapath) DeleteIPCache(p netip.Prefix) error {
	k, err := lpmKey(p)
	if err != nil {
		return err
	}
	if err := d.ipcache.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete ipcache %s: %w", p, err)
	}
	return nil
}

// IPCache lists the ipcache.
func (d *Datapath) IPCache() (map[netip.Prefix]IPCacheEntry, error) {
	out := map[netip.Prefix]IPCacheEntry{}
	var (
		k podLpmV4Key
		v podIpcacheInfo
	)
	it := d.ipcache.Iterate()
	for it.Next(&k, &v) {
		e := IPCacheEntry{Identity: identity.ID(v.Identity), Kind: IPCacheKind(v.Flags)}
		if v.NodeIp != 0 {
			e.NodeIP = u32ToIP4(v.NodeIp)
		}
		out[netip.PrefixFrom(u32ToIP4(k.Addr), int(k.Prefixlen))] = e
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list ipcache: %w", err)
	}
	return out, nil
}

// SetCIDRs makes the CIDR identity table exactly want, writing new and
// changed prefixes before deleting stale ones so no lookup sees a gap.
func (d *Datapath) SetCIDRs(want map[netip.Prefix]identity.ID) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	have := map[podLpmV4Key]uint32{}
	var (
		k podLpmV4Key
		v uint32
	)
	it := d.cidrs.Iterate()
	for it.Next(&k, &v) {
		have[k] = v
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list CIDR identities: %w", err)
	}
	keep := map[podLpmV4Key]bool{}
	for p, id := range want {
		k, err := lpmKey(p)
		if err != nil {
			return err
		}
		keep[k] = true
		if old, ok := have[k]; ok && old == uint32(id) {
			continue
		}
		val := uint32(id)
		if err := d.cidrs.Update(&k, &val, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write CIDR identity %s: %w", p, err)
		}
	}
	for k := range have {
		if keep[k] {
			continue
		}
		if err := d.cidrs.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete CIDR identity: %w", err)
		}
	}
	return nil
}
