package policy

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// namedPort is one named container port of a pod.
type namedPort struct {
	name  string
	proto uint8
	port  uint16
}

// podState is what the compiler keeps of a pod: one for every pod of the
// cluster, so it holds nothing its identity holds (labels, service
// account) and shares its named ports with a pod of its identity when
// they are equal.
type podState struct {
	id   EndpointID
	node string
	ips  podAddrs
	// ports are sorted, shared with its identity's first pod or its
	// group when equal (a pointer: 8 bytes where a slice takes 24); nil
	// for none.
	ports *[]namedPort
	ident *identState
	group *group
	// identIdx is the pod's index in ident.pods.
	identIdx int32
	// active pods (an IP, not host network, not finished) are endpoints
	// and peers; others are kept only to be activated by a later update.
	active bool
}

// labels are the pod's labels: its identity's (an inactive pod, which has
// none, keeps none).
func (p *podState) labels() map[string]string {
	if p.ident == nil {
		return nil
	}
	return p.ident.podLabels
}

// serviceAccount is the pod's service account, as its labels.
func (p *podState) serviceAccount() string {
	if p.ident == nil {
		return ""
	}
	return p.ident.serviceAccount
}

// PodFacts is what the compiler reads of a pod: UpsertPod takes it from a
// corev1.Pod, the agent (UpsertPodFacts) from its own pod cache without
// building a corev1.Pod for each pod of the cluster.
type PodFacts struct {
	Namespace, Name string
	// Labels are read, never written, and not kept past the call unless
	// LabelsShared.
	Labels map[string]string
	// LabelsShared: Labels is never written by anyone (an informer
	// cache's interned set), so the compiler may keep it rather than a
	// copy.
	LabelsShared   bool
	NodeName       string
	ServiceAccount string
	HostNetwork    bool
	// Finished: the pod succeeded or failed.
	Finished bool
	// IPs are status.podIP and status.podIPs (repeats are ignored).
	IPs []string
	// Ports are the pod's containers' ports; unnamed ones are ignored.
	Ports []PodPort
}

// PodPort is a container port of a pod.
type PodPort struct {
	Name     string
	Protocol corev1.Protocol
	Port     int32
}

// podFacts reads a corev1.Pod.
func podFacts(pod *corev1.Pod) PodFacts {
	f := PodFacts{
		Namespace: pod.Namespace, Name: pod.Name, Labels: pod.Labels, NodeName: pod.Spec.NodeName,
		ServiceAccount: pod.Spec.ServiceAccountName, HostNetwork: pod.Spec.HostNetwork,
		Finished: pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed,
	}
	if pod.Status.PodIP != "" {
		f.IPs = append(f.IPs, pod.Status.PodIP)
	}
	for _, ip := range pod.Status.PodIPs {
		f.IPs = append(f.IPs, ip.IP)
	}
	for _, c := range pod.Spec.Containers {
		for _, cp := range c.Ports {
			f.Ports = append(f.Ports, PodPort{Name: cp.Name, Protocol: cp.Protocol, Port: cp.ContainerPort})
		}
	}
	return f
}

func newPodState(f *PodFacts) *podState {
	p := &podState{id: EndpointID{Namespace: f.Namespace, Name: f.Name}, node: f.NodeName}
	var buf [2]netip.Addr
	ips := buf[:0]
	for _, s := range f.IPs {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			continue
		}
		ip = ip.Unmap().WithZone("")
		if !slices.Contains(ips, ip) {
			ips = append(ips, ip)
		}
	}
	p.ips = packAddrs(ips)
	var ports []namedPort
	for _, cp := range f.Ports {
		if cp.Name == "" || cp.Port < 1 || cp.Port > 65535 {
			continue
		}
		proto := policytypes.ProtoTCP
		switch cp.Protocol {
		case corev1.ProtocolUDP:
			proto = policytypes.ProtoUDP
		case corev1.ProtocolSCTP:
			proto = policytypes.ProtoSCTP
		}
		ports = append(ports, namedPort{cp.Name, proto, uint16(cp.Port)})
	}
	slices.SortFunc(ports, func(a, b namedPort) int {
		if c := strings.Compare(a.name, b.name); c != 0 {
			return c
		}
		if a.proto != b.proto {
			return int(a.proto) - int(b.proto)
		}
		return int(a.port) - int(b.port)
	})
	if ports = slices.Compact(ports); len(ports) > 0 {
		p.ports = &ports
	}
	p.active = p.ips != "" && !f.HostNetwork && !f.Finished
	return p
}

