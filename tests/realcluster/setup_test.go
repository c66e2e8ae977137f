package realcluster

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/tests/testenv"
)

// requireCluster skips t unless it may bring up a Kubernetes cluster on
// this host.
func requireCluster(t *testing.T) {
	t.Helper()
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("skipped under -short: a Kubernetes cluster on this host")
	}
}

// labSpec says which cluster a test brings up.
type labSpec struct {
	cluster.UpOptions
	// Up brings the cluster up as `meshctl lab up` does (cluster.Up:
	// Veil, and the DNS and demo unless UpOptions leaves them out);
	// otherwise only cluster.Start runs, and the test installs Veil itself
	// (testLab.installVeil).
	Up bool
	// AgentImage is the agent image to import, "" to build it (make
	// image) for this lab.
	AgentImage string
}

// testLab is a cluster brought up for one test, removed when the test ends
// unless the test took it down itself (down).
type testLab struct {
	*cluster.Cluster
	clients kubernetes.Interface
	// image is the agent image `make image` built for this test.
	image string
	// host is the host's state before the cluster came up (snapshotHost).
	host map[string]string

	t       *testing.T
	stopped bool
}

// startLab builds (from make controlplane's cache) and starts the cluster
// spec asks for, with the agent image of this checkout imported into every
// node, after removing a crashed earlier run's leftovers of the same
// prefix. A failed test's output gets every process's last log lines and
// every pod's.
func startLab(t *testing.T, ctx context.Context, spec labSpec) *testLab {
	t.Helper()
	// Binaries first: a cold build is `make controlplane`'s, not the test's.
	bins, err := controlplane.BuildCluster(ctx)
	if err != nil {
		t.Fatalf("build cluster binaries (make controlplane builds them ahead of the tests): %v", err)
	}
	l := &testLab{t: t, image: spec.AgentImage}
	if l.image == "" {
		imageStart := time.Now()
		l.image = buildAgentImage(t, ctx)
		t.Logf("make image: %s", time.Since(imageStart).Round(time.Millisecond))
	}
	// A crashed run's leftovers are not this run's to account for.
	if err := cluster.Cleanup(spec.Prefix, ""); err != nil {
		t.Fatalf("remove leftovers of an earlier run: %v", err)
	}
	l.host = snapshotHost(t, spec.Prefix)
	opts := spec.UpOptions
	opts.Binaries = bins
	opts.Images = append(slices.Clone(opts.Images), l.image)
	opts.Logger = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	if spec.Up {
		l.Cluster, err = cluster.Up(ctx, opts)
	} else {
		l.Cluster, err = cluster.Start(ctx, opts.Options)
	}
	if err != nil {
		t.Fatalf("bring up cluster %s: %v", spec.Prefix, err)
	}
	l.clients = kubernetes.NewForConfigOrDie(l.Config)
	t.Cleanup(func() {
		if l.stopped {
			return
		}
		if t.Failed() {
			for name, tail := range l.LogTails(3000) {
				t.Logf("--- last lines of %s:\n%s", name, tail)
			}
			dumpPodLogs(t, l.clients)
		}
		if err := l.Stop(); err != nil {
			t.Errorf("stop cluster: %v", err)
		}
	})
	return l
}

// installVeil installs Veil from its chart with values (nil: the lab's)
// and waits until every node is Ready and runs a ready agent.
func (l *testLab) installVeil(ctx context.Context, values map[string]any) {
	l.t.Helper()
	if err := l.InstallVeil(ctx, values); err != nil {
		l.t.Fatalf("install veil: %v", err)
	}
	if err := l.WaitNodesReady(ctx); err != nil {
		l.t.Fatal(err)
	}
	testenv.Eventually(l.t, 2*time.Minute, time.Second, func() error {
		ds, err := l.clients.AppsV1().DaemonSets(deploy.Namespace).Get(ctx, deploy.DaemonSetName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if int(ds.Status.NumberReady) != len(l.Nodes) {
			return fmt.Errorf("daemonset %s: %d of %d ready", ds.Name, ds.Status.NumberReady, ds.Status.DesiredNumberScheduled)
		}
		return nil
	})
}

// waitServiceAccount waits for namespace ns's default ServiceAccount, which
// the controller manager makes: pods are refused until it exists.
func (l *testLab) waitServiceAccount(ctx context.Context, ns string) {
	l.t.Helper()
	testenv.Eventually(l.t, time.Minute, 200*time.Millisecond, func() error {
		_, err := l.clients.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

// down stops the cluster and checks that it left nothing: none of its
// processes runs, and the host's state is as before it came up.
func (l *testLab) down() {
	t := l.t
	t.Helper()
	pids, err := l.PIDs()
	if err != nil {
		t.Fatal(err)
	}
	l.stopped = true
	if err := l.Stop(); err != nil {
		t.Fatalf("stop cluster: %v", err)
	}
	// Killed containers and shims were reparented to the host's init,
	// which reaps them when it gets to it: a zombie has ended.
	testenv.Eventually(t, 10*time.Second, 100*time.Millisecond, func() error {
		for _, pid := range pids {
			if running(pid) {
				return fmt.Errorf("process %d (%s) of the cluster still runs", pid, comm(pid))
			}
		}
		return nil
	})
	after := snapshotHost(t, l.Prefix)
	for _, k := range slices.Sorted(maps.Keys(l.host)) {
		if l.host[k] != after[k] {
			t.Errorf("host %s changed:\nbefore:\n%s\nafter:\n%s", k, l.host[k], after[k])
		}
	}
}
