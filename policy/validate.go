package policy

import (
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apivalidation "k8s.io/apimachinery/pkg/api/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	metav1validation "k8s.io/apimachinery/pkg/apis/meta/v1/validation"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
)

// This file checks objects the way the API server would before they reach
// the compiler: NetworkPolicy as upstream Kubernetes validates it (the rules
// of k8s.io/kubernetes/pkg/apis/networking/validation, reimplemented here so
// that Veil does not import k8s.io/kubernetes), and MeshPolicy and
// ClusterMeshPolicy as their CRD's OpenAPI schema and CEL rules do, plus a
// port range and named-port syntax the schema cannot express. meshctl runs
// these on manifest files before applying; the agent runs them to fill the
// Accepted condition of MeshPolicy status.
//
// Lint* functions find what is valid but probably a mistake: selectors that
// select nothing, named ports that no pod has. They need the pods, so they
// are separate from validation.

var (
	supportedNetworkPolicyProtocols = []string{string(corev1.ProtocolTCP), string(corev1.ProtocolUDP), string(corev1.ProtocolSCTP)}
	supportedMeshProtocols          = []string{string(v1alpha1.ProtocolTCP), string(v1alpha1.ProtocolUDP), string(v1alpha1.ProtocolSCTP), string(v1alpha1.ProtocolICMP)}
	supportedModes                  = []string{string(v1alpha1.ModeEnforce), string(v1alpha1.ModeAudit)}
	supportedEntities               = []string{string(v1alpha1.EntityWorld), string(v1alpha1.EntityHost), string(v1alpha1.EntityRemoteNode), string(v1alpha1.EntityCluster), string(v1alpha1.EntityAll)}
	supportedPolicyTypes            = []string{string(networkingv1.PolicyTypeIngress), string(networkingv1.PolicyTypeEgress)}
)

// Limits from the CRD schema (+kubebuilder:validation markers).
const (
	maxRulePeers    = 256
	maxRulePorts    = 256
	maxCIDRLength   = 64
	maxCIDRExcepts  = 64
	maxICMPTypeCode = 255
)

// ValidateNetworkPolicy returns every reason the API server would reject np
// on create, with upstream's field paths and messages. CIDRs are checked
// strictly (no leading zeros, no bits beyond the prefix length), as current
// Kubernetes does with StrictIPCIDRValidation.
func ValidateNetworkPolicy(np *networkingv1.NetworkPolicy) field.ErrorList {
	errs := apivalidation.ValidateObjectMeta(&np.ObjectMeta, true, apivalidation.NameIsDNSSubdomain, field.NewPath("metadata"))
	spec := field.NewPath("spec")
	errs = append(errs, validateSelector(&np.Spec.PodSelector, spec.Child("podSelector"))...)
	for i, rule := range np.Spec.Ingress {
		path := spec.Child("ingress").Index(i)
		for j := range rule.Ports {
			errs = append(errs, validateNetworkPolicyPort(&rule.Ports[j], path.Child("ports").Index(j))...)
		}
		for j := range rule.From {
			errs = append(errs, validateNetworkPolicyPeer(&rule.From[j], path.Child("from").Index(j))...)
		}
	}
	for i, rule := range np.Spec.Egress {
		path := spec.Child("egress").Index(i)
		for j := range rule.Ports {
			errs = append(errs, validateNetworkPolicyPort(&rule.Ports[j], path.Child("ports").Index(j))...)
		}
		for j := range rule.To {
			errs = append(errs, validateNetworkPolicyPeer(&rule.To[j], path.Child("to").Index(j))...)
		}
	}
	typesPath := spec.Child("policyTypes")
	if len(np.Spec.PolicyTypes) > len(supportedPolicyTypes) {
		return append(errs, field.Invalid(typesPath, np.Spec.PolicyTypes, "may not specify more than two policyTypes"))
	}
	for i, t := range np.Spec.PolicyTypes {
		if t != networkingv1.PolicyTypeIngress && t != networkingv1.PolicyTypeEgress {
			errs = append(errs, field.NotSupported(typesPath.Index(i), t, supportedPolicyTypes))
		}
	}
	return errs
}

