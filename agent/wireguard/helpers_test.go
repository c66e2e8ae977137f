package wireguard

import (
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

func udp(s string) *net.UDPAddr { return net.UDPAddrFromAddrPort(netip.MustParseAddrPort(s)) }

// unixErr wraps an errno the way a netlink call's error reaches Open.
func unixErr(name string) error {
	errno := map[string]unix.Errno{
		"EOPNOTSUPP": unix.EOPNOTSUPP,
		"ENOTSUP":    unix.ENOTSUP,
		"EPERM":      unix.EPERM,
		"EEXIST":     unix.EEXIST,
	}[name]
	return fmt.Errorf("add kernel link: %w", errno)
}
