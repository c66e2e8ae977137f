package k8s

import (
	"maps"
	"slices"
	"unique"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

// PodInfo is what Veil reads of a Pod, and all the agent's pod cache holds.
// Even slimmed, a corev1.Pod costs about 2 KB: its structs are mostly
// fields Veil never sets (a Pod is 1,240 bytes, each Container 408); this
// is about 200 bytes and the label set it shares with the pods of its
// deployment. At 150,000 pods that is the difference between about 300
// and 30 MiB.
//
// Like every object in an informer's cache it is shared: never write it,
// nor its maps and slices.
type PodInfo struct {
	// Namespace, NodeName, ServiceAccount and Phase are interned: every
	// pod of a namespace or node shares one string.
	Namespace, Name string
	// ResourceVersion tells a resync from an update (see unreadChange).
	ResourceVersion string
	// Labels are interned: pods with equal labels share the map.
	Labels map[string]string
	// Annotations are Veil's own (see veilAnnotation); nil for most pods.
	Annotations    map[string]string
	NodeName       string
	ServiceAccount string
	HostNetwork    bool
	Phase          corev1.PodPhase
	// PodIP is status.podIP; PodIPs status.podIPs when they say more.
	PodIP  string
	PodIPs []string
	// Ports are the named container ports, which policies may refer to;
	// interned like Labels: pods with equal lists share the slice.
	Ports []NamedPort
}

// intern returns the one copy of s that every pod shares (a namespace,
// node or service account name is held by thousands of pods).
func intern(s string) string {
	if s == "" {
		return ""
	}
	return unique.Make(s).Value()
}

// NamedPort is a container port with a name.
type NamedPort struct {
	Container string
	Name      string
	Port      int32
	Protocol  corev1.Protocol
}

// compactPod keeps what Veil reads of in; t, when not nil, interns its
// label set and named ports.
func compactPod(in *corev1.Pod, t *transformer) *PodInfo {
	p := &PodInfo{
		Namespace: intern(in.Namespace), Name: in.Name, ResourceVersion: in.ResourceVersion,
		Labels: in.Labels, Annotations: veilAnnotations(in.Annotations),
		NodeName: intern(in.Spec.NodeName), ServiceAccount: intern(in.Spec.ServiceAccountName), HostNetwork: in.Spec.HostNetwork,
		Phase: corev1.PodPhase(intern(string(in.Status.Phase))), PodIP: in.Status.PodIP,
	}
	if t != nil {
		p.Labels = t.labels.intern(in.Labels)
	}
	// Most pods have one IP, the same as podIP: kept once.
	if len(in.Status.PodIPs) > 1 || (len(in.Status.PodIPs) == 1 && in.Status.PodIPs[0].IP != in.Status.PodIP) {
		for _, ip := range in.Status.PodIPs {
			p.PodIPs = append(p.PodIPs, ip.IP)
		}
	}
	for _, c := range in.Spec.Containers {
		for _, cp := range c.Ports {
			if cp.Name != "" {
				p.Ports = append(p.Ports, NamedPort{Container: intern(c.Name), Name: intern(cp.Name), Port: cp.ContainerPort, Protocol: cp.Protocol})
			}
		}
	}
	if t != nil {
		p.Ports = t.ports.intern(p.Ports)
	}
	return p
}

// Object is the pod as a corev1.Pod with only the fields Veil reads, for
// the policy compiler; a new object each call, the caller's to keep.
func (p *PodInfo) Object() *corev1.Pod {
	out := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: p.Namespace, Name: p.Name, ResourceVersion: p.ResourceVersion,
			Labels: p.Labels, Annotations: p.Annotations,
		},
		Spec:   corev1.PodSpec{NodeName: p.NodeName, ServiceAccountName: p.ServiceAccount, HostNetwork: p.HostNetwork},
		Status: corev1.PodStatus{Phase: p.Phase, PodIP: p.PodIP},
	}
	switch {
	case p.PodIPs != nil:
		for _, ip := range p.PodIPs {
			out.Status.PodIPs = append(out.Status.PodIPs, corev1.PodIP{IP: ip})
		}
	case p.PodIP != "":
		out.Status.PodIPs = []corev1.PodIP{{IP: p.PodIP}}
	}
	for _, np := range p.Ports {
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

// GetObjectMeta makes a PodInfo an object the informer's store can key and
// index (meta.Accessor); the meta is made for the call.
func (p *PodInfo) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Namespace: p.Namespace, Name: p.Name, ResourceVersion: p.ResourceVersion, Labels: p.Labels, Annotations: p.Annotations}
}

var _ metav1.ObjectMetaAccessor = (*PodInfo)(nil)

// equalButVersion reports whether p and o differ at most in their
// resource versions.
func (p *PodInfo) equalButVersion(o *PodInfo) bool {
	a, b := *p, *o
	a.ResourceVersion, b.ResourceVersion = "", ""
	return a.Namespace == b.Namespace && a.Name == b.Name && maps.Equal(a.Labels, b.Labels) &&
		maps.Equal(a.Annotations, b.Annotations) && a.NodeName == b.NodeName && a.ServiceAccount == b.ServiceAccount &&
		a.HostNetwork == b.HostNetwork && a.Phase == b.Phase && a.PodIP == b.PodIP && slices.Equal(a.PodIPs, b.PodIPs) &&
		slices.Equal(a.Ports, b.Ports)
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
	obj, ok, err := s.indexer.GetByKey(namespace + "/" + name)
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