func validateSelector(sel *metav1.LabelSelector, path *field.Path) field.ErrorList {
	return metav1validation.ValidateLabelSelector(sel, metav1validation.LabelSelectorValidationOptions{}, path)
}

func validateNetworkPolicyPort(p *networkingv1.NetworkPolicyPort, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	if p.Protocol != nil && *p.Protocol != corev1.ProtocolTCP && *p.Protocol != corev1.ProtocolUDP && *p.Protocol != corev1.ProtocolSCTP {
		errs = append(errs, field.NotSupported(path.Child("protocol"), *p.Protocol, supportedNetworkPolicyProtocols))
	}
	switch {
	case p.Port == nil:
		if p.EndPort != nil {
			errs = append(errs, field.Invalid(path.Child("endPort"), *p.EndPort, "may not be specified when `port` is not specified"))
		}
	case p.Port.Type == intstr.Int:
		for _, msg := range validation.IsValidPortNum(int(p.Port.IntVal)) {
			errs = append(errs, field.Invalid(path.Child("port"), p.Port.IntVal, msg))
		}
		if p.EndPort != nil {
			if *p.EndPort < p.Port.IntVal {
				errs = append(errs, field.Invalid(path.Child("endPort"), *p.EndPort, "must be greater than or equal to `port`"))
			}
			for _, msg := range validation.IsValidPortNum(int(*p.EndPort)) {
				errs = append(errs, field.Invalid(path.Child("endPort"), *p.EndPort, msg))
			}
		}
	default:
		if p.EndPort != nil {
			errs = append(errs, field.Invalid(path.Child("endPort"), *p.EndPort, "may not be specified when `port` is non-numeric"))
		}
		for _, msg := range validation.IsValidPortName(p.Port.StrVal) {
			errs = append(errs, field.Invalid(path.Child("port"), p.Port.StrVal, msg))
		}
	}
	return errs
}

func validateNetworkPolicyPeer(p *networkingv1.NetworkPolicyPeer, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	forms := 0
	if p.PodSelector != nil {
		forms++
		errs = append(errs, validateSelector(p.PodSelector, path.Child("podSelector"))...)
	}
	if p.NamespaceSelector != nil {
		forms++
		errs = append(errs, validateSelector(p.NamespaceSelector, path.Child("namespaceSelector"))...)
	}
	if p.IPBlock != nil {
		forms++
		errs = append(errs, validateIPBlock(p.IPBlock, path.Child("ipBlock"))...)
	}
	switch {
	case forms == 0:
		errs = append(errs, field.Required(path, "must specify a peer"))
	case forms > 1 && p.IPBlock != nil:
		errs = append(errs, field.Forbidden(path, "may not specify both ipBlock and another peer"))
	}
	return errs
}

func validateIPBlock(b *networkingv1.IPBlock, path *field.Path) field.ErrorList {
	if b.CIDR == "" {
		return field.ErrorList{field.Required(path.Child("cidr"), "")}
	}
	errs := validation.IsValidCIDRForLegacyField(path.Child("cidr"), b.CIDR, true, nil)
	cidr, err := netip.ParsePrefix(b.CIDR)
	if err != nil {
		return errs
	}
	for i, s := range b.Except {
		exceptPath := path.Child("except").Index(i)
		errs = append(errs, validation.IsValidCIDRForLegacyField(exceptPath, s, true, nil)...)
		except, err := netip.ParsePrefix(s)
		if err != nil {
			continue
		}
		if !cidr.Masked().Contains(except.Addr()) || cidr.Bits() >= except.Bits() {
			errs = append(errs, field.Invalid(exceptPath, s, "must be a strict subset of `cidr`"))
		}
	}
	return errs
}

