package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/veilmesh/veil/policy/policytypes"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// The upstream e2e network-policy model: namespaces x, y, z (labelled
// ns=<name>), pods a, b, c in each (labelled pod=<name>), each serving 80
// and 81 on TCP, UDP and SCTP through container ports named
// serve-<port>-<proto>.
var (
	e2eNamespaces = []string{"x", "y", "z"}
	e2ePods       = []string{"a", "b", "c"}
)

func e2eIP(ns, pod string) string {
	return fmt.Sprintf("10.1.%d.%d", strings.Index("xyz", ns), strings.Index("abc", pod)+1)
}

func testNamespace(name string, kv ...string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: kvMap(kv...)}}
}

func kvMap(kv ...string) map[string]string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

func containerPort(name string, port int32, proto corev1.Protocol) corev1.ContainerPort {
	return corev1.ContainerPort{Name: name, ContainerPort: port, Protocol: proto}
}

func testPod(ns, name, ip string, lbls map[string]string, ports ...corev1.ContainerPort) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: lbls},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Ports: ports}}, NodeName: "node-1"},
		Status:     corev1.PodStatus{PodIP: ip, Phase: corev1.PodRunning},
	}
}

func e2eInput() Input {
	var in Input
	for _, ns := range e2eNamespaces {
		in.Namespaces = append(in.Namespaces, testNamespace(ns, "ns", ns))
		for _, p := range e2ePods {
			var ports []corev1.ContainerPort
			for _, port := range []int32{80, 81} {
				for _, proto := range []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP} {
					ports = append(ports, containerPort(fmt.Sprintf("serve-%d-%s", port, strings.ToLower(string(proto))), port, proto))
				}
			}
			in.Pods = append(in.Pods, testPod(ns, p, e2eIP(ns, p), map[string]string{"pod": p}, ports...))
		}
	}
	return in
}

// reach is a hand-written expected reachability among the e2e pods, built
// like upstream's Reachability: start from a default and override by
// patterns ("x/a", "x/*", "*/a", "*/*"), later calls winning.
type reach map[[2]string]bool

func newReach(def bool) reach {
	r := reach{}
	r.set("*/*", "*/*", def)
	return r
}

func matchPattern(pat, ns, pod string) bool {
	pns, ppod, _ := strings.Cut(pat, "/")
	return (pns == "*" || pns == ns) && (ppod == "*" || ppod == pod)
}

func (r reach) set(from, to string, v bool) reach {
	for _, fns := range e2eNamespaces {
		for _, fp := range e2ePods {
			for _, tns := range e2eNamespaces {
				for _, tp := range e2ePods {
					if matchPattern(from, fns, fp) && matchPattern(to, tns, tp) {
						r[[2]string{fns + "/" + fp, tns + "/" + tp}] = v
					}
				}
			}
		}
	}
	return r
}

// np builds a NetworkPolicy; mutate fills the spec.
func np(ns, name string, sel *metav1.LabelSelector, mutate func(*networkingv1.NetworkPolicySpec)) *networkingv1.NetworkPolicy {
	p := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if sel != nil {
		p.Spec.PodSelector = *sel
	}
	if mutate != nil {
		mutate(&p.Spec)
	}
	return p
}

func matchLabels(kv ...string) *metav1.LabelSelector {
	return &metav1.LabelSelector{MatchLabels: kvMap(kv...)}
}

func matchExpr(key string, op metav1.LabelSelectorOperator, values ...string) *metav1.LabelSelector {
	return &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: key, Operator: op, Values: values}}}
}

func npPortOf(proto corev1.Protocol, port any) networkingv1.NetworkPolicyPort {
	p := networkingv1.NetworkPolicyPort{Protocol: &proto}
	switch v := port.(type) {
	case int:
		x := intstr.FromInt32(int32(v))
		p.Port = &x
	case string:
		x := intstr.FromString(v)
		p.Port = &x
	}
	return p
}

func ipBlock(cidr string, except ...string) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: cidr, Except: except}}
}

func mustCompile(t testing.TB, in Input) *Compiler {
	t.Helper()
	c, err := Compile(in, Options{Node: *testNode})
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	for _, e := range c.Invalid() {
		t.Fatalf("unexpected invalid policy: %v", e)
	}
	return c
}

// checkReach compares the trace of every ordered pair of distinct e2e pods
// with want.
func checkReach(t *testing.T, c *Compiler, pp PortProto, want reach) {
	t.Helper()
	var bad []string
	for key, w := range want {
		if key[0] == key[1] {
			continue
		}
		fns, fp, _ := strings.Cut(key[0], "/")
		tns, tp, _ := strings.Cut(key[1], "/")
		tr, err := c.Trace(PodPeer(fns, fp), PodPeer(tns, tp), pp.Proto, pp.Port)
		if err != nil {
			t.Fatalf("Trace %s -> %s: %v", key[0], key[1], err)
		}
		if tr.Allowed != w {
			bad = append(bad, fmt.Sprintf("%s -> %s %s: got allowed=%v; want %v (egress %v, ingress %v)", key[0], key[1], pp, tr.Allowed, w, tr.Egress.Allowed, tr.Ingress.Allowed))
		}
	}
	if len(bad) > 0 {
		slices.Sort(bad)
		t.Errorf("%d wrong verdicts:\n%s", len(bad), strings.Join(bad, "\n"))
	}
}

var (
	tcp80  = PortProto{policytypes.ProtoTCP, 80}
	tcp81  = PortProto{policytypes.ProtoTCP, 81}
	udp80  = PortProto{policytypes.ProtoUDP, 80}
	udp81  = PortProto{policytypes.ProtoUDP, 81}
	sctp80 = PortProto{policytypes.ProtoSCTP, 80}
	sctp81 = PortProto{policytypes.ProtoSCTP, 81}
)

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }
