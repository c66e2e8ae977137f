// Package policysync keeps the node's datapath in line with the cluster: a
// workqueue controller feeds every changed object to the policy compiler and
// writes what changed (endpoint records and policy, the ipcache built from
// the nodes' resolved claims, the CIDR table), evicts connections policy no
// longer allows, and reports policy status conditions.
package policysync

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/endpoints"
	"github.com/veilmesh/veil/agent/k8s"
	"github.com/veilmesh/veil/api/annotations"
	"github.com/veilmesh/veil/api/client/clientset/versioned"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// Datapath is what policy sync writes.
type Datapath interface {
	UpsertEndpoint(datapath.Endpoint) error
	DeleteEndpoint(ip netip.Addr) error
	SetPolicy(ip netip.Addr, entries []policytypes.Entry, defaults policytypes.Defaults) error
	SetCIDRs(map[netip.Prefix]identity.ID) error
	UpsertIPCache(netip.Prefix, datapath.IPCacheEntry) error
	DeleteIPCache(netip.Prefix) error
	EvictFlows(deny func(datapath.FlowKey) bool) (int, error)
}

// Encryption is what the nodes' claims are handed to (agent/encryption).
type Encryption interface {
	Reassert(ctx context.Context, self *corev1.Node) error
	SyncPeers(ctx context.Context, c nodeinfo.Cluster) error
	Tunnelled(node string) bool
}

// Degraded records why a part of the agent works worse than it should.
type Degraded interface {
	Set(component, reason string)
	Clear(component string)
}

// Config is what a Syncer needs.
type Config struct {
	NodeName string
	NodeIP   netip.Addr
	// ClusterCIDRs hold every node's pod CIDR (--cluster-cidr).
	ClusterCIDRs []netip.Prefix
	Compiler     *policy.Compiler
	Datapath     Datapath
	Endpoints    *endpoints.Registry
	Encryption   Encryption
	Listers      k8s.Listers
	// Kube reads a new endpoint's Pod the informer does not have yet.
	Kube kubernetes.Interface
	// Veil writes policy status conditions.
	Veil versioned.Interface
	// Events records refused node claims on the claiming Nodes.
	Events   record.EventRecorder
	Degraded Degraded
	// Synced, when set, is called with how long each sync took.
	Synced func(time.Duration)
	// Converged, when set, is called once the agent first converged.
	Converged func()
	Log       *slog.Logger
}

// Syncer is the controller.
type Syncer struct {
	cfg   Config
	log   *slog.Logger
	queue workqueue.TypedRateLimitingInterface[k8s.Key]
	// ipcacheDirty: what the whole ipcache is built from (the nodes, which
	// are tunnelled) changed since it was last written; podsDirty (under
	// mu) names the pods whose own entries may have changed since, with
	// the addresses they may hold in the ipcache when those changed.
	ipcacheDirty atomic.Bool
	lastSync     atomic.Int64
	// busy: the worker holds a key it has not finished.
	busy atomic.Bool
	// initial holds the keys enqueued before Run started (see Enqueue);
	// started: Run took them, later keys go to the queue.
	initialMu sync.Mutex
	initial   map[k8s.Key]struct{}
	started   bool

	// mu guards what was written to the ipcache and the node claims:
	// cluster is the last resolution of every node's claims, which the
	// ipcache and the peers are built from; claims is what each Node
	// claimed then; conflicts are the refused claims last reported.
	mu        sync.Mutex
	ipc       ipcacheState
	podsDirty map[policy.EndpointID]dirtyPod
	cluster   nodeinfo.Cluster
	claims    map[string]nodeinfo.Node
	conflicts map[nodeinfo.Conflict]bool
}

// New returns a syncer with an empty queue; Run runs it.
func New(cfg Config) *Syncer {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Syncer{
		cfg: cfg, log: cfg.Log,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.DefaultTypedControllerRateLimiter[k8s.Key](),
			workqueue.TypedRateLimitingQueueConfig[k8s.Key]{Name: "veil-agent"}),
		ipc: newIPCacheState(), podsDirty: map[policy.EndpointID]dirtyPod{}, initial: map[k8s.Key]struct{}{},
	}
}

// Enqueue asks for the object of k to be synced.
//
// Until Run starts, keys are kept in a set of the syncer's own, which Run
// drops once it has synced them: the workqueue's sets would keep the room
// for every key queued before the first convergence for the life of the
// agent (before the first lists stopped reaching the handlers, that was
// every pod of the cluster: about 24 MiB at 150,000 pods).
func (s *Syncer) Enqueue(k k8s.Key) {
	s.initialMu.Lock()
	if !s.started {
		s.initial[k] = struct{}{}
		s.initialMu.Unlock()
		return
	}
	s.initialMu.Unlock()
	s.queue.Add(k)
}

