package policy

import (
	"fmt"
	"net/netip"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// parsedPolicy is a validated policy in the compiler's terms. Selectors are
// described by selSpec here and bound to shared selectors when the policy
// is installed.
type parsedPolicy struct {
	ref   PolicyRef
	audit bool
	// namespace is the policy's namespace ("" for ClusterMeshPolicy).
	namespace string
	// subjectNS (ClusterMeshPolicy only; nil = every namespace) and
	// subjectPod select the pods the policy applies to.
	subjectNS  labels.Selector
	subjectPod labels.Selector
	// defaultDeny per direction (indexed by Direction).
	defaultDeny [2]bool
	rules       []parsedRule
}

// parsedRule is one (peer, port) pair of one rule: the unit a RuleID names.
// A rule with P peers and Q ports becomes P×Q consecutive parsedRules.
type parsedRule struct {
	section string
	dir     policytypes.Direction
	verdict policytypes.Verdict
	peer    peerSpec
	port    portSpec
	// peerText and portText describe the rule in words.
	peerText, portText string
	// nPeers and nPorts size the peers × ports block this pair belongs to;
	// the block is laid out peer-major.
	nPeers, nPorts int
}

type peerSpec struct {
	// any matches every peer (identity.Any).
	any bool
	// static lists reserved identities (entities).
	static []identity.ID
	// sel, when set, is bound to a shared selector.
	sel *selSpec
}

type selSpec struct {
	kind      selKind
	namespace string
	nsSel     labels.Selector
	podSel    labels.Selector
	cidr      netip.Prefix
	except    []netip.Prefix
}

func (s *selSpec) key() string {
	switch s.kind {
	case selAllPods:
		return allPodsKey
	case selCIDR:
		return cidrSelectorKey(s.cidr, s.except)
	}
	return labelSelectorKey(s.namespace, s.nsSel, s.podSel)
}

type portSpec struct {
	// any matches every protocol and port.
	any   bool
	proto uint8
	// lo..hi is a numeric range (0..65535 = every port of proto). For ICMP
	// it is already type<<8|code and plen says how much of it counts.
	lo, hi uint16
	// icmpLen is the prefix length of an ICMP match (0, 8 or 16).
	icmp    bool
	icmpLen uint8
	// name is a named port, resolved against the destination pod.
	name string
}

func fieldErr(ref PolicyRef, field string, format string, args ...any) *PolicyError {
	return &PolicyError{Policy: ref, Field: field, Err: fmt.Errorf(format, args...)}
}

// selectorFrom converts a LabelSelector; nil stays nil.
func selectorFrom(ref PolicyRef, field string, ls *metav1.LabelSelector) (labels.Selector, *PolicyError) {
	if ls == nil {
		return nil, nil
	}
	sel, err := metav1.LabelSelectorAsSelector(ls)
	if err != nil {
		return nil, &PolicyError{Policy: ref, Field: field, Err: fmt.Errorf("invalid label selector: %w", err)}
	}
	return sel, nil
}

func selectorText(ls *metav1.LabelSelector) string {
	sel, err := metav1.LabelSelectorAsSelector(ls)
	if err != nil {
		return "invalid"
	}
	if sel.Empty() {
		return "{}"
	}
	return sel.String()
}

// parseNetworkPolicy validates np and translates it. Upstream semantics:
// policyTypes default to Ingress, plus Egress when egress rules exist; rules
// of a direction not in policyTypes are ignored.
func parseNetworkPolicy(np *networkingv1.NetworkPolicy) (*parsedPolicy, *PolicyError) {
	ref := PolicyRef{Kind: KindNetworkPolicy, Namespace: np.Namespace, Name: np.Name}
	p := &parsedPolicy{ref: ref, namespace: np.Namespace}
	sel, perr := selectorFrom(ref, "spec.podSelector", &np.Spec.PodSelector)
	if perr != nil {
		return nil, perr
	}
	p.subjectPod = sel
	ingress, egress := false, false
	if len(np.Spec.PolicyTypes) == 0 {
		ingress, egress = true, len(np.Spec.Egress) > 0
	}
	for i, t := range np.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			ingress = true
		case networkingv1.PolicyTypeEgress:
			egress = true
		default:
			return nil, fieldErr(ref, fmt.Sprintf("spec.policyTypes[%d]", i), "unsupported value %q: want Ingress or Egress", t)
		}
	}
	p.defaultDeny = [2]bool{policytypes.Ingress: ingress, policytypes.Egress: egress}
	if ingress {
		for i, r := range np.Spec.Ingress {
			if err := p.addNPRule(policytypes.Ingress, fmt.Sprintf("ingress[%d]", i), "from", r.From, r.Ports); err != nil {
				return nil, err
			}
		}
	}
	if egress {
		for i, r := range np.Spec.Egress {
			if err := p.addNPRule(policytypes.Egress, fmt.Sprintf("egress[%d]", i), "to", r.To, r.Ports); err != nil {
				return nil, err
			}
		}
	}
	return p, nil
}

