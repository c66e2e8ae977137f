package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/k8s"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/api/nodeinfo"
	"github.com/veilmesh/veil/policy/api/v1alpha1"
	"github.com/veilmesh/veil/policy/identity"
)

func (d *Daemon) worker(ctx context.Context) {
	lastFlush := time.Now()
	for {
		k, shutdown := d.queue.Get()
		if shutdown {
			return
		}
		start := time.Now()
		err := d.sync(ctx, k)
		if err != nil {
			d.log.Warn("sync failed; will retry", "kind", k.Kind, "namespace", k.Namespace, "name", k.Name, "error", err)
			d.queue.AddRateLimited(k)
		} else {
			d.queue.Forget(k)
		}
		d.queue.Done(k)
		// The ipcache is rebuilt from the whole cluster, so a burst of pod
		// events (a start, a scale-up) is flushed once when the queue
		// drains, or at least every flushEvery, not once per event.
		if d.queue.Len() == 0 || time.Since(lastFlush) > flushEvery {
			if ferr := d.flushIPCache(); ferr != nil {
				d.log.Warn("ipcache sync failed; will retry", "error", ferr)
			}
			lastFlush = time.Now()
		}
		d.metrics.reconcile.Observe(time.Since(start).Seconds())
		if err == nil {
			d.lastSync.Store(time.Now().UnixNano())
		}
		if d.queue.Len() == 0 && !d.endpoints.Converged() {
			d.converged()
			d.log.Info("converged with the API server")
			// Connections restored from pinned state are checked once,
			// now that the state they are checked against is complete.
			if err := d.evictRevoked(nil, true); err != nil {
				d.log.Warn("re-check connections", "error", err)
			}
		}
	}
}

// converged marks the agent converged, gives the endpoints wired before
// that their compiled policy in place of deny-all, and makes every endpoint
// whose Pod the API server does not have (restored from the last run, the
// Pod deleted meanwhile) deny-all instead of keeping its old policy.
func (d *Daemon) converged() {
	rewrite, rest := d.endpoints.Converge()
	for _, ep := range rest {
		if _, ok := d.compiler.Endpoint(ep.Pod); !ok {
			rewrite = append(rewrite, ep)
		}
	}
	for _, ep := range rewrite {
		if err := d.writeEndpoint(ep.Pod); err != nil {
			// It keeps denying; the next change of its pod retries.
			d.log.Warn("write policy of endpoint after convergence", "pod", ep.Pod, "error", err)
		}
	}
	if len(rewrite) > 0 {
		d.endpoints.Changed()
	}
}

// flushEvery bounds how stale the ipcache may get during a burst of events.
const flushEvery = 250 * time.Millisecond

// flushIPCache writes the ipcache and re-checks the connections whose peer
// it changed.
func (d *Daemon) flushIPCache() error {
	if !d.ipcacheDirty.Swap(false) {
		return nil
	}
	changed, err := d.syncIPCache()
	if err != nil {
		d.ipcacheDirty.Store(true)
	}
	return errors.Join(err, d.evictRevoked(changed, false))
}

