package audit

import (
	"context"
	"crypto/rand"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/meshctl/output"
)

// ActiveEvidence is what one active check saw.
type ActiveEvidence struct {
	Scope          string `json:"scope"`
	Marker         string `json:"marker"`
	SourcePod      string `json:"sourcePod,omitempty"`
	SourceIP       string `json:"sourceIP,omitempty"`
	DestinationPod string `json:"destinationPod"`
	DestinationIP  string `json:"destinationIP"`
	// DestinationPort is the UDP port the marker was sent to.
	DestinationPort uint32           `json:"destinationPort"`
	Sent            uint32           `json:"sent"`
	Source          *CaptureEvidence `json:"sourceCapture,omitempty"`
	Destination     *CaptureEvidence `json:"destinationCapture,omitempty"`
	Error           string           `json:"error,omitempty"`
}

// CaptureEvidence is what one agent's capture counted.
type CaptureEvidence struct {
	Node                 string    `json:"node"`
	Started              time.Time `json:"started"`
	UnderlayInterface    string    `json:"underlayInterface"`
	TunnelInterface      string    `json:"tunnelInterface"`
	UnderlayFrames       uint64    `json:"underlayFrames"`
	WireGuardFrames      uint64    `json:"wireguardFrames"`
	UnderlayMarkerFrames uint64    `json:"underlayMarkerFrames"`
	TunnelMarkerFrames   uint64    `json:"tunnelMarkerFrames"`
	PlaintextPodFrames   uint64    `json:"plaintextPodFrames"`
}

func newCaptureEvidence(node string, c *agentv1.CaptureResponse) *CaptureEvidence {
	return &CaptureEvidence{
		Node: node, Started: time.Unix(0, c.StartedUnixNano).UTC(),
		UnderlayInterface: c.UnderlayInterface, TunnelInterface: c.TunnelInterface,
		UnderlayFrames: c.UnderlayFrames, WireGuardFrames: c.WireguardFrames,
		UnderlayMarkerFrames: c.UnderlayMarkerFrames, TunnelMarkerFrames: c.TunnelMarkerFrames,
		PlaintextPodFrames: c.PlaintextPodFrames,
	}
}

// markerSends is how many markers each active check sends.
const markerSends = 3

// defaultMarkerPort is discard, for a pod that declares no UDP port.
const defaultMarkerPort = 9

// markerPort is the port to send a marker to pod on: the --marker-port
// flag, else the first UDP port the pod declares, so that the marker is
// delivered rather than answered with an ICMP port unreachable.
func markerPort(flag uint32, pod corev1.Pod) uint32 {
	if flag != 0 {
		return flag
	}
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			if p.Protocol == corev1.ProtocolUDP && p.ContainerPort > 0 {
				return uint32(p.ContainerPort)
			}
		}
	}
	return defaultMarkerPort
}

// Active runs the active checks, one node pair at a time so that one
// pair's traffic is not counted in another's capture.
type Active struct {
	dial Dialer
	opts Options
	// conns and errs cache one connection (or why there is none) per node.
	conns map[string]*agentclient.Conn
	errs  map[string]error
}

// Dialer connects to the agent of a node; its errors are reported in the
// failed check's reason.
type Dialer func(ctx context.Context, node string) (*agentclient.Conn, error)

// NewActive returns the active checks of o, reaching agents through dial.
// The caller closes it.
func NewActive(o Options, dial Dialer) *Active {
	return &Active{dial: dial, opts: o, conns: map[string]*agentclient.Conn{}, errs: map[string]error{}}
}

// Close closes the connections to the agents.
func (a *Active) Close() {
	for _, c := range a.conns {
		c.Close()
	}
}

// conn connects to a node's agent through the Dialer.
func (a *Active) conn(ctx context.Context, node string) (*agentclient.Conn, error) {
	if c, ok := a.conns[node]; ok {
		return c, nil
	}
	if err, ok := a.errs[node]; ok {
		return nil, err
	}
	c, err := a.dial(ctx, node)
	if err != nil {
		a.errs[node] = err
		return nil, err
	}
	a.conns[node] = c
	return c, nil
}

