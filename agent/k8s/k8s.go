// Package k8s is the agent's one reader of the API server: the shared
// informers for the objects the agent follows, their listers, and the wait
// for their first list. Its handlers only turn events into Keys.
package k8s

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	kubeinformers "k8s.io/client-go/informers"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	networkinglisters "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/veilmesh/veil/api/client/clientset/versioned"
	veilinformers "github.com/veilmesh/veil/api/client/informers/externalversions"
	veillisters "github.com/veilmesh/veil/api/client/listers/policy/v1alpha1"
)

// Kind says which informer a Key came from.
type Kind int

// The kinds of object the agent follows.
const (
	Pod Kind = iota
	Namespace
	Node
	NetworkPolicy
	MeshPolicy
	ClusterMeshPolicy
)

func (k Kind) String() string {
	return [...]string{"Pod", "Namespace", "Node", "NetworkPolicy", "MeshPolicy", "ClusterMeshPolicy"}[k]
}

// Key names one object of one kind.
type Key struct {
	Kind      Kind
	Namespace string
	Name      string
}

// Listers read the informers' caches.
type Listers struct {
	Pods                PodStore
	Namespaces          corelisters.NamespaceLister
	Nodes               corelisters.NodeLister
	NetworkPolicies     networkinglisters.NetworkPolicyLister
	MeshPolicies        veillisters.MeshPolicyLister
	ClusterMeshPolicies veillisters.ClusterMeshPolicyLister
}

// Watcher owns the agent's informers.
type Watcher struct {
	Listers
	kubeFactory kubeinformers.SharedInformerFactory
	veilFactory veilinformers.SharedInformerFactory
	informers   map[Kind]cache.SharedIndexInformer
	// slim: the caches hold slimmed objects, so an update that leaves
	// them equal changed nothing Veil reads.
	slim bool
	// ckpt writes the pod cache's checkpoint; nil without one.
	ckpt *checkpointer
}

// KubeInformers is the shared informer factory of Kubernetes' own kinds, for
// components that watch kinds of their own (Services, EndpointSlices): they
// register their informers on it before Start, and share its connection.
func (w *Watcher) KubeInformers() kubeinformers.SharedInformerFactory { return w.kubeFactory }

// Options tune the informers.
type Options struct {
	// Resync resyncs every informer that often; 0 never.
	Resync time.Duration
	// FullObjects keeps whole objects in the caches instead of only the
	// fields Veil reads (see transform.go): for measuring what slimming
	// saves, and for nothing else.
	FullObjects bool
	// CorePods keeps pods as slimmed corev1.Pods (PodInfo.Object), as the
	// caches did before PodInfo: for measuring what PodInfo saves, and
	// for nothing else.
	CorePods bool
	// Checkpoint, when set, resumes the pod cache from a checkpoint and
	// keeps one (RunCheckpoints); ignored with FullObjects or CorePods,
	// whose caches hold no PodInfos.
	Checkpoint *CheckpointOptions
}

// New prepares informers for every kind, resyncing every resync (0:
// never); Start starts them.
func New(kube kubernetes.Interface, veil versioned.Interface, resync time.Duration) *Watcher {
	return NewWithOptions(kube, veil, Options{Resync: resync})
}