func (p *parsedPolicy) addNPRule(dir policytypes.Direction, section, peerField string, peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort) *PolicyError {
	var pspecs []peerSpec
	var ptexts, psections []string
	for j, peer := range peers {
		field := fmt.Sprintf("%s.%s[%d]", section, peerField, j)
		ps, text, err := p.npPeer("spec."+field, peer)
		if err != nil {
			return err
		}
		pspecs, ptexts, psections = append(pspecs, ps), append(ptexts, text), append(psections, fmt.Sprintf(".%s[%d]", peerField, j))
	}
	if len(peers) == 0 {
		pspecs, ptexts, psections = []peerSpec{{any: true}}, []string{"any peer"}, []string{""}
	}
	var ospecs []portSpec
	var otexts, osections []string
	for k, port := range ports {
		field := fmt.Sprintf("spec.%s.ports[%d]", section, k)
		ps, text, err := npPort(p.ref, field, port)
		if err != nil {
			return err
		}
		ospecs, otexts, osections = append(ospecs, ps), append(otexts, text), append(osections, fmt.Sprintf(".ports[%d]", k))
	}
	if len(ports) == 0 {
		ospecs, otexts, osections = []portSpec{{any: true}}, []string{"any port"}, []string{""}
	}
	p.cross(dir, policytypes.Allow, section, pspecs, ptexts, psections, ospecs, otexts, osections)
	return nil
}

func (p *parsedPolicy) cross(dir policytypes.Direction, v policytypes.Verdict, section string, pspecs []peerSpec, ptexts, psections []string, ospecs []portSpec, otexts, osections []string) {
	for j := range pspecs {
		for k := range ospecs {
			p.rules = append(p.rules, parsedRule{
				section: section + psections[j] + osections[k],
				dir:     dir, verdict: v,
				peer: pspecs[j], port: ospecs[k],
				peerText: ptexts[j], portText: otexts[k],
				nPeers: len(pspecs), nPorts: len(ospecs),
			})
		}
	}
}

func (p *parsedPolicy) npPeer(field string, peer networkingv1.NetworkPolicyPeer) (peerSpec, string, *PolicyError) {
	if peer.IPBlock != nil {
		if peer.PodSelector != nil || peer.NamespaceSelector != nil {
			return peerSpec{}, "", fieldErr(p.ref, field, "ipBlock cannot be combined with podSelector or namespaceSelector")
		}
		spec, text, err := parseCIDR(p.ref, field+".ipBlock", peer.IPBlock.CIDR, peer.IPBlock.Except, true)
		if err != nil {
			return peerSpec{}, "", err
		}
		return peerSpec{sel: spec}, "ipBlock " + text, nil
	}
	if peer.PodSelector == nil && peer.NamespaceSelector == nil {
		return peerSpec{}, "", fieldErr(p.ref, field, "must specify a podSelector, namespaceSelector or ipBlock")
	}
	return p.labelPeer(field, peer.PodSelector, peer.NamespaceSelector, p.namespace)
}

// labelPeer builds a pod/namespace selector peer. A podSelector alone picks
// pods of ownNS ("" = every namespace); a namespaceSelector alone picks every
// pod of the matching namespaces; both pick the intersection.
func (p *parsedPolicy) labelPeer(field string, pod, ns *metav1.LabelSelector, ownNS string) (peerSpec, string, *PolicyError) {
	podSel, err := selectorFrom(p.ref, field+".podSelector", pod)
	if err != nil {
		return peerSpec{}, "", err
	}
	nsSel, err := selectorFrom(p.ref, field+".namespaceSelector", ns)
	if err != nil {
		return peerSpec{}, "", err
	}
	spec := &selSpec{kind: selLabels, podSel: podSel, nsSel: nsSel}
	var text string
	switch {
	case ns == nil:
		spec.namespace = ownNS
		text = "podSelector " + selectorText(pod)
		if ownNS != "" {
			text += " in namespace " + ownNS
		}
	case pod == nil:
		spec.podSel = labels.Everything()
		text = "namespaceSelector " + selectorText(ns)
	default:
		text = "namespaceSelector " + selectorText(ns) + " and podSelector " + selectorText(pod)
	}
	return peerSpec{sel: spec}, text, nil
}

