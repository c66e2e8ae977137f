// Package podnet wires a pod's network namespace to its node: a veth pair
// whose node side is named after the container, the pod's address as a /32,
// and routes through a gateway address that exists nowhere.
//
// The pod reaches 169.254.1.1 (GatewayIP) through a permanent neighbour
// entry that maps it to the node-side veth's MAC, so everything the pod sends
// lands on that veth, where Veil's datapath decides. The node reaches the pod
// through a /32 route on the node-side veth.
//
// The node side is configured in the network namespace of the calling
// goroutine's thread (the agent runs in the node's namespace). The pod side is
// configured on a fresh, locked OS thread switched into the pod's namespace;
// that thread is discarded afterwards, so no goroutine ever runs in a pod's
// namespace by accident.
package podnet

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/veilmesh/veil/agent/nsthread"
)

// GatewayIP is the pod's next hop for every route.
var GatewayIP = netip.MustParseAddr("169.254.1.1")

// DefaultRoutes is what a pod gets when the request names no routes.
var DefaultRoutes = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}

// ErrNetnsNotFound is matched (errors.Is) when the pod's namespace path does
// not exist or is not a network namespace.
var ErrNetnsNotFound = errors.New("network namespace not found")

// Request describes one pod attachment.
type Request struct {
	// NetnsPath is the pod's namespace (CNI_NETNS), IfName its interface
	// name inside it (CNI_IFNAME).
	NetnsPath   string
	IfName      string
	ContainerID string
	IP          netip.Addr
	// MTU of both veth ends; 0 means DefaultMTU.
	MTU int
	// Routes sent through the gateway; nil means DefaultRoutes.
	Routes []netip.Prefix
}

// Result describes what Setup created.
type Result struct {
	HostVeth    string
	HostIfindex int
	HostMAC     net.HardwareAddr
	PodMAC      net.HardwareAddr
	MTU         int
}

// HostVethName is the node-side interface name for a container: stable, so
// that a retried ADD or a DEL finds it, and within IFNAMSIZ (15).
func HostVethName(containerID string) string {
	sum := sha256.Sum256([]byte(containerID))
	return "veil" + hex.EncodeToString(sum[:])[:11]
}

// IsHostVethName reports whether name has the shape HostVethName gives, so
// the datapath can tell a pod's veth before its endpoint is registered.
func IsHostVethName(name string) bool {
	rest, ok := strings.CutPrefix(name, "veil")
	if !ok || len(rest) != 11 {
		return false
	}
	_, err := hex.DecodeString(rest + "0")
	return err == nil && strings.ToLower(rest) == rest
}

func (r *Request) validate() error {
	switch {
	case r.ContainerID == "":
		return errors.New("empty container ID")
	case r.NetnsPath == "":
		return errors.New("empty netns path")
	case r.IfName == "" || len(r.IfName) > 15 || strings.ContainsAny(r.IfName, "/: \t\n") || r.IfName == "." || r.IfName == "..":
		return fmt.Errorf("invalid interface name %q", r.IfName)
	case !r.IP.Is4():
		return fmt.Errorf("pod address %s: only IPv4 is supported", r.IP)
	case r.MTU != 0 && (r.MTU < 68 || r.MTU > 65535):
		return fmt.Errorf("MTU %d out of range 68..65535", r.MTU)
	}
	for _, p := range r.Routes {
		if !p.IsValid() || !p.Addr().Is4() {
			return fmt.Errorf("route %s: only IPv4 routes are supported", p)
		}
	}
	return nil
}

func (r *Request) routes() []netip.Prefix {
	if r.Routes == nil {
		return DefaultRoutes
	}
	return r.Routes
}

