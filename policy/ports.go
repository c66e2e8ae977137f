package policy

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/veilmesh/veil/policy/policytypes"
)

// ProtoName returns "TCP", "UDP", "SCTP", "ICMP", "ICMPv6", "any" or the
// number.
func ProtoName(p uint8) string {
	switch p {
	case policytypes.ProtoAny:
		return "any"
	case policytypes.ProtoTCP:
		return "TCP"
	case policytypes.ProtoUDP:
		return "UDP"
	case policytypes.ProtoSCTP:
		return "SCTP"
	case policytypes.ProtoICMP:
		return "ICMP"
	case policytypes.ProtoICMPv6:
		return "ICMPv6"
	}
	return strconv.Itoa(int(p))
}

// ParseProto parses a protocol name (case-insensitive) or number.
func ParseProto(s string) (uint8, error) {
	switch strings.ToUpper(s) {
	case "TCP":
		return policytypes.ProtoTCP, nil
	case "UDP":
		return policytypes.ProtoUDP, nil
	case "SCTP":
		return policytypes.ProtoSCTP, nil
	case "ICMP":
		return policytypes.ProtoICMP, nil
	case "ICMPV6":
		return policytypes.ProtoICMPv6, nil
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("parse protocol %q: want TCP, UDP, SCTP, ICMP, ICMPv6 or a number", s)
	}
	return uint8(n), nil
}

func parsePortProto(s string) (PortProto, error) {
	num, proto, hasProto := strings.Cut(s, "/")
	pp := PortProto{Proto: policytypes.ProtoTCP}
	if hasProto {
		p, err := ParseProto(proto)
		if err != nil {
			return PortProto{}, fmt.Errorf("parse port %q: %w", s, err)
		}
		pp.Proto = p
	}
	n, err := strconv.ParseUint(num, 10, 16)
	if err != nil {
		return PortProto{}, fmt.Errorf("parse port %q: want N or N/PROTO with N in 0..65535", s)
	}
	pp.Port = uint16(n)
	if pp.Proto == policytypes.ProtoICMP || pp.Proto == policytypes.ProtoICMPv6 {
		if n > 255 {
			return PortProto{}, fmt.Errorf("parse port %q: ICMP type must be 0..255", s)
		}
		pp.Port = uint16(n) << 8
	}
	return pp, nil
}