// sync converges one object: the compiler learns its current state from the
// cache, and what changed reaches the datapath.
func (d *Daemon) sync(ctx context.Context, k k8s.Key) error {
	var ch policy.Changes
	switch k.Kind {
	case k8s.Pod:
		pod, err := d.listers.Pods.Pods(k.Namespace).Get(k.Name)
		if apierrors.IsNotFound(err) {
			ch = d.compiler.DeletePod(k.Namespace, k.Name)
		} else if err != nil {
			return err
		} else {
			ch = d.compiler.UpsertPod(d.withLocalIP(pod))
			// Annotations change no policy, so the compiler does not
			// report them; a local pod's datapath record may still need
			// its acceleration opt-out.
			ep, ok := d.endpoints.Get(policy.EndpointID{Namespace: k.Namespace, Name: k.Name})
			if ok && ep.NoAccel != optedOut(pod.Annotations[AccelerationAnnotation]) {
				if err := d.writeEndpoint(ep.Pod); err != nil {
					return err
				}
			}
		}
	case k8s.Namespace:
		ns, err := d.listers.Namespaces.Get(k.Name)
		if apierrors.IsNotFound(err) {
			ch = d.compiler.DeleteNamespace(k.Name)
		} else if err != nil {
			return err
		} else {
			ch = d.compiler.UpsertNamespace(ns)
		}
	case k8s.Node:
		node, err := d.listers.Nodes.Get(k.Name)
		if apierrors.IsNotFound(err) {
			ch = d.compiler.DeleteNode(k.Name)
		} else if err != nil {
			return err
		} else {
			ch = d.compiler.UpsertNode(node)
		}
		// Node addresses and pod CIDRs live in the ipcache, keys in the
		// peers: syncNodes marks the ipcache for rewriting when a node's
		// claims changed, and only then (not on every kubelet heartbeat).
		if err := d.syncNodes(ctx, k.Name, node); err != nil {
			return err
		}
	case k8s.NetworkPolicy:
		np, err := d.listers.NetworkPolicies.NetworkPolicies(k.Namespace).Get(k.Name)
		if apierrors.IsNotFound(err) {
			ch = d.compiler.DeleteNetworkPolicy(k.Namespace, k.Name)
		} else if err != nil {
			return err
		} else {
			ch = d.compiler.UpsertNetworkPolicy(np)
		}
	case k8s.MeshPolicy:
		mp, err := d.listers.MeshPolicies.MeshPolicies(k.Namespace).Get(k.Name)
		if apierrors.IsNotFound(err) {
			ch = d.compiler.DeleteMeshPolicy(k.Namespace, k.Name)
		} else if err != nil {
			return err
		} else {
			ch = d.compiler.UpsertMeshPolicy(mp)
			if err := d.apply(ch); err != nil {
				return err
			}
			return d.writeMeshPolicyStatus(ctx, mp)
		}
	case k8s.ClusterMeshPolicy:
		cmp, err := d.listers.ClusterMeshPolicies.Get(k.Name)
		if apierrors.IsNotFound(err) {
			ch = d.compiler.DeleteClusterMeshPolicy(k.Name)
		} else if err != nil {
			return err
		} else {
			ch = d.compiler.UpsertClusterMeshPolicy(cmp)
			if err := d.apply(ch); err != nil {
				return err
			}
			return d.writeClusterMeshPolicyStatus(ctx, cmp)
		}
	}
	return d.apply(ch)
}

// withLocalIP returns pod with the address this node's IPAM gave it, when
// the API server does not know it yet (kubelet writes the pod IP only after
// CNI ADD returns, and policy must be in place before the pod runs).
func (d *Daemon) withLocalIP(pod *corev1.Pod) *corev1.Pod {
	if pod.Spec.NodeName != d.cfg.NodeName || pod.Spec.HostNetwork || pod.Status.PodIP != "" {
		return pod
	}
	ep, ok := d.endpoints.Get(policy.EndpointID{Namespace: pod.Namespace, Name: pod.Name})
	if !ok {
		return pod
	}
	cp := pod.DeepCopy()
	cp.Status.PodIP = ep.IP.String()
	cp.Status.PodIPs = []corev1.PodIP{{IP: ep.IP.String()}}
	return cp
}

// apply writes what a compiler mutation changed into the datapath.
func (d *Daemon) apply(ch policy.Changes) error {
	var errs []error
	var changedIPs []netip.Prefix
	for _, id := range ch.Endpoints {
		ep, ok := d.endpoints.Get(id)
		if !ok {
			continue
		}
		if err := d.writeEndpoint(id); err != nil {
			errs = append(errs, err)
			continue
		}
		changedIPs = append(changedIPs, netip.PrefixFrom(ep.IP, ep.IP.BitLen()))
	}
	if ch.IPCache || len(ch.Removed) > 0 {
		d.ipcacheDirty.Store(true)
	}
	if ch.CIDRTable {
		want := map[netip.Prefix]identity.ID{}
		for _, e := range d.compiler.CIDRTable() {
			want[e.Prefix] = e.ID
		}
		errs = append(errs, d.dp.SetCIDRs(want))
	}
	if len(changedIPs) > 0 {
		errs = append(errs, d.evictRevoked(changedIPs, false))
	}
	if len(changedIPs) > 0 || ch.IPCache {
		d.endpoints.Changed()
	}
	return errors.Join(errs...)
}