// ValidateMeshPolicy returns every reason the API server would reject mp
// under the MeshPolicy CRD's schema and CEL rules, and ports outside
// 1-65535 or named ports that are not IANA service names, which the schema
// cannot express but which could never match.
func ValidateMeshPolicy(mp *v1alpha1.MeshPolicy) field.ErrorList {
	errs := apivalidation.ValidateObjectMeta(&mp.ObjectMeta, true, apivalidation.NameIsDNSSubdomain, field.NewPath("metadata"))
	spec := field.NewPath("spec")
	errs = append(errs, validateSelector(&mp.Spec.PodSelector, spec.Child("podSelector"))...)
	return append(errs, validatePolicyRules(&mp.Spec.PolicyRules, spec)...)
}

// ValidateClusterMeshPolicy is ValidateMeshPolicy for the cluster-scoped
// kind.
func ValidateClusterMeshPolicy(cmp *v1alpha1.ClusterMeshPolicy) field.ErrorList {
	errs := apivalidation.ValidateObjectMeta(&cmp.ObjectMeta, false, apivalidation.NameIsDNSSubdomain, field.NewPath("metadata"))
	spec := field.NewPath("spec")
	errs = append(errs, validateSelector(&cmp.Spec.PodSelector, spec.Child("podSelector"))...)
	errs = append(errs, validateSelector(cmp.Spec.NamespaceSelector, spec.Child("namespaceSelector"))...)
	return append(errs, validatePolicyRules(&cmp.Spec.PolicyRules, spec)...)
}

func validatePolicyRules(r *v1alpha1.PolicyRules, spec *field.Path) field.ErrorList {
	var errs field.ErrorList
	if r.Mode != "" && r.Mode != v1alpha1.ModeEnforce && r.Mode != v1alpha1.ModeAudit {
		errs = append(errs, field.NotSupported(spec.Child("mode"), r.Mode, supportedModes))
	}
	ingress := func(name string, rules []v1alpha1.IngressRule) {
		for i, rule := range rules {
			errs = append(errs, validateMeshRule(rule.From, rule.Ports, spec.Child(name).Index(i), "from")...)
		}
	}
	egress := func(name string, rules []v1alpha1.EgressRule) {
		for i, rule := range rules {
			errs = append(errs, validateMeshRule(rule.To, rule.Ports, spec.Child(name).Index(i), "to")...)
		}
	}
	ingress("ingress", r.Ingress)
	ingress("ingressDeny", r.IngressDeny)
	egress("egress", r.Egress)
	egress("egressDeny", r.EgressDeny)
	return errs
}

func validateMeshRule(peers []v1alpha1.Peer, ports []v1alpha1.PortRule, path *field.Path, peersName string) field.ErrorList {
	var errs field.ErrorList
	if len(peers) > maxRulePeers {
		errs = append(errs, field.TooMany(path.Child(peersName), len(peers), maxRulePeers))
	}
	if len(ports) > maxRulePorts {
		errs = append(errs, field.TooMany(path.Child("ports"), len(ports), maxRulePorts))
	}
	for i := range peers {
		errs = append(errs, validateMeshPeer(&peers[i], path.Child(peersName).Index(i))...)
	}
	for i := range ports {
		errs = append(errs, validateMeshPort(&ports[i], path.Child("ports").Index(i))...)
	}
	return errs
}

func validateMeshPeer(p *v1alpha1.Peer, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	forms := 0
	if p.PodSelector != nil || p.NamespaceSelector != nil {
		forms++
		errs = append(errs, validateSelector(p.PodSelector, path.Child("podSelector"))...)
		errs = append(errs, validateSelector(p.NamespaceSelector, path.Child("namespaceSelector"))...)
	}
	if p.Entity != nil {
		forms++
		switch *p.Entity {
		case v1alpha1.EntityWorld, v1alpha1.EntityHost, v1alpha1.EntityRemoteNode, v1alpha1.EntityCluster, v1alpha1.EntityAll:
		default:
			errs = append(errs, field.NotSupported(path.Child("entity"), *p.Entity, supportedEntities))
		}
	}
	if p.CIDR != nil {
		forms++
		errs = append(errs, validateCIDRPeer(p.CIDR, path.Child("cidr"))...)
	}
	switch {
	case forms == 0:
		errs = append(errs, field.Required(path, "a peer needs exactly one of podSelector/namespaceSelector, entity or cidr"))
	case forms > 1:
		errs = append(errs, field.Forbidden(path, "a peer needs exactly one of podSelector/namespaceSelector, entity or cidr"))
	}
	return errs
}

