package k8s

import (
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"unique"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/tools/cache"
)

// PodInfo is what Veil reads of a Pod, and all the agent's pod cache holds.
// Even slimmed, a corev1.Pod costs about 2 KB: its structs are mostly
// fields Veil never sets (a Pod is 1,240 bytes, each Container 408); a
// PodInfo is 80 bytes, its store key, and the label set and named ports it
// shares with the pods of its deployment. At 150,000 pods that is the
// difference between about 270 and 20 MiB.
//
// It is packed, and read through its methods (Fields has them all at
// once): the namespace, node and service account are interned handles; the
// name is the tail of the store key "namespace/name", which the informer's
// store keys the pod by without a string of its own (see GetObjectMeta);
// the resource version is a number, an IPv4 pod IP four bytes, the phase
// and host network a few bits. What most pods do not have (Veil's
// annotations, a second IP, an IPv6 address, a version or phase that is
// not the usual kind) is behind one pointer, nil for most pods.
//
// Like every object in an informer's cache it is shared: never write it,
// nor its maps and slices.
type PodInfo struct {
	// key is the store key: "namespace/name", or the name alone without a
	// namespace.
	key string
	// labels are interned: pods with equal labels share the map.
	labels map[string]string
	// ports are interned: pods with equal lists share them.
	ports *[]NamedPort
	// rare holds what most pods do not have; nil for most.
	rare *podRare
	// namespace, nodeName and serviceAccount are interned; the zero
	// handle is "".
	namespace, nodeName, serviceAccount unique.Handle[string]
	// rv is the resource version when it is a decimal number (as the
	// API server's are); 0 when it is not, and rare says it.
	rv uint64
	// ip4 is the pod IP when it is an IPv4 address written as IPv4
	// addresses are (podIPIs4 says so); else rare holds it.
	ip4 [4]byte
	// bits: the phase (phaseMask: one of phases, or phaseOther and rare
	// says it), host network and podIPIs4.
	bits uint8
}

// podRare is what most pods do not have.
type podRare struct {
	// annotations are Veil's own (see veilAnnotation).
	annotations map[string]string
	// podIPs are status.podIPs when they say more than podIP.
	podIPs []string
	// podIP when it is not a plain IPv4 address (IPv6, or written
	// another way).
	podIP string
	// resourceVersion when it is not a decimal number.
	resourceVersion string
	// phase when it is none of phases.
	phase corev1.PodPhase
}

const (
	phaseMask   = 0b111
	phaseOther  = phaseMask
	hostNetwork = 1 << 3
	podIPIs4    = 1 << 4
)

// phases are the phases held as numbers: index = code.
var phases = [...]corev1.PodPhase{"", corev1.PodPending, corev1.PodRunning, corev1.PodSucceeded, corev1.PodFailed, corev1.PodUnknown}

// PodFields is a PodInfo written out, field by field: what NewPodInfo
// packs and Fields unpacks.
type PodFields struct {
	Namespace, Name string
	// ResourceVersion tells a resync from an update (see unreadChange).
	ResourceVersion string
	Labels          map[string]string
	// Annotations are Veil's own (see veilAnnotation); nil for most pods.
	Annotations    map[string]string
	NodeName       string
	ServiceAccount string
	HostNetwork    bool
	Phase          corev1.PodPhase
	// PodIP is status.podIP; PodIPs status.podIPs when they say more.
	PodIP  string
	PodIPs []string
	// Ports are the named container ports, which policies may refer to.
	Ports []NamedPort
}

// NamedPort is a container port with a name.
type NamedPort struct {
	Container string
	Name      string
	Port      int32
	Protocol  corev1.Protocol
}

// handle interns s; "" is the zero handle.
func handle(s string) unique.Handle[string] {
	if s == "" {
		return unique.Handle[string]{}
	}
	return unique.Make(s)
}

func handleValue(h unique.Handle[string]) string {
	if h == (unique.Handle[string]{}) {
		return ""
	}
	return h.Value()
}

// intern returns the one copy of s that every pod shares (a namespace,
// node or service account name is held by thousands of pods).
func intern(s string) string {
	if s == "" {
		return ""
	}
	return unique.Make(s).Value()
}

// podKey is the store key of the pod namespace/name, as
// cache.MetaNamespaceKeyFunc makes it.
func podKey(namespace, name string) string {
	if namespace == "" {
		return name
	}
	return namespace + "/" + name
}

