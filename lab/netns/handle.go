package netns

import (
	"fmt"

	vnetns "github.com/vishvananda/netns"
)

// Handle opens the namespace for netlink calls that take a namespace file
// descriptor (moving a veth peer into it); the caller closes it.
func (n *Netns) Handle() (vnetns.NsHandle, error) {
	return netnsHandle(n.Path())
}

func netnsHandle(path string) (vnetns.NsHandle, error) {
	h, err := vnetns.GetFromPath(path)
	if err != nil {
		return 0, fmt.Errorf("open netns %s: %w", path, err)
	}
	return h, nil
}
