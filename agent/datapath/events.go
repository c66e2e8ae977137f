package datapath

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"
	"unsafe"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// DropReason says why the datapath dropped a packet (bpf/lib/common.h).
type DropReason uint8

// The values are generated from enum drop_reason.
const (
	ReasonNone          = DropReason(podDropReasonREASON_NONE)
	DropSpoofedSource   = DropReason(podDropReasonDROP_SPOOFED_SOURCE)
	DropPolicyEgress    = DropReason(podDropReasonDROP_POLICY_EGRESS)
	DropPolicyIngress   = DropReason(podDropReasonDROP_POLICY_INGRESS)
	DropUnsupportedL3   = DropReason(podDropReasonDROP_UNSUPPORTED_L3)
	DropInvalidPacket   = DropReason(podDropReasonDROP_INVALID_PACKET)
	DropFragment        = DropReason(podDropReasonDROP_FRAGMENT)
	DropNoRoute         = DropReason(podDropReasonDROP_NO_ROUTE)
	DropRedirectFailed  = DropReason(podDropReasonDROP_REDIRECT_FAILED)
	DropUnknownEndpoint = DropReason(podDropReasonDROP_UNKNOWN_ENDPOINT)
	DropNoTunnel        = DropReason(podDropReasonDROP_NO_TUNNEL)
	DropLeak            = DropReason(podDropReasonDROP_LEAK)
	DropUnencryptedPeer = DropReason(podDropReasonDROP_UNENCRYPTED_PEER)
	maxDropReason       = uint32(podDropReasonDROP_MAX)
)

var dropReasonNames = map[DropReason]string{
	ReasonNone:          "none",
	DropSpoofedSource:   "spoofed-source",
	DropPolicyEgress:    "policy-denied-egress",
	DropPolicyIngress:   "policy-denied-ingress",
	DropUnsupportedL3:   "unsupported-l3",
	DropInvalidPacket:   "invalid-packet",
	DropFragment:        "fragment",
	DropNoRoute:         "no-route",
	DropRedirectFailed:  "redirect-failed",
	DropUnknownEndpoint: "unknown-endpoint",
	DropNoTunnel:        "no-tunnel",
	DropLeak:            "unencrypted-leak",
	DropUnencryptedPeer: "unencrypted-from-peer",
}

func (r DropReason) String() string {
	if n, ok := dropReasonNames[r]; ok {
		return n
	}
	return fmt.Sprintf("reason-%d", uint8(r))
}

// ObservationPoint says which program saw a packet.
type ObservationPoint uint8

const (
	FromPod    = ObservationPoint(podObsPointOBS_FROM_POD)
	ToPod      = ObservationPoint(podObsPointOBS_TO_POD)
	FromNetdev = ObservationPoint(podObsPointOBS_FROM_NETDEV)
	FromTunnel = ObservationPoint(podObsPointOBS_FROM_TUNNEL)
	ToNetdev   = ObservationPoint(podObsPointOBS_TO_NETDEV)
)

func (p ObservationPoint) String() string {
	switch p {
	case FromPod:
		return "from-pod"
	case ToPod:
		return "to-pod"
	case FromNetdev:
		return "from-network"
	case FromTunnel:
		return "from-tunnel"
	case ToNetdev:
		return "to-network"
	}
	return fmt.Sprintf("point-%d", uint8(p))
}

// Flow event flags (enum flow_flags).
const (
	FlagReply          = uint32(podFlowFlagsFLOW_F_REPLY)
	FlagAudit          = uint32(podFlowFlagsFLOW_F_AUDIT)
	FlagEncrypted      = uint32(podFlowFlagsFLOW_F_ENCRYPTED)
	FlagIngressDecided = uint32(podFlowFlagsFLOW_F_INGRESS_DECIDED)
	FlagLeak           = uint32(podFlowFlagsFLOW_F_LEAK)
)

// FlowEvent is one verdict or drop reported by the datapath.
type FlowEvent struct {
	Time             time.Time
	Src, Dst         netip.Addr
	SrcPort, DstPort uint16 // for ICMP, DstPort is type<<8 | code
	Proto            uint8
	Verdict          policytypes.Verdict
	Reason           DropReason
	Point            ObservationPoint
	Flags            uint32
	SrcIdentity      identity.ID
	DstIdentity      identity.ID
	Ifindex          int
	Len              uint32
	RuleID           uint32
}

// bootTime is the wall-clock time of CLOCK_MONOTONIC's zero, which is what
// bpf_ktime_get_ns counts from.
func bootTime() time.Time {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return time.Time{}
	}
	return time.Now().Add(-time.Duration(ts.Nano()))
}

// ReadEvents calls fn for every flow event until ctx is done. Only one reader
// should run per node: events are consumed.
func (d *Datapath) ReadEvents(ctx context.Context, fn func(FlowEvent)) error {
	rd, err := ringbuf.NewReader(d.events)
	if err != nil {
		return fmt.Errorf("open flow event ring buffer: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { rd.Close() })
	defer stop()
	defer rd.Close()
	boot := bootTime()
	var raw podFlowEvent
	for {
		rec, err := rd.Read()
		if err != nil {
			if errors.Is(err, ringbuf.ErrClosed) {
				return ctx.Err()
			}
			return fmt.Errorf("read flow event: %w", err)
		}
		if len(rec.RawSample) < int(unsafe.Sizeof(raw)) {
			continue
		}
		raw = *(*podFlowEvent)(unsafe.Pointer(&rec.RawSample[0]))
		fn(FlowEvent{
			Time: boot.Add(time.Duration(raw.TsNs)),
			Src:  u32ToIP4(raw.Saddr), Dst: u32ToIP4(raw.Daddr),
			SrcPort: raw.Sport, DstPort: raw.Dport, Proto: raw.Proto,
			Verdict: policytypes.Verdict(raw.Verdict), Reason: DropReason(raw.Reason),
			Point: ObservationPoint(raw.Point), Flags: raw.Flags,
			SrcIdentity: identity.ID(raw.SrcIdentity), DstIdentity: identity.ID(raw.DstIdentity),
			Ifindex: int(raw.Ifindex), Len: raw.Len, RuleID: raw.RuleId,
		})
	}
}