// Run syncs queued objects until ctx is done. Start it once the informers'
// caches have synced and every cached object is queued (pods need not be:
// the first convergence reads every cached pod): the first time the queue
// drains, the agent has converged.
func (s *Syncer) Run(ctx context.Context) {
	go func() {
		<-ctx.Done()
		s.queue.ShutDown()
	}()
	s.worker(ctx)
}

// Idle reports whether every key queued so far has been synced (or
// given up on for now and queued again with a delay).
func (s *Syncer) Idle() bool {
	s.initialMu.Lock()
	waiting := len(s.initial)
	s.initialMu.Unlock()
	return waiting == 0 && s.queue.Len() == 0 && !s.busy.Load()
}

// IPCacheStale marks the ipcache for rewriting: something it is built from
// (which nodes are tunnelled) changed.
func (s *Syncer) IPCacheStale() { s.ipcacheDirty.Store(true) }

// LastSync is when an object last synced, in Unix nanoseconds.
func (s *Syncer) LastSync() int64 { return s.lastSync.Load() }

// IPCacheSize is the number of ipcache entries written.
func (s *Syncer) IPCacheSize() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ipc.size()
}

// Conflicts are the node claims refused at the last resolution.
func (s *Syncer) Conflicts() []nodeinfo.Conflict {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]nodeinfo.Conflict, 0, len(s.conflicts))
	for c := range s.conflicts {
		out = append(out, c)
	}
	return out
}

func (s *Syncer) worker(ctx context.Context) {
	lastFlush := time.Now()
	s.busy.Store(true)
	objects, pods := s.takeInitial()
	if !s.firstConvergence(ctx, objects, pods) {
		return
	}
	s.finish(&lastFlush)
	s.busy.Store(false)
	for {
		k, shutdown := s.queue.Get()
		if shutdown {
			return
		}
		s.busy.Store(true)
		start := time.Now()
		err := s.process(ctx, k, true, &lastFlush)
		s.queue.Done(k)
		s.finish(&lastFlush)
		// What a change costs: its sync and the ipcache write it caused.
		s.synced(start, err)
		s.busy.Store(false)
	}
}

// synced records a sync that started at start.
func (s *Syncer) synced(start time.Time, err error) {
	if s.cfg.Synced != nil {
		s.cfg.Synced(time.Since(start))
	}
	if err == nil {
		s.lastSync.Store(time.Now().UnixNano())
	}
}