// Setup creates the pod's veth pair and configures both ends. A leftover
// node-side veth of the same container (an ADD retried after a crash) is
// replaced. On error nothing is left behind.
func Setup(ctx context.Context, req Request) (Result, error) {
	if err := req.validate(); err != nil {
		return Result{}, fmt.Errorf("set up pod network: %w", err)
	}
	fail := func(err error) (Result, error) {
		return Result{}, fmt.Errorf("set up pod network for container %s: %w", req.ContainerID, err)
	}
	host, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fail(fmt.Errorf("open netlink in node namespace: %w", err))
	}
	defer host.Close()
	podNS, err := openNetns(req.NetnsPath)
	if err != nil {
		return fail(err)
	}
	defer podNS.Close()
	if err := ctx.Err(); err != nil {
		return fail(err)
	}

	res := Result{HostVeth: HostVethName(req.ContainerID), MTU: req.MTU}
	if res.MTU == 0 {
		res.MTU = defaultMTU(host)
	}
	if err := deleteLink(host, res.HostVeth); err != nil {
		return fail(err)
	}
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: res.HostVeth, MTU: res.MTU},
		PeerName:      req.IfName,
		PeerMTU:       uint32(res.MTU),
		PeerNamespace: netlink.NsFd(int(podNS)),
	}
	if err := host.LinkAdd(veth); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return fail(fmt.Errorf("create veth %s with peer %s in %s: an interface named %s (or %s) already exists: %w",
				res.HostVeth, req.IfName, req.NetnsPath, req.IfName, res.HostVeth, err))
		}
		return fail(fmt.Errorf("create veth %s with peer %s in %s: %w", res.HostVeth, req.IfName, req.NetnsPath, err))
	}
	ok := false
	defer func() {
		if !ok {
			// Deleting one end removes the peer and every route on both.
			_ = deleteLink(host, res.HostVeth)
		}
	}()

	link, err := host.LinkByName(res.HostVeth)
	if err != nil {
		return fail(fmt.Errorf("look up veth %s: %w", res.HostVeth, err))
	}
	res.HostIfindex = link.Attrs().Index
	res.HostMAC = link.Attrs().HardwareAddr
	if err := host.LinkSetUp(link); err != nil {
		return fail(fmt.Errorf("set %s up: %w", res.HostVeth, err))
	}
	if err := host.RouteReplace(hostRoute(res.HostIfindex, req.IP)); err != nil {
		return fail(fmt.Errorf("add route %s/32 dev %s: %w", req.IP, res.HostVeth, err))
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}

	err = inNetns(podNS, func(h *netlink.Handle) error {
		mac, err := setupPodSide(h, req, res.HostMAC)
		res.PodMAC = mac
		return err
	})
	if err != nil {
		return fail(fmt.Errorf("in %s: %w", req.NetnsPath, err))
	}
	ok = true
	return res, nil
}

func hostRoute(ifindex int, ip netip.Addr) *netlink.Route {
	return &netlink.Route{
		LinkIndex: ifindex,
		Dst:       &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(32, 32)},
		Scope:     netlink.SCOPE_LINK,
	}
}

func gatewayLinkRoute(ifindex int) *netlink.Route {
	return &netlink.Route{
		LinkIndex: ifindex,
		Dst:       &net.IPNet{IP: GatewayIP.AsSlice(), Mask: net.CIDRMask(32, 32)},
		Scope:     netlink.SCOPE_LINK,
	}
}

func viaGatewayRoute(ifindex int, dst netip.Prefix) *netlink.Route {
	return &netlink.Route{
		LinkIndex: ifindex,
		Dst:       &net.IPNet{IP: dst.Masked().Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), 32)},
		Gw:        GatewayIP.AsSlice(),
	}
}

func setupPodSide(h *netlink.Handle, req Request, hostMAC net.HardwareAddr) (net.HardwareAddr, error) {
	if lo, err := h.LinkByName("lo"); err == nil {
		if err := h.LinkSetUp(lo); err != nil {
			return nil, fmt.Errorf("set lo up: %w", err)
		}
	}
	eth, err := h.LinkByName(req.IfName)
	if err != nil {
		return nil, fmt.Errorf("look up %s: %w", req.IfName, err)
	}
	idx := eth.Attrs().Index
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: req.IP.AsSlice(), Mask: net.CIDRMask(32, 32)}}
	if err := h.AddrReplace(eth, addr); err != nil {
		return nil, fmt.Errorf("add address %s/32 to %s: %w", req.IP, req.IfName, err)
	}
	if err := h.LinkSetUp(eth); err != nil {
		return nil, fmt.Errorf("set %s up: %w", req.IfName, err)
	}
	if err := h.NeighSet(&netlink.Neigh{
		LinkIndex: idx, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: GatewayIP.AsSlice(), HardwareAddr: hostMAC,
	}); err != nil {
		return nil, fmt.Errorf("add neighbour %s lladdr %s dev %s: %w", GatewayIP, hostMAC, req.IfName, err)
	}
	if err := h.RouteReplace(gatewayLinkRoute(idx)); err != nil {
		return nil, fmt.Errorf("add route %s dev %s: %w", GatewayIP, req.IfName, err)
	}
	for _, dst := range req.routes() {
		if err := h.RouteReplace(viaGatewayRoute(idx, dst)); err != nil {
			return nil, fmt.Errorf("add route %s via %s dev %s: %w", dst, GatewayIP, req.IfName, err)
		}
	}
	return eth.Attrs().HardwareAddr, nil
}

