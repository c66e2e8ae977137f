// Package scale measures one agent's control plane against a large cluster
// held by a real API server: Nodes, Pods in many namespaces,
// NetworkPolicies and MeshPolicies created through kube-apiserver, and the
// agent's own components (informers, policy compiler, policy sync) running
// in a child process so that its memory, CPU and watch traffic are its own.
//
// Run it (it starts etcd and kube-apiserver on loopback, so it is gated as
// privileged, but it touches no kernel networking):
//
//	VEIL_PRIVILEGED=1 VEIL_SCALE_PODS=1000,10000 go test ./tests/scale -run '^$' -bench Scale -benchtime 1x -timeout 30m
package scale
