// Package flows turns the datapath's flow events into API flows, naming
// their pods, identities and rules, and keeps the newest ones for Observe.
package flows

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/veilmesh/veil/agent/datapath"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// Policy is what flows are named from.
type Policy interface {
	Identities() []policy.IdentityInfo
	Endpoints() []policy.Endpoint
	Rule(id uint32) (policy.Rule, bool)
}

// Source delivers the datapath's flow events until ctx is done.
type Source interface {
	ReadEvents(ctx context.Context, fn func(datapath.FlowEvent)) error
}

// Config is what a Log needs.
type Config struct {
	// NodeName is the node every flow is observed on.
	NodeName string
	Policy   Policy
	// Size is how many flows are kept; 0 means 4096.
	Size int
	// Observed, when set, is called with every new flow.
	Observed func(*agentv1.Flow)
	// Services, when set, names the Service a flow's connection was
	// load-balanced through.
	Services ServiceNamer
}

// ServiceNamer names the Service a connection from client to backend went
// through ("namespace/name:port"), or "" when it went to the pod directly.
type ServiceNamer interface {
	ServiceVia(client netip.Addr, backend netip.AddrPort, proto uint8) string
}

// Log describes flows and keeps the newest ones.
type Log struct {
	cfg   Config
	names names

	mu        sync.Mutex
	ring      []*agentv1.Flow
	next      int
	full      bool
	followers map[chan *agentv1.Flow]struct{}
}

// New returns an empty log.
func New(cfg Config) *Log {
	if cfg.Size == 0 {
		cfg.Size = 4096
	}
	return &Log{cfg: cfg, ring: make([]*agentv1.Flow, cfg.Size), followers: map[chan *agentv1.Flow]struct{}{}}
}

// Run describes and keeps every event of src until ctx is done or src
// fails.
func (l *Log) Run(ctx context.Context, src Source) error {
	return src.ReadEvents(ctx, func(ev datapath.FlowEvent) {
		f := l.Describe(ev)
		if l.cfg.Observed != nil {
			l.cfg.Observed(f)
		}
		l.Add(f)
	})
}

// Add keeps f, dropping the oldest flow when full, and hands it to every
// follower.
func (l *Log) Add(f *agentv1.Flow) {
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
func (l *Log) Snapshot(follow bool) ([]*agentv1.Flow, chan *agentv1.Flow) {
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
func (l *Log) Unfollow(ch chan *agentv1.Flow) {
	l.mu.Lock()
	delete(l.followers, ch)
	l.mu.Unlock()
}

func protoName(p uint8) string { return policy.ProtoName(p) }

// Describe turns a datapath event into an API flow.
func (l *Log) Describe(ev datapath.FlowEvent) *agentv1.Flow {
	f := &agentv1.Flow{
		TimeUnixNano: ev.Time.UnixNano(), Node: l.cfg.NodeName,
		SrcIp: ev.Src.String(), DstIp: ev.Dst.String(),
		SrcPort: uint32(ev.SrcPort), DstPort: uint32(ev.DstPort),
		Protocol: protoName(ev.Proto), ObservationPoint: ev.Point.String(),
		SrcIdentity: uint32(ev.SrcIdentity), DstIdentity: uint32(ev.DstIdentity),
		Bytes: ev.Len, Encrypted: ev.Flags&datapath.FlagEncrypted != 0,
	}
	switch {
	case ev.Verdict == policytypes.Deny:
		f.Verdict = "DENIED"
		f.DropReason = ev.Reason.String()
	case ev.Flags&datapath.FlagAudit != 0:
		f.Verdict = "AUDIT"
	default:
		f.Verdict = "ALLOWED"
	}
	f.SrcLabels = l.IdentityLabels(ev.SrcIdentity)
	f.DstLabels = l.IdentityLabels(ev.DstIdentity)
	f.SrcPod = l.PodOf(ev.Src)
	f.DstPod = l.PodOf(ev.Dst)
	if ev.RuleID != 0 {
		if r, ok := l.cfg.Policy.Rule(ev.RuleID); ok {
			f.Rule = fmt.Sprintf("%s %s", r.Policy, r.Section)
		}
	}
	if s := l.cfg.Services; s != nil && ev.Proto != policytypes.ProtoICMP {
		// The client is the local pod; the flow may be a reply.
		f.Service = s.ServiceVia(ev.Src, netip.AddrPortFrom(ev.Dst, ev.DstPort), ev.Proto)
		if f.Service == "" {
			f.Service = s.ServiceVia(ev.Dst, netip.AddrPortFrom(ev.Src, ev.SrcPort), ev.Proto)
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

func (l *Log) namesNow() *names {
	n := &l.names
	n.mu.Lock()
	defer n.mu.Unlock()
	if time.Since(n.built) < time.Second && n.labels != nil {
		return n
	}
	n.labels = map[identity.ID][]string{}
	for _, info := range l.cfg.Policy.Identities() {
		out := make([]string, len(info.Labels))
		for i, l := range info.Labels {
			out[i] = l.String()
		}
		n.labels[info.ID] = out
	}
	n.pods = map[netip.Addr]string{}
	for _, e := range l.cfg.Policy.Endpoints() {
		for _, a := range e.IPs {
			n.pods[a] = e.EndpointID.String()
		}
	}
	n.built = time.Now()
	return n
}

// IdentityLabels names an identity's labels.
func (l *Log) IdentityLabels(id identity.ID) []string {
	if name := id.ReservedName(); name != "" {
		return []string{"reserved:" + name}
	}
	n := l.namesNow()
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.labels[id]
}

// PodOf names the pod that holds ip, "" when none does.
func (l *Log) PodOf(ip netip.Addr) string {
	n := l.namesNow()
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.pods[ip]
}