// takeInitial ends the first convergence's queue and returns its keys in
// the order that costs least: namespaces and nodes first (pods compile
// with their namespace's labels), then policies, sorted; and the pods, in
// no particular order (they are compiled together: see firstConvergence).
func (s *Syncer) takeInitial() (objects, pods []k8s.Key) {
	s.initialMu.Lock()
	defer s.initialMu.Unlock()
	for k := range s.initial {
		if k.Kind == k8s.Pod {
			pods = append(pods, k)
		} else {
			objects = append(objects, k)
		}
	}
	s.initial, s.started = nil, true
	slices.SortFunc(objects, func(a, b k8s.Key) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	return objects, pods
}

// firstConvergence syncs the keys queued before Run: the objects one by
// one, then every pod in one batch (policy.Compiler.UpsertPodsFacts),
// which compiles each of the node's groups once, with the policies and
// every peer in place, rather than once for each pod of the cluster that
// joins one of its selectors; and the ipcache is built once, whole, by
// the flush that follows (finish), rather than while the pods arrive. It
// reports false when ctx ended first.
func (s *Syncer) firstConvergence(ctx context.Context, objects, pods []k8s.Key) bool {
	if !s.syncKeys(ctx, objects) {
		return false
	}
	start := time.Now()
	// Every cached pod, read from the cache as it is now: the queued
	// keys name the same pods (a pod that changes meanwhile is queued
	// again, as after Run every change is).
	cached := s.cfg.Listers.Pods.List()
	ch := s.cfg.Compiler.UpsertPodsFacts(func(yield func(policy.PodFacts) bool) {
		for _, pod := range cached {
			if !yield(s.podFacts(pod)) {
				return
			}
		}
	})
	// A queued pod the cache no longer holds was deleted: the compiler
	// forgets it, if it holds it (an endpoint wired before Run). When it
	// holds no pod besides the cached ones, there is none to forget.
	var single []k8s.Key
	if s.cfg.Compiler.PodCount() != len(cached) {
		for _, k := range pods {
			if _, err := s.cfg.Listers.Pods.Get(k.Namespace, k.Name); err != nil {
				single = append(single, k)
			}
		}
	}
	// Nothing is written per pod before the first convergence (apply):
	// the ipcache is built from the whole cluster once the batch is in.
	s.IPCacheStale()
	err := s.apply(policy.Changes{IPCache: ch.IPCache, CIDRTable: ch.CIDRTable})
	if err != nil {
		s.log.Warn("sync of the cluster's pods failed; will retry", "error", err)
	}
	s.synced(start, err)
	return s.syncKeys(ctx, single)
}

// syncKeys syncs keys one by one during the first convergence (which
// flushes once, at its end); it reports false when ctx ended first.
func (s *Syncer) syncKeys(ctx context.Context, keys []k8s.Key) bool {
	for _, k := range keys {
		if ctx.Err() != nil {
			return false
		}
		start := time.Now()
		err := s.process(ctx, k, false, nil)
		s.synced(start, err)
	}
	return ctx.Err() == nil
}

// process syncs one key; a failure queues it again with a delay. queued:
// k came from the queue (which must forget its failures). lastFlush is
// nil during the first convergence, which flushes once, at its end.
func (s *Syncer) process(ctx context.Context, k k8s.Key, queued bool, lastFlush *time.Time) error {
	err := s.sync(ctx, k)
	if err != nil {
		s.log.Warn("sync failed; will retry", "kind", k.Kind, "namespace", k.Namespace, "name", k.Name, "error", err)
		s.queue.AddRateLimited(k)
	} else if queued {
		s.queue.Forget(k)
	}
	// The ipcache is rebuilt from the whole cluster, so a burst of pod
	// events (a start, a scale-up) is flushed once when the queue
	// drains, or at least every flushEvery, not once per event.
	if lastFlush != nil && time.Since(*lastFlush) > flushEvery {
		s.flush(lastFlush)
	}
	return err
}

func (s *Syncer) flush(lastFlush *time.Time) {
	if err := s.flushIPCache(); err != nil {
		s.log.Warn("ipcache sync failed; will retry", "error", err)
	}
	*lastFlush = time.Now()
}

// finish flushes the ipcache when the queue drained, and converges the
// first time it does.
func (s *Syncer) finish(lastFlush *time.Time) {
	if s.queue.Len() != 0 {
		return
	}
	s.flush(lastFlush)
	if !s.cfg.Endpoints.Converged() {
		s.converged()
		s.log.Info("converged with the API server")
		if s.cfg.Converged != nil {
			s.cfg.Converged()
		}
		// The first lists (every pod of the cluster, decoded whole
		// before the informers slimmed them) leave hundreds of MiB of
		// garbage in a large cluster: give it back to the system once,
		// rather than keep it as the agent's resident size. A forced
		// collection of a heap that size takes a few hundred
		// milliseconds, which the worker need not wait for: it runs
		// beside it.
		go debug.FreeOSMemory()
		// Connections restored from pinned state are checked once,
		// now that the state they are checked against is complete.
		if err := s.evictRevoked(nil, true); err != nil {
			s.log.Warn("re-check connections", "error", err)
		}
	}
}

// converged marks the agent converged and writes every endpoint's compiled
// policy, once (apply wrote none before): the endpoints wired meanwhile get
// it in place of deny-all, those restored from the last run in place of
// their old policy, and one whose Pod the API server does not have (deleted
// meanwhile) deny-all.
func (s *Syncer) converged() {
	pending, rest := s.cfg.Endpoints.Converge()
	rewrite := append(pending, rest...)
	for _, ep := range rewrite {
		if err := s.writeEndpoint(ep.Pod); err != nil {
			// It keeps denying; the next change of its pod retries.
			s.log.Warn("write policy of endpoint after convergence", "pod", ep.Pod, "error", err)
		}
	}
	if len(rewrite) > 0 {
		s.cfg.Endpoints.Changed()
	}
}

// flushEvery bounds how stale the ipcache may get during a burst of events.
const flushEvery = 250 * time.Millisecond

// flushIPCache writes the ipcache and re-checks the connections whose peer
// it changed: all of it when the nodes changed, else only the entries of
// the pods that changed, so a pod change elsewhere costs work for that pod
// alone, whatever the size of the cluster.
func (s *Syncer) flushIPCache() error {
	var (
		changed []netip.Prefix
		err     error
	)
	s.mu.Lock()
	built := s.ipc.built
	s.mu.Unlock()
	if s.ipcacheDirty.Swap(false) || !built {
		changed, err = s.syncIPCache()
		if err != nil {
			s.ipcacheDirty.Store(true)
		}
	} else {
		changed, err = s.syncPodIPCache()
	}
	return errors.Join(err, s.evictRevoked(changed, false))
}

// sync converges one object: the compiler learns its current state from the
// cache, and what changed reaches the datapath.
func (s *Syncer) sync(ctx context.Context, k k8s.Key) error {
	var ch policy.Changes
	switch k.Kind {
	case k8s.Pod:
		pod, err := s.cfg.Listers.Pods.Get(k.Namespace, k.Name)
		if apierrors.IsNotFound(err) {
			ch = s.cfg.Compiler.DeletePod(k.Namespace, k.Name)
		} else if err != nil {
			return err
		} else {
			ch = s.cfg.Compiler.UpsertPodFacts(s.podFacts(pod))
			// Annotations change no policy, so the compiler does not
			// report them; a local pod's datapath record may still need
			// its acceleration opt-out.
			ep, ok := s.cfg.Endpoints.Get(policy.EndpointID{Namespace: k.Namespace, Name: k.Name})
			if ok && ep.NoAccel != optedOut(pod.Annotations()[annotations.SocketAcceleration]) {
				if err := s.writeEndpoint(ep.Pod); err != nil {
					return err
				}
			}
		}
	case k8s.Namespace:
		ns, err := s.cfg.Listers.Namespaces.Get(k.Name)
		if apierrors.IsNotFound(err) {
			ch = s.cfg.Compiler.DeleteNamespace(k.Name)
		} else if err != nil {
			return err
		} else {
			ch = s.cfg.Compiler.UpsertNamespace(ns)
		}
	case k8s.Node:
		node, err := s.cfg.Listers.Nodes.Get(k.Name)
		if apierrors.IsNotFound(err) {
			ch = s.cfg.Compiler.DeleteNode(k.Name)
		} else if err != nil {
			return err
		} else {
			ch = s.cfg.Compiler.UpsertNode(node)
		}
		// Node addresses and pod CIDRs live in the ipcache, keys in the
		// peers: syncNodes marks the ipcache for rewriting when a node's
		// claims changed, and only then (not on every kubelet heartbeat).
		if err := s.syncNodes(ctx, k.Name, node); err != nil {
			return err
		}
	case k8s.NetworkPolicy:
		np, err := s.cfg.Listers.NetworkPolicies.NetworkPolicies(k.Namespace).Get(k.Name)
		if apierrors.IsNotFound(err) {
			ch = s.cfg.Compiler.DeleteNetworkPolicy(k.Namespace, k.Name)
		} else if err != nil {
			return err
		} else {
			ch = s.cfg.Compiler.UpsertNetworkPolicy(np)
		}
	case k8s.MeshPolicy:
		mp, err := s.cfg.Listers.MeshPolicies.MeshPolicies(k.Namespace).Get(k.Name)
		if apierrors.IsNotFound(err) {
			ch = s.cfg.Compiler.DeleteMeshPolicy(k.Namespace, k.Name)
		} else if err != nil {
			return err
		} else {
			ch = s.cfg.Compiler.UpsertMeshPolicy(mp)
			if err := s.apply(ch); err != nil {
				return err
			}
			return s.writeMeshPolicyStatus(ctx, mp)
		}
	case k8s.ClusterMeshPolicy:
		cmp, err := s.cfg.Listers.ClusterMeshPolicies.Get(k.Name)
		if apierrors.IsNotFound(err) {
			ch = s.cfg.Compiler.DeleteClusterMeshPolicy(k.Name)
		} else if err != nil {
			return err
		} else {
			ch = s.cfg.Compiler.UpsertClusterMeshPolicy(cmp)
			if err := s.apply(ch); err != nil {
				return err
			}
			return s.writeClusterMeshPolicyStatus(ctx, cmp)
		}
	}
	return s.apply(ch)
}

// withLocalIP returns pod with the address this node's IPAM gave it, when
// the API server does not know it yet (kubelet writes the pod IP only after
// CNI ADD returns, and policy must be in place before the pod runs).
func (s *Syncer) withLocalIP(pod *corev1.Pod) *corev1.Pod {
	if pod.Spec.NodeName != s.cfg.NodeName || pod.Spec.HostNetwork || pod.Status.PodIP != "" {
		return pod
	}
	ep, ok := s.cfg.Endpoints.Get(policy.EndpointID{Namespace: pod.Namespace, Name: pod.Name})
	if !ok {
		return pod
	}
	cp := pod.DeepCopy()
	cp.Status.PodIP = ep.IP.String()
	cp.Status.PodIPs = []corev1.PodIP{{IP: ep.IP.String()}}
	return cp
}

// podFacts is what the compiler reads of a cached pod, with the address
// this node's IPAM gave it when the API server does not know it yet (as
// withLocalIP), read without building a corev1.Pod.
func (s *Syncer) podFacts(pod *k8s.PodInfo) policy.PodFacts {
	f := policy.PodFacts{
		// A cached pod's labels are never written (interned, shared by
		// every pod with the same set): the compiler keeps them as they are.
		Namespace: pod.Namespace(), Name: pod.Name(), Labels: pod.Labels(), LabelsShared: true, NodeName: pod.NodeName(),
		ServiceAccount: pod.ServiceAccount(), HostNetwork: pod.HostNetwork(),
		Finished: pod.Phase() == corev1.PodSucceeded || pod.Phase() == corev1.PodFailed,
	}
	podIP, podIPs := pod.PodIP(), pod.PodIPs()
	if f.NodeName == s.cfg.NodeName && !f.HostNetwork && podIP == "" {
		if ep, ok := s.cfg.Endpoints.Get(policy.EndpointID{Namespace: f.Namespace, Name: f.Name}); ok {
			f.IPs = []string{ep.IP.String()}
		}
	}
	switch {
	case f.IPs != nil:
	case podIPs != nil:
		f.IPs = append(make([]string, 0, 1+len(podIPs)), podIP)
		f.IPs = append(f.IPs, podIPs...)
	case podIP != "":
		f.IPs = []string{podIP}
	}
	for _, np := range pod.Ports() {
		f.Ports = append(f.Ports, policy.PodPort{Name: np.Name, Protocol: np.Protocol, Port: np.Port})
	}
	return f
}

// apply writes what a compiler mutation changed into the datapath.
func (s *Syncer) apply(ch policy.Changes) error {
	var errs []error
	var changedIPs []netip.Prefix
	// Before the first convergence the compiler holds part of the
	// cluster: an endpoint keeps what its maps hold (its policy from the
	// last run, identities being restored, or deny-all when new) and
	// converged writes each once, rather than once per pod listed that
	// its policy selects.
	converged := s.cfg.Endpoints.Converged()
	for _, id := range ch.Endpoints {
		ep, ok := s.cfg.Endpoints.Get(id)
		if !ok || !converged {
			continue
		}
		if err := s.writeEndpoint(id); err != nil {
			errs = append(errs, err)
			continue
		}
		changedIPs = append(changedIPs, netip.PrefixFrom(ep.IP, ep.IP.BitLen()))
	}
	if ch.IPCache || len(ch.Removed) > 0 || len(ch.Endpoints) > 0 {
		// Every pod whose ipcache entry changed is among them: its
		// identity, addresses or node changed, or it stopped being an
		// endpoint.
		s.mu.Lock()
		// Until the first full build nothing is followed pod by pod.
		if s.ipc.built {
			for _, id := range ch.Endpoints {
				s.markPodDirty(id, ch.PrevIPs)
			}
			for _, id := range ch.Removed {
				s.markPodDirty(id, ch.PrevIPs)
			}
		}
		s.mu.Unlock()
	}
	if ch.CIDRTable {
		want := map[netip.Prefix]identity.ID{}
		for _, e := range s.cfg.Compiler.CIDRTable() {
			want[e.Prefix] = e.ID
		}
		errs = append(errs, s.cfg.Datapath.SetCIDRs(want))
	}
	if len(changedIPs) > 0 {
		errs = append(errs, s.evictRevoked(changedIPs, false))
	}
	if len(changedIPs) > 0 || ch.IPCache {
		s.cfg.Endpoints.Changed()
	}
	return errors.Join(errs...)
}

// writeEndpoint brings one local endpoint's datapath record and policy in
// line with the compiler. An endpoint no longer registered is left alone.
func (s *Syncer) writeEndpoint(id policy.EndpointID) error {
	ep, ok := s.cfg.Endpoints.Get(id)
	if !ok {
		return nil
	}
	cep, ok := s.cfg.Compiler.Endpoint(ep.Pod)
	ident := identity.Unmanaged
	if ok {
		ident = cep.Identity
	}
	hostMAC, podMAC, err := ep.MACs()
	if err != nil {
		return err
	}
	noAccel := s.accelerationOptOut(ep.Pod)
	if ident != ep.Identity || noAccel != ep.NoAccel {
		if err := s.cfg.Datapath.UpsertEndpoint(datapath.Endpoint{
			IP: ep.IP, ID: ep.ID, Identity: ident, Ifindex: ep.HostIfindex, HostMAC: hostMAC, MAC: podMAC,
			NoAcceleration: noAccel,
		}); err != nil {
			return fmt.Errorf("update endpoint %s: %w", ep.Pod, err)
		}
		s.cfg.Endpoints.Recorded(ep.Pod, ident, noAccel)
	}
	entries, defaults := cep.Entries, cep.Defaults
	if !ok || ep.Pending {
		// Unmanaged (its Pod is unknown) or compiled against a policy set
		// that is not complete yet: deny both ways, never allow, until
		// the pod is known and the agent has converged.
		entries, defaults = nil, denyAll
	}
	component := FailedClosedPrefix + ep.Pod.String()
	if err := s.cfg.Datapath.SetPolicy(ep.IP, entries, defaults); err != nil {
		var perr *datapath.PolicyUpdateError
		if errors.As(err, &perr) && perr.FailedClosed {
			s.cfg.Degraded.Set(component, err.Error())
		}
		return fmt.Errorf("set policy of %s: %w", ep.Pod, err)
	}
	s.cfg.Degraded.Clear(component)
	return nil
}

// FailedClosedPrefix starts the degraded component of an endpoint whose
// policy could not be written and that therefore denies everything.
const FailedClosedPrefix = "policy of endpoint "

// denyAll is the policy of an endpoint whose real policy is not known.
var denyAll = policytypes.Defaults{
	IngressEnforce: policytypes.Deny, IngressAudit: policytypes.Deny,
	EgressEnforce: policytypes.Deny, EgressAudit: policytypes.Deny,
}

// tunnelKind is the ipcache flag for prefixes hosted by the named node.
func (s *Syncer) tunnelKind(node string) datapath.IPCacheKind {
	if s.cfg.Encryption.Tunnelled(node) {
		return datapath.Tunnel
	}
	return 0
}

// accelerationOptOut reports whether the pod opted out of acceleration.
func (s *Syncer) accelerationOptOut(id policy.EndpointID) bool {
	pod, err := s.cfg.Listers.Pods.Get(id.Namespace, id.Name)
	if err != nil {
		return false
	}
	return optedOut(pod.Annotations()[annotations.SocketAcceleration])
}

func optedOut(v string) bool {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "false", "off", "disabled", "no":
		return true
	}
	return false
}