// parseCELCIDR parses a CIDR as the CEL isCIDR()/cidr() functions of the
// API server do: netip syntax, bits beyond the prefix allowed, IPv4-mapped
// IPv6 refused.
func parseCELCIDR(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	if p.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("IPv4-mapped IPv6 address %q is not allowed", s)
	}
	return p, nil
}

func validateCIDRPeer(c *v1alpha1.CIDRPeer, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	cidrPath := path.Child("cidr")
	if len(c.CIDR) > maxCIDRLength {
		errs = append(errs, field.TooLong(cidrPath, c.CIDR, maxCIDRLength))
	}
	cidr, err := parseCELCIDR(c.CIDR)
	if err != nil {
		errs = append(errs, field.Invalid(cidrPath, c.CIDR, "cidr must be a valid CIDR such as 10.0.0.0/8"))
	}
	if len(c.Except) > maxCIDRExcepts {
		errs = append(errs, field.TooMany(path.Child("except"), len(c.Except), maxCIDRExcepts))
	}
	for i, s := range c.Except {
		exceptPath := path.Child("except").Index(i)
		if len(s) > maxCIDRLength {
			errs = append(errs, field.TooLong(exceptPath, s, maxCIDRLength))
		}
		except, exceptErr := parseCELCIDR(s)
		// containsCIDR of the CEL library: equal or narrower, same family.
		inside := err == nil && exceptErr == nil &&
			cidr.Masked() == netip.PrefixFrom(except.Addr(), cidr.Bits()).Masked() && cidr.Bits() <= except.Bits()
		if !inside {
			errs = append(errs, field.Invalid(exceptPath, s, "every except entry must be a valid CIDR inside cidr"))
		}
	}
	return errs
}

func validateMeshPort(p *v1alpha1.PortRule, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	switch p.Protocol {
	case "", v1alpha1.ProtocolTCP, v1alpha1.ProtocolUDP, v1alpha1.ProtocolSCTP, v1alpha1.ProtocolICMP:
	default:
		errs = append(errs, field.NotSupported(path.Child("protocol"), p.Protocol, supportedMeshProtocols))
	}
	if p.Protocol == v1alpha1.ProtocolICMP {
		const msg = "ICMP rules take icmpType/icmpCode, other protocols take port/endPort"
		if p.Port != nil {
			errs = append(errs, field.Forbidden(path.Child("port"), msg))
		}
		if p.EndPort != nil {
			errs = append(errs, field.Forbidden(path.Child("endPort"), msg))
		}
	} else {
		const msg = "ICMP rules take icmpType/icmpCode, other protocols take port/endPort"
		if p.ICMPType != nil {
			errs = append(errs, field.Forbidden(path.Child("icmpType"), msg))
		}
		if p.ICMPCode != nil {
			errs = append(errs, field.Forbidden(path.Child("icmpCode"), msg))
		}
	}
	if p.ICMPCode != nil && p.ICMPType == nil {
		errs = append(errs, field.Required(path.Child("icmpType"), "icmpCode needs icmpType"))
	}
	if p.ICMPType != nil && (*p.ICMPType < 0 || *p.ICMPType > maxICMPTypeCode) {
		errs = append(errs, field.Invalid(path.Child("icmpType"), *p.ICMPType, validation.InclusiveRangeError(0, maxICMPTypeCode)))
	}
	if p.ICMPCode != nil && (*p.ICMPCode < 0 || *p.ICMPCode > maxICMPTypeCode) {
		errs = append(errs, field.Invalid(path.Child("icmpCode"), *p.ICMPCode, validation.InclusiveRangeError(0, maxICMPTypeCode)))
	}
	if p.Port != nil {
		if p.Port.Type == intstr.Int {
			for _, msg := range validation.IsValidPortNum(int(p.Port.IntVal)) {
				errs = append(errs, field.Invalid(path.Child("port"), p.Port.IntVal, msg))
			}
		} else {
			for _, msg := range validation.IsValidPortName(p.Port.StrVal) {
				errs = append(errs, field.Invalid(path.Child("port"), p.Port.StrVal, msg))
			}
		}
	}
	if p.EndPort != nil {
		for _, msg := range validation.IsValidPortNum(int(*p.EndPort)) {
			errs = append(errs, field.Invalid(path.Child("endPort"), *p.EndPort, msg))
		}
		if p.Port == nil || p.Port.Type != intstr.Int || *p.EndPort < p.Port.IntVal {
			errs = append(errs, field.Invalid(path.Child("endPort"), *p.EndPort, "endPort needs a numeric port and must be >= port"))
		}
	}
	return errs
}

