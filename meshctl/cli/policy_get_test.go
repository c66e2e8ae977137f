package cli

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/policytypes"
)

func TestPolicyGetGolden(t *testing.T) {
	socket := serve(t, newFakeAgent(t))
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
	}{
		// x/a: default deny ingress, one allow rule from namespace y on a
		// named port; local, so with counters.
		{"live-policy-get-xa.txt", []string{"policy", "get", "x/a"}, ExitOK},
		{"live-policy-get-xa.json", []string{"policy", "get", "x/a", "-o", "json"}, ExitOK},
		// y/a: audit-mode deny from z, ICMP from anyone; not on the
		// agent's node, so without counters.
		{"live-policy-get-ya.txt", []string{"policy", "get", "y/a"}, ExitOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, stderr, code := runAgainst(t, socket, tc.args...)
			if code != tc.wantCode {
				t.Errorf("exit code = %d; want %d\nstderr: %s", code, tc.wantCode, stderr)
			}
			golden(t, tc.name, out)
		})
	}
}

func TestPolicyGetErrors(t *testing.T) {
	socket := serve(t, newFakeAgent(t))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"policy", "get", "x/q"}, "no endpoint x/q known to this agent"},
		{[]string{"policy", "get", "10.0.1.1"}, "want NAMESPACE/POD"},
		{[]string{"policy", "get"}, "accepts 1 arg"},
	} {
		_, stderr, code := runAgainst(t, socket, tc.args...)
		if code != ExitUsage || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: exit %d, stderr %q; want exit 2 and %q", tc.args, code, stderr, tc.want)
		}
	}
}

// TestPolicyGetMatchesCompiler checks every entry of the JSON output
// against the compiler's endpoint: same number of entries per direction,
// each with the rule that made it and its counters.
func TestPolicyGetMatchesCompiler(t *testing.T) {
	fa := newFakeAgent(t)
	out, stderr, code := runAgainst(t, serve(t, fa), "policy", "get", "x/a", "-o", "json")
	if code != ExitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var r policyReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatal(err)
	}
	ep, _ := fa.compiled.Endpoint(policy.EndpointID{Namespace: "x", Name: "a"})
	var in, eg int
	for _, e := range ep.Entries {
		if e.Direction == policytypes.Egress {
			eg++
		} else {
			in++
		}
	}
	if len(r.Ingress.Entries) != in || len(r.Egress.Entries) != eg {
		t.Errorf("%d ingress and %d egress entries; want %d and %d", len(r.Ingress.Entries), len(r.Egress.Entries), in, eg)
	}
	if r.Ingress.Default != "deny" || r.Egress.Default != "allow" || !r.Counters {
		t.Errorf("defaults %s/%s, counters %v; want deny/allow with counters", r.Ingress.Default, r.Egress.Default, r.Counters)
	}
	for _, e := range append(r.Ingress.Entries, r.Egress.Entries...) {
		if e.Rule == "" || e.Hits == 0 {
			t.Errorf("entry %+v lacks its rule or counters", e)
		}
	}
}

func TestEntryPort(t *testing.T) {
	for _, tc := range []struct {
		key  policytypes.Key
		want string
	}{
		{policytypes.Key{}, "any"},
		{policytypes.Key{Proto: policytypes.ProtoTCP}, "*/TCP"},
		{policytypes.Key{Proto: policytypes.ProtoUDP, Port: 53, PortPrefixLen: 16}, "53/UDP"},
		{policytypes.Key{Proto: policytypes.ProtoTCP, Port: 8000, PortPrefixLen: 13}, "8000-8007/TCP"},
		{policytypes.Key{Proto: policytypes.ProtoICMP, Port: 8 << 8, PortPrefixLen: 8}, "8/ICMP"},
		{policytypes.Key{Proto: policytypes.ProtoICMP, Port: 3<<8 | 4, PortPrefixLen: 16}, "3/ICMP code 4"},
	} {
		if got := entryPort(tc.key); got != tc.want {
			t.Errorf("entryPort(%+v) = %q; want %q", tc.key, got, tc.want)
		}
	}
}

// TestLiveTraceRendersAsOffline traces the same flows offline and through
// the agent, whose answer comes from the same compiled state: the outputs
// must be identical, byte for byte, in every format.
func TestLiveTraceRendersAsOffline(t *testing.T) {
	socket := serve(t, newFakeAgent(t))
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"live-trace-audit.txt", []string{"--from", "z/a", "--to", "y/b", "--port", "81/UDP"}},
		{"live-trace-denied.txt", []string{"--from", "x/b", "--to", "x/a", "--port", "80"}},
		{"live-trace-icmp-world.json", []string{"--from", "192.0.2.1", "--to", "y/a", "--port", "8/ICMP", "-o", "json"}},
		{"live-trace-allowed.yaml", []string{"--from", "y/b", "--to", "x/a", "--port", "80/TCP", "-o", "yaml"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			live, stderr, code := runAgainst(t, socket, append([]string{"policy", "trace"}, tc.args...)...)
			if code != ExitOK {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			offline, _, _ := run(t, "", append([]string{"policy", "trace", "-f", e2e, "-f", policies, "-f", auditDir}, tc.args...)...)
			if live != offline {
				t.Errorf("live trace differs from offline:\n--- live\n%s\n--- offline\n%s", live, offline)
			}
			golden(t, tc.name, live)
		})
	}
	_, _, code := runAgainst(t, socket, "policy", "trace", "--from", "x/b", "--to", "x/a", "--port", "80", "--exit-code")
	if code != ExitFailure {
		t.Errorf("live trace --exit-code of a DENIED flow: exit %d; want 1", code)
	}
	_, stderr, code := runAgainst(t, socket, "policy", "trace", "--from", "x/q", "--to", "x/a", "--port", "80")
	if code != ExitUsage || !strings.Contains(stderr, "x/q") {
		t.Errorf("live trace of an unknown pod: exit %d, stderr %q; want 2 naming the pod", code, stderr)
	}
	// The offline golden file of the same flow is the live one too.
	want, err := os.ReadFile(filepath.Join("..", "testdata", "golden", "trace-audit.txt"))
	if err != nil {
		t.Fatal(err)
	}
	live, _, _ := runAgainst(t, socket, "policy", "trace", "--from", "z/a", "--to", "y/b", "--port", "81/UDP")
	if !*update && live != string(want) {
		t.Errorf("live trace differs from the offline golden trace-audit.txt:\n%s", live)
	}
}