// Teardown removes the pod's veth pair. A missing namespace or interface is
// not an error: CNI DEL may come after the runtime removed the namespace, or
// more than once.
func Teardown(ctx context.Context, containerID, netnsPath, ifname string) error {
	if containerID == "" {
		return errors.New("tear down pod network: empty container ID")
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("tear down pod network for container %s: %w", containerID, err)
	}
	hostVeth := HostVethName(containerID)
	host, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("tear down pod network for container %s: open netlink in node namespace: %w", containerID, err)
	}
	defer host.Close()
	if err := deleteLink(host, hostVeth); err != nil {
		return fmt.Errorf("tear down pod network for container %s: %w", containerID, err)
	}
	if netnsPath == "" || ifname == "" {
		return nil
	}
	// The pod end went with the node end, unless the pair was never ours or
	// its node end was renamed; clear a leftover veth so a new ADD can reuse
	// the name.
	podNS, err := openNetns(netnsPath)
	if errors.Is(err, ErrNetnsNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("tear down pod network for container %s: %w", containerID, err)
	}
	defer podNS.Close()
	err = inNetns(podNS, func(h *netlink.Handle) error {
		l, err := h.LinkByName(ifname)
		if err != nil {
			if isNotFound(err) {
				return nil
			}
			return fmt.Errorf("look up %s: %w", ifname, err)
		}
		if l.Type() != "veth" {
			return nil
		}
		if err := h.LinkDel(l); err != nil && !isNotFound(err) {
			return fmt.Errorf("delete %s: %w", ifname, err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("tear down pod network for container %s in %s: %w", containerID, netnsPath, err)
	}
	return nil
}

// Check verifies that what Setup creates is in place and returns its
// description. The error lists everything missing, not just the first.
func Check(ctx context.Context, req Request) (Result, error) {
	if err := req.validate(); err != nil {
		return Result{}, fmt.Errorf("check pod network: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return Result{}, fmt.Errorf("check pod network for container %s: %w", req.ContainerID, err)
	}
	var missing []string
	res := Result{HostVeth: HostVethName(req.ContainerID)}
	host, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return Result{}, fmt.Errorf("check pod network for container %s: open netlink: %w", req.ContainerID, err)
	}
	defer host.Close()
	link, err := host.LinkByName(res.HostVeth)
	switch {
	case isNotFound(err):
		missing = append(missing, fmt.Sprintf("node-side veth %s", res.HostVeth))
	case err != nil:
		return Result{}, fmt.Errorf("check pod network for container %s: look up %s: %w", req.ContainerID, res.HostVeth, err)
	default:
		res.HostIfindex = link.Attrs().Index
		res.HostMAC = link.Attrs().HardwareAddr
		res.MTU = link.Attrs().MTU
		if link.Attrs().Flags&net.FlagUp == 0 {
			missing = append(missing, fmt.Sprintf("node-side veth %s is down", res.HostVeth))
		}
		if req.MTU != 0 && link.Attrs().MTU != req.MTU {
			missing = append(missing, fmt.Sprintf("node-side veth %s has MTU %d, want %d", res.HostVeth, link.Attrs().MTU, req.MTU))
		}
		has, err := hasRoute(host, hostRoute(res.HostIfindex, req.IP))
		if err != nil {
			return Result{}, fmt.Errorf("check pod network for container %s: %w", req.ContainerID, err)
		}
		if !has {
			missing = append(missing, fmt.Sprintf("node route %s/32 dev %s", req.IP, res.HostVeth))
		}
	}

	podNS, err := openNetns(req.NetnsPath)
	if err != nil {
		missing = append(missing, err.Error())
	} else {
		defer podNS.Close()
		err := inNetns(podNS, func(h *netlink.Handle) error {
			m, mac, err := checkPodSide(h, req, res.HostMAC)
			res.PodMAC = mac
			for _, s := range m {
				missing = append(missing, s+" in "+req.NetnsPath)
			}
			return err
		})
		if err != nil {
			return Result{}, fmt.Errorf("check pod network for container %s in %s: %w", req.ContainerID, req.NetnsPath, err)
		}
	}
	if len(missing) > 0 {
		return res, fmt.Errorf("check pod network for container %s: missing or wrong: %s", req.ContainerID, strings.Join(missing, "; "))
	}
	return res, nil
}

func checkPodSide(h *netlink.Handle, req Request, hostMAC net.HardwareAddr) ([]string, net.HardwareAddr, error) {
	eth, err := h.LinkByName(req.IfName)
	if isNotFound(err) {
		return []string{"interface " + req.IfName}, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("look up %s: %w", req.IfName, err)
	}
	var missing []string
	idx := eth.Attrs().Index
	if eth.Attrs().Flags&net.FlagUp == 0 {
		missing = append(missing, fmt.Sprintf("interface %s is down", req.IfName))
	}
	if req.MTU != 0 && eth.Attrs().MTU != req.MTU {
		missing = append(missing, fmt.Sprintf("interface %s has MTU %d, want %d", req.IfName, eth.Attrs().MTU, req.MTU))
	}
	addrs, err := h.AddrList(eth, netlink.FAMILY_V4)
	if err != nil {
		return nil, nil, fmt.Errorf("list addresses of %s: %w", req.IfName, err)
	}
	hasAddr := false
	for _, a := range addrs {
		ones, _ := a.Mask.Size()
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == req.IP && ones == 32 {
			hasAddr = true
		}
	}
	if !hasAddr {
		missing = append(missing, fmt.Sprintf("address %s/32 on %s", req.IP, req.IfName))
	}
	neighs, err := h.NeighList(idx, netlink.FAMILY_V4)
	if err != nil {
		return nil, nil, fmt.Errorf("list neighbours on %s: %w", req.IfName, err)
	}
	hasNeigh := false
	for _, n := range neighs {
		if n.IP.Equal(GatewayIP.AsSlice()) && n.State&netlink.NUD_PERMANENT != 0 &&
			(hostMAC == nil || n.HardwareAddr.String() == hostMAC.String()) {
			hasNeigh = true
		}
	}
	if !hasNeigh {
		missing = append(missing, fmt.Sprintf("permanent neighbour %s lladdr %s on %s", GatewayIP, hostMAC, req.IfName))
	}
	want := []*netlink.Route{gatewayLinkRoute(idx)}
	for _, dst := range req.routes() {
		want = append(want, viaGatewayRoute(idx, dst))
	}
	for _, r := range want {
		has, err := hasRoute(h, r)
		if err != nil {
			return nil, nil, err
		}
		if !has {
			desc := fmt.Sprintf("route %s dev %s", r.Dst, req.IfName)
			if r.Gw != nil {
				desc = fmt.Sprintf("route %s via %s dev %s", r.Dst, r.Gw, req.IfName)
			}
			missing = append(missing, desc)
		}
	}
	return missing, eth.Attrs().HardwareAddr, nil
}

func hasRoute(h *netlink.Handle, want *netlink.Route) (bool, error) {
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{LinkIndex: want.LinkIndex}, netlink.RT_FILTER_OIF)
	if err != nil {
		return false, fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if sameNet(r.Dst, want.Dst) && r.Gw.Equal(want.Gw) {
			return true, nil
		}
	}
	return false, nil
}

func sameNet(a, b *net.IPNet) bool {
	if a == nil || b == nil {
		// The kernel reports a default route with a nil Dst.
		isDefault := func(n *net.IPNet) bool {
			if n == nil {
				return true
			}
			ones, _ := n.Mask.Size()
			return ones == 0
		}
		return isDefault(a) && isDefault(b)
	}
	return a.IP.Equal(b.IP) && a.Mask.String() == b.Mask.String()
}

// DefaultMTU is the MTU of the node's default-route device, or 1500 if there
// is none, in the calling thread's namespace.
func DefaultMTU() int {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return 1500
	}
	defer h.Close()
	return defaultMTU(h)
}

