package cli

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/output"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/policytypes"
)

// servicePrefix marks a --to that names a Service: svc/NAMESPACE/NAME.
const servicePrefix = "svc/"

// serviceResolver finds the backends a Service port sends clients to.
type serviceResolver interface {
	ServiceBackends(ctx context.Context, namespace, name string, port policy.PortProto) (serviceTarget, error)
}

// serviceTarget is a Service port and its backends.
type serviceTarget struct {
	Backends []serviceBackend
	// Problems explain pods the Service selects that are not backends of
	// this port.
	Problems []string
}

type serviceBackend struct {
	// Peer is what the backend is traced as: NAMESPACE/POD, or its IP
	// when the endpoint names no pod.
	Peer        string
	Port        uint16
	Terminating bool
}

// parseServiceRef splits "svc/NS/NAME".
func parseServiceRef(s string) (namespace, name string, err error) {
	rest := strings.TrimPrefix(s, servicePrefix)
	ns, n, ok := strings.Cut(rest, "/")
	if !ok || ns == "" || n == "" || strings.Contains(n, "/") {
		return "", "", fmt.Errorf("%q: want svc/NAMESPACE/NAME", s)
	}
	return ns, n, nil
}

// ServiceBackends resolves a Service from the manifests as the EndpointSlice
// controller would: the pods of its namespace that its selector matches and
// that have not finished, each with the target port resolved on that pod (a
// name through the pod's container ports).
func (m *manifestSource) ServiceBackends(_ context.Context, namespace, name string, pp policy.PortProto) (serviceTarget, error) {
	i := slices.IndexFunc(m.set.Services, func(s *corev1.Service) bool { return s.Namespace == namespace && s.Name == name })
	if i < 0 {
		return serviceTarget{}, usageErrorf("service %s/%s is not in the manifests", namespace, name)
	}
	svc := m.set.Services[i]
	sp, err := servicePort(svc, pp)
	if err != nil {
		return serviceTarget{}, err
	}
	if len(svc.Spec.Selector) == 0 {
		return serviceTarget{}, usageErrorf("service %s/%s has no selector: its endpoints are managed by hand, so only the agent knows them (trace without -f)", namespace, name)
	}
	sel := labels.SelectorFromSet(svc.Spec.Selector)
	var t serviceTarget
	for _, p := range m.set.Pods {
		if p.Namespace != namespace || !sel.Matches(labels.Set(p.Labels)) ||
			p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		port, ok := podTargetPort(p, sp)
		if !ok {
			t.Problems = append(t.Problems, fmt.Sprintf("pod %s/%s does not declare target port %q (%s)", p.Namespace, p.Name, sp.TargetPort.String(), sp.Protocol))
			continue
		}
		t.Backends = append(t.Backends, serviceBackend{
			Peer: p.Namespace + "/" + p.Name, Port: port, Terminating: p.DeletionTimestamp != nil,
		})
	}
	slices.SortFunc(t.Backends, func(a, b serviceBackend) int { return strings.Compare(a.Peer, b.Peer) })
	return t, nil
}

// servicePort finds the Service port a client reaches with pp.
func servicePort(svc *corev1.Service, pp policy.PortProto) (corev1.ServicePort, error) {
	var have []string
	for _, sp := range svc.Spec.Ports {
		proto := cmp.Or(sp.Protocol, corev1.ProtocolTCP)
		if uint16(sp.Port) == pp.Port && strings.EqualFold(string(proto), policy.ProtoName(pp.Proto)) {
			sp.Protocol = proto
			return sp, nil
		}
		have = append(have, fmt.Sprintf("%d/%s", sp.Port, proto))
	}
	return corev1.ServicePort{}, usageErrorf("service %s/%s has no port %s; it has %s", svc.Namespace, svc.Name, portString(pp), output.Dash(strings.Join(have, ", ")))
}

// podTargetPort resolves a Service port's target port on one pod.
func podTargetPort(p *corev1.Pod, sp corev1.ServicePort) (uint16, bool) {
	switch {
	case sp.TargetPort.Type == intstr.String && sp.TargetPort.StrVal != "":
		for _, c := range p.Spec.Containers {
			for _, cp := range c.Ports {
				if cp.Name == sp.TargetPort.StrVal && cmp.Or(cp.Protocol, corev1.ProtocolTCP) == sp.Protocol {
					return uint16(cp.ContainerPort), true
				}
			}
		}
		return 0, false
	case sp.TargetPort.IntVal != 0:
		return uint16(sp.TargetPort.IntVal), true
	}
	return uint16(sp.Port), true
}