// ValidateNamespace checks what policy depends on in a namespace: its name
// and labels.
func ValidateNamespace(ns *corev1.Namespace) field.ErrorList {
	return apivalidation.ValidateObjectMeta(&ns.ObjectMeta, false, apivalidation.NameIsDNSLabel, field.NewPath("metadata"))
}

// ValidatePod checks what policy depends on in a pod, as the API server
// does: its name, labels and container ports (named ports are resolved
// against them). A port name used twice in one pod (across containers) is
// ambiguous for named-port rules; the API server only refuses it within a
// container, so across containers it is left to LintPod.
func ValidatePod(pod *corev1.Pod) field.ErrorList {
	errs := apivalidation.ValidateObjectMeta(&pod.ObjectMeta, true, apivalidation.NameIsDNSSubdomain, field.NewPath("metadata"))
	spec := field.NewPath("spec")
	check := func(containers []corev1.Container, path *field.Path) {
		for i, c := range containers {
			names := map[string]bool{}
			for j, port := range c.Ports {
				portPath := path.Index(i).Child("ports").Index(j)
				if port.Name != "" {
					if msgs := validation.IsValidPortName(port.Name); len(msgs) > 0 {
						for _, msg := range msgs {
							errs = append(errs, field.Invalid(portPath.Child("name"), port.Name, msg))
						}
					} else if names[port.Name] {
						errs = append(errs, field.Duplicate(portPath.Child("name"), port.Name))
					}
					names[port.Name] = true
				}
				if port.ContainerPort == 0 {
					errs = append(errs, field.Required(portPath.Child("containerPort"), ""))
				} else {
					for _, msg := range validation.IsValidPortNum(int(port.ContainerPort)) {
						errs = append(errs, field.Invalid(portPath.Child("containerPort"), port.ContainerPort, msg))
					}
				}
				switch port.Protocol {
				case "", corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP:
				default:
					errs = append(errs, field.NotSupported(portPath.Child("protocol"), port.Protocol, supportedNetworkPolicyProtocols))
				}
			}
		}
	}
	check(pod.Spec.InitContainers, spec.Child("initContainers"))
	check(pod.Spec.Containers, spec.Child("containers"))
	return errs
}

// Warning is something valid that probably does not do what its author
// meant.
type Warning struct {
	Field   *field.Path
	Message string
}

func (w Warning) String() string { return w.Field.String() + ": " + w.Message }

// Inventory is the pods and namespaces that Lint* check policies against.
type Inventory struct {
	nsLabels map[string]labels.Set
	pods     []*corev1.Pod
}

// NewInventory indexes namespaces and pods for linting. A namespace that a
// pod names but that is not in namespaces counts as one with no labels but
// its name.
func NewInventory(namespaces []*corev1.Namespace, pods []*corev1.Pod) *Inventory {
	inv := &Inventory{nsLabels: map[string]labels.Set{}, pods: pods}
	for _, ns := range namespaces {
		inv.nsLabels[ns.Name] = nsLabelSet(ns.Name, ns.Labels)
	}
	for _, p := range pods {
		if _, ok := inv.nsLabels[p.Namespace]; !ok {
			inv.nsLabels[p.Namespace] = nsLabelSet(p.Namespace, nil)
		}
	}
	return inv
}

