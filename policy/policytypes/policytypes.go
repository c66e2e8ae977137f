// Package policytypes holds the contract between the policy compiler
// (package policy) and the datapath (agent/datapath): the keys, entries,
// verdicts, directions, protocol numbers and per-endpoint defaults of the
// datapath policy map. It is a leaf, so the datapath can write and read
// compiled entries without importing the compiler.
//
// The compiler's output is exactly the content of one endpoint's slice of the
// datapath policy map (bpf/lib/policy.h): longest-prefix-match entries keyed
// by (direction, peer identity, protocol, port prefix).
//
// How the datapath decides, per packet of a new flow, for one direction:
//
//  1. It looks the key up three times: with the peer's label identity (pod,
//     host, world, remote-node…), with the peer's CIDR identity (if the peer's
//     IP falls in a CIDR that some policy names), and with identity.Any.
//     Each lookup returns the longest-prefix entry for that identity.
//  2. Deny wins: if any of the hits says Deny, the flow is denied; else if any
//     says Allow, it is allowed; else the endpoint's default for that
//     direction applies (Defaults).
//
// So the compiler must make each longest-prefix entry carry the merged
// verdict of every rule that covers it *for that same identity* (a deny on
// "any port" must be copied onto a more specific allow for the same identity,
// because the more specific entry shadows it). Across the three identities
// the datapath merges by itself.
//
// Every entry carries two verdicts: Enforce, computed from enforce-mode
// policies only, decides what happens to the packet; Audit, computed as if
// every policy (including audit-mode ones) were enforced, is what the flow
// log reports as "would be denied" when it differs.
package policytypes

import "github.com/veilmesh/veil/policy/identity"

// Direction is relative to the endpoint that owns the policy.
type Direction uint8

const (
	Ingress Direction = 0
	Egress  Direction = 1
)

func (d Direction) String() string {
	if d == Egress {
		return "egress"
	}
	return "ingress"
}

// IP protocol numbers used in keys. ProtoAny is not a protocol: it means the
// entry's prefix stops before the protocol byte.
const (
	ProtoAny    uint8 = 0
	ProtoICMP   uint8 = 1
	ProtoTCP    uint8 = 6
	ProtoUDP    uint8 = 17
	ProtoICMPv6 uint8 = 58
	ProtoSCTP   uint8 = 132
)

// Verdict of one entry or default.
type Verdict uint8

const (
	// None: no opinion (only meaningful inside the compiler).
	None  Verdict = 0
	Allow Verdict = 1
	Deny  Verdict = 2
)

// Key is one policy-map key for an endpoint.
//
// Port holds the destination port for TCP, UDP and SCTP. For ICMP it holds
// type<<8 | code, so PortPrefixLen 8 matches a type and 16 a type and code.
// PortPrefixLen is the number of leading bits of Port that are significant
// (0 = any port, 16 = exactly Port); a range lo..hi is expressed as the
// minimal set of prefixes that covers it. When Proto is ProtoAny,
// PortPrefixLen must be 0.
type Key struct {
	Direction     Direction
	Identity      identity.ID
	Proto         uint8
	Port          uint16
	PortPrefixLen uint8
}

// Entry is one compiled policy-map entry.
type Entry struct {
	Key
	Enforce Verdict
	Audit   Verdict
	// RuleID names the rule that decided the verdict (see policy.Compiler.Rules),
	// so counters and flow events can say which rule matched.
	RuleID uint32
}

// Defaults are an endpoint's verdicts when no entry matches, per direction.
// A direction is default-deny once any enforce-mode policy selects the
// endpoint for that direction; Audit is the same with audit-mode policies
// counted too.
type Defaults struct {
	IngressEnforce, IngressAudit Verdict
	EgressEnforce, EgressAudit   Verdict
}

// RuleLocalHost is the RuleID of the built-in rule that lets a pod's own
// node reach it whatever its ingress policy: upstream NetworkPolicy cannot
// block it (kubelet probes come from there), and no mainstream plugin
// does. Only an explicit deny rule stops it.
const RuleLocalHost uint32 = 0