// NewPodInfo packs f. Its maps and slices are kept, not copied: they are
// the PodInfo's, never to be written.
func NewPodInfo(f PodFields) *PodInfo {
	p := &PodInfo{
		key: podKey(f.Namespace, f.Name), labels: f.Labels,
		namespace: handle(f.Namespace), nodeName: handle(f.NodeName), serviceAccount: handle(f.ServiceAccount),
	}
	if len(f.Ports) > 0 {
		ports := f.Ports
		p.ports = &ports
	}
	p.setRest(f.ResourceVersion, f.Phase, f.HostNetwork, f.PodIP, f.PodIPs, f.Annotations)
	return p
}

// setRest packs the resource version, phase, host network, IPs and
// annotations.
func (p *PodInfo) setRest(rv string, phase corev1.PodPhase, hostNet bool, podIP string, podIPs []string, annotations map[string]string) {
	var r podRare
	if v, ok := parseVersion(rv); ok {
		p.rv = v
	} else {
		r.resourceVersion = rv
	}
	if i := slices.Index(phases[:], phase); i >= 0 {
		p.bits |= uint8(i)
	} else {
		p.bits |= phaseOther
		r.phase = phase
	}
	if hostNet {
		p.bits |= hostNetwork
	}
	if ip, ok := parseIPv4(podIP); ok {
		p.ip4 = ip
		p.bits |= podIPIs4
	} else {
		r.podIP = podIP
	}
	if len(podIPs) > 0 {
		r.podIPs = podIPs
	}
	if len(annotations) > 0 {
		r.annotations = annotations
	}
	if r.annotations != nil || r.podIPs != nil || r.podIP != "" || r.resourceVersion != "" || r.phase != "" {
		p.rare = &r
	}
}

// parseVersion reads a resource version that is a decimal number written
// as FormatUint writes it (the API server's are); anything else is kept
// as a string.
func parseVersion[S ~string | ~[]byte](s S) (uint64, bool) {
	if len(s) == 0 || len(s) > 20 || s[0] == '0' {
		return 0, false
	}
	var v uint64
	for i := range len(s) {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		d := uint64(c - '0')
		if v > (1<<64-1-d)/10 {
			return 0, false
		}
		v = v*10 + d
	}
	return v, true
}

// parseIPv4 reads an IPv4 address written as netip.Addr.String writes it
// (four decimal numbers up to 255 without leading zeros), so that
// formatting it gives s back; anything else is kept as a string.
func parseIPv4[S ~string | ~[]byte](s S) ([4]byte, bool) {
	var ip [4]byte
	part, digits, n := 0, 0, 0
	for i := range len(s) {
		switch c := s[i]; {
		case c >= '0' && c <= '9':
			if digits > 0 && n == 0 {
				return ip, false // a leading zero
			}
			n = n*10 + int(c-'0')
			digits++
			if n > 255 {
				return ip, false
			}
		case c == '.' && digits > 0 && part < 3:
			ip[part] = byte(n)
			part, digits, n = part+1, 0, 0
		default:
			return ip, false
		}
	}
	if part != 3 || digits == 0 {
		return ip, false
	}
	ip[3] = byte(n)
	return ip, true
}

// Fields unpacks p.
func (p *PodInfo) Fields() PodFields {
	return PodFields{
		Namespace: p.Namespace(), Name: p.Name(), ResourceVersion: p.ResourceVersion(),
		Labels: p.labels, Annotations: p.Annotations(), NodeName: p.NodeName(), ServiceAccount: p.ServiceAccount(),
		HostNetwork: p.HostNetwork(), Phase: p.Phase(), PodIP: p.PodIP(), PodIPs: p.PodIPs(), Ports: p.Ports(),
	}
}

// Key is the pod's key in the informer's store: "namespace/name".
func (p *PodInfo) Key() string { return p.key }

// Namespace is the pod's namespace.
func (p *PodInfo) Namespace() string { return handleValue(p.namespace) }

// Name is the pod's name.
func (p *PodInfo) Name() string {
	if p.namespace == (unique.Handle[string]{}) {
		return p.key
	}
	return p.key[len(p.namespace.Value())+1:]
}

// ResourceVersion is the version of the pod this was made of.
func (p *PodInfo) ResourceVersion() string {
	if p.rv != 0 {
		return strconv.FormatUint(p.rv, 10)
	}
	if p.rare != nil {
		return p.rare.resourceVersion
	}
	return ""
}

