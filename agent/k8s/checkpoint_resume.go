package k8s

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"strconv"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/watchlist"
)

// CheckpointOptions turn on the pod cache's checkpoint (see checkpoint.go).
type CheckpointOptions struct {
	// Path is the checkpoint file (<state dir>/CheckpointFile).
	Path string
	// Node is this agent's node: a checkpoint another node's agent wrote
	// is not resumed from.
	Node string
	// MaxAge: an older checkpoint is not resumed from; 0 means no limit.
	// The API server answers a watch from a version it no longer holds
	// with 410 Gone, and the agent then lists anyway: the limit saves that
	// round trip and a first convergence on pods that old.
	MaxAge time.Duration
	// Interval is how often the checkpoint is rewritten while the cache
	// changes; 0 means 30 s. It is also written when the agent stops.
	Interval time.Duration
	// Log, nil for slog.Default.
	Log *slog.Logger
}

// checkpointer owns the checkpoint: the one the pod informer resumes from,
// and the writes of the cache.
type checkpointer struct {
	opts    CheckpointOptions
	log     *slog.Logger
	indexer cache.Indexer
	synced  func() bool
	// clusterID is the UID of the namespace "default" as cached, or "".
	clusterID func() string
	// lastRV is the version this agent last wrote: the cache has not
	// changed while its version has not. A checkpoint read at start does
	// not set it, as the API server may yet refuse it (another cluster,
	// a version ahead): the first write after a resume writes the same
	// pods again, once.
	lastRV string
	warned bool
}

// loadCheckpoint returns the checkpoint to resume from, or nil to list.
// Nothing about the file fails the start: a damaged one is removed.
func (c *checkpointer) load(now time.Time) *Checkpoint {
	ck, err := ReadCheckpoint(c.opts.Path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		c.log.Info("pod cache: no checkpoint; listing pods", "path", c.opts.Path)
		return nil
	case err != nil:
		c.log.Warn("pod cache: checkpoint unreadable; removing it and listing pods", "path", c.opts.Path, "error", err)
		if err := os.Remove(c.opts.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
			c.log.Warn("pod cache: remove the unreadable checkpoint", "path", c.opts.Path, "error", err)
		}
		return nil
	case ck.Node != c.opts.Node:
		c.log.Warn("pod cache: checkpoint is another node's; listing pods", "path", c.opts.Path, "checkpointNode", ck.Node, "node", c.opts.Node)
		return nil
	case ck.ResourceVersion == "" || ck.ClusterID == "":
		c.log.Warn("pod cache: checkpoint has no resource version or cluster; listing pods", "path", c.opts.Path)
		return nil
	}
	age := now.Sub(ck.Written)
	if c.opts.MaxAge > 0 && age > c.opts.MaxAge {
		c.log.Info("pod cache: checkpoint too old; listing pods", "age", age.Round(time.Second), "maxAge", c.opts.MaxAge, "pods", len(ck.Pods))
		return nil
	}
	c.log.Info("pod cache: checkpoint read; resuming from it once the API server confirms its cluster and version", "age", age.Round(time.Millisecond),
		"pods", len(ck.Pods), "resourceVersion", ck.ResourceVersion)
	return ck
}

// run writes the checkpoint every interval while the cache changes, and
// once more when ctx is done.
func (c *checkpointer) run(ctx context.Context) {
	interval := c.opts.Interval
	if interval <= 0 {
		interval = 30 * time.Second
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if err := c.write(time.Now()); err != nil {
				c.log.Warn("pod cache: write checkpoint at shutdown", "error", err)
			}
			return
		case <-t.C:
			if err := c.write(time.Now()); err != nil {
				c.log.Warn("pod cache: write checkpoint", "error", err)
			}
		}
	}
}

// write writes the cache if it has synced and changed since the last
// write. The version is the store's own, read before its pods: the store
// sets it under its lock with every change it applies (a watch event, a
// bookmark, a whole relist), so the pods listed after it hold every event
// up to it. The reflector's version would not do: the store lags it.
func (c *checkpointer) write(now time.Time) error {
	if !c.synced() {
		return nil
	}
	rv := c.indexer.LastStoreSyncResourceVersion()
	if rv == "" {
		// client-go tracks it only with its AtomicFIFO feature.
		if !c.warned {
			c.warned = true
			c.log.Warn("pod cache: the informer's store keeps no resource version (client-go feature AtomicFIFO off); no checkpoint is written")
		}
		return nil
	}
	if rv == c.lastRV {
		return nil
	}
	cluster := c.clusterID()
	if cluster == "" {
		return errors.New("the namespace default, whose UID names the cluster, is not in the cache")
	}
	objs := c.indexer.List()
	ck := &Checkpoint{ResourceVersion: rv, Written: now, Node: c.opts.Node, ClusterID: cluster, Pods: make([]*PodInfo, 0, len(objs))}
	for _, o := range objs {
		if p, ok := o.(*PodInfo); ok {
			ck.Pods = append(ck.Pods, p)
		}
	}
	start := time.Now()
	if err := WriteCheckpoint(c.opts.Path, ck); err != nil {
		return err
	}
	c.lastRV = rv
	c.log.Debug("pod cache: checkpoint written", "pods", len(ck.Pods), "resourceVersion", rv, "took", time.Since(start))
	return nil
}

