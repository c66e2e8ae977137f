package policy

import (
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
)

// Batch applies many changes and recompiles once, reporting their combined
// Changes. An agent's initial sync should use it: applied one by one, every
// new identity would patch every group that can see it, once per pod.
//
//	ch := c.Batch(func(b *policy.Batch) {
//		for _, p := range pods {
//			b.UpsertPod(p)
//		}
//	})
//
// The compiler is locked for the duration of fn; fn must not call methods
// of the Compiled itself.
func (c *Compiled) Batch(fn func(b *Batch)) Changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	fn(&Batch{c: c})
	return c.flush()
}

// Batch collects changes inside Compiled.Batch. Its methods mirror the
// Upsert*/Delete* methods of Compiled.
type Batch struct{ c *Compiled }

func (b *Batch) UpsertNamespace(ns *corev1.Namespace) {
	if ns != nil {
		b.c.upsertNamespace(ns)
	}
}

func (b *Batch) DeleteNamespace(name string) { b.c.deleteNamespace(name) }

func (b *Batch) UpsertPod(pod *corev1.Pod) {
	if pod != nil {
		b.c.upsertPod(pod)
	}
}

func (b *Batch) DeletePod(namespace, name string) { b.c.deletePod(EndpointID{namespace, name}) }

func (b *Batch) UpsertNode(node *corev1.Node) {
	if node != nil {
		b.c.upsertNode(node)
	}
}

func (b *Batch) DeleteNode(name string) { delete(b.c.nodes, name) }

func (b *Batch) UpsertNetworkPolicy(np *networkingv1.NetworkPolicy) {
	if np != nil {
		b.c.installPolicy(PolicyRef{KindNetworkPolicy, np.Namespace, np.Name}, func() (*parsedPolicy, *PolicyError) { return parseNetworkPolicy(np) })
	}
}

func (b *Batch) DeleteNetworkPolicy(namespace, name string) {
	b.c.removePolicy(PolicyRef{KindNetworkPolicy, namespace, name})
}

func (b *Batch) UpsertMeshPolicy(mp *v1alpha1.MeshPolicy) {
	if mp != nil {
		b.c.installPolicy(PolicyRef{KindMeshPolicy, mp.Namespace, mp.Name}, func() (*parsedPolicy, *PolicyError) { return parseMeshPolicy(mp) })
	}
}

func (b *Batch) DeleteMeshPolicy(namespace, name string) {
	b.c.removePolicy(PolicyRef{KindMeshPolicy, namespace, name})
}

func (b *Batch) UpsertClusterMeshPolicy(cmp *v1alpha1.ClusterMeshPolicy) {
	if cmp != nil {
		b.c.installPolicy(PolicyRef{KindClusterMeshPolicy, "", cmp.Name}, func() (*parsedPolicy, *PolicyError) { return parseClusterMeshPolicy(cmp) })
	}
}

func (b *Batch) DeleteClusterMeshPolicy(name string) {
	b.c.removePolicy(PolicyRef{KindClusterMeshPolicy, "", name})
}
