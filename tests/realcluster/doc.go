// Package realcluster tests Veil in a real Kubernetes cluster built by
// lab/cluster: real kubelets, containerd and runc on lab nodes, Veil
// installed from its Helm chart, pods scheduled by kube-scheduler.
package realcluster