// resumingPods lists and watches pods, but answers the informer's first
// list from a checkpoint: the pods it holds, at its version, after which
// the reflector watches from that version. Every later list is a real one,
// so a 410 Gone for a version the API server no longer holds ends in a
// relist as it would without a checkpoint.
//
// The reflector lists either with a List or, with client-go's
// WatchListClient feature (on by default), with a watch that streams the
// initial objects and ends them with a bookmark. The checkpoint answers a
// List: a watch list that would resume is declined with
// errListFromCheckpoint, and the reflector falls back to a List. Streamed,
// each pod cost an event, a bare Pod the transform swapped for its
// PodInfo, and an entry in the reflector's temporary store: about 0.3 s of
// CPU at 150,000 pods. Listed, the PodInfos go to the store as they are,
// in one slice.
type resumingPods struct {
	*cache.ListWatch
	client     any
	namespaces typedcorev1.NamespaceInterface
	log        *slog.Logger

	mu sync.Mutex
	// from returns the checkpoint read at start (or nil), waiting for the
	// read; nil once taken.
	from func() *Checkpoint
	// declined is the checkpoint a watch list took and declined, for the
	// List the reflector falls back to.
	declined *Checkpoint
	// resumedAt is the version the cache was resumed at until the
	// reflector watches from it.
	resumedAt string
	// labels and ports intern label sets and named-port lists (the
	// transformer's); set by internWith.
	labels *labelInterner
	ports  *portsInterner
}

// errListFromCheckpoint declines the watch list that would resume: the
// reflector falls back to a List (it does for any error it does not retry),
// which the checkpoint answers.
var errListFromCheckpoint = errors.New("pod cache: the first list is answered from the checkpoint")

// internWith makes resumed pods share their label sets and named-port
// lists with the pods t compacts, as listed pods share them.
func (l *resumingPods) internWith(t *transformer) {
	l.labels, l.ports = &t.labels, &t.ports
}

// podInfoList is the answer to a List from a checkpoint: its items are the
// PodInfos the cache is to hold, which the transform passes on as they are.
type podInfoList struct {
	metav1.ListMeta
	Items []*PodInfo
}

func (l *podInfoList) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

func (l *podInfoList) DeepCopyObject() runtime.Object {
	out := &podInfoList{ListMeta: *l.ListMeta.DeepCopy(), Items: make([]*PodInfo, len(l.Items))}
	for i, p := range l.Items {
		out.Items[i] = p.DeepCopyObject().(*PodInfo)
	}
	return out
}

func newResumingPods(client kubernetes.Interface, from func() *Checkpoint, log *slog.Logger) *resumingPods {
	pods := client.CoreV1().Pods(metav1.NamespaceAll)
	return &resumingPods{
		ListWatch: &cache.ListWatch{
			ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
				return pods.List(ctx, opts)
			},
			WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
				return pods.Watch(ctx, opts)
			},
		},
		client: client, namespaces: client.CoreV1().Namespaces(), from: from, log: log,
	}
}

// IsWatchListSemanticsUnSupported passes on what the client says (fake
// clientsets do not stream lists).
func (l *resumingPods) IsWatchListSemanticsUnSupported() bool {
	return watchlist.DoesClientNotSupportWatchListSemantics(l.client)
}

// take returns the checkpoint the first time, if it is of this cluster and
// not ahead of it; nil after, and when it is not.
func (l *resumingPods) take(ctx context.Context) *Checkpoint {
	l.mu.Lock()
	defer l.mu.Unlock()
	load := l.from
	l.from = nil
	if load == nil {
		return nil
	}
	c := load()
	if c == nil {
		return nil
	}
	if err := l.verify(ctx, c); err != nil {
		l.log.Warn("pod cache: not resuming from the checkpoint; listing pods", "error", err)
		return nil
	}
	l.log.Info("pod cache: resuming from checkpoint; watching from its version", "age", time.Since(c.Written).Round(time.Millisecond),
		"pods", len(c.Pods), "resourceVersion", c.ResourceVersion)
	return c
}