// evictRevoked removes connections that policy no longer allows, so neither
// conntrack nor socket acceleration lets them outlive their permission. Only
// connections with an end in changed (a changed endpoint's address, an
// ipcache prefix whose identity moved) are re-checked, unless all: nothing
// any other connection's verdict depends on changed.
//
// Never before the agent has converged: a half-rebuilt compiler traces
// unknown peers as denied, and would revoke allowed connections.
func (s *Syncer) evictRevoked(changed []netip.Prefix, all bool) error {
	if !s.cfg.Endpoints.Converged() || (!all && len(changed) == 0) {
		return nil
	}
	n, err := s.cfg.Datapath.EvictFlows(revocationCheck(s.cfg.Compiler, changed, all))
	if n > 0 {
		s.log.Info("evicted connections that policy no longer allows", "count", n)
	}
	return err
}

// revocationCheck is what EvictFlows asks about a connection, in the
// direction that opened it: whether policy now denies it. Connections with
// no end in changed are not traced (a trace resolves peers by address among
// every pod) and stay, unless all.
func revocationCheck(c *policy.Compiler, changed []netip.Prefix, all bool) func(datapath.FlowKey) bool {
	addrs := map[netip.Addr]bool{}
	var wider []netip.Prefix
	for _, p := range changed {
		if p.IsSingleIP() {
			addrs[p.Addr()] = true
		} else {
			wider = append(wider, p)
		}
	}
	touched := func(ip netip.Addr) bool {
		if addrs[ip] {
			return true
		}
		for _, p := range wider {
			if p.Contains(ip) {
				return true
			}
		}
		return false
	}
	return func(k datapath.FlowKey) bool {
		if !all && !touched(k.Src) && !touched(k.Dst) {
			return false
		}
		tr, err := c.Trace(policy.IPPeer(k.Src), policy.IPPeer(k.Dst), k.Proto, k.DstPort)
		return err == nil && !tr.Allowed
	}
}