// writeEndpoint brings one local endpoint's datapath record and policy in
// line with the compiler. An endpoint no longer registered is left alone.
func (d *Daemon) writeEndpoint(id policy.EndpointID) error {
	ep, ok := d.endpoints.Get(id)
	if !ok {
		return nil
	}
	cep, ok := d.compiler.Endpoint(ep.Pod)
	ident := identity.Unmanaged
	if ok {
		ident = cep.Identity
	}
	hostMAC, podMAC, err := ep.MACs()
	if err != nil {
		return err
	}
	noAccel := d.accelerationOptOut(ep.Pod)
	if ident != ep.Identity || noAccel != ep.NoAccel {
		if err := d.dp.UpsertEndpoint(datapath.Endpoint{
			IP: ep.IP, ID: ep.ID, Identity: ident, Ifindex: ep.HostIfindex, HostMAC: hostMAC, MAC: podMAC,
			NoAcceleration: noAccel,
		}); err != nil {
			return fmt.Errorf("update endpoint %s: %w", ep.Pod, err)
		}
		d.endpoints.Recorded(ep.Pod, ident, noAccel)
	}
	entries, defaults := cep.Entries, cep.Defaults
	if !ok || ep.Pending {
		// Unmanaged (its Pod is unknown) or compiled against a policy set
		// that is not complete yet: deny both ways, never allow, until
		// the pod is known and the agent has converged.
		entries, defaults = nil, denyAll
	}
	component := failedClosedPrefix + ep.Pod.String()
	if err := d.dp.SetPolicy(ep.IP, entries, defaults); err != nil {
		var perr *datapath.PolicyUpdateError
		if errors.As(err, &perr) && perr.FailedClosed {
			d.setDegraded(component, err.Error())
		}
		return fmt.Errorf("set policy of %s: %w", ep.Pod, err)
	}
	d.clearDegraded(component)
	return nil
}

// failedClosedPrefix starts the degraded component of an endpoint whose
// policy could not be written and that therefore denies everything.
const failedClosedPrefix = "policy of endpoint "

// failedClosed lists the degraded reasons of endpoints that fail closed.
func (d *Daemon) failedClosed() []string {
	var out []string
	d.degraded.Range(func(k, v any) bool {
		if strings.HasPrefix(k.(string), failedClosedPrefix) {
			out = append(out, v.(string))
		}
		return true
	})
	sort.Strings(out)
	return out
}

// denyAll is the policy of an endpoint whose real policy is not known.
var denyAll = policy.Defaults{
	IngressEnforce: policy.Deny, IngressAudit: policy.Deny,
	EgressEnforce: policy.Deny, EgressAudit: policy.Deny,
}

// tunnelKind is the ipcache flag for prefixes hosted by the named node.
func (d *Daemon) tunnelKind(node string) datapath.IPCacheKind {
	if d.enc.Tunnelled(node) {
		return datapath.Tunnel
	}
	return 0
}

// AccelerationAnnotation on a pod set to "false" keeps its TCP connections
// off socket acceleration (for applications that splice(2) sockets).
const AccelerationAnnotation = "veil.dev/socket-acceleration"

// accelerationOptOut reports whether the pod opted out of acceleration.
func (d *Daemon) accelerationOptOut(id policy.EndpointID) bool {
	pod, err := d.listers.Pods.Pods(id.Namespace).Get(id.Name)
	if err != nil {
		return false
	}
	return optedOut(pod.Annotations[AccelerationAnnotation])
}

func optedOut(v string) bool {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "false", "off", "disabled", "no":
		return true
	}
	return false
}

// wantIPCache is what the ipcache should hold for the resolved nodes and
// the compiler's pods. The WireGuard peers come from the same resolution,
// so a node's prefixes carry the tunnel flag exactly when it is a peer, and
// are forwarded toward the address its tunnel uses.
func (d *Daemon) wantIPCache(c nodeinfo.Cluster) map[netip.Prefix]datapath.IPCacheEntry {
	want := map[netip.Prefix]datapath.IPCacheEntry{}
	nodeIPs := map[string]netip.Addr{}
	self := netip.PrefixFrom(d.nodeIP, 32)
	for _, n := range c.Nodes {
		if n.Name == d.cfg.NodeName {
			nodeIPs[n.Name] = d.nodeIP
			for _, a := range n.Addrs() {
				if a.Is4() {
					want[netip.PrefixFrom(a, 32)] = datapath.IPCacheEntry{Identity: identity.Host, NodeIP: d.nodeIP, Kind: datapath.NodeAddr}
				}
			}
			continue
		}
		ip := n.IP()
		if !ip.IsValid() {
			continue
		}
		nodeIPs[n.Name] = ip
		// A peer's own addresses are in its allowed IPs when peerNodeAddrs:
		// pods reach them through the tunnel then.
		var nodeTunnel datapath.IPCacheKind
		if d.enc.PeerNodeAddrs() {
			nodeTunnel = d.tunnelKind(n.Name)
		}
		for _, a := range n.Addrs() {
			if a.Is4() && netip.PrefixFrom(a, 32) != self {
				kind := datapath.NodeAddr
				if slices.Contains(n.InternalIPs, a) {
					kind |= nodeTunnel
				}
				want[netip.PrefixFrom(a, 32)] = datapath.IPCacheEntry{Identity: identity.RemoteNode, NodeIP: ip, Kind: kind}
			}
		}
		for _, cidr := range n.PodCIDRs {
			if cidr.Addr().Is4() {
				want[cidr] = datapath.IPCacheEntry{Identity: identity.World, NodeIP: ip, Kind: datapath.PodCIDR | d.tunnelKind(n.Name)}
			}
		}
	}
	want[self] = datapath.IPCacheEntry{Identity: identity.Host, NodeIP: d.nodeIP, Kind: datapath.NodeAddr}
	for _, e := range d.compiler.IPCache() {
		if !e.IP.Is4() || e.Node == d.cfg.NodeName {
			continue
		}
		nip, ok := nodeIPs[e.Node]
		if !ok {
			continue
		}
		want[netip.PrefixFrom(e.IP, 32)] = datapath.IPCacheEntry{Identity: e.Identity, NodeIP: nip, Kind: datapath.RemotePod | d.tunnelKind(e.Node)}
	}
	return want
}