// namedPorts are the pod's named ports, sorted.
func (p *podState) namedPorts() []namedPort {
	if p.ports == nil {
		return nil
	}
	return *p.ports
}

// resolve returns the numbers of named port name for proto.
func resolvePort(ports []namedPort, name string, proto uint8, out []uint16) []uint16 {
	for _, np := range ports {
		if np.name == name && np.proto == proto {
			out = append(out, np.port)
		}
	}
	return out
}

func portsSignature(ports []namedPort) string {
	var b strings.Builder
	for _, p := range ports {
		b.WriteString(p.name)
		b.WriteByte('/')
		b.WriteString(ProtoName(p.proto))
		b.WriteByte('=')
		b.WriteString(strconv.Itoa(int(p.port)))
		b.WriteByte(';')
	}
	return b.String()
}

// identState is one allocated pod identity and the active pods that carry
// it.
type identState struct {
	id  identity.ID
	key string
	// Its canonical label set is derived when asked for (labels): kept
	// whole for each of the tens of thousands of identities of a large
	// cluster it cost more than the pods' own labels.
	namespace      string
	serviceAccount string
	podLabels      labels.Set
	nsLabels       labels.Set
	// pods are the active pods carrying it, each at its identIdx.
	pods []*podState
	// ports is the union of its pods' named ports: what an egress named port
	// towards this identity resolves to.
	ports []namedPort
}

// labels is the identity's canonical label set.
func (id *identState) labels() identity.Labels {
	return identity.PodLabels(id.namespace, id.podLabels, id.nsLabels, id.serviceAccount)
}

// add makes p one of the identity's pods.
func (id *identState) add(p *podState) {
	p.identIdx = int32(len(id.pods))
	id.pods = append(id.pods, p)
}

// remove drops p from the identity's pods.
func (id *identState) remove(p *podState) {
	i, last := p.identIdx, id.pods[len(id.pods)-1]
	id.pods[i], last.identIdx = last, i
	id.pods[len(id.pods)-1] = nil
	id.pods = id.pods[:len(id.pods)-1]
	if len(id.pods) <= cap(id.pods)/4 && cap(id.pods) > 8 {
		id.pods = slices.Clip(slices.Clone(id.pods))
	}
}

// addPorts takes in the named ports of a pod that joined: only when it
// brings one the union lacks is the union recomputed (a pod joining an
// identity of hundreds would otherwise cost a walk over all of them).
func (id *identState) addPorts(ports []namedPort) bool {
	for _, np := range ports {
		if !slices.Contains(id.ports, np) {
			return id.recomputePorts()
		}
	}
	return false
}

func (id *identState) recomputePorts() bool {
	var ports []namedPort
	for _, p := range id.pods {
		ports = append(ports, p.namedPorts()...)
	}
	slices.SortFunc(ports, func(a, b namedPort) int {
		if c := strings.Compare(a.name, b.name); c != 0 {
			return c
		}
		if a.proto != b.proto {
			return int(a.proto) - int(b.proto)
		}
		return int(a.port) - int(b.port)
	})
	ports = slices.Compact(ports)
	if slices.Equal(ports, id.ports) {
		return false
	}
	id.ports = ports
	return true
}

// groupKey identifies endpoints that compile to the same entries: same
// identity (so the same policies and peers apply) and same named ports (so
// ingress named ports resolve alike).
type groupKey struct {
	id    identity.ID
	ports string
}

// group is the compiled policy shared by the endpoints of one groupKey.
type group struct {
	key   groupKey
	ident *identState
	ports []namedPort
	// podPorts are its pods' ports (ports, as the first pod held them).
	podPorts  *[]namedPort
	endpoints map[*podState]struct{}

	// flat holds the entries as of the last full compile or fold, sorted;
	// overlay the re-patched blocks of single peer identities since then
	// (nil slice: no entries left); materialized the folded result.
	flat         []policytypes.Entry
	overlay      map[identity.ID][]policytypes.Entry
	materialized []policytypes.Entry
	mu           sync.Mutex // guards the fold done by readers
	defaults     policytypes.Defaults
	// pols are the policies selecting the group, in policy order.
	pols []*policyState
	// selectors this group's entries were built from.
	sels []*selector
	// selectedBy lists, per direction, the policies making it default-deny.
	selectedBy [2][]PolicyRef
	// egressNamed: entries depend on the named ports of peer identities;
	// cidrNamed: on the named ports and IPs of pods inside CIDR regions.
	egressNamed, cidrNamed bool
	computed               bool
	// local counts the endpoints on the compiler's node (Options.Node).
	local int
}