// NewWithOptions is New with every option.
func NewWithOptions(kube kubernetes.Interface, veil versioned.Interface, opts Options) *Watcher {
	w := &Watcher{
		kubeFactory: kubeinformers.NewSharedInformerFactory(kube, opts.Resync),
		veilFactory: veilinformers.NewSharedInformerFactory(veil, opts.Resync),
	}
	var resumeFrom func() *Checkpoint
	if opts.Checkpoint != nil && !opts.FullObjects && !opts.CorePods {
		w.ckpt = &checkpointer{opts: *opts.Checkpoint, log: cmp.Or(opts.Checkpoint.Log, slog.Default())}
		// Read in the background: decoding 150,000 pods takes about
		// 0.1 s, which the caller's work until Start and the other
		// informers' first lists overlap. The pod informer's first list
		// waits for it.
		loaded := make(chan *Checkpoint, 1)
		go func(now time.Time) { loaded <- w.ckpt.load(now) }(time.Now())
		resumeFrom = func() *Checkpoint { return <-loaded }
	}
	// The pod cache is looked up by key only: without the namespace index
	// informers get by default, which costs an entry per pod of the
	// cluster and work on every pod event.
	var resuming *resumingPods
	pods := w.kubeFactory.InformerFor(&corev1.Pod{}, func(c kubernetes.Interface, resync time.Duration) cache.SharedIndexInformer {
		if w.ckpt != nil {
			resuming = newResumingPods(c, resumeFrom, w.ckpt.log)
			return cache.NewSharedIndexInformer(resuming, &corev1.Pod{}, resync, cache.Indexers{})
		}
		return coreinformers.NewPodInformer(c, metav1.NamespaceAll, resync, cache.Indexers{})
	})
	if w.ckpt != nil {
		w.ckpt.indexer, w.ckpt.synced = pods.GetIndexer(), pods.HasSynced
	}
	core := w.kubeFactory.Core().V1()
	netpols := w.kubeFactory.Networking().V1().NetworkPolicies()
	mesh := w.veilFactory.Policy().V1alpha1()
	w.informers = map[Kind]cache.SharedIndexInformer{
		Pod:               pods,
		Namespace:         core.Namespaces().Informer(),
		Node:              core.Nodes().Informer(),
		NetworkPolicy:     netpols.Informer(),
		MeshPolicy:        mesh.MeshPolicies().Informer(),
		ClusterMeshPolicy: mesh.ClusterMeshPolicies().Informer(),
	}
	if !opts.FullObjects {
		w.slim = true
		t := &transformer{corePods: opts.CorePods}
		if resuming != nil {
			resuming.internWith(t)
		}
		for _, inf := range w.informers {
			// Only fails once started, and nothing has started yet.
			_ = inf.SetTransform(t.transform)
		}
	}
	w.Listers = Listers{
		Pods: PodStore{indexer: pods.GetIndexer()}, Namespaces: core.Namespaces().Lister(), Nodes: core.Nodes().Lister(),
		NetworkPolicies: netpols.Lister(), MeshPolicies: mesh.MeshPolicies().Lister(),
		ClusterMeshPolicies: mesh.ClusterMeshPolicies().Lister(),
	}
	if w.ckpt != nil {
		w.ckpt.clusterID = func() string {
			ns, err := w.Namespaces.Get(metav1.NamespaceDefault)
			if err != nil {
				return ""
			}
			return string(ns.UID)
		}
	}
	return w
}

// OnChange calls fn with the key of every object added, updated or
// deleted after the informers' first lists: what those lists held, the
// caller reads from the caches once WaitForCacheSync returned (Keys, and
// the pod cache whole). Call it before Start.
func (w *Watcher) OnChange(fn func(Key)) error {
	for kind, inf := range w.informers {
		if _, err := inf.AddEventHandler(handler{kind: kind, fn: fn, skipUnread: w.slim}); err != nil {
			return fmt.Errorf("watch %s: %w", kind, err)
		}
	}
	return nil
}

// Start starts the informers; they stop when ctx is done.
func (w *Watcher) Start(ctx context.Context) {
	w.kubeFactory.Start(ctx.Done())
	w.veilFactory.Start(ctx.Done())
}

// RunCheckpoints keeps the pod cache's checkpoint until ctx is done, and
// writes it once more then; it returns at once without one
// (Options.Checkpoint).
func (w *Watcher) RunCheckpoints(ctx context.Context) {
	if w.ckpt != nil {
		w.ckpt.run(ctx)
	}
}

