package lab

import (
	"fmt"

	vnetns "github.com/vishvananda/netns"

	"github.com/veilmesh/veil/tests/netlab"
)

func netns(ns *netlab.Netns) (vnetns.NsHandle, error) {
	h, err := vnetns.GetFromPath(ns.Path())
	if err != nil {
		return 0, fmt.Errorf("open netns %s: %w", ns.Name, err)
	}
	return h, nil
}
