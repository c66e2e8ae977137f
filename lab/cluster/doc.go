// Package cluster runs a real Kubernetes cluster inside the lab: a hub
// network namespace with etcd, kube-apiserver, kube-controller-manager and
// kube-scheduler, and nodes that are each a network namespace on the hub's
// bridge plus a mount and UTS namespace, running containerd, runc, a real
// kubelet and (Options.KubeProxy) kube-proxy in iptables or nftables mode.
// There is no registry: the images a cluster runs (the pause image, the
// test server and client, CoreDNS, Veil's agent image) are OCI tarballs
// imported into every node's containerd.
//
//	c, err := cluster.Start(ctx, cluster.Options{Nodes: 2, Images: []string{"bin/veil-image.tar"}})
//	if err != nil { … }
//	defer c.Stop()
//	err = c.InstallVeil(ctx, nil) // Veil's Helm chart, applied as users apply it
//	err = c.WaitNodesReady(ctx)
//
// Up does all of what `meshctl lab up` runs, in phases it times: Start,
// Veil, the cluster DNS (InstallDNS: CoreDNS behind kube-system/kube-dns at
// DNSServiceIP) and the demo (StartDemo: Deployments, Services and
// policies applied through the API server). Supervise runs Up in a process
// that outlives the command that started it and records the lab in its
// dir (LabState); Down stops it. Exec runs a command in a pod through the
// API server, as kubectl exec does. AddNode joins one more node to a
// running cluster, as a machine joins a real one: Veil's DaemonSet and
// whatever else runs on every node come to it by themselves.
//
// Everything a cluster creates carries its prefix: network namespaces
// <prefix>-hub and <prefix>-node-N, the cgroup veil-<prefix> in every
// hierarchy (kubelet's cgroupRoot of node N is veil-<prefix>/node-N; its
// cgroup v2 subtree is shown in the node's mount namespace at
// NodeCgroupRoot, the chart's cgroupRoot, so each agent attaches its socket
// programs to its own node's pods), and the working dir. Stop removes all
// of it, and Cleanup does the same by those exact names after a run that
// crashed. Nothing reaches out of the lab: the hub has no link to the host
// (it routes each node's pod CIDR to the node, as a cloud network does),
// and the host reaches the API server only through a relay on its
// loopback.
//
// Binaries come from lab/controlplane's cache (`make controlplane`); runc,
// the CNI plugins, nft, iptables and conntrack from the host (`make deps`).
// Starting a cluster needs root, and a machine where changing namespaces,
// mounts and cgroups is allowed (VEIL_PRIVILEGED=1 in the tests). By hand:
// `meshctl lab up`, or `go run ./lab/cluster/cmd/veil-cluster up`.
package cluster
