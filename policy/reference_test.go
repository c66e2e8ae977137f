package policy

import (
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/policy/policytypes"
)

// refEval is a deliberately naive evaluator written straight from the
// upstream NetworkPolicy semantics and the MeshPolicy type comments: it
// walks every policy for every flow, matching peers by IP and labels. It
// shares no code with the compiler, so agreement between the two on random
// inputs checks identities, selector caching, CIDR regions, LPM merging and
// the datapath simulation at once.
type refEval struct {
	in    Input
	nsLbl map[string]labels.Set
}

func newRefEval(in Input) *refEval {
	r := &refEval{in: in, nsLbl: map[string]labels.Set{}}
	for _, ns := range in.Namespaces {
		ls := labels.Set{}
		for k, v := range ns.Labels {
			ls[k] = v
		}
		ls["kubernetes.io/metadata.name"] = ns.Name
		r.nsLbl[ns.Name] = ls
	}
	return r
}

func (r *refEval) nsLabels(ns string) labels.Set {
	if ls, ok := r.nsLbl[ns]; ok {
		return ls
	}
	return labels.Set{"kubernetes.io/metadata.name": ns}
}

// refPeer is one end of a flow: a pod (with its IP) or a bare IP.
type refPeer struct {
	pod *corev1.Pod
	ip  netip.Addr
}

func (r *refEval) nodeOf(ip netip.Addr) (string, bool) {
	for _, n := range r.in.Nodes {
		for _, a := range n.Status.Addresses {
			if a.Address == ip.String() {
				return n.Name, true
			}
		}
	}
	return "", false
}

func selMatches(ls *metav1.LabelSelector, set labels.Set) bool {
	sel, err := metav1.LabelSelectorAsSelector(ls)
	if err != nil {
		panic(err) // the generator produces only valid selectors
	}
	return sel.Matches(set)
}

func inBlock(ip netip.Addr, cidr string, except []string) bool {
	p, err := netip.ParsePrefix(cidr)
	if err != nil || !p.Contains(ip) {
		return false
	}
	for _, e := range except {
		if ep, err := netip.ParsePrefix(e); err == nil && ep.Contains(ip) {
			return false
		}
	}
	return true
}

func protoOf(p *corev1.Protocol) uint8 {
	if p == nil {
		return policytypes.ProtoTCP
	}
	switch *p {
	case corev1.ProtocolUDP:
		return policytypes.ProtoUDP
	case corev1.ProtocolSCTP:
		return policytypes.ProtoSCTP
	}
	return policytypes.ProtoTCP
}

// namedPortIs reports whether pod has a container port named name on proto
// with number port.
func namedPortIs(pod *corev1.Pod, name string, proto uint8, port uint16) bool {
	if pod == nil {
		return false
	}
	for _, c := range pod.Spec.Containers {
		for _, cp := range c.Ports {
			cpProto := cp.Protocol
			if cp.Name == name && protoOf(&cpProto) == proto && cp.ContainerPort == int32(port) {
				return true
			}
		}
	}
	return false
}

func portMatches(port *intstr.IntOrString, endPort *int32, ruleProto, proto uint8, dport uint16, dest *corev1.Pod) bool {
	if ruleProto != proto {
		return false
	}
	if port == nil {
		return true
	}
	if port.Type == intstr.String {
		return namedPortIs(dest, port.StrVal, proto, dport)
	}
	hi := port.IntVal
	if endPort != nil {
		hi = *endPort
	}
	return int32(dport) >= port.IntVal && int32(dport) <= hi
}

// verdicts accumulates one direction's decision.
type verdicts struct {
	isoEnf, isoAud, allowEnf, allowAud, denyEnf, denyAud bool
}

func (v verdicts) result() (enforce, audit bool) {
	return !v.denyEnf && (v.allowEnf || !v.isoEnf), !v.denyAud && (v.allowAud || !v.isoAud)
}