// parseCIDR validates a CIDR peer. strict demands that every except be a
// strict subset of cidr (NetworkPolicy validation); otherwise inside it is
// enough (MeshPolicy CEL rule).
func parseCIDR(ref PolicyRef, field, cidr string, except []string, strict bool) (*selSpec, string, *PolicyError) {
	pfx, err := netip.ParsePrefix(cidr)
	if err != nil {
		return nil, "", &PolicyError{Policy: ref, Field: field + ".cidr", Err: fmt.Errorf("parse CIDR: %w", err)}
	}
	pfx = pfx.Masked()
	spec := &selSpec{kind: selCIDR, cidr: pfx}
	text := pfx.String()
	for i, e := range except {
		ep, err := netip.ParsePrefix(e)
		if err != nil {
			return nil, "", &PolicyError{Policy: ref, Field: fmt.Sprintf("%s.except[%d]", field, i), Err: fmt.Errorf("parse CIDR: %w", err)}
		}
		ep = ep.Masked()
		if !prefixContains(pfx, ep) || (strict && ep.Bits() == pfx.Bits()) {
			return nil, "", fieldErr(ref, fmt.Sprintf("%s.except[%d]", field, i), "%s must be a strict subset of cidr %s", ep, pfx)
		}
		spec.except = append(spec.except, ep)
	}
	if len(spec.except) > 0 {
		text += fmt.Sprintf(" except %v", spec.except)
	}
	return spec, text, nil
}

func npPort(ref PolicyRef, field string, port networkingv1.NetworkPolicyPort) (portSpec, string, *PolicyError) {
	proto := policytypes.ProtoTCP
	if port.Protocol != nil {
		switch *port.Protocol {
		case corev1.ProtocolTCP:
		case corev1.ProtocolUDP:
			proto = policytypes.ProtoUDP
		case corev1.ProtocolSCTP:
			proto = policytypes.ProtoSCTP
		default:
			return portSpec{}, "", fieldErr(ref, field+".protocol", "unsupported protocol %q: want TCP, UDP or SCTP", *port.Protocol)
		}
	}
	return l4Port(ref, field, proto, port.Port, port.EndPort)
}

// l4Port validates a TCP/UDP/SCTP port: absent (every port), a number with
// an optional endPort, or a named port.
func l4Port(ref PolicyRef, field string, proto uint8, port *intstr.IntOrString, endPort *int32) (portSpec, string, *PolicyError) {
	ps := portSpec{proto: proto, lo: 0, hi: 65535}
	pn := ProtoName(proto)
	if port == nil {
		if endPort != nil {
			return portSpec{}, "", fieldErr(ref, field+".endPort", "endPort needs port")
		}
		return ps, "every " + pn + " port", nil
	}
	if port.Type == intstr.String {
		if errs := validation.IsValidPortName(port.StrVal); len(errs) > 0 {
			return portSpec{}, "", fieldErr(ref, field+".port", "invalid named port %q: %s", port.StrVal, errs[0])
		}
		if endPort != nil {
			return portSpec{}, "", fieldErr(ref, field+".endPort", "endPort needs a numeric port, not named port %q", port.StrVal)
		}
		ps.name = port.StrVal
		return ps, "port " + port.StrVal + "/" + pn, nil
	}
	if port.IntVal < 1 || port.IntVal > 65535 {
		return portSpec{}, "", fieldErr(ref, field+".port", "port %d out of range 1-65535", port.IntVal)
	}
	ps.lo, ps.hi = uint16(port.IntVal), uint16(port.IntVal)
	text := "port " + strconv.Itoa(int(port.IntVal)) + "/" + pn
	if endPort != nil {
		if *endPort < port.IntVal || *endPort > 65535 {
			return portSpec{}, "", fieldErr(ref, field+".endPort", "endPort %d must be within port %d..65535", *endPort, port.IntVal)
		}
		ps.hi = uint16(*endPort)
		text = fmt.Sprintf("ports %d-%d/%s", port.IntVal, *endPort, pn)
	}
	return ps, text, nil
}

