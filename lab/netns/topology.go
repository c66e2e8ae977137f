package netns

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// GatewayIP is the address every pod routes through. It exists nowhere: the
// pod has a permanent neighbour entry mapping it to its host-side veth, so
// every packet a pod sends reaches that veth, where Veil's program decides.
var GatewayIP = netip.MustParseAddr("169.254.1.1")

// Pod is a pod network namespace joined to its node by a veth pair.
type Pod struct {
	Netns
	Node *Node
	IP   netip.Addr
	// HostVeth is the node-side interface, HostIfindex its index in the
	// node namespace; HostMAC and MAC the two ends' addresses.
	HostVeth    string
	HostIfindex int
	HostMAC     net.HardwareAddr
	MAC         net.HardwareAddr
}

// Node is a node network namespace.
type Node struct {
	Netns
	// Underlay is the node's interface toward other nodes, UnderlayIP its
	// address on it.
	Underlay   string
	UnderlayIP netip.Addr
}

// NewNode creates a node namespace. IP forwarding is off: delivery between
// pods is the datapath's job, not the node's routing table.
func NewNode(name string) (*Node, error) {
	ns, err := NewNetns(name)
	if err != nil {
		return nil, err
	}
	n := &Node{Netns: *ns}
	if err := n.Sysctl("net.ipv4.ip_forward", "0"); err != nil {
		ns.Delete()
		return nil, err
	}
	return n, nil
}

// AddPod creates a pod namespace named name with address ip, wired to the
// node through a veth pair whose node side is called hostVeth.
func (n *Node) AddPod(name, hostVeth string, ip netip.Addr) (*Pod, error) {
	ns, err := NewNetns(name)
	if err != nil {
		return nil, err
	}
	p := &Pod{Netns: *ns, Node: n, IP: ip, HostVeth: hostVeth}
	if err := p.wire(); err != nil {
		ns.Delete()
		return nil, fmt.Errorf("wire pod %s: %w", name, err)
	}
	return p, nil
}

func (p *Pod) wire() error {
	podNS, err := netnsHandle(p.Path())
	if err != nil {
		return err
	}
	defer podNS.Close()
	err = p.Node.Do(func() error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: p.HostVeth},
			PeerName:      "eth0",
			PeerNamespace: netlink.NsFd(int(podNS)),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s: %w", p.HostVeth, err)
		}
		host, err := netlink.LinkByName(p.HostVeth)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(host); err != nil {
			return err
		}
		p.HostIfindex = host.Attrs().Index
		p.HostMAC = host.Attrs().HardwareAddr
		// The node reaches the pod through its veth (host-originated traffic).
		return netlink.RouteAdd(&netlink.Route{
			LinkIndex: p.HostIfindex,
			Dst:       &net.IPNet{IP: p.IP.AsSlice(), Mask: net.CIDRMask(32, 32)},
			Scope:     netlink.SCOPE_LINK,
		})
	})
	if err != nil {
		return err
	}
	return p.Do(func() error {
		eth, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		p.MAC = eth.Attrs().HardwareAddr
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.IP.AsSlice(), Mask: net.CIDRMask(32, 32)}}
		if err := netlink.AddrAdd(eth, addr); err != nil {
			return fmt.Errorf("address eth0: %w", err)
		}
		if err := netlink.LinkSetUp(eth); err != nil {
			return err
		}
		if err := netlink.NeighAdd(&netlink.Neigh{
			LinkIndex: eth.Attrs().Index, State: netlink.NUD_PERMANENT,
			IP: GatewayIP.AsSlice(), HardwareAddr: p.HostMAC,
		}); err != nil {
			return fmt.Errorf("gateway neighbour: %w", err)
		}
		if err := netlink.RouteAdd(&netlink.Route{
			LinkIndex: eth.Attrs().Index, Scope: netlink.SCOPE_LINK,
			Dst: &net.IPNet{IP: GatewayIP.AsSlice(), Mask: net.CIDRMask(32, 32)},
		}); err != nil {
			return fmt.Errorf("gateway route: %w", err)
		}
		// Only the lab's own ranges are routed; the pod has no default route,
		// so nothing it sends can leave the lab by accident.
		for _, dst := range LabRanges {
			if err := netlink.RouteAdd(&netlink.Route{
				LinkIndex: eth.Attrs().Index, Gw: GatewayIP.AsSlice(),
				Dst: &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), 32)},
			}); err != nil {
				return fmt.Errorf("route %s: %w", dst, err)
			}
		}
		return nil
	})
}

// LabRanges are the address ranges routed inside the lab: pods and underlay.
var LabRanges = []netip.Prefix{
	netip.MustParsePrefix("10.244.0.0/16"),
	netip.MustParsePrefix("10.99.0.0/16"),
}

// Connect joins two nodes with an underlay veth pair; each end gets the
// address given, in a /24 shared by both.
func Connect(a, b *Node, aDev, bDev string, aIP, bIP netip.Addr) error {
	bNS, err := netnsHandle(b.Path())
	if err != nil {
		return err
	}
	defer bNS.Close()
	err = a.Do(func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: aDev}, PeerName: bDev, PeerNamespace: netlink.NsFd(int(bNS))}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add underlay veth %s: %w", aDev, err)
		}
		return addrUp(aDev, aIP)
	})
	if err != nil {
		return err
	}
	if err := b.Do(func() error { return addrUp(bDev, bIP) }); err != nil {
		return err
	}
	a.Underlay, a.UnderlayIP = aDev, aIP
	b.Underlay, b.UnderlayIP = bDev, bIP
	return nil
}

func addrUp(dev string, ip netip.Addr) error {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return err
	}
	if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
		return fmt.Errorf("address %s: %w", dev, err)
	}
	return netlink.LinkSetUp(l)
}

// LinkStats returns the packet and byte counters of an interface of the node.
func (n *Node) LinkStats(dev string) (*netlink.LinkStatistics, error) {
	var st *netlink.LinkStatistics
	err := n.Do(func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		st = l.Attrs().Statistics
		return nil
	})
	return st, err
}
