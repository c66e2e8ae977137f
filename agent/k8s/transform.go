package k8s

import (
	"slices"
	"strconv"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/veilmesh/veil/api/annotations"
	"github.com/veilmesh/veil/api/policy/v1alpha1"
)

// The informers keep only what Veil reads. A pod object from the API
// server is mostly spec and status the kubelet needs (containers' images,
// env, probes, volumes, conditions) and managed fields; at 150,000 pods
// those would dominate the agent's memory. The transforms run before an
// object enters the cache, so the rest is never retained; they return
// objects that are equal for what Veil reads (see transform_test.go for the
// list each kind keeps).

// veilAnnotation reports whether an annotation key is Veil's to read.
func veilAnnotation(k string) bool {
	return strings.HasPrefix(k, annotations.WireGuardPrefix) || k == annotations.SocketAcceleration
}

func veilAnnotations(in map[string]string) map[string]string {
	var out map[string]string
	for k, v := range in {
		if veilAnnotation(k) {
			if out == nil {
				out = map[string]string{}
			}
			out[k] = v
		}
	}
	return out
}

// slimMeta keeps the identity of an object, its labels and Veil's
// annotations.
func slimMeta(in *metav1.ObjectMeta, labels map[string]string) metav1.ObjectMeta {
	return metav1.ObjectMeta{
		Name: in.Name, Namespace: in.Namespace, UID: in.UID, ResourceVersion: in.ResourceVersion,
		Generation: in.Generation, CreationTimestamp: in.CreationTimestamp, DeletionTimestamp: in.DeletionTimestamp,
		Labels: labels, Annotations: veilAnnotations(in.Annotations),
	}
}

// slimNode keeps a node's creation time, Veil's annotations, pod CIDRs and
// addresses: what api/nodeinfo parses.
func slimNode(in *corev1.Node) *corev1.Node {
	return &corev1.Node{
		ObjectMeta: slimMeta(&in.ObjectMeta, nil),
		Spec:       corev1.NodeSpec{PodCIDR: in.Spec.PodCIDR, PodCIDRs: in.Spec.PodCIDRs},
		Status:     corev1.NodeStatus{Addresses: in.Status.Addresses},
	}
}

// slimNamespace keeps a namespace's name and labels.
func slimNamespace(in *corev1.Namespace) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: slimMeta(&in.ObjectMeta, in.Labels)}
}

// transformer holds what the transforms share: the interned label sets
// and named ports.
type transformer struct {
	labels labelInterner
	ports  portsInterner
	// corePods keeps slimmed corev1.Pods (Options.CorePods).
	corePods bool
}

// transform keeps a PodInfo of each pod, slims the Nodes and
// Namespaces, and drops the managed
// fields of the rest (policies: their status is written back with an
// update, and an update without managed fields keeps them). Tombstones
// are left as they are.
func (t *transformer) transform(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Pod:
		if t.corePods {
			return compactPod(o, t).Object(), nil
		}
		return compactPod(o, t), nil
	case *corev1.Node:
		return slimNode(o), nil
	case *corev1.Namespace:
		return slimNamespace(o), nil
	case *networkingv1.NetworkPolicy:
		o.ManagedFields = nil
		o.Annotations = veilAnnotations(o.Annotations)
		return o, nil
	case *v1alpha1.MeshPolicy:
		o.ManagedFields = nil
		return o, nil
	case *v1alpha1.ClusterMeshPolicy:
		o.ManagedFields = nil
		return o, nil
	}
	return obj, nil
}

var _ cache.TransformFunc = (&transformer{}).transform

// labelInterner hands out one shared map per distinct label set, so pods
// of one deployment (equal labels) share it. Interned maps must never be
// written, like every object in an informer's cache.
//
// It forgets sets no pod has been interned with for two generations: a
// generation ends when the current one holds as many sets as the last,
// so the interner stays within twice the label sets in recent use, and a
// set forgotten while pods still hold it only loses sharing with pods
// that arrive later.
type labelInterner struct {
	mu   sync.Mutex
	sets generations[map[string]string]
	buf  []string
	key  []byte
}

const minGeneration = 4096

// generations keeps what was interned by key, forgetting what was not
// asked for in two generations (see labelInterner).
type generations[T any] struct {
	cur, prev map[string]T
}

