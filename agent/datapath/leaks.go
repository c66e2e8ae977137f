package datapath

import (
	"fmt"
	"net/netip"
	"time"
)

// Leak is pod traffic that strict mode kept off the underlay because it
// would have crossed to another node unencrypted.
type Leak struct {
	Src, Dst         netip.Addr
	SrcPort, DstPort uint16
	Proto            uint8
	// EndpointID is the local endpoint involved (sender, or receiver of
	// plaintext from a remote pod).
	EndpointID  uint32
	Reason      DropReason
	Packets     uint64
	First, Last time.Time
}

// Leaks lists the leak records (the newest few thousand flows).
func (d *Datapath) Leaks() ([]Leak, error) {
	boot := bootTime()
	var (
		k   podCtKey
		v   podLeak
		out []Leak
	)
	it := d.leaks.Iterate()
	for it.Next(&k, &v) {
		out = append(out, Leak{
			Src: u32ToIP4(k.Saddr), Dst: u32ToIP4(k.Daddr), SrcPort: k.Sport, DstPort: k.Dport, Proto: k.Proto,
			EndpointID: v.EndpointId, Reason: DropReason(v.Reason), Packets: v.Packets,
			First: boot.Add(time.Duration(v.FirstNs)), Last: boot.Add(time.Duration(v.LastNs)),
		})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list leaks: %w", err)
	}
	return out, nil
}
