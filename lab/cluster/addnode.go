package cluster

import (
	"context"
	"fmt"
	"time"

	"k8s.io/client-go/kubernetes"
)

// maxNodes bounds a cluster's nodes: NodeIP numbers them from .11 of the
// underlay's /24.
const maxNodes = 200

// AddNode joins one more node to the running cluster, as a new machine
// joins a real one: its kubelet certificates from the cluster's CA, its
// namespaces on the underlay, containerd with the cluster's images, kubelet
// (and kube-proxy in the cluster's mode). It returns once the node is
// registered with a pod CIDR and the hub routes that CIDR to it; whatever
// runs on every node (Veil's DaemonSet) comes to it by itself. The node is
// appended to Nodes: AddNode must not run while another goroutine reads
// Nodes. On error, what it started stays for Stop to remove.
func (c *Cluster) AddNode(ctx context.Context) (*Node, error) {
	c.addMu.Lock()
	defer c.addMu.Unlock()
	began := time.Now()
	i := len(c.Nodes) + 1
	if i > maxNodes {
		return nil, fmt.Errorf("add node %s: a cluster has at most %d nodes", NodeName(i), maxNodes)
	}
	node := &Node{Index: i, Name: NodeName(i), IP: NodeIP(i), c: c}
	if err := c.writeNodePKI(i); err != nil {
		return nil, fmt.Errorf("add node %s: %w", node.Name, err)
	}
	if err := node.start(ctx, c.names(), c.images); err != nil {
		return nil, fmt.Errorf("add node %s: %w", node.Name, err)
	}
	clients, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return nil, fmt.Errorf("add node %s: create client: %w", node.Name, err)
	}
	if err := c.registered(ctx, clients, node); err != nil {
		return nil, fmt.Errorf("add node %s: %w", node.Name, err)
	}
	c.Nodes = append(c.Nodes, node)
	c.log.Info("node added", "node", node.Name, "ip", node.IP, "podCIDR", node.PodCIDR, "took", time.Since(began).Round(time.Millisecond))
	return node, nil
}
