package netlab

import (
	"fmt"

	"github.com/vishvananda/netns"
)

func netnsHandle(path string) (netns.NsHandle, error) {
	h, err := netns.GetFromPath(path)
	if err != nil {
		return 0, fmt.Errorf("open netns %s: %w", path, err)
	}
	return h, nil
}