// WaitForCacheSync waits until every informer has listed. While some are
// still waiting it calls waiting with their kinds every report (an API
// server that is away, RBAC that forbids a list, a CRD that is not
// installed), and with nil once all have listed.
func (w *Watcher) WaitForCacheSync(ctx context.Context, report time.Duration, waiting func([]string)) error {
	// Checked often: the agent's first convergence starts when this
	// returns (a few hundred milliseconds into a resumed start).
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	lastReport := time.Now()
	for {
		var left []string
		for kind, inf := range w.informers {
			if !inf.HasSynced() {
				left = append(left, kind.String())
			}
		}
		if len(left) == 0 {
			// The first lists' garbage (every object whole, before the
			// transforms) is given back once the agent converged
			// (policysync), a moment later: a forced collection here
			// too cost a resumed start, whose lists left little
			// garbage, about 0.3 s.
			waiting(nil)
			return nil
		}
		slices.Sort(left)
		if time.Since(lastReport) > report {
			waiting(left)
			lastReport = time.Now()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("informer caches %v did not sync: %w", left, ctx.Err())
		case <-t.C:
		}
	}
}

// Keys returns the key of every cached object but pods, for the first
// convergence after start: namespaces and nodes first so pods compile with
// their namespace labels. The first convergence reads the pods from their
// cache itself, all at once.
func (w *Watcher) Keys() []Key {
	var out []Key
	add := func(kind Kind, objs []metav1.Object) {
		for _, o := range objs {
			out = append(out, Key{Kind: kind, Namespace: o.GetNamespace(), Name: o.GetName()})
		}
	}
	nss, _ := w.Namespaces.List(labels.Everything())
	add(Namespace, metaList(nss))
	nodes, _ := w.Nodes.List(labels.Everything())
	add(Node, metaList(nodes))
	nps, _ := w.NetworkPolicies.List(labels.Everything())
	add(NetworkPolicy, metaList(nps))
	mps, _ := w.MeshPolicies.List(labels.Everything())
	add(MeshPolicy, metaList(mps))
	cmps, _ := w.ClusterMeshPolicies.List(labels.Everything())
	add(ClusterMeshPolicy, metaList(cmps))
	return out
}

func metaList[T metav1.Object](objs []T) []metav1.Object {
	out := make([]metav1.Object, len(objs))
	for i, o := range objs {
		out[i] = o
	}
	return out
}

// handler turns informer events into keys; it never touches objects.
type handler struct {
	kind Kind
	fn   func(Key)
	// skipUnread drops updates that changed only what the transforms
	// dropped (kubelet heartbeats, pod conditions, managed fields): at
	// 5,000 nodes heartbeats alone are hundreds of events a second.
	skipUnread bool
}

func (h handler) key(obj any) (Key, bool) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	if p, ok := obj.(*PodInfo); ok {
		// Its meta names it by its store key (see GetObjectMeta).
		return Key{Kind: h.kind, Namespace: p.Namespace(), Name: p.Name()}, true
	}
	m, err := meta.Accessor(obj)
	if err != nil {
		return Key{}, false
	}
	return Key{Kind: h.kind, Namespace: m.GetNamespace(), Name: m.GetName()}, true
}

func (h handler) OnAdd(obj any, initial bool) {
	// An object of the informer's first list: in the cache before it
	// reports synced, and read from there (see OnChange). Keying each of
	// 150,000 pods here and queueing it once more cost a resumed start
	// about a fifth of its CPU. A relist later (after a 410) is not
	// initial: its objects arrive as changes.
	if initial {
		return
	}
	if k, ok := h.key(obj); ok {
		h.fn(k)
	}
}
func (h handler) OnUpdate(old, obj any) {
	if h.skipUnread && unreadChange(old, obj) {
		return
	}
	h.OnAdd(obj, false)
}
func (h handler) OnDelete(obj any) { h.OnAdd(obj, false) }

var _ cache.ResourceEventHandler = handler{}

// KubeClientConfig is cfg for the client of Kubernetes' own kinds:
// protobuf on the wire, as kubelet and kube-proxy use. The first lists are
// the agent's largest reads (every Pod of the cluster), and protobuf is
// about a third of their JSON's size and several times cheaper to decode.
// Veil's own kinds are custom resources, which the API server serves only
// as JSON: their client keeps cfg as it is.
func KubeClientConfig(cfg *rest.Config) *rest.Config {
	out := rest.CopyConfig(cfg)
	out.ContentType = runtime.ContentTypeProtobuf
	out.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	return out
}
