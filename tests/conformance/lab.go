package conformance

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/lab/controlplane"
)

// Mode is one way the lab's cluster is set up for a run.
type Mode struct {
	// ID names the mode's results dirs.
	ID string
	// Name is the results table's.
	Name string
	// KubeProxy is how the nodes run kube-proxy: nftables or iptables
	// mode beside Veil, or none (Veil's own Service translation alone).
	KubeProxy cluster.KubeProxyMode
	// Values are Veil's chart values (over the cluster's own, top-level
	// keys replacing them).
	Values map[string]any
}

// StrictValues turn on WireGuard with strict mode: no pod byte crosses
// nodes outside the tunnel, which is how the tests must pass.
func StrictValues() map[string]any {
	return map[string]any{"encryption": map[string]any{"type": "wireguard", "strictMode": true}}
}

// StrictNodeToNodeValues are StrictValues with node-to-node encryption:
// host traffic between nodes, and from a node to another node's pods, is
// routed into the tunnel too.
func StrictNodeToNodeValues() map[string]any {
	return map[string]any{"encryption": map[string]any{"type": "wireguard", "strictMode": true, "nodeToNode": true}}
}

// Lab is a running cluster with Veil installed and the e2e images
// imported, ready for e2e.test.
type Lab struct {
	Cluster *cluster.Cluster
	Bins    controlplane.E2EBinaries
	// HubKubeconfig reaches the API server from the hub's namespace.
	HubKubeconfig string
	// Unsupported are images the tests name that the lab has no stand-in
	// for; tests that run them fail to start their pods.
	Unsupported []string
	Startup     time.Duration
}

// LabOptions tune StartLab.
type LabOptions struct {
	Prefix string
	Nodes  int
	// AgentImage is `make image`'s tarball.
	AgentImage string
	Mode       Mode
	// WorkDir receives the images and the kubeconfig.
	WorkDir string
	Logger  *slog.Logger
}

// StartLab builds (or finds cached) e2e.test, agnhost and kubectl, builds
// the images the tests use, starts the cluster with them, installs Veil and
// waits until every node is Ready and every agent runs. The caller must
// Stop the lab's Cluster.
func StartLab(ctx context.Context, opts LabOptions) (*Lab, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	bins, err := controlplane.BuildE2E(ctx)
	if err != nil {
		return nil, err
	}
	cbins, err := controlplane.BuildCluster(ctx)
	if err != nil {
		return nil, err
	}
	refs, err := ListImages(ctx, bins.E2ETest)
	if err != nil {
		return nil, err
	}
	root, err := controlplane.RepoRoot()
	if err != nil {
		return nil, err
	}
	imgDir := filepath.Join(opts.WorkDir, "images")
	if err := os.MkdirAll(imgDir, 0o755); err != nil {
		return nil, fmt.Errorf("create image dir: %w", err)
	}
	pause := filepath.Join(imgDir, "pause")
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", pause, "./lab/cluster/image/pause")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build the pause binary: %w: %s", err, out)
	}
	images, unsupported, err := BuildImages(ctx, imgDir, bins.Agnhost, bins.Source, pause, refs)
	if err != nil {
		return nil, err
	}
	log.Info("e2e images built", "images", len(images), "without stand-in", len(unsupported))

	began := time.Now()
	// Up, as `meshctl lab up` does: Veil from its chart, the agents and
	// their WireGuard peers ready, the cluster DNS (CoreDNS behind
	// kube-system/kube-dns) answering, and each node's pods in its own
	// cgroup2 subtree for socket load-balancing. No demo: the tests make
	// their own namespaces, and the demo's policy would only add load.
	c, err := cluster.Up(ctx, cluster.UpOptions{
		Options: cluster.Options{
			Prefix:    opts.Prefix,
			Nodes:     opts.Nodes,
			Binaries:  cbins,
			Images:    append([]string{opts.AgentImage}, images...),
			KubeProxy: opts.Mode.KubeProxy,
			Logger:    log,
		},
		Values: opts.Mode.Values,
		NoDemo: true,
	})
	if err != nil {
		return nil, err
	}
	lab := &Lab{Cluster: c, Bins: bins, Unsupported: unsupported, Startup: time.Since(began)}
	lab.HubKubeconfig = filepath.Join(opts.WorkDir, "kubeconfig-hub")
	if err := controlplane.WriteKubeconfig(lab.HubKubeconfig, c.HubConfig()); err != nil {
		return nil, fmt.Errorf("%w (and stop the cluster: %v)", err, c.Stop())
	}
	return lab, nil
}

// Run is a Run of the lab's e2e.test in the hub's namespace.
func (l *Lab) Run(focus, skip string, timeout time.Duration, reportDir string) Run {
	return Run{
		E2ETest:    l.Bins.E2ETest,
		Kubectl:    l.Bins.Kubectl,
		Netns:      l.Cluster.HubNetnsPath(),
		Kubeconfig: l.HubKubeconfig,
		Focus:      focus,
		Skip:       skip,
		Nodes:      len(l.Cluster.Nodes),
		Timeout:    timeout,
		ReportDir:  reportDir,
	}
}