func acceptedCondition(perr *policy.PolicyError, generation int64) metav1.Condition {
	c := metav1.Condition{
		Type: v1alpha1.ConditionAccepted, Status: metav1.ConditionTrue,
		Reason: "Compiled", Message: "the policy is enforced", ObservedGeneration: generation,
	}
	if perr != nil {
		c.Status, c.Reason, c.Message = metav1.ConditionFalse, "Invalid", perr.Error()
	}
	return c
}

func statusNeedsUpdate(st *v1alpha1.PolicyStatus, c metav1.Condition) bool {
	old := meta.FindStatusCondition(st.Conditions, c.Type)
	return old == nil || old.Status != c.Status || old.Reason != c.Reason || old.Message != c.Message ||
		old.ObservedGeneration != c.ObservedGeneration
}

func (s *Syncer) writeMeshPolicyStatus(ctx context.Context, mp *v1alpha1.MeshPolicy) error {
	ref := policy.PolicyRef{Kind: policy.KindMeshPolicy, Namespace: mp.Namespace, Name: mp.Name}
	c := acceptedCondition(s.cfg.Compiler.PolicyError(ref), mp.Generation)
	if !statusNeedsUpdate(&mp.Status, c) {
		return nil
	}
	cp := mp.DeepCopy()
	meta.SetStatusCondition(&cp.Status.Conditions, c)
	cp.Status.ObservedGeneration = mp.Generation
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err := s.cfg.Veil.PolicyV1alpha1().MeshPolicies(mp.Namespace).UpdateStatus(cctx, cp, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		return nil // a newer version is on its way through the informer
	}
	if err != nil {
		return fmt.Errorf("write status of MeshPolicy %s/%s: %w", mp.Namespace, mp.Name, err)
	}
	return nil
}

