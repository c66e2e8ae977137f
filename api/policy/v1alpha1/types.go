package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Mode says whether a policy's verdicts are enforced or only reported.
// +kubebuilder:validation:Enum=enforce;audit
type Mode string

const (
	ModeEnforce Mode = "enforce"
	ModeAudit   Mode = "audit"
)

// Entity names a group of peers that has no labels of its own.
// +kubebuilder:validation:Enum=world;host;remote-node;cluster;all
type Entity string

const (
	// EntityWorld is every address outside the cluster.
	EntityWorld Entity = "world"
	// EntityHost is the local node (host network namespace).
	EntityHost Entity = "host"
	// EntityRemoteNode is every other node of the cluster.
	EntityRemoteNode Entity = "remote-node"
	// EntityCluster is every pod and node of the cluster.
	EntityCluster Entity = "cluster"
	// EntityAll is every peer.
	EntityAll Entity = "all"
)

// Protocol of a port rule.
// +kubebuilder:validation:Enum=TCP;UDP;SCTP;ICMP
type Protocol string

const (
	ProtocolTCP  Protocol = "TCP"
	ProtocolUDP  Protocol = "UDP"
	ProtocolSCTP Protocol = "SCTP"
	ProtocolICMP Protocol = "ICMP"
)

// +genclient
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Namespaced,shortName=mp,categories=veil
// +kubebuilder:printcolumn:name="Mode",type=string,JSONPath=`.spec.mode`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`

// MeshPolicy is a namespaced L3/L4 policy for the pods of its namespace.
type MeshPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   MeshPolicySpec `json:"spec"`
	Status PolicyStatus   `json:"status,omitempty"`
}

// MeshPolicySpec selects pods of the policy's namespace and lists the rules
// that apply to them.
type MeshPolicySpec struct {
	// PodSelector selects the pods of this namespace the policy applies to.
	// An empty selector selects every pod of the namespace.
	PodSelector metav1.LabelSelector `json:"podSelector"`

	PolicyRules `json:",inline"`
}

// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object

// MeshPolicyList is a list of MeshPolicy.
type MeshPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []MeshPolicy `json:"items"`
}

// +genclient
// +genclient:nonNamespaced
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=cmp,categories=veil
// +kubebuilder:printcolumn:name="Mode",type=string,JSONPath=`.spec.mode`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`

// ClusterMeshPolicy is a cluster-scoped policy; it selects pods in any
// namespace by pod and namespace selectors.
type ClusterMeshPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   ClusterMeshPolicySpec `json:"spec"`
	Status PolicyStatus          `json:"status,omitempty"`
}