// syncIPCache makes the ipcache match the cluster: remote pods, other nodes'
// addresses and pod CIDRs, and this node's own address. It returns the
// prefixes it wrote or removed.
func (d *Daemon) syncIPCache() ([]netip.Prefix, error) {
	want := d.wantIPCache(d.resolvedCluster())

	d.mu.Lock()
	defer d.mu.Unlock()
	var (
		errs    []error
		changed []netip.Prefix
	)
	for p, e := range want {
		if old, ok := d.ipcache[p]; ok && old == e {
			continue
		}
		if err := d.dp.UpsertIPCache(p, e); err != nil {
			errs = append(errs, err)
			continue
		}
		d.ipcache[p] = e
		changed = append(changed, p)
	}
	for p := range d.ipcache {
		if _, ok := want[p]; ok {
			continue
		}
		if err := d.dp.DeleteIPCache(p); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(d.ipcache, p)
		changed = append(changed, p)
	}
	return changed, errors.Join(errs...)
}

// evictRevoked removes connections that policy no longer allows, so neither
// conntrack nor socket acceleration lets them outlive their permission. Only
// connections with an end in changed (a changed endpoint's address, an
// ipcache prefix whose identity moved) are re-checked, unless all: nothing
// any other connection's verdict depends on changed.
//
// Never before the agent has converged: a half-rebuilt compiler traces
// unknown peers as denied, and would revoke allowed connections.
func (d *Daemon) evictRevoked(changed []netip.Prefix, all bool) error {
	if !d.endpoints.Converged() || (!all && len(changed) == 0) {
		return nil
	}
	n, err := d.dp.EvictFlows(revocationCheck(d.compiler, changed, all))
	if n > 0 {
		d.log.Info("evicted connections that policy no longer allows", "count", n)
	}
	return err
}

// revocationCheck is what EvictFlows asks about a connection, in the
// direction that opened it: whether policy now denies it. Connections with
// no end in changed are not traced (a trace resolves peers by address among
// every pod) and stay, unless all.
func revocationCheck(c *policy.Compiled, changed []netip.Prefix, all bool) func(datapath.FlowKey) bool {
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

func (d *Daemon) writeMeshPolicyStatus(ctx context.Context, mp *v1alpha1.MeshPolicy) error {
	ref := policy.PolicyRef{Kind: policy.KindMeshPolicy, Namespace: mp.Namespace, Name: mp.Name}
	c := acceptedCondition(d.compiler.PolicyError(ref), mp.Generation)
	if !statusNeedsUpdate(&mp.Status, c) {
		return nil
	}
	cp := mp.DeepCopy()
	meta.SetStatusCondition(&cp.Status.Conditions, c)
	cp.Status.ObservedGeneration = mp.Generation
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err := d.veil.PolicyV1alpha1().MeshPolicies(mp.Namespace).UpdateStatus(cctx, cp, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		return nil // a newer version is on its way through the informer
	}
	if err != nil {
		return fmt.Errorf("write status of MeshPolicy %s/%s: %w", mp.Namespace, mp.Name, err)
	}
	return nil
}

func (d *Daemon) writeClusterMeshPolicyStatus(ctx context.Context, cmp *v1alpha1.ClusterMeshPolicy) error {
	ref := policy.PolicyRef{Kind: policy.KindClusterMeshPolicy, Name: cmp.Name}
	c := acceptedCondition(d.compiler.PolicyError(ref), cmp.Generation)
	if !statusNeedsUpdate(&cmp.Status, c) {
		return nil
	}
	cp := cmp.DeepCopy()
	meta.SetStatusCondition(&cp.Status.Conditions, c)
	cp.Status.ObservedGeneration = cmp.Generation
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err := d.veil.PolicyV1alpha1().ClusterMeshPolicies().UpdateStatus(cctx, cp, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("write status of ClusterMeshPolicy %s: %w", cmp.Name, err)
	}
	return nil
}