// podsOn are the pods of a node that have a pod address: not host
// network, an IPv4 address inside the node's pod CIDRs when those are known.
func podsOn(pods []corev1.Pod, cidrs []netip.Prefix) []corev1.Pod {
	var out []corev1.Pod
	for _, p := range pods {
		ip, err := netip.ParseAddr(p.Status.PodIP)
		if p.Spec.HostNetwork || err != nil || !ip.Is4() || p.DeletionTimestamp != nil {
			continue
		}
		if len(cidrs) > 0 && !slices.ContainsFunc(cidrs, func(c netip.Prefix) bool { return c.Contains(ip) }) {
			continue
		}
		out = append(out, p)
	}
	return out
}

// Run runs the active check of every ordered node pair of r, adding its
// checks and evidence to r, or a not-tested row where a node runs no pod;
// pods are each node's pods.
func (a *Active) Run(ctx context.Context, r *Report, cs *Cluster, pods map[string][]corev1.Pod) {
	withPods := map[string][]corev1.Pod{}
	for i, n := range r.Nodes {
		withPods[n.Node] = podsOn(pods[n.Node], claimsOf(&cs.Nodes[i]).podCIDRs)
	}
	for _, src := range r.Nodes {
		for _, dst := range r.Nodes {
			if src.Node == dst.Node {
				continue
			}
			s := pairScope(src.Node, dst.Node)
			switch {
			case len(withPods[src.Node]) == 0:
				r.NotTested = append(r.NotTested, Check{Scope: s, Check: "active", Reason: src.Node + " runs no pod to send the marker from"})
				continue
			case len(withPods[dst.Node]) == 0:
				r.NotTested = append(r.NotTested, Check{Scope: s, Check: "active", Reason: dst.Node + " runs no pod to send the marker to"})
				continue
			}
			c, ev := a.pair(ctx, src.Node, dst.Node, withPods[dst.Node][0])
			r.addActive(c)
			r.Active = append(r.Active, ev)
		}
	}
}