// side decides one endpoint's direction for a flow with peer.
func (r *refEval) side(ep *corev1.Pod, dir policytypes.Direction, peer refPeer, proto uint8, port uint16) (bool, bool) {
	var v verdicts
	dest := ep
	if dir == policytypes.Egress {
		dest = peer.pod
	}
	epNS := r.nsLabels(ep.Namespace)
	for _, np := range r.in.NetworkPolicies {
		if np.Namespace != ep.Namespace || !selMatches(&np.Spec.PodSelector, ep.Labels) {
			continue
		}
		ingress, egress := len(np.Spec.PolicyTypes) == 0, len(np.Spec.PolicyTypes) == 0 && len(np.Spec.Egress) > 0
		for _, t := range np.Spec.PolicyTypes {
			ingress = ingress || t == networkingv1.PolicyTypeIngress
			egress = egress || t == networkingv1.PolicyTypeEgress
		}
		type rule struct {
			peers []networkingv1.NetworkPolicyPeer
			ports []networkingv1.NetworkPolicyPort
		}
		var rules []rule
		if dir == policytypes.Ingress && ingress {
			v.isoEnf, v.isoAud = true, true
			for _, ru := range np.Spec.Ingress {
				rules = append(rules, rule{ru.From, ru.Ports})
			}
		}
		if dir == policytypes.Egress && egress {
			v.isoEnf, v.isoAud = true, true
			for _, ru := range np.Spec.Egress {
				rules = append(rules, rule{ru.To, ru.Ports})
			}
		}
		for _, ru := range rules {
			peerOK := len(ru.peers) == 0
			for _, p := range ru.peers {
				switch {
				case p.IPBlock != nil:
					peerOK = peerOK || inBlock(peer.ip, p.IPBlock.CIDR, p.IPBlock.Except)
				case peer.pod == nil:
				case p.NamespaceSelector == nil:
					peerOK = peerOK || (peer.pod.Namespace == np.Namespace && selMatches(p.PodSelector, peer.pod.Labels))
				default:
					peerOK = peerOK || (selMatches(p.NamespaceSelector, r.nsLabels(peer.pod.Namespace)) &&
						(p.PodSelector == nil || selMatches(p.PodSelector, peer.pod.Labels)))
				}
			}
			portOK := len(ru.ports) == 0
			for _, pt := range ru.ports {
				portOK = portOK || portMatches(pt.Port, pt.EndPort, protoOf(pt.Protocol), proto, port, dest)
			}
			if peerOK && portOK {
				v.allowEnf, v.allowAud = true, true
			}
		}
	}
	mesh := func(rules *v1alpha1.PolicyRules, policyNS string) {
		audit := rules.Mode == v1alpha1.ModeAudit
		var allow, deny [][2]any
		dd := false
		if dir == policytypes.Ingress {
			dd = rules.Ingress != nil
			if rules.DefaultDeny != nil && rules.DefaultDeny.Ingress != nil {
				dd = *rules.DefaultDeny.Ingress
			}
			for _, ru := range rules.Ingress {
				allow = append(allow, [2]any{ru.From, ru.Ports})
			}
			for _, ru := range rules.IngressDeny {
				deny = append(deny, [2]any{ru.From, ru.Ports})
			}
		} else {
			dd = rules.Egress != nil
			if rules.DefaultDeny != nil && rules.DefaultDeny.Egress != nil {
				dd = *rules.DefaultDeny.Egress
			}
			for _, ru := range rules.Egress {
				allow = append(allow, [2]any{ru.To, ru.Ports})
			}
			for _, ru := range rules.EgressDeny {
				deny = append(deny, [2]any{ru.To, ru.Ports})
			}
		}
		matches := func(ru [2]any) bool {
			peers, ports := ru[0].([]v1alpha1.Peer), ru[1].([]v1alpha1.PortRule)
			peerOK := len(peers) == 0
			for _, p := range peers {
				peerOK = peerOK || r.meshPeer(p, policyNS, ep, peer)
			}
			portOK := len(ports) == 0
			for _, pt := range ports {
				if pt.Protocol == v1alpha1.ProtocolICMP {
					portOK = portOK || (proto == policytypes.ProtoICMP && (pt.ICMPType == nil || int32(port>>8) == *pt.ICMPType) &&
						(pt.ICMPCode == nil || int32(port&0xff) == *pt.ICMPCode)) || (proto == policytypes.ProtoICMPv6 && pt.ICMPType == nil)
					continue
				}
				rp := policytypes.ProtoTCP
				switch pt.Protocol {
				case v1alpha1.ProtocolUDP:
					rp = policytypes.ProtoUDP
				case v1alpha1.ProtocolSCTP:
					rp = policytypes.ProtoSCTP
				}
				portOK = portOK || portMatches(pt.Port, pt.EndPort, rp, proto, port, dest)
			}
			return peerOK && portOK
		}
		if dd {
			v.isoAud = true
			v.isoEnf = v.isoEnf || !audit
		}
		for _, ru := range allow {
			if matches(ru) {
				v.allowAud = true
				v.allowEnf = v.allowEnf || !audit
			}
		}
		for _, ru := range deny {
			if matches(ru) {
				v.denyAud = true
				v.denyEnf = v.denyEnf || !audit
			}
		}
	}
	if node, isNode := r.nodeOf(peer.ip); dir == policytypes.Ingress && peer.pod == nil && isNode && node == ep.Spec.NodeName {
		// The pod's own node may always reach it, unless a rule denies it.
		v.allowEnf, v.allowAud = true, true
	}
	for _, m := range r.in.MeshPolicies {
		if m.Namespace == ep.Namespace && selMatches(&m.Spec.PodSelector, ep.Labels) {
			mesh(&m.Spec.PolicyRules, m.Namespace)
		}
	}
	for _, m := range r.in.ClusterMeshPolicies {
		if (m.Spec.NamespaceSelector == nil || selMatches(m.Spec.NamespaceSelector, epNS)) && selMatches(&m.Spec.PodSelector, ep.Labels) {
			mesh(&m.Spec.PolicyRules, "")
		}
	}
	return v.result()
}