func nsLabelSet(name string, ls map[string]string) labels.Set {
	set := labels.Set{}
	for k, v := range ls {
		set[k] = v
	}
	set[corev1.LabelMetadataName] = name
	return set
}

// selection is the pods one selector of a policy picks, and whether the
// namespace part picked any namespace at all (to say which part is wrong).
type selection struct {
	pods       []*corev1.Pod
	namespaces int
}

// sel picks pods by a namespace selector (nil: only namespace ns; ns "" and
// nil selector: every namespace) and a pod selector (nil: every pod). ok is
// false when a selector does not parse (validation reports that).
func (inv *Inventory) sel(ns string, nsSel, podSel *metav1.LabelSelector) (selection, bool) {
	var out selection
	nsMatch := func(name string) bool { return ns == "" || name == ns }
	if nsSel != nil {
		s, err := metav1.LabelSelectorAsSelector(nsSel)
		if err != nil {
			return out, false
		}
		nsMatch = func(name string) bool { return s.Matches(inv.nsLabels[name]) }
	}
	podMatch := labels.Everything()
	if podSel != nil {
		s, err := metav1.LabelSelectorAsSelector(podSel)
		if err != nil {
			return out, false
		}
		podMatch = s
	}
	for name := range inv.nsLabels {
		if nsMatch(name) {
			out.namespaces++
		}
	}
	for _, p := range inv.pods {
		if nsMatch(p.Namespace) && podMatch.Matches(labels.Set(p.Labels)) {
			out.pods = append(out.pods, p)
		}
	}
	return out, true
}

func (inv *Inventory) selectedWarning(s selection, explicitNS bool, path *field.Path, what string) []Warning {
	switch {
	case len(s.pods) > 0:
		return nil
	case explicitNS && s.namespaces == 0:
		return []Warning{{path.Child("namespaceSelector"), "matches no namespace"}}
	}
	return []Warning{{path, what + " no pod"}}
}

// hasNamedPort reports whether some pod has a container port called name
// for protocol proto.
func hasNamedPort(pods []*corev1.Pod, name string, proto corev1.Protocol) bool {
	for _, p := range pods {
		for _, cs := range [][]corev1.Container{p.Spec.InitContainers, p.Spec.Containers} {
			for _, c := range cs {
				for _, port := range c.Ports {
					pp := port.Protocol
					if pp == "" {
						pp = corev1.ProtocolTCP
					}
					if port.Name == name && pp == proto {
						return true
					}
				}
			}
		}
	}
	return false
}

func namedPortWarning(pods []*corev1.Pod, port *intstr.IntOrString, proto string, path *field.Path, whose string) []Warning {
	if port == nil || port.Type != intstr.String {
		return nil
	}
	if proto == "" {
		proto = string(corev1.ProtocolTCP)
	}
	if hasNamedPort(pods, port.StrVal, corev1.Protocol(proto)) {
		return nil
	}
	return []Warning{{path.Child("port"), fmt.Sprintf("no %s has a container port named %q for %s, so this port matches nothing", whose, port.StrVal, proto)}}
}

