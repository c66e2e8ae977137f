package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	agentv1 "github.com/veilmesh/veil/agent/api/v1"
	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
)

// flowLog keeps the last flows and fans new ones out to followers.
type flowLog struct {
	mu        sync.Mutex
	ring      []*agentv1.Flow
	next      int
	full      bool
	followers map[chan *agentv1.Flow]struct{}
}

func newFlowLog(size int) *flowLog {
	return &flowLog{ring: make([]*agentv1.Flow, size), followers: map[chan *agentv1.Flow]struct{}{}}
}

func (l *flowLog) add(f *agentv1.Flow) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ring[l.next] = f
	l.next = (l.next + 1) % len(l.ring)
	if l.next == 0 {
		l.full = true
	}
	for ch := range l.followers {
		select {
		case ch <- f:
		default: // a slow follower loses flows rather than stalling the agent
		}
	}
}

// Snapshot returns the stored flows, oldest first, and (when follow) a
// channel of new ones registered atomically with the snapshot.
func (l *flowLog) Snapshot(follow bool) ([]*agentv1.Flow, chan *agentv1.Flow) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*agentv1.Flow
	if l.full {
		out = append(out, l.ring[l.next:]...)
	}
	out = append(out, l.ring[:l.next]...)
	var ch chan *agentv1.Flow
	if follow {
		ch = make(chan *agentv1.Flow, 1024)
		l.followers[ch] = struct{}{}
	}
	return out, ch
}

// Unfollow stops sending new flows to ch.
func (l *flowLog) Unfollow(ch chan *agentv1.Flow) {
	l.mu.Lock()
	delete(l.followers, ch)
	l.mu.Unlock()
}

// readFlows turns datapath flow events into API flows.
func (d *Daemon) readFlows(ctx context.Context) {
	err := d.dp.ReadEvents(ctx, func(ev datapath.FlowEvent) {
		f := d.describeFlow(ev)
		d.metrics.verdicts.WithLabelValues(f.Verdict).Inc()
		d.flows.add(f)
	})
	if err != nil && !errors.Is(err, context.Canceled) {
		d.log.Error("flow events stopped", "error", err)
		d.setDegraded("flow-events", err.Error())
	}
}

func protoName(p uint8) string { return policy.ProtoName(p) }

func (d *Daemon) describeFlow(ev datapath.FlowEvent) *agentv1.Flow {
	f := &agentv1.Flow{
		TimeUnixNano: ev.Time.UnixNano(), Node: d.cfg.NodeName,
		SrcIp: ev.Src.String(), DstIp: ev.Dst.String(),
		SrcPort: uint32(ev.SrcPort), DstPort: uint32(ev.DstPort),
		Protocol: protoName(ev.Proto), ObservationPoint: ev.Point.String(),
		SrcIdentity: uint32(ev.SrcIdentity), DstIdentity: uint32(ev.DstIdentity),
		Bytes: ev.Len, Encrypted: ev.Flags&datapath.FlagEncrypted != 0,
	}
	switch {
	case ev.Verdict == policy.Deny:
		f.Verdict = "DENIED"
		f.DropReason = ev.Reason.String()
	case ev.Flags&datapath.FlagAudit != 0:
		f.Verdict = "AUDIT"
	default:
		f.Verdict = "ALLOWED"
	}
	f.SrcLabels = d.identityLabels(ev.SrcIdentity)
	f.DstLabels = d.identityLabels(ev.DstIdentity)
	f.SrcPod = d.podOf(ev.Src)
	f.DstPod = d.podOf(ev.Dst)
	if ev.RuleID != 0 {
		if r, ok := d.compiler.Rule(ev.RuleID); ok {
			f.Rule = fmt.Sprintf("%s %s", r.Policy, r.Section)
		}
	}
	return f
}

// names caches what flow descriptions look up per event: labels of every
// identity and the pod of every address. It is rebuilt at most once a second.
type names struct {
	mu     sync.Mutex
	built  time.Time
	labels map[identity.ID][]string
	pods   map[netip.Addr]string
}

func (d *Daemon) namesNow() *names {
	n := &d.names
	n.mu.Lock()
	defer n.mu.Unlock()
	if time.Since(n.built) < time.Second && n.labels != nil {
		return n
	}
	n.labels = map[identity.ID][]string{}
	for _, info := range d.compiler.Identities() {
		out := make([]string, len(info.Labels))
		for i, l := range info.Labels {
			out[i] = l.String()
		}
		n.labels[info.ID] = out
	}
	n.pods = map[netip.Addr]string{}
	for _, e := range d.compiler.Endpoints() {
		for _, a := range e.IPs {
			n.pods[a] = e.EndpointID.String()
		}
	}
	n.built = time.Now()
	return n
}

func (d *Daemon) identityLabels(id identity.ID) []string {
	if name := id.ReservedName(); name != "" {
		return []string{"reserved:" + name}
	}
	n := d.namesNow()
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.labels[id]
}

func (d *Daemon) podOf(ip netip.Addr) string {
	n := d.namesNow()
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.pods[ip]
}