func defaultMTU(h *netlink.Handle) int {
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return 1500
	}
	for _, r := range routes {
		if !sameNet(r.Dst, nil) || r.LinkIndex == 0 {
			continue
		}
		if l, err := h.LinkByIndex(r.LinkIndex); err == nil && l.Attrs().MTU > 0 {
			return l.Attrs().MTU
		}
	}
	return 1500
}

func deleteLink(h *netlink.Handle, name string) error {
	l, err := h.LinkByName(name)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up %s: %w", name, err)
	}
	if err := h.LinkDel(l); err != nil && !isNotFound(err) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}

// openNetns opens a namespace by path, telling "gone" apart from other
// failures: a bind mount removed by the runtime leaves either nothing or a
// plain file behind.
func openNetns(path string) (netns.NsHandle, error) {
	h, err := netns.GetFromPath(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return netns.None(), fmt.Errorf("open netns %s: %w", path, ErrNetnsNotFound)
		}
		return netns.None(), fmt.Errorf("open netns %s: %w", path, err)
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(h), &st); err != nil {
		h.Close()
		return netns.None(), fmt.Errorf("open netns %s: %w", path, err)
	}
	if st.Type != unix.NSFS_MAGIC && st.Type != unix.PROC_SUPER_MAGIC {
		h.Close()
		return netns.None(), fmt.Errorf("open netns %s: not a network namespace: %w", path, ErrNetnsNotFound)
	}
	return h, nil
}

// inNetns runs fn with a netlink handle in ns, on a thread of its own.
func inNetns(ns netns.NsHandle, fn func(*netlink.Handle) error) error {
	return nsthread.Do(ns, func() error {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return fmt.Errorf("open netlink in pod namespace: %w", err)
		}
		defer h.Close()
		return fn(h)
	})
}