// LintNetworkPolicy warns about the parts of np that select no pod of inv
// and named ports that no destination pod defines.
func (inv *Inventory) LintNetworkPolicy(np *networkingv1.NetworkPolicy) []Warning {
	spec := field.NewPath("spec")
	target, ok := inv.sel(np.Namespace, nil, &np.Spec.PodSelector)
	if !ok {
		return nil
	}
	var ws []Warning
	if len(target.pods) == 0 {
		ws = append(ws, Warning{spec.Child("podSelector"), fmt.Sprintf("selects no pod in namespace %s", np.Namespace)})
	}
	ws = append(ws, lintPolicyTypes(np, spec)...)
	peer := func(p networkingv1.NetworkPolicyPeer, path *field.Path) ([]*corev1.Pod, bool) {
		if p.IPBlock != nil || (p.PodSelector == nil && p.NamespaceSelector == nil) {
			return nil, false
		}
		ns := np.Namespace
		if p.NamespaceSelector != nil {
			ns = ""
		}
		s, ok := inv.sel(ns, p.NamespaceSelector, p.PodSelector)
		if !ok {
			return nil, false
		}
		ws = append(ws, inv.selectedWarning(s, p.NamespaceSelector != nil, path, "selects")...)
		return s.pods, true
	}
	for i, rule := range np.Spec.Ingress {
		path := spec.Child("ingress").Index(i)
		for j, p := range rule.From {
			peer(p, path.Child("from").Index(j))
		}
		if len(target.pods) > 0 {
			for j, port := range rule.Ports {
				ws = append(ws, namedPortWarning(target.pods, port.Port, protoString(port.Protocol), path.Child("ports").Index(j), "pod selected by the policy")...)
			}
		}
	}
	for i, rule := range np.Spec.Egress {
		path := spec.Child("egress").Index(i)
		dests, bounded := []*corev1.Pod{}, len(rule.To) > 0
		for j, p := range rule.To {
			pods, isSel := peer(p, path.Child("to").Index(j))
			bounded = bounded && isSel
			dests = append(dests, pods...)
		}
		if !bounded {
			dests = inv.pods
		}
		for j, port := range rule.Ports {
			ws = append(ws, namedPortWarning(dests, port.Port, protoString(port.Protocol), path.Child("ports").Index(j), "destination pod of this rule")...)
		}
	}
	return ws
}

// lintPolicyTypes warns about rules of a direction that an explicit
// policyTypes leaves out: upstream ignores them without a word.
func lintPolicyTypes(np *networkingv1.NetworkPolicy, spec *field.Path) []Warning {
	if len(np.Spec.PolicyTypes) == 0 {
		return nil
	}
	var ws []Warning
	for _, d := range []struct {
		t     networkingv1.PolicyType
		field string
		n     int
	}{{networkingv1.PolicyTypeIngress, "ingress", len(np.Spec.Ingress)}, {networkingv1.PolicyTypeEgress, "egress", len(np.Spec.Egress)}} {
		if d.n > 0 && !slices.Contains(np.Spec.PolicyTypes, d.t) {
			ws = append(ws, Warning{spec.Child(d.field), fmt.Sprintf("ignored: policyTypes does not list %s", d.t)})
		}
	}
	return ws
}

func protoString(p *corev1.Protocol) string {
	if p == nil {
		return ""
	}
	return string(*p)
}

// LintMeshPolicy is LintNetworkPolicy for a MeshPolicy.
func (inv *Inventory) LintMeshPolicy(mp *v1alpha1.MeshPolicy) []Warning {
	spec := field.NewPath("spec")
	target, ok := inv.sel(mp.Namespace, nil, &mp.Spec.PodSelector)
	if !ok {
		return nil
	}
	var ws []Warning
	if len(target.pods) == 0 {
		ws = append(ws, Warning{spec.Child("podSelector"), fmt.Sprintf("selects no pod in namespace %s", mp.Namespace)})
	}
	return append(ws, inv.lintRules(&mp.Spec.PolicyRules, mp.Namespace, target.pods, spec)...)
}

// LintClusterMeshPolicy is LintNetworkPolicy for a ClusterMeshPolicy.
func (inv *Inventory) LintClusterMeshPolicy(cmp *v1alpha1.ClusterMeshPolicy) []Warning {
	spec := field.NewPath("spec")
	target, ok := inv.sel("", cmp.Spec.NamespaceSelector, &cmp.Spec.PodSelector)
	if !ok {
		return nil
	}
	ws := inv.selectedWarning(target, cmp.Spec.NamespaceSelector != nil, spec, "selects")
	for i := range ws {
		if ws[i].Field == spec {
			ws[i].Field = spec.Child("podSelector")
		}
	}
	return append(ws, inv.lintRules(&cmp.Spec.PolicyRules, "", target.pods, spec)...)
}

