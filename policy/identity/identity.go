// Package identity defines Veil's security identities: a canonical label set
// (pod labels, namespace name and labels, service account) mapped to a
// node-local number. Numbers are node-local because on the wire the source
// identity is always derived from the source IP on the receiving node.
package identity

import "fmt"

// ID is a numeric security identity as stored in the datapath maps.
type ID uint32

// Reserved identities. The numbering follows the convention of the field
// (Cilium's reserved range) so that operators recognise them.
const (
	// Any is not an identity: in a policy key it matches every peer.
	Any        ID = 0
	Host       ID = 1
	World      ID = 2
	Unmanaged  ID = 3
	Health     ID = 4
	RemoteNode ID = 6

	// MinPod is the first number handed to pod label sets.
	MinPod ID = 256
	// MinCIDR is the first number handed to CIDR identities (peers named
	// by an ipBlock or a MeshPolicy CIDR). They live in a range of their own
	// so a number tells at a glance which kind it is.
	MinCIDR ID = 1 << 24
)

// Reserved reports whether id is one of the reserved identities.
func (id ID) Reserved() bool { return id > Any && id < MinPod }

// IsCIDR reports whether id was allocated for a CIDR peer.
func (id ID) IsCIDR() bool { return id >= MinCIDR }

// ReservedName returns the name of a reserved identity ("host", "world"…), or
// "" when id is not reserved.
func (id ID) ReservedName() string {
	switch id {
	case Host:
		return "host"
	case World:
		return "world"
	case Unmanaged:
		return "unmanaged"
	case Health:
		return "health"
	case RemoteNode:
		return "remote-node"
	}
	return ""
}

func (id ID) String() string {
	if n := id.ReservedName(); n != "" {
		return fmt.Sprintf("%d (reserved:%s)", uint32(id), n)
	}
	return fmt.Sprintf("%d", uint32(id))
}
