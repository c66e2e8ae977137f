package policy

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// The entry-level contract of package policytypes: a deny on a shorter prefix is
// copied onto every longer prefix of the same identity, enforce and audit
// verdicts are kept apart, and ranges become minimal prefixes.
func TestEntriesCarryMergedVerdicts(t *testing.T) {
	in := Input{Namespaces: []*corev1.Namespace{testNamespace("x"), testNamespace("y")}}
	in.Pods = []*corev1.Pod{
		testPod("x", "server", "10.0.0.1", map[string]string{"app": "server"}),
		testPod("y", "client", "10.0.1.1", map[string]string{"app": "client"}),
	}
	end := int32(81)
	p80 := meshPortOf(v1alpha1.ProtocolTCP, 80)
	p80.EndPort = &end
	in.MeshPolicies = []*v1alpha1.MeshPolicy{
		mp("x", "allow", matchLabels("app", "server"), v1alpha1.PolicyRules{
			Ingress: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(&metav1.LabelSelector{}, nil)}, Ports: []v1alpha1.PortRule{p80}}},
		}),
		mp("x", "deny-client", matchLabels("app", "server"), v1alpha1.PolicyRules{
			IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(matchLabels("kubernetes.io/metadata.name", "y"), nil)}}},
		}),
		mp("x", "audit-deny-81", matchLabels("app", "server"), v1alpha1.PolicyRules{
			Mode:        v1alpha1.ModeAudit,
			IngressDeny: []v1alpha1.IngressRule{{Ports: []v1alpha1.PortRule{meshPortOf(v1alpha1.ProtocolTCP, 81)}}},
		}),
	}
	c := mustCompile(t, in)
	ep, ok := c.Endpoint(EndpointID{"x", "server"})
	if !ok {
		t.Fatal("no endpoint")
	}
	client, _ := c.Endpoint(EndpointID{"y", "client"})
	server := ep.Identity
	ruleOf := func(policy, section string) uint32 {
		for _, r := range c.Rules() {
			if r.Policy.Name == policy && r.Section == section {
				return r.ID
			}
		}
		t.Fatalf("no rule %s %s", policy, section)
		return 0
	}
	allow := ruleOf("allow", "ingress[0].from[0].ports[0]")
	deny := ruleOf("deny-client", "ingressDeny[0].from[0]")
	audit := ruleOf("audit-deny-81", "ingressDeny[0].ports[0]")
	key := func(id identity.ID, proto uint8, port uint16, plen uint8) policytypes.Key {
		return policytypes.Key{Direction: policytypes.Ingress, Identity: id, Proto: proto, Port: port, PortPrefixLen: plen}
	}
	entry := func(k policytypes.Key, enforce, audit policytypes.Verdict, rule uint32) policytypes.Entry {
		return policytypes.Entry{Key: k, Enforce: enforce, Audit: audit, RuleID: rule}
	}
	want := []policytypes.Entry{
		// Any peer: only the audit deny of 81.
		entry(key(identity.Any, policytypes.ProtoTCP, 81, 16), policytypes.None, policytypes.Deny, audit),
		// The local node is always allowed in.
		entry(key(identity.Host, policytypes.ProtoAny, 0, 0), policytypes.Allow, policytypes.Allow, policytypes.RuleLocalHost),
		// The server's own identity: 80-81 is one /15 prefix.
		entry(key(server, policytypes.ProtoTCP, 80, 15), policytypes.Allow, policytypes.Allow, allow),
		// The client: denied on every port, and the deny is copied onto
		// the longer 80-81 prefix that would otherwise shadow it.
		entry(key(client.Identity, policytypes.ProtoAny, 0, 0), policytypes.Deny, policytypes.Deny, deny),
		entry(key(client.Identity, policytypes.ProtoTCP, 80, 15), policytypes.Deny, policytypes.Deny, deny),
	}
	slices.SortFunc(want, func(a, b policytypes.Entry) int { return compareKeys(a.Key, b.Key) })
	if !slices.Equal(ep.Entries, want) {
		t.Errorf("entries:\n got %+v\nwant %+v", ep.Entries, want)
	}
	if ep.Defaults != (policytypes.Defaults{IngressEnforce: policytypes.Deny, IngressAudit: policytypes.Deny, EgressEnforce: policytypes.Allow, EgressAudit: policytypes.Allow}) {
		t.Errorf("defaults %+v", ep.Defaults)
	}
}