// pair sends a marker from a pod on src to dst's pod while both agents
// capture, and judges what they saw.
func (a *Active) pair(ctx context.Context, src, dst string, to corev1.Pod) (Check, ActiveEvidence) {
	s := pairScope(src, dst)
	ev := ActiveEvidence{Scope: s, Marker: "veil-audit-" + rand.Text(), DestinationPod: to.Namespace + "/" + to.Name, DestinationIP: to.Status.PodIP,
		DestinationPort: markerPort(a.opts.MarkerPort, to)}
	failWith := func(format string, args ...any) (Check, ActiveEvidence) {
		c := fail(s, "active", format, args...)
		ev.Error = c.Reason
		return c, ev
	}
	sc, err := a.conn(ctx, src)
	if err != nil {
		return failWith("cannot reach the agent of %s: %s", src, oneLine(err))
	}
	dc, err := a.conn(ctx, dst)
	if err != nil {
		return failWith("cannot reach the agent of %s: %s", dst, oneLine(err))
	}
	req := &agentv1.CaptureRequest{Marker: ev.Marker, DurationMs: uint32(a.opts.CaptureDuration / time.Millisecond)}
	type captured struct {
		resp *agentv1.CaptureResponse
		err  error
	}
	var (
		wg           sync.WaitGroup
		srcCap, dCap captured
	)
	capture := func(c *agentclient.Conn, node string, out *captured) {
		defer wg.Done()
		cctx, cancel := context.WithTimeout(ctx, a.opts.CaptureDuration+c.Timeout)
		defer cancel()
		resp, err := c.Client.CaptureUnderlay(cctx, req)
		if err != nil {
			err = c.CallError("capture the underlay of "+node, err)
		}
		*out = captured{resp, err}
	}
	wg.Add(2)
	go capture(sc, src, &srcCap)
	go capture(dc, dst, &dCap)
	// Give both captures a head start before the marker goes out.
	lead := min(a.opts.CaptureDuration/4, 500*time.Millisecond)
	select {
	case <-time.After(lead):
	case <-ctx.Done():
	}
	// One marker per call: the agent sends from a connected UDP socket,
	// which an ICMP port unreachable from a pod that does not listen
	// closes for the datagrams after the first.
	var sendErr error
	gap := min(a.opts.CaptureDuration/10, 100*time.Millisecond)
	for i := 0; i < markerSends && sendErr == nil; i++ {
		if i > 0 {
			time.Sleep(gap)
		}
		var sent *agentv1.SendMarkerResponse
		sent, sendErr = agentclient.Unary(ctx, sc, "send marker from "+src, func(ctx context.Context) (*agentv1.SendMarkerResponse, error) {
			return sc.Client.SendMarker(ctx, &agentv1.SendMarkerRequest{Destination: to.Status.PodIP, Port: ev.DestinationPort, Marker: ev.Marker, Count: 1})
		})
		if sendErr == nil {
			ev.SourcePod, ev.SourceIP, ev.Sent = sent.SourcePod, sent.SourceIp, ev.Sent+sent.Sent
		}
	}
	wg.Wait()
	if sendErr != nil {
		return failWith("%s", oneLine(sendErr))
	}
	if srcCap.err != nil {
		return failWith("%s", oneLine(srcCap.err))
	}
	if dCap.err != nil {
		return failWith("%s", oneLine(dCap.err))
	}
	ev.Source, ev.Destination = newCaptureEvidence(src, srcCap.resp), newCaptureEvidence(dst, dCap.resp)
	var problems []string
	if ev.Sent == 0 {
		problems = append(problems, src+" sent no marker")
	}
	for _, c := range []*CaptureEvidence{ev.Source, ev.Destination} {
		if c.UnderlayMarkerFrames > 0 {
			problems = append(problems, fmt.Sprintf("the marker was seen in the clear on %s's underlay (%s): %s", c.Node, output.Dash(c.UnderlayInterface), output.Plural(int(c.UnderlayMarkerFrames), "frame")))
		}
		if c.PlaintextPodFrames > 0 {
			problems = append(problems, fmt.Sprintf("%s on %s's underlay (%s)", output.Plural(int(c.PlaintextPodFrames), "plaintext pod frame"), c.Node, output.Dash(c.UnderlayInterface)))
		}
		if c.WireGuardFrames == 0 {
			problems = append(problems, fmt.Sprintf("no WireGuard frames on %s's underlay (%s)", c.Node, output.Dash(c.UnderlayInterface)))
		}
	}
	if ev.Destination.TunnelMarkerFrames == 0 {
		problems = append(problems, fmt.Sprintf("the marker never arrived: %s's tunnel (%s) did not see it", dst, output.Dash(ev.Destination.TunnelInterface)))
	}
	if len(problems) > 0 {
		return failWith("%s", strings.Join(problems, "; "))
	}
	return pass(s, "active", "marker sent %d× from %s (%s) to %s (%s) arrived through %s's tunnel %d×; never in the clear on %s (%s) or %s (%s), WireGuard frames %d and %d",
		ev.Sent, output.Dash(ev.SourcePod), output.Dash(ev.SourceIP), ev.DestinationPod, ev.DestinationIP, dst, ev.Destination.TunnelMarkerFrames,
		src, output.Dash(ev.Source.UnderlayInterface), dst, output.Dash(ev.Destination.UnderlayInterface),
		ev.Source.WireGuardFrames, ev.Destination.WireGuardFrames), ev
}

// oneLine puts an error's message, which may carry hints on further
// lines, on one line for a report row.
func oneLine(err error) string { return strings.Join(strings.Fields(err.Error()), " ") }
