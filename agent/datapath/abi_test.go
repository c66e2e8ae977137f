package datapath

import (
	"testing"

	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// The leaf packages policy and policy/identity cannot import the generated
// types, so their numbers that the datapath reads are checked against the C
// enums here: a change on either side fails this test, never the wire.
func TestSharedConstantsMatchC(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"identity.Any", uint64(identity.Any), uint64(podReservedIdentityID_ANY)},
		{"identity.Host", uint64(identity.Host), uint64(podReservedIdentityID_HOST)},
		{"identity.World", uint64(identity.World), uint64(podReservedIdentityID_WORLD)},
		{"identity.Unmanaged", uint64(identity.Unmanaged), uint64(podReservedIdentityID_UNMANAGED)},
		{"identity.Health", uint64(identity.Health), uint64(podReservedIdentityID_HEALTH)},
		{"identity.RemoteNode", uint64(identity.RemoteNode), uint64(podReservedIdentityID_REMOTE_NODE)},
		{"identity.MinPod", uint64(identity.MinPod), uint64(podReservedIdentityID_MIN_POD)},
		{"identity.MinCIDR", uint64(identity.MinCIDR), uint64(podReservedIdentityID_MIN_CIDR)},
		{"policy.None", uint64(policytypes.None), uint64(podVerdictVERDICT_NONE)},
		{"policy.Allow", uint64(policytypes.Allow), uint64(podVerdictVERDICT_ALLOW)},
		{"policy.Deny", uint64(policytypes.Deny), uint64(podVerdictVERDICT_DENY)},
		{"policy.Ingress", uint64(policytypes.Ingress), uint64(podDirectionDIR_INGRESS)},
		{"policy.Egress", uint64(policytypes.Egress), uint64(podDirectionDIR_EGRESS)},
	} {
		if c.got != c.want {
			t.Errorf("%s = %d; the C enum says %d", c.name, c.got, c.want)
		}
	}
	// Forwarding counters live after the drop reasons in one array.
	if uint32(podForwardKindFWD_LOCAL) <= maxDropReason || uint32(podForwardKindMETRICS_MAX) <= fwdTunnel {
		t.Errorf("veil_metrics layout: drop reasons up to %d, forward kinds %d..%d",
			maxDropReason, podForwardKindFWD_LOCAL, podForwardKindMETRICS_MAX)
	}
}