// ServiceBackends asks the agent which backends it sends the Service's
// clients to.
func (a agentSource) ServiceBackends(ctx context.Context, namespace, name string, pp policy.PortProto) (serviceTarget, error) {
	resp, err := unary(ctx, a.c, "list services", func(ctx context.Context) (*agentv1.ListServicesResponse, error) {
		return a.c.Client.ListServices(ctx, &agentv1.ListServicesRequest{Namespace: namespace})
	})
	if err != nil {
		return serviceTarget{}, err
	}
	i := slices.IndexFunc(resp.Services, func(s *agentv1.Service) bool { return s.Name == name })
	if i < 0 {
		return serviceTarget{}, usageErrorf("node %s load-balances no service %s/%s", output.OrUnknown(a.c.Status.Node), namespace, name)
	}
	svc := resp.Services[i]
	var have []string
	for _, p := range svc.Ports {
		if p.Port != uint32(pp.Port) || !strings.EqualFold(p.Protocol, policy.ProtoName(pp.Proto)) {
			have = append(have, fmt.Sprintf("%d/%s", p.Port, p.Protocol))
			continue
		}
		var t serviceTarget
		if p.Problem != "" {
			t.Problems = append(t.Problems, p.Problem)
		}
		for _, b := range p.Backends {
			t.Backends = append(t.Backends, serviceBackend{Peer: cmp.Or(b.Pod, b.Ip), Port: uint16(b.Port), Terminating: b.Terminating})
		}
		return t, nil
	}
	return serviceTarget{}, usageErrorf("service %s/%s has no port %s; it has %s", namespace, name, portString(pp), output.Dash(strings.Join(have, ", ")))
}

// serviceTraceReport is the -o json|yaml output of a trace to a Service.
type serviceTraceReport struct {
	// Verdict is ALLOWED when every backend allows the flow, DENIED when
	// none does (or there is no backend), PARTIAL otherwise.
	Verdict  string                `json:"verdict"`
	From     string                `json:"from"`
	Service  string                `json:"service"`
	Port     string                `json:"port"`
	Backends []serviceTraceBackend `json:"backends"`
	Problems []string              `json:"problems,omitempty"`
}

type serviceTraceBackend struct {
	Backend     string      `json:"backend"`
	Port        uint16      `json:"port"`
	Terminating bool        `json:"terminating"`
	Trace       traceReport `json:"trace"`
}

// traceService traces from to every backend of a Service port, each on the
// backend's own port: after the socket-level translation, policy judges the
// backend, never the Service address.
func traceService(ctx context.Context, tr tracer, res serviceResolver, from policy.Peer, to string, pp policy.PortProto) (serviceTraceReport, error) {
	ns, name, err := parseServiceRef(to)
	if err != nil {
		return serviceTraceReport{}, usageErrorf("--to: %w", err)
	}
	target, err := res.ServiceBackends(ctx, ns, name, pp)
	if err != nil {
		return serviceTraceReport{}, err
	}
	r := serviceTraceReport{From: from.String(), Service: ns + "/" + name, Port: portString(pp),
		Backends: []serviceTraceBackend{}, Problems: target.Problems}
	allowed := 0
	for _, b := range target.Backends {
		peer, err := policy.ParsePeer(b.Peer)
		if err != nil {
			return serviceTraceReport{}, fmt.Errorf("backend %s: %w", b.Peer, err)
		}
		res, err := tr.Trace(ctx, from, peer, policy.PortProto{Proto: pp.Proto, Port: b.Port})
		if err != nil {
			return serviceTraceReport{}, err
		}
		if res.Allowed {
			allowed++
		}
		r.Backends = append(r.Backends, serviceTraceBackend{Backend: b.Peer, Port: b.Port, Terminating: b.Terminating, Trace: newTraceReport(res)})
	}
	switch {
	case len(r.Backends) > 0 && allowed == len(r.Backends):
		r.Verdict = "ALLOWED"
	case allowed == 0:
		r.Verdict = "DENIED"
	default:
		r.Verdict = "PARTIAL"
	}
	return r, nil
}

func writeServiceTrace(w io.Writer, pal output.Palette, r serviceTraceReport) error {
	verdict := func(word string) string {
		switch word {
		case "ALLOWED":
			return pal.Green(word)
		case "PARTIAL":
			return pal.Yellow(word)
		}
		return pal.Red(word)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s  %s → svc %s  %s\n", pal.Bold(verdict(r.Verdict)), r.From, r.Service, r.Port)
	if len(r.Backends) == 0 {
		b.WriteString("no backends: clients are refused at once\n")
	} else {
		fmt.Fprintf(&b, "%s; each is judged as the backend itself\n\n", output.Plural(len(r.Backends), "backend"))
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "BACKEND\tIP\tPORT\t%s\tDECIDED BY\n", pal.Plain("VERDICT"))
		for _, be := range r.Backends {
			name := be.Backend
			if be.Terminating {
				name += " (terminating)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", name, be.Trace.To.IP, be.Trace.Port, verdict(be.Trace.Verdict), decidedBy(be.Trace))
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write trace: %w", err)
		}
	}
	for _, p := range r.Problems {
		fmt.Fprintf(&b, "%s %s\n", pal.Yellow("!"), p)
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write trace: %w", err)
	}
	return nil
}

// decidedBy names the side that decided a trace and its first reason: the
// denying side of a denied flow, the ingress side of an allowed one.
func decidedBy(r traceReport) string {
	side, d := "ingress", r.Ingress
	if r.Egress.Verdict == "DENIED" || (!r.Ingress.Applicable && r.Egress.Applicable) {
		side, d = "egress", r.Egress
	}
	if !d.Applicable {
		return side + ": no policy applies"
	}
	want := ruleVerdict(policytypes.Allow)
	if d.Verdict == "DENIED" {
		want = ruleVerdict(policytypes.Deny)
	}
	for _, rs := range d.Reasons {
		if rs.Verdict == want && !rs.Audit {
			return side + ": " + rs.Message
		}
	}
	if len(d.Reasons) > 0 {
		return side + ": " + d.Reasons[0].Message
	}
	return side
}
