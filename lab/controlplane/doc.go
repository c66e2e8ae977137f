// Package controlplane runs a real etcd and kube-apiserver for the lab and
// Veil's tests, built from the Go module sources pinned under build/ and
// cached between runs (see Build and CacheDir).
//
// A test starts one, talks to it as cluster-admin and is done:
//
//	func TestPrivilegedSomething(t *testing.T) {
//		testenv.RequirePrivileged(t) // tests/testenv: VEIL_PRIVILEGED=1
//		cp := controlplane.StartForTest(t, controlplane.Options{})
//		clients := kubernetes.NewForConfigOrDie(cp.Config)
//		…
//	}
//
// Veil's CRDs from deploy/crds are installed and Established before Start
// returns. Everything listens on 127.0.0.1 only, on ports chosen at start,
// so several control planes can run at once. A ControlPlane is safe for
// concurrent use; Stop ends exactly the processes Start started.
//
// BuildCluster also builds what lab/cluster's real-kubelet lab runs:
// kube-controller-manager, kube-scheduler, kubelet and kube-proxy (one
// wrapper module, build/kubernetes, on kube-apiserver's pins) and
// containerd, its runc shim and ctr (build/containerd), and the cluster DNS,
// CoreDNS with only the plugins a lab uses (build/coredns). Each of the four
// sets has its own cache key, so changing one set's pins rebuilds only that
// set. `make controlplane` (which CI runs before the tests) builds all of
// them; set GOFLAGS=-p=1 to build on one core. Cold (empty build cache,
// modules downloaded, -p=1 on a busy 2-core machine): etcd and
// kube-apiserver 8 min, then the four Kubernetes binaries 3.5 min (they
// share most packages with kube-apiserver) and containerd 2 min; CoreDNS
// 2.5 min (its modules downloaded in 20 s, build cache cold for it, on a
// busy 2-core machine); peak memory 2.7 GB.
package controlplane
