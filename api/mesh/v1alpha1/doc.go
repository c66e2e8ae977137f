// Package v1alpha1 holds the mesh.veil.dev/v1alpha1 API: MeshNode
// (cluster-scoped), where each node's agent records its state (encryption
// above all) for meshctl and operators to read from the API server.
//
// Until Veil 0.1 MeshNode was served in group policy.veil.dev; the README's
// "Upgrading" section says how a running install moves to this group.
//
// +k8s:deepcopy-gen=package
// +groupName=mesh.veil.dev
package v1alpha1