// parseMeshPolicy translates a MeshPolicy or, with cluster set, a
// ClusterMeshPolicy's rules.
func parseMeshRules(p *parsedPolicy, r *v1alpha1.PolicyRules) *PolicyError {
	switch r.Mode {
	case "", v1alpha1.ModeEnforce:
	case v1alpha1.ModeAudit:
		p.audit = true
	default:
		return fieldErr(p.ref, "spec.mode", "unsupported mode %q: want enforce or audit", r.Mode)
	}
	p.defaultDeny = [2]bool{policytypes.Ingress: r.Ingress != nil, policytypes.Egress: r.Egress != nil}
	if r.DefaultDeny != nil {
		if r.DefaultDeny.Ingress != nil {
			p.defaultDeny[policytypes.Ingress] = *r.DefaultDeny.Ingress
		}
		if r.DefaultDeny.Egress != nil {
			p.defaultDeny[policytypes.Egress] = *r.DefaultDeny.Egress
		}
	}
	for i, rule := range r.Ingress {
		if err := p.addMeshRule(policytypes.Ingress, policytypes.Allow, fmt.Sprintf("ingress[%d]", i), "from", rule.From, rule.Ports); err != nil {
			return err
		}
	}
	for i, rule := range r.IngressDeny {
		if err := p.addMeshRule(policytypes.Ingress, policytypes.Deny, fmt.Sprintf("ingressDeny[%d]", i), "from", rule.From, rule.Ports); err != nil {
			return err
		}
	}
	for i, rule := range r.Egress {
		if err := p.addMeshRule(policytypes.Egress, policytypes.Allow, fmt.Sprintf("egress[%d]", i), "to", rule.To, rule.Ports); err != nil {
			return err
		}
	}
	for i, rule := range r.EgressDeny {
		if err := p.addMeshRule(policytypes.Egress, policytypes.Deny, fmt.Sprintf("egressDeny[%d]", i), "to", rule.To, rule.Ports); err != nil {
			return err
		}
	}
	return nil
}

func parseMeshPolicy(mp *v1alpha1.MeshPolicy) (*parsedPolicy, *PolicyError) {
	ref := PolicyRef{Kind: KindMeshPolicy, Namespace: mp.Namespace, Name: mp.Name}
	p := &parsedPolicy{ref: ref, namespace: mp.Namespace}
	sel, perr := selectorFrom(ref, "spec.podSelector", &mp.Spec.PodSelector)
	if perr != nil {
		return nil, perr
	}
	p.subjectPod = sel
	if err := parseMeshRules(p, &mp.Spec.PolicyRules); err != nil {
		return nil, err
	}
	return p, nil
}

func parseClusterMeshPolicy(cmp *v1alpha1.ClusterMeshPolicy) (*parsedPolicy, *PolicyError) {
	ref := PolicyRef{Kind: KindClusterMeshPolicy, Name: cmp.Name}
	p := &parsedPolicy{ref: ref}
	sel, perr := selectorFrom(ref, "spec.podSelector", &cmp.Spec.PodSelector)
	if perr != nil {
		return nil, perr
	}
	p.subjectPod = sel
	if p.subjectNS, perr = selectorFrom(ref, "spec.namespaceSelector", cmp.Spec.NamespaceSelector); perr != nil {
		return nil, perr
	}
	if err := parseMeshRules(p, &cmp.Spec.PolicyRules); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *parsedPolicy) addMeshRule(dir policytypes.Direction, v policytypes.Verdict, section, peerField string, peers []v1alpha1.Peer, ports []v1alpha1.PortRule) *PolicyError {
	var pspecs []peerSpec
	var ptexts, psections []string
	for j, peer := range peers {
		field := fmt.Sprintf("spec.%s.%s[%d]", section, peerField, j)
		ps, text, err := p.meshPeer(field, peer)
		if err != nil {
			return err
		}
		pspecs, ptexts, psections = append(pspecs, ps), append(ptexts, text), append(psections, fmt.Sprintf(".%s[%d]", peerField, j))
	}
	if len(peers) == 0 {
		pspecs, ptexts, psections = []peerSpec{{any: true}}, []string{"any peer"}, []string{""}
	}
	var ospecs []portSpec
	var otexts, osections []string
	for k, port := range ports {
		field := fmt.Sprintf("spec.%s.ports[%d]", section, k)
		ps, text, err := meshPort(p.ref, field, port)
		if err != nil {
			return err
		}
		ospecs, otexts, osections = append(ospecs, ps), append(otexts, text), append(osections, fmt.Sprintf(".ports[%d]", k))
	}
	if len(ports) == 0 {
		ospecs, otexts, osections = []portSpec{{any: true}}, []string{"any port"}, []string{""}
	}
	p.cross(dir, v, section, pspecs, ptexts, psections, ospecs, otexts, osections)
	return nil
}

