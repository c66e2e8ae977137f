package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// +genclient
// +genclient:nonNamespaced
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=mn,categories=veil
// +kubebuilder:printcolumn:name="Encryption",type=string,JSONPath=`.status.encryption.mode`
// +kubebuilder:printcolumn:name="Peers",type=integer,JSONPath=`.status.encryption.peerCount`
// +kubebuilder:printcolumn:name="Strict",type=boolean,JSONPath=`.status.encryption.strictMode`
// +kubebuilder:printcolumn:name="Leaks",type=integer,JSONPath=`.status.encryption.leaks`
// +kubebuilder:printcolumn:name="Updated",type=date,JSONPath=`.status.updated`

// MeshNode is one node as its Veil agent reports it: the place where the
// whole cluster's encryption state can be read from the API server. The
// agent of the node with the same name owns it.
type MeshNode struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +optional
	Spec MeshNodeSpec `json:"spec,omitempty"`
	// +optional
	Status MeshNodeStatus `json:"status,omitempty"`
}

// MeshNodeSpec is empty: a MeshNode is all status.
type MeshNodeSpec struct{}

// MeshNodeStatus is what the node's agent last recorded.
type MeshNodeStatus struct {
	// AgentVersion of the agent that wrote this status.
	// +optional
	AgentVersion string `json:"agentVersion,omitempty"`
	// NodeIP is the node's underlay address.
	// +optional
	NodeIP string `json:"nodeIP,omitempty"`
	// PodCIDRs of the node.
	// +optional
	PodCIDRs []string `json:"podCIDRs,omitempty"`
	// Updated is when the agent wrote this status; a stale time means the
	// agent is not running.
	// +optional
	Updated metav1.Time `json:"updated,omitempty"`
	// +optional
	Encryption EncryptionStatus `json:"encryption,omitempty"`
}

// EncryptionMode is the WireGuard implementation that runs a node's
// device, or none. The agent's WireGuard device modes are these values, and
// meshctl's audit reads them.
type EncryptionMode string

// Encryption modes a MeshNode reports (EncryptionStatus.Mode).
const (
	EncryptionModeKernel    EncryptionMode = "kernel"
	EncryptionModeUserspace EncryptionMode = "userspace"
	EncryptionModeDisabled  EncryptionMode = "disabled"
)

// EncryptionStatus is a node's transparent encryption state.
type EncryptionStatus struct {
	// Mode is "kernel" or "userspace" (the WireGuard implementation), or
	// "disabled".
	// +optional
	Mode EncryptionMode `json:"mode,omitempty"`
	// +optional
	Interface string `json:"interface,omitempty"`
	// PublicKey of the node (base64), and its Fingerprint as shown in logs.
	// +optional
	PublicKey string `json:"publicKey,omitempty"`
	// +optional
	Fingerprint string `json:"fingerprint,omitempty"`
	// KeyCreated is when the current key was made.
	// +optional
	KeyCreated metav1.Time `json:"keyCreated,omitempty"`
	// +optional
	ListenPort int32 `json:"listenPort,omitempty"`
	// StrictMode is true when pod traffic to other nodes is never sent
	// unencrypted.
	// +optional
	StrictMode bool `json:"strictMode,omitempty"`
	// PeerCount is how many peers the device has configured.
	// +optional
	PeerCount int32 `json:"peerCount,omitempty"`
	// PeerSummary counts the peers by health and digests the view of the
	// healthy ones, which Peers leaves out. Without it (agents before
	// 0.4) Peers lists every peer.
	// +optional
	PeerSummary *PeerSummary `json:"peerSummary,omitempty"`
	// Peers are the unhealthy peers (see PeerSummary), at most
	// MaxListedPeers of them; PeerSummary.Unlisted counts the rest. A
	// MeshNode so stays a few KB at any cluster size.
	// +optional
	// +listType=map
	// +listMapKey=node
	// +kubebuilder:validation:MaxItems=100
	Peers []PeerStatus `json:"peers,omitempty"`
	// Leaks counts pod packets that strict mode kept off the underlay, and
	// RecentLeaks lists the newest of them.
	// +optional
	Leaks int64 `json:"leaks,omitempty"`
	// +optional
	// +kubebuilder:validation:MaxItems=32
	RecentLeaks []LeakRecord `json:"recentLeaks,omitempty"`
	// UnencryptedPackets counts pod packets sent to other nodes in the
	// clear (only without strict mode, when a node has no tunnel).
	// +optional
	UnencryptedPackets int64 `json:"unencryptedPackets,omitempty"`
	// GuardedDevices are the devices whose egress the strict-mode guard
	// holds, and UnguardedDevices those that lead off the node without it
	// (ways around the tunnel).
	// +optional
	// +kubebuilder:validation:MaxItems=64
	GuardedDevices []string `json:"guardedDevices,omitempty"`
	// +optional
	// +kubebuilder:validation:MaxItems=64
	UnguardedDevices []string `json:"unguardedDevices,omitempty"`
}