// sameVersion reports whether p and o are of the same resource version.
func (p *PodInfo) sameVersion(o *PodInfo) bool {
	if p.rv != o.rv {
		return false
	}
	return p.rv != 0 || p.ResourceVersion() == o.ResourceVersion()
}

// Labels are the pod's labels, shared with the pods of equal labels: never
// write them.
func (p *PodInfo) Labels() map[string]string { return p.labels }

// Annotations are the pod's annotations that are Veil's (see
// veilAnnotation); nil for most pods.
func (p *PodInfo) Annotations() map[string]string {
	if p.rare == nil {
		return nil
	}
	return p.rare.annotations
}

// NodeName is spec.nodeName.
func (p *PodInfo) NodeName() string { return handleValue(p.nodeName) }

// ServiceAccount is spec.serviceAccountName.
func (p *PodInfo) ServiceAccount() string { return handleValue(p.serviceAccount) }

// HostNetwork is spec.hostNetwork.
func (p *PodInfo) HostNetwork() bool { return p.bits&hostNetwork != 0 }

// Phase is status.phase.
func (p *PodInfo) Phase() corev1.PodPhase {
	if c := p.bits & phaseMask; c != phaseOther {
		return phases[c]
	}
	return p.rare.phase
}

// PodIP is status.podIP.
func (p *PodInfo) PodIP() string {
	if p.bits&podIPIs4 != 0 {
		return netip.AddrFrom4(p.ip4).String()
	}
	if p.rare != nil {
		return p.rare.podIP
	}
	return ""
}

// PodIPs are status.podIPs when they say more than PodIP (two addresses,
// or one that is not PodIP); nil for most pods.
func (p *PodInfo) PodIPs() []string {
	if p.rare == nil {
		return nil
	}
	return p.rare.podIPs
}

// Ports are the named container ports, which policies may refer to;
// shared with the pods of equal lists: never write them.
func (p *PodInfo) Ports() []NamedPort {
	if p.ports == nil {
		return nil
	}
	return *p.ports
}

// compactPod keeps what Veil reads of in; t, when not nil, interns its
// label set and named ports.
func compactPod(in *corev1.Pod, t *transformer) *PodInfo {
	ns := intern(in.Namespace)
	p := &PodInfo{
		key: podKey(ns, in.Name), labels: in.Labels,
		namespace: handle(ns), nodeName: handle(in.Spec.NodeName), serviceAccount: handle(in.Spec.ServiceAccountName),
	}
	if t != nil {
		p.labels = t.labels.intern(in.Labels)
	}
	// Most pods have one IP, the same as podIP: kept once.
	var podIPs []string
	if len(in.Status.PodIPs) > 1 || (len(in.Status.PodIPs) == 1 && in.Status.PodIPs[0].IP != in.Status.PodIP) {
		for _, ip := range in.Status.PodIPs {
			podIPs = append(podIPs, ip.IP)
		}
	}
	p.setRest(in.ResourceVersion, in.Status.Phase, in.Spec.HostNetwork, in.Status.PodIP, podIPs, veilAnnotations(in.Annotations))
	var ports []NamedPort
	for _, c := range in.Spec.Containers {
		for _, cp := range c.Ports {
			if cp.Name != "" {
				ports = append(ports, NamedPort{Container: intern(c.Name), Name: intern(cp.Name), Port: cp.ContainerPort, Protocol: cp.Protocol})
			}
		}
	}
	switch {
	case len(ports) == 0:
	case t != nil:
		p.ports = t.ports.intern(ports)
	default:
		p.ports = &ports
	}
	return p
}