func (r *refEval) meshPeer(p v1alpha1.Peer, policyNS string, ep *corev1.Pod, peer refPeer) bool {
	switch {
	case p.Entity != nil:
		node, isNode := r.nodeOf(peer.ip)
		switch *p.Entity {
		case v1alpha1.EntityAll:
			return true
		case v1alpha1.EntityCluster:
			return peer.pod != nil || isNode
		case v1alpha1.EntityWorld:
			return peer.pod == nil && !isNode
		case v1alpha1.EntityHost:
			return peer.pod == nil && isNode && node == ep.Spec.NodeName
		case v1alpha1.EntityRemoteNode:
			return peer.pod == nil && isNode && node != ep.Spec.NodeName
		}
		return false
	case p.CIDR != nil:
		return inBlock(peer.ip, p.CIDR.CIDR, p.CIDR.Except)
	case peer.pod == nil:
		return false
	case p.NamespaceSelector == nil:
		return (policyNS == "" || peer.pod.Namespace == policyNS) && selMatches(p.PodSelector, peer.pod.Labels)
	default:
		return selMatches(p.NamespaceSelector, r.nsLabels(peer.pod.Namespace)) && (p.PodSelector == nil || selMatches(p.PodSelector, peer.pod.Labels))
	}
}

// decide returns the enforce and audit verdicts, and each side's enforce
// verdict, of a flow.
func (r *refEval) decide(src, dst refPeer, proto uint8, port uint16) (allowed, audit, egress, ingress bool) {
	egress, egressAudit := true, true
	ingress, ingressAudit := true, true
	if src.pod != nil {
		egress, egressAudit = r.side(src.pod, policytypes.Egress, dst, proto, port)
	}
	if dst.pod != nil {
		ingress, ingressAudit = r.side(dst.pod, policytypes.Ingress, src, proto, port)
	}
	return egress && ingress, egressAudit && ingressAudit, egress, ingress
}
