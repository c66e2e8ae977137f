package policy

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Scenarios of the upstream NetworkPolicy documentation and e2e suite
// (test/e2e/network/netpol/network_policy.go), on the e2e model. Every
// expectation is written by hand from the upstream semantics.
func TestNetworkPolicyE2EScenarios(t *testing.T) {
	tcp, udp, sctp := corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP
	ingress, egress := networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress
	podA := matchLabels("pod", "a")
	all := &metav1.LabelSelector{}
	from := func(peers ...networkingv1.NetworkPolicyPeer) func(*networkingv1.NetworkPolicySpec) {
		return func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = append(s.Ingress, networkingv1.NetworkPolicyIngressRule{From: peers})
		}
	}
	peer := func(nsSel, podSel *metav1.LabelSelector) networkingv1.NetworkPolicyPeer {
		return networkingv1.NetworkPolicyPeer{NamespaceSelector: nsSel, PodSelector: podSel}
	}
	type check struct {
		port PortProto
		want reach
	}
	tests := []struct {
		name     string
		policies []*networkingv1.NetworkPolicy
		checks   []check
	}{
		{
			name:     "no policy allows everything",
			policies: nil,
			checks:   []check{{tcp80, newReach(true)}, {udp81, newReach(true)}},
		},
		{
			name: "default-deny-ingress",
			policies: []*networkingv1.NetworkPolicy{np("x", "deny-ingress", all, func(s *networkingv1.NetworkPolicySpec) {
				s.PolicyTypes = []networkingv1.PolicyType{ingress}
			})},
			checks: []check{{tcp80, newReach(true).set("*/*", "x/*", false)}},
		},
		{
			name:     "default-deny-ingress with implicit policyTypes and no rules",
			policies: []*networkingv1.NetworkPolicy{np("x", "deny-ingress", all, nil)},
			checks:   []check{{tcp80, newReach(true).set("*/*", "x/*", false)}, {sctp81, newReach(true).set("*/*", "x/*", false)}},
		},
		{
			name: "default-deny-egress",
			policies: []*networkingv1.NetworkPolicy{np("x", "deny-egress", all, func(s *networkingv1.NetworkPolicySpec) {
				s.PolicyTypes = []networkingv1.PolicyType{egress}
			})},
			checks: []check{{tcp80, newReach(true).set("x/*", "*/*", false)}},
		},
		{
			name: "default-deny-all",
			policies: []*networkingv1.NetworkPolicy{np("x", "deny-all", all, func(s *networkingv1.NetworkPolicySpec) {
				s.PolicyTypes = []networkingv1.PolicyType{ingress, egress}
			})},
			checks: []check{{tcp80, newReach(true).set("*/*", "x/*", false).set("x/*", "*/*", false)}},
		},
		{
			name: "allow-all ingress with an empty rule",
			policies: []*networkingv1.NetworkPolicy{np("x", "allow-all", all, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{}}
			})},
			checks: []check{{tcp80, newReach(true)}},
		},
		{
			name: "allow-all egress with an empty rule",
			policies: []*networkingv1.NetworkPolicy{np("x", "allow-all", all, func(s *networkingv1.NetworkPolicySpec) {
				s.Egress = []networkingv1.NetworkPolicyEgressRule{{}}
				s.PolicyTypes = []networkingv1.PolicyType{egress}
			})},
			checks: []check{{udp81, newReach(true)}},
		},
		{
			name: "ingress: [] is deny all ingress",
			policies: []*networkingv1.NetworkPolicy{np("x", "empty-rules", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{}
			})},
			checks: []check{{tcp80, newReach(true).set("*/*", "x/a", false)}},
		},
		{
			name:     "allow from pods within server namespace based on PodSelector",
			policies: []*networkingv1.NetworkPolicy{np("x", "x-a-from-b", podA, from(peer(nil, matchLabels("pod", "b"))))},
			checks:   []check{{tcp80, newReach(true).set("*/*", "x/a", false).set("x/b", "x/a", true)}},
		},
		{
			name: "allow ingress traffic for a target on top of default deny",
			policies: []*networkingv1.NetworkPolicy{
				np("x", "deny", all, nil),
				np("x", "allow-a", podA, func(s *networkingv1.NetworkPolicySpec) { s.Ingress = []networkingv1.NetworkPolicyIngressRule{{}} }),
			},
			checks: []check{{tcp80, newReach(true).set("*/*", "x/*", false).set("*/*", "x/a", true)}},
		},
		{
			name:     "allow ingress from pods in all namespaces (namespaceSelector {})",
			policies: []*networkingv1.NetworkPolicy{np("x", "all-ns", podA, from(peer(all, nil)))},
			checks:   []check{{tcp80, newReach(true)}},
		},
		{
			name:     "allow only from a different namespace based on NamespaceSelector",
			policies: []*networkingv1.NetworkPolicy{np("x", "from-y", podA, from(peer(matchLabels("ns", "y"), nil)))},
			checks:   []check{{tcp80, newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true)}},
		},
		{
			name:     "NamespaceSelector with the default kubernetes.io/metadata.name label",
			policies: []*networkingv1.NetworkPolicy{np("x", "from-y", podA, from(peer(matchLabels("kubernetes.io/metadata.name", "y"), nil)))},
			checks:   []check{{tcp80, newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true)}},
		},
		{
			name:     "NamespaceSelector NotIn on the default label",
			policies: []*networkingv1.NetworkPolicy{np("x", "not-y", podA, from(peer(matchExpr("kubernetes.io/metadata.name", metav1.LabelSelectorOpNotIn, "y"), nil)))},
			checks:   []check{{tcp80, newReach(true).set("y/*", "x/a", false)}},
		},
		{
			name:     "PodSelector with MatchExpressions",
			policies: []*networkingv1.NetworkPolicy{np("x", "expr", podA, from(peer(nil, matchExpr("pod", metav1.LabelSelectorOpIn, "b"))))},
			checks:   []check{{tcp80, newReach(true).set("*/*", "x/a", false).set("x/b", "x/a", true)}},
		},
		{
			name:     "NamespaceSelector with MatchExpressions",
			policies: []*networkingv1.NetworkPolicy{np("x", "expr", podA, from(peer(matchExpr("ns", metav1.LabelSelectorOpIn, "y"), nil)))},
			checks:   []check{{tcp80, newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true)}},
		},
		{
			name: "PodSelector or NamespaceSelector (two peers are OR)",
			policies: []*networkingv1.NetworkPolicy{np("x", "or", podA, from(
				peer(matchExpr("ns", metav1.LabelSelectorOpNotIn, "x"), nil),
				peer(nil, matchLabels("pod", "b")),
			))},
			checks: []check{{tcp80, newReach(true).set("x/c", "x/a", false)}},
		},
		{
			name: "PodSelector and NamespaceSelector (one peer is AND)",
			policies: []*networkingv1.NetworkPolicy{np("x", "and", podA, from(
				peer(matchExpr("ns", metav1.LabelSelectorOpNotIn, "x"), matchLabels("pod", "b")),
			))},
			checks: []check{{tcp80, newReach(true).set("*/*", "x/a", false).set("y/b", "x/a", true).set("z/b", "x/a", true)}},
		},
		{
			name: "multiple PodSelectors and NamespaceSelectors",
			policies: []*networkingv1.NetworkPolicy{np("x", "multi", podA, from(
				peer(matchExpr("ns", metav1.LabelSelectorOpNotIn, "x"), matchExpr("pod", metav1.LabelSelectorOpIn, "b", "c")),
			))},
			checks: []check{{tcp80, newReach(true).set("*/*", "x/a", false).set("y/b", "x/a", true).set("y/c", "x/a", true).set("z/b", "x/a", true).set("z/c", "x/a", true)}},
		},
		{
			name: "any of several PodSelectors",
			policies: []*networkingv1.NetworkPolicy{np("x", "any", podA, from(
				peer(nil, matchLabels("pod", "b")), peer(nil, matchLabels("pod", "c")),
			))},
			checks: []check{{tcp80, newReach(true).set("*/*", "x/a", false).set("x/b", "x/a", true).set("x/c", "x/a", true)}},
		},
		{
			name:     "only from a pod in a different namespace (PodSelector and NamespaceSelector)",
			policies: []*networkingv1.NetworkPolicy{np("x", "ya", podA, from(peer(matchLabels("ns", "y"), matchLabels("pod", "a"))))},
			checks:   []check{{tcp80, newReach(true).set("*/*", "x/a", false).set("y/a", "x/a", true)}},
		},
		{
			name:     "empty podSelector in a peer is the policy's namespace only",
			policies: []*networkingv1.NetworkPolicy{np("x", "same-ns", all, from(peer(nil, all)))},
			checks:   []check{{tcp80, newReach(true).set("*/*", "x/*", false).set("x/*", "x/*", true)}},
		},
		{
			name:     "namespaceSelector {} and podSelector {} in one peer is every pod",
			policies: []*networkingv1.NetworkPolicy{np("x", "every-pod", all, from(peer(all, all)))},
			checks:   []check{{tcp80, newReach(true)}},
		},
		{
			name: "ports: only 81 from namespace y",
			policies: []*networkingv1.NetworkPolicy{np("x", "port81", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{peer(matchLabels("ns", "y"), nil)},
					Ports: []networkingv1.NetworkPolicyPort{npPortOf(tcp, 81)},
				}}
			})},
			checks: []check{
				{tcp80, newReach(true).set("*/*", "x/a", false)},
				{tcp81, newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true)},
				{udp81, newReach(true).set("*/*", "x/a", false)},
			},
		},
		{
			name: "stacked policies with overlapping podSelectors are a union",
			policies: []*networkingv1.NetworkPolicy{
				np("x", "p80", podA, func(s *networkingv1.NetworkPolicySpec) {
					s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{peer(matchLabels("ns", "y"), nil)}, Ports: []networkingv1.NetworkPolicyPort{npPortOf(tcp, 80)}}}
				}),
				np("x", "p81", podA, func(s *networkingv1.NetworkPolicySpec) {
					s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{peer(matchLabels("ns", "y"), nil)}, Ports: []networkingv1.NetworkPolicyPort{npPortOf(tcp, 81)}}}
				}),
			},
			checks: []check{
				{tcp80, newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true)},
				{tcp81, newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true)},
			},
		},
		{
			name: "ingress on one named port",
			policies: []*networkingv1.NetworkPolicy{np("x", "named", all, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{npPortOf(tcp, "serve-81-tcp")}}}
			})},
			checks: []check{
				{tcp81, newReach(true)},
				{tcp80, newReach(true).set("*/*", "x/*", false)},
				{udp81, newReach(true).set("*/*", "x/*", false)},
			},
		},
		{
			name: "ingress from namespace on one named port",
			policies: []*networkingv1.NetworkPolicy{np("x", "named-ns", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{peer(matchLabels("ns", "y"), nil)},
					Ports: []networkingv1.NetworkPolicyPort{npPortOf(tcp, "serve-80-tcp")},
				}}
			})},
			checks: []check{
				{tcp80, newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true)},
				{tcp81, newReach(true).set("*/*", "x/a", false)},
			},
		},
		{
			name: "named port with the wrong protocol matches nothing",
			policies: []*networkingv1.NetworkPolicy{np("x", "named-udp", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{npPortOf(udp, "serve-80-tcp")}}}
			})},
			checks: []check{
				{tcp80, newReach(true).set("*/*", "x/a", false)},
				{udp80, newReach(true).set("*/*", "x/a", false)},
			},
		},
		{
			name: "egress on one named port",
			policies: []*networkingv1.NetworkPolicy{np("x", "egress-named", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Egress = []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{npPortOf(udp, "serve-81-udp")}}}
				s.PolicyTypes = []networkingv1.PolicyType{egress}
			})},
			checks: []check{
				{udp81, newReach(true)},
				{udp80, newReach(true).set("x/a", "*/*", false)},
				{tcp81, newReach(true).set("x/a", "*/*", false)},
			},
		},
		{
			name:     "deny ingress from pods in other namespaces",
			policies: []*networkingv1.NetworkPolicy{np("x", "same-ns", all, from(peer(nil, all)))},
			checks:   []check{{udp80, newReach(true).set("y/*", "x/*", false).set("z/*", "x/*", false)}},
		},
		{
			name: "deny egress from pods based on PodSelector",
			policies: []*networkingv1.NetworkPolicy{np("x", "deny-egress-a", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.PolicyTypes = []networkingv1.PolicyType{egress}
			})},
			checks: []check{{tcp80, newReach(true).set("x/a", "*/*", false)}},
		},
		{
			name: "ingress and egress together",
			policies: []*networkingv1.NetworkPolicy{np("x", "both", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{peer(nil, matchLabels("pod", "b"))}}}
				s.Egress = []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{peer(nil, matchLabels("pod", "b"))}}}
			})},
			checks: []check{{tcp80, newReach(true).set("*/*", "x/a", false).set("x/a", "*/*", false).set("x/b", "x/a", true).set("x/a", "x/b", true)}},
		},
		{
			name: "policyTypes Egress ignores ingress rules",
			policies: []*networkingv1.NetworkPolicy{np("x", "egress-only", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{peer(nil, matchLabels("pod", "b"))}}}
				s.Egress = []networkingv1.NetworkPolicyEgressRule{{}}
				s.PolicyTypes = []networkingv1.PolicyType{egress}
			})},
			checks: []check{{tcp80, newReach(true)}},
		},
		{
			name: "client side egress deny wins over a server allowing it",
			policies: []*networkingv1.NetworkPolicy{
				np("x", "a-egress-ya", podA, func(s *networkingv1.NetworkPolicySpec) {
					s.Egress = []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{peer(matchLabels("ns", "y"), matchLabels("pod", "a"))}}}
					s.PolicyTypes = []networkingv1.PolicyType{egress}
				}),
				np("y", "b-from-xa", matchLabels("pod", "b"), from(peer(matchLabels("ns", "x"), matchLabels("pod", "a")))),
			},
			checks: []check{{tcp80, newReach(true).set("x/a", "*/*", false).set("x/a", "y/a", true).set("*/*", "y/b", false)}},
		},
		{
			name: "egress to a server in a different namespace by PodSelector and NamespaceSelector on 80",
			policies: []*networkingv1.NetworkPolicy{np("x", "egress-ya80", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.PolicyTypes = []networkingv1.PolicyType{egress}
				s.Egress = []networkingv1.NetworkPolicyEgressRule{{
					To:    []networkingv1.NetworkPolicyPeer{peer(matchLabels("ns", "y"), matchLabels("pod", "a"))},
					Ports: []networkingv1.NetworkPolicyPort{npPortOf(tcp, 80)},
				}}
			})},
			checks: []check{
				{tcp80, newReach(true).set("x/a", "*/*", false).set("x/a", "y/a", true)},
				{tcp81, newReach(true).set("x/a", "*/*", false)},
			},
		},
		{
			name: "egress rules without policyTypes also isolate ingress (Ingress is always implied)",
			policies: []*networkingv1.NetworkPolicy{np("x", "implicit", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Egress = []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{peer(matchLabels("ns", "y"), nil)}}}
			})},
			checks: []check{{tcp80, newReach(true).set("*/*", "x/a", false).set("x/a", "*/*", false).set("x/a", "y/*", true)}},
		},
		{
			name: "any port on a specific protocol",
			policies: []*networkingv1.NetworkPolicy{np("x", "tcp-any", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp}}}}
			})},
			checks: []check{
				{tcp80, newReach(true)},
				{tcp81, newReach(true)},
				{udp80, newReach(true).set("*/*", "x/a", false)},
				{sctp81, newReach(true).set("*/*", "x/a", false)},
			},
		},
		{
			name: "ports without protocol default to TCP",
			policies: []*networkingv1.NetworkPolicy{np("x", "default-proto", podA, func(s *networkingv1.NetworkPolicySpec) {
				p := npPortOf(tcp, 80)
				p.Protocol = nil
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{p}}}
			})},
			checks: []check{
				{tcp80, newReach(true)},
				{udp80, newReach(true).set("*/*", "x/a", false)},
				{sctp80, newReach(true).set("*/*", "x/a", false)},
			},
		},
		{
			name: "an allow-all ingress policy takes precedence over a narrower one",
			policies: []*networkingv1.NetworkPolicy{
				np("x", "p80", podA, func(s *networkingv1.NetworkPolicySpec) {
					s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{npPortOf(tcp, 80)}}}
				}),
				np("x", "all", podA, func(s *networkingv1.NetworkPolicySpec) { s.Ingress = []networkingv1.NetworkPolicyIngressRule{{}} }),
			},
			checks: []check{{tcp81, newReach(true)}, {udp80, newReach(true)}},
		},
		{
			name: "an allow-all egress policy takes precedence over a narrower one",
			policies: []*networkingv1.NetworkPolicy{
				np("x", "p80", podA, func(s *networkingv1.NetworkPolicySpec) {
					s.PolicyTypes = []networkingv1.PolicyType{egress}
					s.Egress = []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{npPortOf(tcp, 80)}}}
				}),
				np("x", "all", podA, func(s *networkingv1.NetworkPolicySpec) {
					s.Egress = []networkingv1.NetworkPolicyEgressRule{{}}
					s.PolicyTypes = []networkingv1.PolicyType{egress}
				}),
			},
			checks: []check{{tcp81, newReach(true)}, {udp80, newReach(true)}},
		},
		{
			name: "egress to a server in a CIDR block",
			policies: []*networkingv1.NetworkPolicy{np("x", "cidr", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.PolicyTypes = []networkingv1.PolicyType{egress}
				s.Egress = []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{ipBlock(e2eIP("y", "b") + "/32")}}}
			})},
			checks: []check{{tcp80, newReach(true).set("x/a", "*/*", false).set("x/a", "y/b", true)}},
		},
		{
			name: "egress CIDR with an except clause",
			policies: []*networkingv1.NetworkPolicy{np("x", "cidr-except", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.PolicyTypes = []networkingv1.PolicyType{egress}
				s.Egress = []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{ipBlock("10.1.0.0/16", e2eIP("y", "b")+"/32")}}}
			})},
			checks: []check{{tcp80, newReach(true).set("x/a", "y/b", false)}},
		},
		{
			name: "an IP in both an except and another policy's CIDR is allowed",
			policies: []*networkingv1.NetworkPolicy{
				np("x", "cidr-except", podA, func(s *networkingv1.NetworkPolicySpec) {
					s.PolicyTypes = []networkingv1.PolicyType{egress}
					s.Egress = []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{ipBlock("10.1.0.0/16", e2eIP("y", "b")+"/32")}}}
				}),
				np("x", "cidr-yb", podA, func(s *networkingv1.NetworkPolicySpec) {
					s.PolicyTypes = []networkingv1.PolicyType{egress}
					s.Egress = []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{ipBlock(e2eIP("y", "b") + "/32")}}}
				}),
			},
			checks: []check{{tcp80, newReach(true)}},
		},
		{
			name:     "ingress ipBlock with except on a wider block",
			policies: []*networkingv1.NetworkPolicy{np("x", "cidr-in", podA, from(ipBlock("10.1.1.0/24", "10.1.1.2/31")))},
			// 10.1.1.2/31 holds y/b (.2) and y/c (.3).
			checks: []check{{tcp80, newReach(true).set("*/*", "x/a", false).set("y/a", "x/a", true)}},
		},
		{
			name: "ingress and egress controlled independently",
			policies: []*networkingv1.NetworkPolicy{
				np("x", "a-no-egress", podA, func(s *networkingv1.NetworkPolicySpec) { s.PolicyTypes = []networkingv1.PolicyType{egress} }),
				np("x", "b-no-ingress", matchLabels("pod", "b"), func(s *networkingv1.NetworkPolicySpec) { s.PolicyTypes = []networkingv1.PolicyType{ingress} }),
			},
			checks: []check{{tcp80, newReach(true).set("x/a", "*/*", false).set("*/*", "x/b", false)}},
		},
		{
			name: "SCTP is not TCP",
			policies: []*networkingv1.NetworkPolicy{np("x", "sctp", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{npPortOf(sctp, 80)}}}
			})},
			checks: []check{
				{sctp80, newReach(true)},
				{tcp80, newReach(true).set("*/*", "x/a", false)},
				{sctp81, newReach(true).set("*/*", "x/a", false)},
			},
		},
		{
			name: "UDP only does not allow TCP",
			policies: []*networkingv1.NetworkPolicy{np("x", "udp", podA, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{npPortOf(udp, 81)}}}
			})},
			checks: []check{
				{udp81, newReach(true)},
				{tcp81, newReach(true).set("*/*", "x/a", false)},
			},
		},
		{
			name: "endPort range",
			policies: []*networkingv1.NetworkPolicy{np("x", "range", podA, func(s *networkingv1.NetworkPolicySpec) {
				p := npPortOf(tcp, 80)
				end := int32(81)
				p.EndPort = &end
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{peer(matchLabels("ns", "y"), nil)}, Ports: []networkingv1.NetworkPolicyPort{p}}}
			})},
			checks: []check{
				{tcp80, newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true)},
				{tcp81, newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true)},
				{udp81, newReach(true).set("*/*", "x/a", false)},
			},
		},
		{
			name: "endPort range and a single port from different peers",
			policies: []*networkingv1.NetworkPolicy{np("x", "multi-port", podA, func(s *networkingv1.NetworkPolicySpec) {
				p := npPortOf(tcp, 79)
				end := int32(80)
				p.EndPort = &end
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{
					{From: []networkingv1.NetworkPolicyPeer{peer(matchLabels("ns", "y"), nil)}, Ports: []networkingv1.NetworkPolicyPort{p}},
					{From: []networkingv1.NetworkPolicyPeer{peer(matchLabels("ns", "z"), nil)}, Ports: []networkingv1.NetworkPolicyPort{npPortOf(tcp, 81)}},
				}
			})},
			checks: []check{
				{tcp80, newReach(true).set("*/*", "x/a", false).set("y/*", "x/a", true)},
				{tcp81, newReach(true).set("*/*", "x/a", false).set("z/*", "x/a", true)},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := e2eInput()
			in.NetworkPolicies = tt.policies
			c := mustCompile(t, in)
			for _, ch := range tt.checks {
				checkReach(t, c, ch.port, ch.want)
			}
		})
	}
}
