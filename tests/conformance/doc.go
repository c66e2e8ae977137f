// Package conformance runs the Kubernetes project's own [sig-network]
// end-to-end tests against the lab with Veil as the cluster's network.
//
// The upstream e2e test binary (e2e.test), agnhost and kubectl are built
// from the k8s.io/kubernetes release the lab's kubelet comes from
// (lab/controlplane.BuildE2E, cached). The lab has no registry, so the
// images the tests name — agnhost, busybox, pause, under the exact names
// `e2e.test --list-images` prints — are built here (BuildImages) and
// imported into every node: agnhost with a shell and the tools the tests
// run in it (dash, busybox's applets, curl, OpenBSD netcat, ss, dig, taken
// from the host's Debian packages with their libraries).
//
// StartLab brings up a 2-node lab/cluster as `meshctl lab up` does
// (cluster.Up: Veil installed with strict WireGuard, CoreDNS behind
// kube-dns, socket load-balancing; no demo), kube-proxy as the Mode says
// (nftables, iptables, or none: Veil alone translates Services) and
// the images; Lab.Run runs e2e.test inside the lab hub's
// network namespace, where it reaches the nodes and pods as a test machine
// beside a real cluster does. Each run writes ginkgo's JSON report, the
// JUnit report and its log to its own dir; SaveSuite, LoadSuites and
// WriteMarkdown turn them into results.md.
//
// `make conformance` runs TestPrivilegedConformance (the [Conformance]
// suite and the NetworkPolicy subset, with kube-proxy nftables and
// without kube-proxy, labs and suites side by side);
// TestPrivilegedConformanceSlice is CI's few-minute slice.
package conformance