// clusterReserved are the reserved identities inside the cluster, which the
// cluster entity picks besides every pod.
var clusterReserved = []identity.ID{identity.Host, identity.RemoteNode, identity.Health, identity.Unmanaged}

func (p *parsedPolicy) meshPeer(field string, peer v1alpha1.Peer) (peerSpec, string, *PolicyError) {
	forms := 0
	if peer.PodSelector != nil || peer.NamespaceSelector != nil {
		forms++
	}
	if peer.Entity != nil {
		forms++
	}
	if peer.CIDR != nil {
		forms++
	}
	if forms != 1 {
		return peerSpec{}, "", fieldErr(p.ref, field, "a peer needs exactly one of podSelector/namespaceSelector, entity or cidr")
	}
	switch {
	case peer.Entity != nil:
		switch *peer.Entity {
		case v1alpha1.EntityWorld:
			return peerSpec{static: []identity.ID{identity.World}}, "entity world", nil
		case v1alpha1.EntityHost:
			return peerSpec{static: []identity.ID{identity.Host}}, "entity host", nil
		case v1alpha1.EntityRemoteNode:
			return peerSpec{static: []identity.ID{identity.RemoteNode}}, "entity remote-node", nil
		case v1alpha1.EntityCluster:
			return peerSpec{static: clusterReserved, sel: &selSpec{kind: selAllPods}}, "entity cluster", nil
		case v1alpha1.EntityAll:
			return peerSpec{any: true}, "entity all", nil
		}
		return peerSpec{}, "", fieldErr(p.ref, field+".entity", "unknown entity %q: want world, host, remote-node, cluster or all", *peer.Entity)
	case peer.CIDR != nil:
		spec, text, err := parseCIDR(p.ref, field+".cidr", peer.CIDR.CIDR, peer.CIDR.Except, false)
		if err != nil {
			return peerSpec{}, "", err
		}
		return peerSpec{sel: spec}, "cidr " + text, nil
	}
	return p.labelPeer(field, peer.PodSelector, peer.NamespaceSelector, p.namespace)
}

func meshPort(ref PolicyRef, field string, port v1alpha1.PortRule) (portSpec, string, *PolicyError) {
	var proto uint8
	switch port.Protocol {
	case "", v1alpha1.ProtocolTCP:
		proto = policytypes.ProtoTCP
	case v1alpha1.ProtocolUDP:
		proto = policytypes.ProtoUDP
	case v1alpha1.ProtocolSCTP:
		proto = policytypes.ProtoSCTP
	case v1alpha1.ProtocolICMP:
		return icmpPort(ref, field, port)
	default:
		return portSpec{}, "", fieldErr(ref, field+".protocol", "unsupported protocol %q: want TCP, UDP, SCTP or ICMP", port.Protocol)
	}
	if port.ICMPType != nil || port.ICMPCode != nil {
		return portSpec{}, "", fieldErr(ref, field+".icmpType", "icmpType/icmpCode need protocol ICMP")
	}
	return l4Port(ref, field, proto, port.Port, port.EndPort)
}

func icmpPort(ref PolicyRef, field string, port v1alpha1.PortRule) (portSpec, string, *PolicyError) {
	if port.Port != nil || port.EndPort != nil {
		return portSpec{}, "", fieldErr(ref, field+".port", "ICMP rules take icmpType/icmpCode, not port/endPort")
	}
	ps := portSpec{proto: policytypes.ProtoICMP, icmp: true}
	if port.ICMPType == nil {
		if port.ICMPCode != nil {
			return portSpec{}, "", fieldErr(ref, field+".icmpCode", "icmpCode needs icmpType")
		}
		return ps, "every ICMP type", nil
	}
	t := *port.ICMPType
	if t < 0 || t > 255 {
		return portSpec{}, "", fieldErr(ref, field+".icmpType", "icmpType %d out of range 0-255", t)
	}
	ps.lo, ps.icmpLen = uint16(t)<<8, 8
	text := fmt.Sprintf("ICMP type %d", t)
	if port.ICMPCode != nil {
		c := *port.ICMPCode
		if c < 0 || c > 255 {
			return portSpec{}, "", fieldErr(ref, field+".icmpCode", "icmpCode %d out of range 0-255", c)
		}
		ps.lo |= uint16(c)
		ps.icmpLen = 16
		text += fmt.Sprintf(" code %d", c)
	}
	ps.hi = ps.lo
	return ps, text, nil
}