// get returns the value interned under key, else interns and returns
// fresh().
func (g *generations[T]) get(key string, fresh func() T) T {
	if v, ok := g.cur[key]; ok {
		return v
	}
	v, ok := g.prev[key]
	if !ok {
		v = fresh()
	}
	if g.cur == nil || len(g.cur) >= max(minGeneration, len(g.prev)) {
		g.prev, g.cur = g.cur, map[string]T{}
	}
	g.cur[key] = v
	return v
}

func (g *generations[T]) len() int { return len(g.cur) + len(g.prev) }

func (in *labelInterner) intern(ls map[string]string) map[string]string {
	if len(ls) == 0 {
		return nil
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	in.buf = in.buf[:0]
	for k := range ls {
		in.buf = append(in.buf, k)
	}
	slices.Sort(in.buf)
	in.key = in.key[:0]
	for _, k := range in.buf {
		in.key = append(in.key, k...)
		in.key = append(in.key, 0)
		in.key = append(in.key, ls[k]...)
		in.key = append(in.key, 0)
	}
	// The lookup by string(in.key) does not allocate; a new set does.
	if m, ok := in.sets.cur[string(in.key)]; ok {
		return m
	}
	return in.sets.get(string(in.key), func() map[string]string {
		// Label keys repeat across sets (app, tier, version...): the
		// interned sets share one string of each.
		m := make(map[string]string, len(ls))
		for k, v := range ls {
			m[intern(k)] = v
		}
		return m
	})
}

// portsInterner hands out one shared list per distinct list of named
// ports, so pods of one deployment share it (every pod of a workload
// that names its ports would otherwise hold a copy: 112 bytes for two).
// Interned lists must never be written. It forgets as labelInterner.
type portsInterner struct {
	mu    sync.Mutex
	lists generations[*[]NamedPort]
	key   []byte
}

// intern returns the shared copy of ports (nil for none); ports is not
// kept.
func (in *portsInterner) intern(ports []NamedPort) *[]NamedPort {
	if len(ports) == 0 {
		return nil
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	in.key = in.key[:0]
	for _, p := range ports {
		in.key = append(in.key, p.Container...)
		in.key = append(in.key, 0)
		in.key = append(in.key, p.Name...)
		in.key = append(in.key, 0)
		in.key = strconv.AppendInt(in.key, int64(p.Port), 10)
		in.key = append(in.key, 0)
		in.key = append(in.key, p.Protocol...)
		in.key = append(in.key, 0)
	}
	// The lookup by string(in.key) does not allocate; a fresh list does.
	if v, ok := in.lists.cur[string(in.key)]; ok {
		return v
	}
	return in.lists.get(string(in.key), func() *[]NamedPort {
		l := slices.Clone(ports)
		return &l
	})
}

// unreadChange reports whether an update between two slimmed objects
// changed nothing but the resource version: nothing Veil reads. A resync
// (the same version delivered again) is not such a change, so it still
// reaches the handlers.
func unreadChange(old, cur any) bool {
	switch o := old.(type) {
	case *PodInfo:
		c, ok := cur.(*PodInfo)
		return ok && !o.sameVersion(c) && o.equalButVersion(c)
	case *corev1.Pod:
		c, ok := cur.(*corev1.Pod)
		return ok && o.ResourceVersion != c.ResourceVersion && equalButVersion(*o, *c, func(p *corev1.Pod) *metav1.ObjectMeta { return &p.ObjectMeta })
	case *corev1.Node:
		c, ok := cur.(*corev1.Node)
		return ok && o.ResourceVersion != c.ResourceVersion && equalButVersion(*o, *c, func(n *corev1.Node) *metav1.ObjectMeta { return &n.ObjectMeta })
	case *corev1.Namespace:
		c, ok := cur.(*corev1.Namespace)
		return ok && o.ResourceVersion != c.ResourceVersion && equalButVersion(*o, *c, func(n *corev1.Namespace) *metav1.ObjectMeta { return &n.ObjectMeta })
	}
	return false
}

// equalButVersion compares shallow copies of two objects with their
// resource versions cleared.
func equalButVersion[T any](a, b T, meta func(*T) *metav1.ObjectMeta) bool {
	meta(&a).ResourceVersion, meta(&b).ResourceVersion = "", ""
	return equality.Semantic.DeepEqual(&a, &b)
}
