// Package v1alpha1 holds the policy.veil.dev/v1alpha1 API: MeshPolicy
// (namespaced) and ClusterMeshPolicy (cluster-scoped), the rules the policy
// compiler turns into datapath entries.
//
// +k8s:deepcopy-gen=package
// +groupName=policy.veil.dev
package v1alpha1
