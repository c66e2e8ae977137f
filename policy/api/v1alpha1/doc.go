// Package v1alpha1 holds the policy.veil.dev/v1alpha1 API: MeshPolicy
// (namespaced) and ClusterMeshPolicy (cluster-scoped), and MeshNode, where
// each node's agent records its state (encryption above all).
//
// +k8s:deepcopy-gen=package
// +groupName=policy.veil.dev
package v1alpha1