// PeerSummary counts a node's WireGuard peers by health, as its agent sees
// them. A peer is healthy when its key is a node's and its last handshake is
// at most HealthyHandshakeAge old; every other peer, and every node that
// published a key but is not configured, is listed in Peers with its Problem.
type PeerSummary struct {
	// Expected is how many other nodes published a key and pod CIDRs to
	// peer with.
	Expected int32 `json:"expected"`
	// Healthy peers are counted, not listed.
	Healthy int32 `json:"healthy"`
	// Handshaking peers are configured and never completed a handshake.
	// +optional
	Handshaking int32 `json:"handshaking,omitempty"`
	// Stale peers' last handshake is older than HealthyHandshakeAge.
	// +optional
	Stale int32 `json:"stale,omitempty"`
	// Unknown peers hold a key that no node publishes.
	// +optional
	Unknown int32 `json:"unknown,omitempty"`
	// Missing are nodes that published a key and are not configured.
	// +optional
	Missing int32 `json:"missing,omitempty"`
	// Unlisted is how many unhealthy peers Peers leaves out (it holds at
	// most MaxListedPeers).
	// +optional
	Unlisted int32 `json:"unlisted,omitempty"`
	// HealthyHandshakeAge is the agent's bound on a healthy peer's last
	// handshake.
	HealthyHandshakeAge metav1.Duration `json:"healthyHandshakeAge"`
	// OldestHealthyHandshake is the oldest last handshake of the healthy
	// peers: a reader with a tighter bound knows whether all still meet it.
	// +optional
	OldestHealthyHandshake *metav1.Time `json:"oldestHealthyHandshake,omitempty"`
	// Digest sums the views of the healthy peers (see PeerDigest): a
	// reader that computes it from what the nodes publish confirms every
	// healthy peer's key, endpoint and allowed IPs without a list.
	Digest string `json:"digest"`
}

// PeerStatus is one WireGuard peer of a node.
type PeerStatus struct {
	// Node is the peer's node name.
	Node      string `json:"node"`
	PublicKey string `json:"publicKey"`
	// +optional
	Endpoint string `json:"endpoint,omitempty"`
	// +optional
	AllowedIPs []string `json:"allowedIPs,omitempty"`
	// +optional
	LastHandshake *metav1.Time `json:"lastHandshake,omitempty"`
	// +optional
	RxBytes int64 `json:"rxBytes,omitempty"`
	// +optional
	TxBytes int64 `json:"txBytes,omitempty"`
	// Problem says why the peer is listed: "no handshake yet", "last
	// handshake 5m0s ago", "key of no node", or "not configured" (a node
	// that published a key has no peer on the device; PublicKey is then
	// empty).
	// +optional
	Problem string `json:"problem,omitempty"`
}

// LeakRecord is one flow strict mode stopped.
type LeakRecord struct {
	Source      string `json:"source"`
	Destination string `json:"destination"`
	Protocol    string `json:"protocol"`
	// +optional
	Endpoint string `json:"endpoint,omitempty"`
	Reason   string `json:"reason"`
	Packets  int64  `json:"packets"`
	// +optional
	First metav1.Time `json:"first,omitempty"`
	// +optional
	Last metav1.Time `json:"last,omitempty"`
}

// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object

// MeshNodeList is a list of MeshNode.
type MeshNodeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []MeshNode `json:"items"`
}
