package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"
	"k8s.io/utils/ptr"

	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/deploy/chart"
	"github.com/veilmesh/veil/lab/controlplane"
)

// LabValues are the chart values every lab sets, as a user of a cluster
// like it would with `helm install --set`: the namespace comes with the
// chart (as in deploy/manifests), and as the hosts of this lab may run
// cgroup v1 (hybrid), where the chart's default cgroupRoot, /sys/fs/cgroup,
// is no cgroup v2 root, cgroupRoot is off; Cluster.Values turns it on
// where the nodes have one.
func LabValues() map[string]any {
	return map[string]any{
		"namespace":   map[string]any{"create": true},
		"cgroupRoot":  "",
		"clusterCIDR": ClusterCIDR.String(),
	}
}

// Values are the chart values for this cluster: LabValues; cgroupRoot
// NodeCgroupRoot when the host has a cgroup v2 hierarchy (each node's own
// subtree of it, where its pods run: socket load-balancing and
// acceleration on); and, on a cluster without kube-proxy, the API server's address on the hub
// (k8sServiceHost/k8sServicePort), which the agents reach directly: the
// kubernetes Service's cluster IP is translated only once an agent has
// loaded its Service load-balancing, which needs the API server, and
// kubeProxyReplacement (the agents translate NodePort traffic).
func (c *Cluster) Values() map[string]any {
	v := LabValues()
	if c.cgroup2 != "" {
		v["cgroupRoot"] = NodeCgroupRoot
	}
	if c.KubeProxy == KubeProxyNone {
		v["k8sServiceHost"] = HubIP.String()
		v["k8sServicePort"] = apiPort
		v["kubeProxyReplacement"] = true
	}
	return v
}

// InstallVeil installs Veil as `helm install` does: the chart's CRDs
// (deploy/crds), then the chart in deploy/helm/veil rendered with values
// (nil means c.Values()) and applied server-side. The agent image must have
// been imported (Options.Images).
func (c *Cluster) InstallVeil(ctx context.Context, values map[string]any) error {
	if values == nil {
		values = c.Values()
	}
	if err := controlplane.InstallCRDs(ctx, c.Config, filepath.Join(c.root, "deploy", "crds")); err != nil {
		return err
	}
	files, err := chart.Render(filepath.Join(c.root, "deploy", "helm", "veil"), deploy.Namespace, values)
	if err != nil {
		return err
	}
	var docs []string
	for _, f := range files {
		docs = append(docs, f.Content)
	}
	objs, err := deploy.DecodeObjects([]byte(strings.Join(docs, "\n---\n")))
	if err != nil {
		return fmt.Errorf("decode the rendered chart: %w", err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("create discovery client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("create dynamic client: %w", err)
	}
	groups, err := restmapper.GetAPIGroupResources(dc)
	if err != nil {
		return fmt.Errorf("discover API resources: %w", err)
	}
	mapper := restmapper.NewDiscoveryRESTMapper(groups)
	for _, o := range objs {
		gvk := o.GroupVersionKind()
		what := gvk.Kind + " " + o.GetNamespace() + "/" + o.GetName()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return fmt.Errorf("map %s: %w", what, err)
		}
		data, err := json.Marshal(o.Object)
		if err != nil {
			return fmt.Errorf("encode %s: %w", what, err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
		}
		if _, err := ri.Patch(ctx, o.GetName(), types.ApplyPatchType, data, metav1.PatchOptions{
			FieldManager: "veil-lab",
			Force:        ptr.To(true),
		}); err != nil {
			return fmt.Errorf("server-side apply %s: %w", what, err)
		}
	}
	c.log.Info("veil installed", "objects", len(objs))
	return nil
}

// WaitNodesReady waits until every node is Ready and has a pod CIDR.
func (c *Cluster) WaitNodesReady(ctx context.Context) error {
	clients, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("create client: %w", err)
	}
	for _, nd := range c.Nodes {
		if err := waitFor(ctx, nd.kubelet, "node "+nd.Name+" Ready with a pod CIDR", func(ctx context.Context) error {
			node, err := clients.CoreV1().Nodes().Get(ctx, nd.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if len(node.Spec.PodCIDRs) == 0 {
				return fmt.Errorf("no pod CIDR")
			}
			for _, cond := range node.Status.Conditions {
				if cond.Type == corev1.NodeReady {
					if cond.Status == corev1.ConditionTrue {
						return nil
					}
					return fmt.Errorf("not ready: %s: %s", cond.Reason, cond.Message)
				}
			}
			return fmt.Errorf("no Ready condition")
		}); err != nil {
			return err
		}
	}
	return nil
}

// Memory returns the resident memory of every process of the cluster
// (control plane, node daemons, containers and their shims), summed by
// process name.
func (c *Cluster) Memory() (map[string]int64, error) {
	pids, err := cgroupPIDs(c.names().cgroup())
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for _, pid := range pids {
		n, err := rss(pid)
		if err != nil {
			continue // exited meanwhile
		}
		out[procName(pid)] += n
	}
	return out, nil
}

// PIDs returns every process of the cluster, from its cgroups.
func (c *Cluster) PIDs() ([]int, error) { return cgroupPIDs(c.names().cgroup()) }

// LogTails returns the last n bytes of the log of every process the
// cluster started, by process name, for a failed test's output.
func (c *Cluster) LogTails(n int64) map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]string{}
	for _, p := range c.procs {
		out[p.name] = p.logTail(n)
	}
	return out
}