func (s *Syncer) writeClusterMeshPolicyStatus(ctx context.Context, cmp *v1alpha1.ClusterMeshPolicy) error {
	ref := policy.PolicyRef{Kind: policy.KindClusterMeshPolicy, Name: cmp.Name}
	c := acceptedCondition(s.cfg.Compiler.PolicyError(ref), cmp.Generation)
	if !statusNeedsUpdate(&cmp.Status, c) {
		return nil
	}
	cp := cmp.DeepCopy()
	meta.SetStatusCondition(&cp.Status.Conditions, c)
	cp.Status.ObservedGeneration = cmp.Generation
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err := s.cfg.Veil.PolicyV1alpha1().ClusterMeshPolicies().UpdateStatus(cctx, cp, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("write status of ClusterMeshPolicy %s: %w", cmp.Name, err)
	}
	return nil
}

// Enforce writes a freshly claimed endpoint into the compiler and the
// datapath: the compiler learns its address, and its datapath record and
// policy are written before this returns.
func (s *Syncer) Enforce(ctx context.Context, ep endpoints.Endpoint) error {
	// The informer may not have the Pod yet: ask the API server once, so
	// the policy is right from the first packet.
	var pod *corev1.Pod
	cached, err := s.cfg.Listers.Pods.Get(ep.Pod.Namespace, ep.Pod.Name)
	if err == nil {
		pod = cached.Object()
	} else if apierrors.IsNotFound(err) {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		pod, err = s.cfg.Kube.CoreV1().Pods(ep.Pod.Namespace).Get(cctx, ep.Pod.Name, metav1.GetOptions{})
		cancel()
	}
	if err == nil {
		if err := s.apply(s.cfg.Compiler.UpsertPod(s.withLocalIP(pod))); err != nil {
			return err
		}
	} else {
		s.log.Warn("pod of new endpoint unknown; it denies all traffic until the pod appears", "pod", ep.Pod, "error", err)
	}
	if err := s.writeEndpoint(ep.Pod); err != nil {
		return err
	}
	return s.flushIPCache()
}