// ClusterMeshPolicySpec selects pods across namespaces.
type ClusterMeshPolicySpec struct {
	// PodSelector selects pods by their labels. Empty selects every pod.
	PodSelector metav1.LabelSelector `json:"podSelector"`
	// NamespaceSelector restricts the selection to namespaces with these
	// labels. Absent or empty means every namespace.
	// +optional
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`

	PolicyRules `json:",inline"`
}

// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object

// ClusterMeshPolicyList is a list of ClusterMeshPolicy.
type ClusterMeshPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []ClusterMeshPolicy `json:"items"`
}

// PolicyRules are the rules shared by MeshPolicy and ClusterMeshPolicy.
// Each direction holds at most 32 rules, which keeps the CEL validation
// within the API server's cost budget; more rules can go in more policies.
//
// Allow rules of every policy kind (NetworkPolicy included) are a union. A
// matching deny rule wins over any allow. A direction becomes default-deny
// for the selected pods when the policy lists allow rules for it (the field
// is present, even empty), unless DefaultDeny says otherwise; deny-only
// policies therefore do not turn on default deny.
type PolicyRules struct {
	// Mode is enforce (default) or audit: an audit policy drops nothing and
	// its would-be denials are reported in the flow log.
	// +kubebuilder:default=enforce
	// +optional
	Mode Mode `json:"mode,omitempty"`

	// Ingress lists traffic the selected pods accept.
	// +optional
	// +kubebuilder:validation:MaxItems=32
	Ingress []IngressRule `json:"ingress,omitempty"`
	// IngressDeny lists traffic the selected pods refuse, whatever allows it.
	// +optional
	// +kubebuilder:validation:MaxItems=32
	IngressDeny []IngressRule `json:"ingressDeny,omitempty"`
	// Egress lists traffic the selected pods may send.
	// +optional
	// +kubebuilder:validation:MaxItems=32
	Egress []EgressRule `json:"egress,omitempty"`
	// EgressDeny lists traffic the selected pods may not send, whatever allows it.
	// +optional
	// +kubebuilder:validation:MaxItems=32
	EgressDeny []EgressRule `json:"egressDeny,omitempty"`

	// DefaultDeny overrides, per direction, whether this policy makes the
	// selected pods default-deny.
	// +optional
	DefaultDeny *DefaultDeny `json:"defaultDeny,omitempty"`
}

// DefaultDeny says per direction whether a policy turns on default deny.
type DefaultDeny struct {
	// +optional
	Ingress *bool `json:"ingress,omitempty"`
	// +optional
	Egress *bool `json:"egress,omitempty"`
}

// IngressRule matches traffic from any of From on any of Ports.
// An empty From matches every peer; empty Ports match every port and
// protocol.
type IngressRule struct {
	// +optional
	// +kubebuilder:validation:MaxItems=256
	From []Peer `json:"from,omitempty"`
	// +optional
	// +kubebuilder:validation:MaxItems=256
	Ports []PortRule `json:"ports,omitempty"`
}

// EgressRule matches traffic to any of To on any of Ports.
type EgressRule struct {
	// +optional
	// +kubebuilder:validation:MaxItems=256
	To []Peer `json:"to,omitempty"`
	// +optional
	// +kubebuilder:validation:MaxItems=256
	Ports []PortRule `json:"ports,omitempty"`
}

// Peer names the other end of a flow by exactly one form: labels
// (podSelector and/or namespaceSelector), an entity, or a CIDR.
//
// For a MeshPolicy, a podSelector alone selects pods in the policy's own
// namespace; with a namespaceSelector it selects those pods in the matching
// namespaces; a namespaceSelector alone selects every pod there. For a
// ClusterMeshPolicy, a podSelector alone selects pods in every namespace.
// +kubebuilder:validation:XValidation:rule="(has(self.podSelector) || has(self.namespaceSelector) ? 1 : 0) + (has(self.entity) ? 1 : 0) + (has(self.cidr) ? 1 : 0) == 1",message="a peer needs exactly one of podSelector/namespaceSelector, entity or cidr"
type Peer struct {
	// +optional
	PodSelector *metav1.LabelSelector `json:"podSelector,omitempty"`
	// +optional
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
	// +optional
	Entity *Entity `json:"entity,omitempty"`
	// +optional
	CIDR *CIDRPeer `json:"cidr,omitempty"`
}

// CIDRPeer matches addresses in CIDR but not in any of Except.
// +kubebuilder:validation:XValidation:rule="isCIDR(self.cidr)",message="cidr must be a valid CIDR such as 10.0.0.0/8",fieldPath=".cidr"
// +kubebuilder:validation:XValidation:rule="!has(self.except) || !isCIDR(self.cidr) || self.except.all(e, isCIDR(e) && cidr(self.cidr).containsCIDR(e))",message="every except entry must be a valid CIDR inside cidr",fieldPath=".except"
//
// The bounds (49 characters fit any IPv6 CIDR, 16 except entries) keep the
// CEL rules within the API server's cost budget.
type CIDRPeer struct {
	// +kubebuilder:validation:MaxLength=49
	CIDR string `json:"cidr"`
	// +optional
	// +kubebuilder:validation:MaxItems=16
	// +kubebuilder:validation:items:MaxLength=49
	Except []string `json:"except,omitempty"`
}

// PortRule matches a protocol and a port, a port range or a named port; for
// ICMP it matches a type and optionally a code.
// +kubebuilder:validation:XValidation:rule="!has(self.port) || (type(self.port) == int ? self.port >= 1 && self.port <= 65535 : size(self.port) <= 15 && self.port.matches('^[a-z0-9]([a-z0-9-]*[a-z0-9])?$') && self.port.matches('[a-z]') && !self.port.contains('--'))",message="port must be a number from 1 to 65535 or a port name (at most 15 lowercase letters, digits and '-', with a letter, no leading, trailing or double '-')",fieldPath=".port"
// +kubebuilder:validation:XValidation:rule="!has(self.endPort) || (has(self.port) && type(self.port) == int)",message="endPort needs a numeric port; it cannot be used with a named port or without port",fieldPath=".endPort"
// +kubebuilder:validation:XValidation:rule="!has(self.endPort) || !has(self.port) || type(self.port) != int || self.endPort >= self.port",message="endPort must be greater than or equal to port",fieldPath=".endPort"
// +kubebuilder:validation:XValidation:rule="has(self.protocol) && self.protocol == 'ICMP' ? (!has(self.port) && !has(self.endPort)) : (!has(self.icmpType) && !has(self.icmpCode))",message="ICMP rules take icmpType/icmpCode, other protocols take port/endPort"
// +kubebuilder:validation:XValidation:rule="!has(self.icmpCode) || has(self.icmpType)",message="icmpCode needs icmpType",fieldPath=".icmpCode"
type PortRule struct {
	// Protocol is TCP (default), UDP, SCTP or ICMP.
	// +kubebuilder:default=TCP
	// +optional
	Protocol Protocol `json:"protocol,omitempty"`
	// Port is a number (1-65535) or a named container port of the
	// destination pod. Absent means every port.
	// +optional
	// +kubebuilder:validation:XIntOrString
	// +kubebuilder:validation:MaxLength=15
	Port *intstr.IntOrString `json:"port,omitempty"`
	// EndPort makes Port..EndPort an inclusive range.
	// +optional
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	EndPort *int32 `json:"endPort,omitempty"`
	// ICMPType matches one ICMP type (ICMP only).
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=255
	ICMPType *int32 `json:"icmpType,omitempty"`
	// ICMPCode matches one ICMP code of ICMPType (ICMP only).
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=255
	ICMPCode *int32 `json:"icmpCode,omitempty"`
}

// Condition types written by the agent.
const (
	// ConditionAccepted is True when the policy compiled, False with a
	// reason when it did not.
	ConditionAccepted = "Accepted"
)

// PolicyStatus is written by the agents.
type PolicyStatus struct {
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}
