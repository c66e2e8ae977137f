package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
)

// ResultVersion is the CNI version of the result JSON the agent returns;
// veil-cni converts it to the network config's version.
const ResultVersion = "1.0.0"

// Attachment describes a wired pod, for its CNI result.
type Attachment struct {
	IP       netip.Addr
	HostVeth string
	HostMAC  net.HardwareAddr
	PodMAC   net.HardwareAddr
	MTU      int
	// IfName and Netns are the pod-side interface and its namespace.
	IfName string
	Netns  string
	Routes []netip.Prefix
}

// Result builds the CNI 1.0 result JSON of an ADD: the node-side veth and
// the pod's interface (with its sandbox), the pod address as a /32 with
// gateway 169.254.1.1, and the routes through that gateway.
func Result(a Attachment) ([]byte, error) {
	switch {
	case !a.IP.Is4():
		return nil, fmt.Errorf("build CNI result: pod address %s is not IPv4", a.IP)
	case a.HostVeth == "" || a.IfName == "" || a.Netns == "":
		return nil, errors.New("build CNI result: host veth, interface name and netns are required")
	}
	podIdx := 1
	res := &types100.Result{
		CNIVersion: ResultVersion,
		Interfaces: []*types100.Interface{
			{Name: a.HostVeth, Mac: a.HostMAC.String(), Mtu: a.MTU},
			{Name: a.IfName, Mac: a.PodMAC.String(), Mtu: a.MTU, Sandbox: a.Netns},
		},
		IPs: []*types100.IPConfig{{
			Interface: &podIdx,
			Address:   net.IPNet{IP: a.IP.AsSlice(), Mask: net.CIDRMask(32, 32)},
			Gateway:   GatewayIP.AsSlice(),
		}},
	}
	for _, p := range a.Routes {
		res.Routes = append(res.Routes, &types.Route{
			Dst: net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)},
			GW:  GatewayIP.AsSlice(),
		})
	}
	data, err := json.Marshal(res)
	if err != nil {
		return nil, fmt.Errorf("encode CNI result: %w", err)
	}
	return data, nil
}