// verify checks c against the API server: the cluster it names is this
// one, and its version is not ahead of the cluster's (a watch from a
// version the API server has not reached waits for it, and would leave
// the cache as it is until then). One request: the namespace default,
// listed for its UID and the cluster's current version.
func (l *resumingPods) verify(ctx context.Context, c *Checkpoint) error {
	nss, err := l.namespaces.List(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + metav1.NamespaceDefault})
	if err != nil {
		return fmt.Errorf("read the cluster's identity: %w", err)
	}
	if len(nss.Items) != 1 || string(nss.Items[0].UID) != c.ClusterID {
		return fmt.Errorf("the checkpoint is of another cluster (its namespace default has UID %q)", c.ClusterID)
	}
	cur, err1 := strconv.ParseUint(nss.ResourceVersion, 10, 64)
	at, err2 := strconv.ParseUint(c.ResourceVersion, 10, 64)
	if err1 == nil && err2 == nil && at > cur {
		return fmt.Errorf("the checkpoint's version %d is ahead of the API server's %d", at, cur)
	}
	return nil
}

func (l *resumingPods) List(opts metav1.ListOptions) (runtime.Object, error) {
	return l.ListWithContext(context.Background(), opts)
}

func (l *resumingPods) ListWithContext(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
	l.mu.Lock()
	c := l.declined
	l.declined = nil
	l.mu.Unlock()
	if c == nil {
		c = l.take(ctx)
	}
	if c == nil {
		return l.ListWatch.ListWithContext(ctx, opts)
	}
	return l.list(c), nil
}

func (l *resumingPods) Watch(opts metav1.ListOptions) (watch.Interface, error) {
	return l.WatchWithContext(context.Background(), opts)
}

func (l *resumingPods) WatchWithContext(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	if opts.SendInitialEvents != nil && *opts.SendInitialEvents {
		if c := l.take(ctx); c != nil {
			l.mu.Lock()
			l.declined = c
			l.mu.Unlock()
			return nil, errListFromCheckpoint
		}
	}
	w, err := l.ListWatch.WatchWithContext(ctx, opts)
	if !l.firstWatchFrom(opts.ResourceVersion) {
		return w, err
	}
	// The watch that catches up from the checkpoint: why it fails is
	// told, as the reflector relists quietly.
	if err != nil {
		l.expired(err)
		return nil, err
	}
	return newTellingWatch(w, l.expired), nil
}

// tellingWatch passes on a watch's events and tells fail the error of an
// error event that arrives while it is not stopped (a stream stopped
// mid-read may report its closed body).
type tellingWatch struct {
	in   watch.Interface
	out  chan watch.Event
	done chan struct{}
	once sync.Once
}

func newTellingWatch(in watch.Interface, fail func(error)) *tellingWatch {
	w := &tellingWatch{in: in, out: make(chan watch.Event), done: make(chan struct{})}
	go func() {
		defer close(w.out)
		for ev := range in.ResultChan() {
			select {
			case <-w.done:
				return
			default:
			}
			if ev.Type == watch.Error {
				fail(apierrors.FromObject(ev.Object))
			}
			select {
			case w.out <- ev:
			case <-w.done:
				return
			}
		}
	}()
	return w
}

func (w *tellingWatch) ResultChan() <-chan watch.Event { return w.out }

func (w *tellingWatch) Stop() {
	w.once.Do(func() {
		close(w.done)
		w.in.Stop()
	})
}

// firstWatchFrom reports whether a watch from rv is the first from the
// version of the checkpoint the cache was resumed from.
func (l *resumingPods) firstWatchFrom(rv string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.resumedAt == "" || rv != l.resumedAt {
		return false
	}
	l.resumedAt = ""
	return true
}

// list is c's pods as a list at c's version, their label sets and named
// ports interned with the transformer's. c gives its pods up to it.
func (l *resumingPods) list(c *Checkpoint) *podInfoList {
	interned := map[uintptr]map[string]string{}
	for _, p := range c.Pods {
		if p.labels != nil && l.labels != nil {
			set := reflect.ValueOf(p.labels).Pointer()
			m, ok := interned[set]
			if !ok {
				m = l.labels.intern(p.labels)
				interned[set] = m
			}
			p.labels = m
		}
		if l.ports != nil {
			p.ports = l.ports.intern(p.Ports())
		}
	}
	out := &podInfoList{ListMeta: metav1.ListMeta{ResourceVersion: c.ResourceVersion}, Items: c.Pods}
	c.Pods = nil
	l.mu.Lock()
	l.resumedAt = c.ResourceVersion
	l.mu.Unlock()
	return out
}

func (l *resumingPods) expired(err error) {
	if apierrors.IsResourceExpired(err) || apierrors.IsGone(err) {
		l.log.Warn("pod cache: the API server no longer holds the checkpoint's version; listing pods", "error", err)
		return
	}
	l.log.Warn("pod cache: watch from the checkpoint's version failed; listing pods", "error", err)
}