// Withdraw removes a released endpoint from the datapath and tells the
// compiler its pod is no longer an endpoint here.
func (s *Syncer) Withdraw(ctx context.Context, ep endpoints.Endpoint) error {
	if err := s.cfg.Datapath.DeleteEndpoint(ep.IP); err != nil {
		return fmt.Errorf("unregister endpoint %s: %w", ep.Pod, err)
	}
	// The pod keeps its API object for a while; without a local address the
	// compiler drops it as an endpoint.
	var err error
	if pod, gerr := s.cfg.Listers.Pods.Get(ep.Pod.Namespace, ep.Pod.Name); gerr == nil {
		err = s.apply(s.cfg.Compiler.UpsertPod(s.withLocalIP(pod.Object())))
	} else {
		err = s.apply(s.cfg.Compiler.DeletePod(ep.Pod.Namespace, ep.Pod.Name))
	}
	return errors.Join(err, s.flushIPCache())
}

var _ endpoints.Enforcer = (*Syncer)(nil)

// resolveNodes decides, from this node's point of view, which node holds
// which pod CIDR, address and key (see nodeinfo.Resolve for the rule). The
// ipcache and the WireGuard peers are both built from its answer, so a node
// is tunnelled exactly where its prefixes are.
func (s *Syncer) resolveNodes(nodes []*corev1.Node) nodeinfo.Cluster {
	return nodeinfo.Resolve(nodes, nodeinfo.Options{Self: s.cfg.NodeName, ClusterCIDRs: s.cfg.ClusterCIDRs})
}