// Object is the pod as a corev1.Pod with only the fields Veil reads, for
// the policy compiler; a new object each call, the caller's to keep.
func (p *PodInfo) Object() *corev1.Pod {
	f := p.Fields()
	out := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: f.Namespace, Name: f.Name, ResourceVersion: f.ResourceVersion,
			Labels: f.Labels, Annotations: f.Annotations,
		},
		Spec:   corev1.PodSpec{NodeName: f.NodeName, ServiceAccountName: f.ServiceAccount, HostNetwork: f.HostNetwork},
		Status: corev1.PodStatus{Phase: f.Phase, PodIP: f.PodIP},
	}
	switch {
	case f.PodIPs != nil:
		for _, ip := range f.PodIPs {
			out.Status.PodIPs = append(out.Status.PodIPs, corev1.PodIP{IP: ip})
		}
	case f.PodIP != "":
		out.Status.PodIPs = []corev1.PodIP{{IP: f.PodIP}}
	}
	for _, np := range f.Ports {
		i := slices.IndexFunc(out.Spec.Containers, func(c corev1.Container) bool { return c.Name == np.Container })
		if i < 0 {
			out.Spec.Containers = append(out.Spec.Containers, corev1.Container{Name: np.Container})
			i = len(out.Spec.Containers) - 1
		}
		c := &out.Spec.Containers[i]
		c.Ports = append(c.Ports, corev1.ContainerPort{Name: np.Name, ContainerPort: np.Port, Protocol: np.Protocol})
	}
	return out
}

// GetObjectMeta makes a PodInfo an object the informer's store can key
// (meta.Accessor), with no allocation (podMeta). It names the pod by its
// store key, with no namespace: cache.MetaNamespaceKeyFunc then returns the
// key itself rather than a new "namespace/name" string, and the store's map
// shares the PodInfo's key (a string a pod saved). Read a PodInfo's
// namespace and name with its methods, not through this.
func (p *PodInfo) GetObjectMeta() metav1.Object { return (*podMeta)(p) }

var _ metav1.ObjectMetaAccessor = (*PodInfo)(nil)

// GetObjectKind and DeepCopyObject make a PodInfo a runtime.Object, so a
// checkpoint's pods can answer the pod informer's first list as they are
// (resumingPods). A PodInfo has no kind of its own.
func (p *PodInfo) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// DeepCopyObject returns a copy of p that shares nothing with it but its
// interned strings.
func (p *PodInfo) DeepCopyObject() runtime.Object {
	cp := *p
	cp.labels = maps.Clone(p.labels)
	if p.ports != nil {
		ports := slices.Clone(*p.ports)
		cp.ports = &ports
	}
	if p.rare != nil {
		rare := *p.rare
		rare.annotations, rare.podIPs = maps.Clone(rare.annotations), slices.Clone(rare.podIPs)
		cp.rare = &rare
	}
	return &cp
}

var _ runtime.Object = (*PodInfo)(nil)

// equalButVersion reports whether p and o differ at most in their
// resource versions.
func (p *PodInfo) equalButVersion(o *PodInfo) bool {
	if p.key != o.key || p.namespace != o.namespace || p.nodeName != o.nodeName || p.serviceAccount != o.serviceAccount ||
		p.ip4 != o.ip4 || p.bits != o.bits || !maps.Equal(p.labels, o.labels) || !slices.Equal(p.Ports(), o.Ports()) {
		return false
	}
	var a, b podRare
	if p.rare != nil {
		a = *p.rare
	}
	if o.rare != nil {
		b = *o.rare
	}
	return maps.Equal(a.annotations, b.annotations) && slices.Equal(a.podIPs, b.podIPs) && a.podIP == b.podIP && a.phase == b.phase
}

// PodStore reads the pod cache. It holds PodInfos, or whole corev1.Pods with
// Options.FullObjects, which it reads as PodInfos.
type PodStore struct {
	indexer cache.Indexer
}

// NewPodStore reads the pods of indexer (tests fill one of their own).
func NewPodStore(indexer cache.Indexer) PodStore { return PodStore{indexer: indexer} }

func asPod(obj any) (*PodInfo, bool) {
	switch o := obj.(type) {
	case *PodInfo:
		return o, true
	case *corev1.Pod:
		return compactPod(o, nil), true
	}
	return nil, false
}

// Get returns the named pod, or an error for which apierrors.IsNotFound
// holds.
func (s PodStore) Get(namespace, name string) (*PodInfo, error) {
	obj, ok, err := s.indexer.GetByKey(podKey(namespace, name))
	if err != nil {
		return nil, err
	}
	if p, isPod := asPod(obj); ok && isPod {
		return p, nil
	}
	return nil, apierrors.NewNotFound(corev1.Resource("pods"), name)
}

// List returns every cached pod.
func (s PodStore) List() []*PodInfo {
	objs := s.indexer.List()
	out := make([]*PodInfo, 0, len(objs))
	for _, o := range objs {
		if p, ok := asPod(o); ok {
			out = append(out, p)
		}
	}
	return out
}
