package datapath

import "fmt"

// Counter is a packet and byte count.
type Counter struct {
	Packets, Bytes uint64
}

// Counters are the datapath's totals since its maps were created.
type Counters struct {
	// Drops by reason.
	Drops map[DropReason]Counter
	// Local: redirected to a pod on this node. Remote: sent toward another
	// node. Stack: handed to the host stack. Established: matched an
	// existing connection. Audit: would have been denied by an audit-mode
	// policy.
	Local, Remote, Stack, Established, Audit Counter
	// Tunnel: sent into the WireGuard device.
	Tunnel Counter
	// EventsLost counts flow events dropped because the ring buffer was full.
	EventsLost uint64
	// SocketRedirected: messages sk_msg moved socket to socket;
	// SocketPassed: messages of sockhash sockets left to the TCP stack.
	SocketRedirected, SocketPassed Counter
}

// Metric indexes of veil_metrics (enum forward_kind).
const (
	fwdLocal  = uint32(podForwardKindFWD_LOCAL)
	fwdRemote = uint32(podForwardKindFWD_REMOTE)
	fwdStack  = uint32(podForwardKindFWD_STACK)
	fwdReply  = uint32(podForwardKindFWD_REPLY)
	fwdAudit  = uint32(podForwardKindFWD_AUDIT)
	eventLost = uint32(podForwardKindEVENT_LOST)
	fwdTunnel = uint32(podForwardKindFWD_TUNNEL)
)

func (d *Datapath) sumPerCPU(m interface {
	Lookup(key, value any) error
}, idx uint32) (Counter, error) {
	var per []podMetric
	if err := m.Lookup(idx, &per); err != nil {
		return Counter{}, fmt.Errorf("read counter %d: %w", idx, err)
	}
	var c Counter
	for _, v := range per {
		c.Packets += v.Packets
		c.Bytes += v.Bytes
	}
	return c, nil
}

// Counters reads the datapath's counters.
func (d *Datapath) Counters() (Counters, error) {
	out := Counters{Drops: map[DropReason]Counter{}}
	for i := uint32(1); i <= maxDropReason; i++ {
		c, err := d.sumPerCPU(d.metrics, i)
		if err != nil {
			return out, err
		}
		if c.Packets > 0 {
			out.Drops[DropReason(i)] = c
		}
	}
	for idx, dst := range map[uint32]*Counter{
		fwdLocal: &out.Local, fwdRemote: &out.Remote, fwdStack: &out.Stack,
		fwdReply: &out.Established, fwdAudit: &out.Audit, fwdTunnel: &out.Tunnel,
	} {
		c, err := d.sumPerCPU(d.metrics, idx)
		if err != nil {
			return out, err
		}
		*dst = c
	}
	lost, err := d.sumPerCPU(d.metrics, eventLost)
	if err != nil {
		return out, err
	}
	out.EventsLost = lost.Packets
	if out.SocketRedirected, err = d.sumPerCPU(d.sockstats, uint32(podSockstatSOCKSTAT_REDIRECTED)); err != nil {
		return out, err
	}
	if out.SocketPassed, err = d.sumPerCPU(d.sockstats, uint32(podSockstatSOCKSTAT_PASSED)); err != nil {
		return out, err
	}
	return out, nil
}