// syncNodes follows a change of the named Node (nil: deleted): it
// re-asserts this node's annotations when they drifted, and, when what
// some node claims changed, resolves the cluster again, reports refused
// claims and re-derives the WireGuard peers.
func (s *Syncer) syncNodes(ctx context.Context, name string, node *corev1.Node) error {
	if node != nil && name == s.cfg.NodeName {
		if err := s.cfg.Encryption.Reassert(ctx, node); err != nil {
			return err
		}
	}
	if s.claimsUnchanged(name, node) {
		return nil
	}
	nodes, err := s.cfg.Listers.Nodes.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("list nodes: %w", err)
	}
	c := s.resolveNodes(nodes)
	s.reportConflicts(c)
	// The ipcache follows at once, even if the peers cannot be set now.
	s.mu.Lock()
	s.cluster = c
	s.mu.Unlock()
	s.ipcacheDirty.Store(true)
	if err := s.cfg.Encryption.SyncPeers(ctx, c); err != nil {
		return err
	}
	// Only once the peers are set may unchanged Nodes be skipped.
	claims := make(map[string]nodeinfo.Node, len(nodes))
	for _, n := range nodes {
		claims[n.Name], _ = nodeinfo.Parse(n) // errors were reported by resolveNodes
	}
	s.mu.Lock()
	s.claims = claims
	s.mu.Unlock()
	return nil
}

// claimsUnchanged reports whether node claims what it did at the last
// resolution: most Node events are kubelet status updates that change
// nothing Veil reads, and resolving thousands of nodes for each would cost.
func (s *Syncer) claimsUnchanged(name string, node *corev1.Node) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	prev, known := s.claims[name]
	if node == nil {
		return !known && s.claims != nil
	}
	cur, _ := nodeinfo.Parse(node)
	return known && prev.Equal(cur)
}

// ResolvedCluster is the last resolution of the nodes' claims; before the
// worker's first Node sync (a CNI call may write the ipcache that early),
// a resolution of what the Node cache holds now.
func (s *Syncer) ResolvedCluster() nodeinfo.Cluster {
	s.mu.Lock()
	c, resolved := s.cluster, s.claims != nil
	s.mu.Unlock()
	if resolved {
		return c
	}
	nodes, err := s.cfg.Listers.Nodes.List(labels.Everything())
	if err != nil {
		return c
	}
	return s.resolveNodes(nodes)
}

// Reasons of the Events the agent records on Nodes.
const (
	reasonClaimRefused = "VeilClaimRefused"
)

// reportConflicts makes refused claims visible: a Warning Event on the
// claiming Node naming the owner (once per conflict while it lasts), a
// log line, and the veil_node_claim_conflicts metric.
func (s *Syncer) reportConflicts(c nodeinfo.Cluster) {
	cur := map[nodeinfo.Conflict]bool{}
	for _, x := range c.Conflicts {
		cur[x] = true
	}
	s.mu.Lock()
	var added []nodeinfo.Conflict
	for x := range cur {
		if !s.conflicts[x] {
			added = append(added, x)
		}
	}
	s.conflicts = cur
	s.mu.Unlock()
	slices.SortFunc(added, func(a, b nodeinfo.Conflict) int {
		return cmp.Or(strings.Compare(a.Node, b.Node), strings.Compare(a.Kind, b.Kind), strings.Compare(a.Claim, b.Claim))
	})
	for _, x := range added {
		s.log.Warn("node claim refused", "node", x.Node, "owner", x.Owner, "kind", x.Kind, "claim", x.Claim)
		s.cfg.Events.Event(nodeRef(x.Node), corev1.EventTypeWarning, reasonClaimRefused, x.Error())
	}
	for _, err := range c.Errors {
		s.log.Warn("node fields ignored", "error", err)
	}
}

// nodeRef is how kubelet refers to a Node in Events (its UID is its name).
func nodeRef(name string) *corev1.ObjectReference {
	return &corev1.ObjectReference{Kind: "Node", Name: name, UID: types.UID(name)}
}
