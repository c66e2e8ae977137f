package encryption

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Node-to-node encryption: host traffic to a peer node's address is routed
// into the tunnel by a rule that every unmarked packet consults; WireGuard's
// own packets carry hostTunnelMark and keep the main table (the underlay).
const (
	hostTunnelMark  = 0x5650
	hostTunnelTable = 0x5650
	hostTunnelPrio  = 5650
)

func hostTunnelRule() *netlink.Rule {
	r := netlink.NewRule()
	r.Family = netlink.FAMILY_V4
	r.Priority = hostTunnelPrio
	r.Mark = hostTunnelMark
	mask := uint32(0xffffffff)
	r.Mask = &mask
	r.Invert = true
	r.Table = hostTunnelTable
	return r
}

// tunnelFallbackMetric orders the blackhole twin of every tunnel route after
// the route through the device: while the device exists its route wins;
// when a userspace device restarts (its TUN and routes vanish) the twin
// stays, so host traffic to peers fails closed instead of taking the main
// table's route over the underlay in plaintext.
const tunnelFallbackMetric = 4096

// routeThroughTunnel makes the tunnel table hold exactly the peers'
// prefixes — each through the device, each with a blackhole behind it — and
// the rule that consults it exist.
func routeThroughTunnel(device string, prefixes map[netip.Prefix]bool) error {
	link, err := netlink.LinkByName(device)
	if err != nil {
		return fmt.Errorf("find WireGuard device: %w", err)
	}
	rules, err := netlink.RuleList(netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list routing rules: %w", err)
	}
	haveRule := false
	for _, r := range rules {
		if r.Priority == hostTunnelPrio && r.Table == hostTunnelTable {
			haveRule = true
		}
	}
	if !haveRule {
		if err := netlink.RuleAdd(hostTunnelRule()); err != nil {
			return fmt.Errorf("add node-to-node routing rule: %w", err)
		}
	}
	have, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: hostTunnelTable}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list node-to-node routes: %w", err)
	}
	type key struct {
		p        netip.Prefix
		fallback bool
	}
	present := map[key]bool{}
	for _, r := range have {
		p, ok := routePrefix(r)
		fallback := r.Type == unix.RTN_BLACKHOLE && r.Priority == tunnelFallbackMetric
		if ok && prefixes[p] && (fallback || r.LinkIndex == link.Attrs().Index) {
			present[key{p, fallback}] = true
			continue
		}
		if err := netlink.RouteDel(&r); err != nil {
			return fmt.Errorf("remove node-to-node route %s: %w", r.Dst, err)
		}
	}
	for p := range prefixes {
		dst := &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}
		if !present[key{p, true}] {
			hole := &netlink.Route{Table: hostTunnelTable, Type: unix.RTN_BLACKHOLE, Priority: tunnelFallbackMetric, Dst: dst}
			if err := netlink.RouteReplace(hole); err != nil {
				return fmt.Errorf("fail-closed route for %s: %w", p, err)
			}
		}
		if present[key{p, false}] {
			continue
		}
		route := &netlink.Route{LinkIndex: link.Attrs().Index, Table: hostTunnelTable, Scope: netlink.SCOPE_LINK, Dst: dst}
		if err := netlink.RouteReplace(route); err != nil {
			return fmt.Errorf("route %s through the tunnel: %w", p, err)
		}
	}
	return nil
}

func routePrefix(r netlink.Route) (netip.Prefix, bool) {
	if r.Dst == nil {
		return netip.Prefix{}, false
	}
	ip, ok := netip.AddrFromSlice(r.Dst.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	bits, _ := r.Dst.Mask.Size()
	return netip.PrefixFrom(ip.Unmap(), bits).Masked(), true
}

// RemoveHostTunnel undoes what node-to-node encryption routed (cleanup
// mode).
func RemoveHostTunnel() error {
	var errs []error
	// One rule is installed; a few more passes catch duplicates of a crash.
	for i := 0; i < 8; i++ {
		if err := netlink.RuleDel(hostTunnelRule()); err != nil {
			break
		}
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: hostTunnelTable}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list node-to-node routes: %w", err)
	}
	for _, r := range routes {
		if err := netlink.RouteDel(&r); err != nil {
			errs = append(errs, fmt.Errorf("remove node-to-node route %s: %w", r.Dst, err))
		}
	}
	return errors.Join(errs...)
}
