package daemon

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/veilmesh/veil/policy/api/nodeinfo"
)

// resolveNodes decides, from this node's point of view, which node holds
// which pod CIDR, address and key (see nodeinfo.Resolve for the rule). The
// ipcache and the WireGuard peers are both built from its answer, so a node
// is tunnelled exactly where its prefixes are.
func (d *Daemon) resolveNodes(nodes []*corev1.Node) nodeinfo.Cluster {
	return nodeinfo.Resolve(nodes, nodeinfo.Options{Self: d.cfg.NodeName, ClusterCIDRs: d.clusterCIDRs})
}

// syncNodes follows a change of the named Node (nil: deleted): it
// re-asserts this node's annotations when they drifted, and, when what
// some node claims changed, resolves the cluster again, reports refused
// claims and re-derives the WireGuard peers.
func (d *Daemon) syncNodes(ctx context.Context, name string, node *corev1.Node) error {
	if node != nil && name == d.cfg.NodeName {
		if err := d.enc.Reassert(ctx, node); err != nil {
			return err
		}
	}
	if d.claimsUnchanged(name, node) {
		return nil
	}
	nodes, err := d.listers.Nodes.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("list nodes: %w", err)
	}
	c := d.resolveNodes(nodes)
	d.reportConflicts(c)
	// The ipcache follows at once, even if the peers cannot be set now.
	d.mu.Lock()
	d.cluster = c
	d.mu.Unlock()
	d.ipcacheDirty.Store(true)
	if err := d.enc.SyncPeers(ctx, c); err != nil {
		return err
	}
	// Only once the peers are set may unchanged Nodes be skipped.
	claims := make(map[string]nodeinfo.Node, len(nodes))
	for _, n := range nodes {
		claims[n.Name], _ = nodeinfo.Parse(n) // errors were reported by resolveNodes
	}
	d.mu.Lock()
	d.claims = claims
	d.mu.Unlock()
	return nil
}

// claimsUnchanged reports whether node claims what it did at the last
// resolution: most Node events are kubelet status updates that change
// nothing Veil reads, and resolving thousands of nodes for each would cost.
func (d *Daemon) claimsUnchanged(name string, node *corev1.Node) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	prev, known := d.claims[name]
	if node == nil {
		return !known && d.claims != nil
	}
	cur, _ := nodeinfo.Parse(node)
	return known && prev.Equal(cur)
}

// resolvedCluster is the last resolution of the nodes' claims; before the
// worker's first Node sync (a CNI call may write the ipcache that early),
// a resolution of what the Node cache holds now.
func (d *Daemon) resolvedCluster() nodeinfo.Cluster {
	d.mu.Lock()
	c, resolved := d.cluster, d.claims != nil
	d.mu.Unlock()
	if resolved {
		return c
	}
	nodes, err := d.listers.Nodes.List(labels.Everything())
	if err != nil {
		return c
	}
	return d.resolveNodes(nodes)
}

// Reasons of the Events the agent records on Nodes.
const (
	reasonClaimRefused = "VeilClaimRefused"
)

// reportConflicts makes refused claims visible: a Warning Event on the
// claiming Node naming the owner (once per conflict while it lasts), a
// log line, and the veil_node_claim_conflicts metric.
func (d *Daemon) reportConflicts(c nodeinfo.Cluster) {
	cur := map[nodeinfo.Conflict]bool{}
	for _, x := range c.Conflicts {
		cur[x] = true
	}
	d.mu.Lock()
	var added []nodeinfo.Conflict
	for x := range cur {
		if !d.conflicts[x] {
			added = append(added, x)
		}
	}
	d.conflicts = cur
	d.mu.Unlock()
	slices.SortFunc(added, func(a, b nodeinfo.Conflict) int {
		return cmp.Or(strings.Compare(a.Node, b.Node), strings.Compare(a.Kind, b.Kind), strings.Compare(a.Claim, b.Claim))
	})
	for _, x := range added {
		d.log.Warn("node claim refused", "node", x.Node, "owner", x.Owner, "kind", x.Kind, "claim", x.Claim)
		d.events.Event(nodeRef(x.Node), corev1.EventTypeWarning, reasonClaimRefused, x.Error())
	}
	for _, err := range c.Errors {
		d.log.Warn("node fields ignored", "error", err)
	}
}

// nodeRef is how kubelet refers to a Node in Events (its UID is its name).
func nodeRef(name string) *corev1.ObjectReference {
	return &corev1.ObjectReference{Kind: "Node", Name: name, UID: types.UID(name)}
}
