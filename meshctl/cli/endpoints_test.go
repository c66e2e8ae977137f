package cli

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestEndpointsAndIdentitiesGolden(t *testing.T) {
	socket := serve(t, newFakeAgent(t))
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
	}{
		{"live-endpoints.txt", []string{"endpoints"}, ExitOK},
		{"live-endpoints-x.json", []string{"endpoints", "-n", "x", "-o", "json"}, ExitOK},
		{"live-endpoints-none.txt", []string{"endpoints", "-n", "nope"}, ExitOK},
		{"live-identities.txt", []string{"identities"}, ExitOK},
		{"live-identities-some.yaml", []string{"identities", "2", "260", "-o", "yaml"}, ExitOK},
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

// TestIdentitiesShowLabels checks that every identity is shown with its
// label set, not as a bare number.
func TestIdentitiesShowLabels(t *testing.T) {
	out, _, code := runAgainst(t, serve(t, newFakeAgent(t)), "identities", "-o", "json")
	var r identitiesReport
	if err := json.Unmarshal([]byte(out), &r); err != nil || code != ExitOK {
		t.Fatalf("exit %d, %v:\n%s", code, err, out)
	}
	if len(r.Identities) < 10 {
		t.Fatalf("%d identities; want the 5 reserved and the pods'", len(r.Identities))
	}
	for _, id := range r.Identities {
		if len(id.Labels) == 0 {
			t.Errorf("identity %d has no labels", id.ID)
		}
		if id.Reserved != (id.ID < 256) {
			t.Errorf("identity %d: reserved = %v", id.ID, id.Reserved)
		}
	}
}

func TestIdentitiesErrors(t *testing.T) {
	socket := serve(t, newFakeAgent(t))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"identities", "abc"}, `identity "abc": want a number`},
		{[]string{"identities", "2", "99999"}, "no identity 99999 on node node-1"},
		{[]string{"endpoints", "extra"}, "unknown command"},
	} {
		_, stderr, code := runAgainst(t, socket, tc.args...)
		if code != ExitUsage || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: exit %d, stderr %q; want exit 2 and %q", tc.args, code, stderr, tc.want)
		}
	}
}
