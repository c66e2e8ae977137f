package conformance

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/lab/controlplane"
)

// Mode is one way the lab's cluster is set up for a run.
type Mode struct {
	// ID names the mode's results dirs.
	ID string
	// Name is the results table's.
	Name string
	// Values are Veil's chart values (on top of cluster.LabValues).
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
	c, err := cluster.Start(ctx, cluster.Options{
		Prefix:   opts.Prefix,
		Nodes:    opts.Nodes,
		Binaries: cbins,
		Images:   append([]string{opts.AgentImage}, images...),
		Logger:   log,
	})
	if err != nil {
		return nil, err
	}
	lab := &Lab{Cluster: c, Bins: bins, Unsupported: unsupported}
	if err := lab.setUp(ctx, opts); err != nil {
		return nil, fmt.Errorf("%w (and stop the cluster: %v)", err, c.Stop())
	}
	lab.Startup = time.Since(began)
	return lab, nil
}

func (l *Lab) setUp(ctx context.Context, opts LabOptions) error {
	c := l.Cluster
	values := cluster.LabValues()
	for k, v := range opts.Mode.Values {
		values[k] = v
	}
	if err := c.InstallVeil(ctx, values); err != nil {
		return err
	}
	if err := c.WaitNodesReady(ctx); err != nil {
		return err
	}
	clients, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("create clients: %w", err)
	}
	if err := waitAgents(ctx, clients, len(c.Nodes)); err != nil {
		return err
	}
	l.HubKubeconfig = filepath.Join(opts.WorkDir, "kubeconfig-hub")
	return controlplane.WriteKubeconfig(l.HubKubeconfig, c.HubConfig())
}

func waitAgents(ctx context.Context, clients kubernetes.Interface, nodes int) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	for {
		ds, err := clients.AppsV1().DaemonSets(deploy.Namespace).Get(ctx, deploy.DaemonSetName, metav1.GetOptions{})
		if err == nil && int(ds.Status.NumberReady) == nodes {
			return nil
		}
		select {
		case <-ctx.Done():
			if err == nil {
				err = fmt.Errorf("%d of %d ready", ds.Status.NumberReady, nodes)
			}
			return fmt.Errorf("wait for the veil-agent DaemonSet: %w", err)
		case <-time.After(time.Second):
		}
	}
}

// HasClusterDNS tells whether the cluster has the kube-dns Service the
// DNS tests query.
func (l *Lab) HasClusterDNS(ctx context.Context) (bool, error) {
	clients, err := kubernetes.NewForConfig(l.Cluster.Config)
	if err != nil {
		return false, fmt.Errorf("create clients: %w", err)
	}
	_, err = clients.CoreV1().Services("kube-system").Get(ctx, "kube-dns", metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look for the kube-dns Service: %w", err)
	}
	return true, nil
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