// lintRules lints the rules of a MeshPolicy (namespace set) or a
// ClusterMeshPolicy (namespace ""), whose selected pods are targets.
func (inv *Inventory) lintRules(r *v1alpha1.PolicyRules, namespace string, targets []*corev1.Pod, spec *field.Path) []Warning {
	var ws []Warning
	// peer returns the pods a peer selects; isSel is false for entity and
	// CIDR peers, which may stand for any address.
	peer := func(p v1alpha1.Peer, path *field.Path) (pods []*corev1.Pod, isSel bool) {
		if p.PodSelector == nil && p.NamespaceSelector == nil {
			if p.CIDR != nil {
				if pfx, err := parseCELCIDR(p.CIDR.CIDR); err == nil && pfx != pfx.Masked() {
					ws = append(ws, Warning{path.Child("cidr", "cidr"), fmt.Sprintf("has bits set beyond the prefix length; it means %s", pfx.Masked())})
				}
			}
			return nil, false
		}
		ns := namespace
		if p.NamespaceSelector != nil {
			ns = ""
		}
		s, ok := inv.sel(ns, p.NamespaceSelector, p.PodSelector)
		if !ok {
			return nil, false
		}
		ws = append(ws, inv.selectedWarning(s, p.NamespaceSelector != nil, path, "selects")...)
		return s.pods, true
	}
	ingress := func(name string, rules []v1alpha1.IngressRule) {
		for i, rule := range rules {
			path := spec.Child(name).Index(i)
			for j, p := range rule.From {
				peer(p, path.Child("from").Index(j))
			}
			if len(targets) > 0 {
				for j, port := range rule.Ports {
					ws = append(ws, namedPortWarning(targets, port.Port, string(port.Protocol), path.Child("ports").Index(j), "pod selected by the policy")...)
				}
			}
		}
	}
	egress := func(name string, rules []v1alpha1.EgressRule) {
		for i, rule := range rules {
			path := spec.Child(name).Index(i)
			dests, bounded := []*corev1.Pod{}, len(rule.To) > 0
			for j, p := range rule.To {
				pods, isSel := peer(p, path.Child("to").Index(j))
				bounded = bounded && isSel
				dests = append(dests, pods...)
			}
			if !bounded {
				dests = inv.pods
			}
			for j, port := range rule.Ports {
				if port.Protocol == v1alpha1.ProtocolICMP {
					continue
				}
				ws = append(ws, namedPortWarning(dests, port.Port, string(port.Protocol), path.Child("ports").Index(j), "destination pod of this rule")...)
			}
		}
	}
	ingress("ingress", r.Ingress)
	ingress("ingressDeny", r.IngressDeny)
	egress("egress", r.Egress)
	egress("egressDeny", r.EgressDeny)
	return ws
}

// LintPod warns about a port name (and protocol) that two containers of
// pod both define: a named-port rule then resolves to more than one port.
// Within one container ValidatePod refuses it, as the API server does.
func LintPod(pod *corev1.Pod) []Warning {
	type use struct {
		container *field.Path
		port      *field.Path
	}
	type nameProto struct {
		name  string
		proto corev1.Protocol
	}
	seen := map[nameProto]use{}
	var ws []Warning
	spec := field.NewPath("spec")
	for _, group := range []struct {
		name       string
		containers []corev1.Container
	}{{"initContainers", pod.Spec.InitContainers}, {"containers", pod.Spec.Containers}} {
		for i, c := range group.containers {
			container := spec.Child(group.name).Index(i)
			for j, port := range c.Ports {
				if port.Name == "" {
					continue
				}
				proto := port.Protocol
				if proto == "" {
					proto = corev1.ProtocolTCP
				}
				key, path := nameProto{port.Name, proto}, container.Child("ports").Index(j).Child("name")
				prev, dup := seen[key]
				switch {
				case !dup:
					seen[key] = use{container, path}
				case prev.container.String() != container.String():
					ws = append(ws, Warning{path, fmt.Sprintf("port name %q is also defined at %s; named-port rules match both", port.Name, prev.port)})
				}
			}
		}
	}
	return ws
}
