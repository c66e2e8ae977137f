package conformance

import (
	"regexp"
	"strings"
	"time"
)

// SuiteSpec is a selection of upstream e2e tests, run by one e2e.test.
type SuiteSpec struct {
	// ID names the suite's results dir.
	ID string
	// Name is the results table's.
	Name  string
	Focus string
	// Skips are left out on every machine of this kind, with why.
	Skips   []Skip
	Timeout time.Duration
	// Specs, when set, is how many specs Focus selects: a run that plans
	// another number fails, so that a renamed upstream test cannot drop
	// out silently.
	Specs int
}

// AnyOf is a focus that matches the specs named, by their full texts'
// beginnings. Not anchored: ginkgo matches a focus against the suite's
// description, a space, then a spec's full text.
func AnyOf(names ...string) string {
	quoted := make([]string, len(names))
	for i, n := range names {
		quoted[i] = regexp.QuoteMeta(n)
	}
	return "(" + strings.Join(quoted, "|") + ")"
}

// ConformanceSuite is every [sig-network] test tagged [Conformance]:
// Services, DNS, networking, EndpointSlices, proxy.
var ConformanceSuite = SuiteSpec{
	ID:      "sig-network-conformance",
	Name:    "[sig-network] [Conformance]",
	Focus:   `\[sig-network\].*\[Conformance\]`,
	Timeout: 25 * time.Minute,
}

// netpolPrefix is the full-text beginning of the NetworkPolicy e2e tests
// (test/e2e/network/netpol).
const netpolPrefix = "[sig-network] Netpol NetworkPolicy between server and client "

// NetpolSuite is the documented subset of the upstream NetworkPolicy e2e
// tests (test/e2e/network/netpol) that the lab runs in one bounded run: at
// least one test per feature, each building its own 3×3 pod model and
// probing all 81 pairs, so the whole 50-test suite (more than an hour on
// two cores) is not run by default. endPort: upstream v1.37 has no traffic
// test for it, only the API test below; Veil's compiler tests cover its
// ranges (policy/netpol_test.go).
var NetpolSuite = SuiteSpec{
	ID:   "netpol",
	Name: "[sig-network] Netpol (subset)",
	Focus: AnyOf(
		// default deny, ingress and both directions
		netpolPrefix+"should support a 'default-deny-ingress' policy",
		netpolPrefix+"should support a 'default-deny-all' policy",
		// pod and namespace selectors, and both at once
		netpolPrefix+"should enforce policy to allow traffic from pods within server namespace based on PodSelector",
		netpolPrefix+"should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
		netpolPrefix+"should enforce policy based on PodSelector and NamespaceSelector",
		netpolPrefix+"should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
		// ports, named ports, protocols
		netpolPrefix+"should enforce policy based on Ports",
		netpolPrefix+"should allow ingress access on one named port",
		netpolPrefix+"should allow egress access on one named port",
		netpolPrefix+"should not allow access by TCP when a policy specifies only UDP",
		"[sig-network] Netpol [LinuxOnly] NetworkPolicy between server and client using UDP should enforce policy based on Ports",
		// a policy naming SCTP isolates its pods for TCP, with or without
		// SCTP in the kernel
		netpolPrefix+"should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP",
		// endPort (the API; see above)
		"[sig-network] Netpol API should support creating NetworkPolicy API with endport field",
		// egress, ipBlock with except
		netpolPrefix+"should deny egress from pods based on PodSelector",
		netpolPrefix+"should enforce except clause while egress access to server in CIDR block",
		// policy changes
		netpolPrefix+"should enforce updated policy",
		netpolPrefix+"should stop enforcing policies after they are deleted",
	),
	Skips: []Skip{{
		Pattern: `\[Feature:SCTPConnectivity\]`,
		Reason:  "machine kind: the kernel has no SCTP (no sctp module, no /proc/net/sctp), so no pod can open an SCTP socket",
	}},
	Timeout: 25 * time.Minute,
	Specs:   17,
}

// NetpolAllSuite is every upstream NetworkPolicy e2e test but those that
// need SCTP connectivity (NetpolSuite's skip).
var NetpolAllSuite = SuiteSpec{
	ID:      "netpol-all",
	Name:    "[sig-network] Netpol (all)",
	Focus:   `\[sig-network\] Netpol `,
	Skips:   NetpolSuite.Skips,
	Timeout: 25 * time.Minute,
}

// SliceSuite is CI's quick, representative slice: pod-to-pod across nodes
// over HTTP and UDP (Veil's datapath and its WireGuard tunnel, strict
// mode), EndpointSlices and Endpoints for a Service's pods, the endpoints
// latency of 200 Services, the API server's own Service, Service
// collection deletion, cluster DNS (CoreDNS reached through its ClusterIP,
// over UDP and TCP, from a musl and a glibc resolver), hostPort (portmap
// chained after veil-cni), and a default-deny NetworkPolicy probed over all
// 81 pairs of the 3×3 pod model.
var SliceSuite = SuiteSpec{
	ID:   "slice",
	Name: "CI slice",
	Focus: AnyOf(
		"[sig-network] Networking Granular Checks: Pods should function for intra-pod communication: http",
		"[sig-network] Networking Granular Checks: Pods should function for intra-pod communication: udp",
		"[sig-network] EndpointSlice should create Endpoints and EndpointSlices for Pods matching a Service",
		"[sig-network] Service endpoints latency should not be very high",
		"[sig-network] API Server should provide secure master service",
		"[sig-network] Services should delete a collection of services",
		"[sig-network] DNS should provide DNS for the cluster [Conformance]",
		"[sig-network] HostPort validates that there is no conflict between pods with same hostPort but different hostIP and protocol",
		netpolPrefix+"should support a 'default-deny-ingress' policy",
	),
	Timeout: 10 * time.Minute,
	Specs:   9,
}
