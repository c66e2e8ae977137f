package cni

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestParseConfigDefaults(t *testing.T) {
	c, err := ParseConfig([]byte(`{"cniVersion":"1.0.0","name":"veil","type":"veil-cni"}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.AgentSocket != DefaultAgentSocket || c.Timeout() != DefaultTimeout || c.MTU != 0 {
		t.Errorf("defaults: socket %q timeout %s mtu %d", c.AgentSocket, c.Timeout(), c.MTU)
	}
	if got := c.Prefixes(); len(got) != 1 || got[0] != netip.MustParsePrefix("0.0.0.0/0") {
		t.Errorf("default routes %v; want [0.0.0.0/0]", got)
	}
}

func TestParseConfigFull(t *testing.T) {
	c, err := ParseConfig([]byte(`{"cniVersion":"1.1.0","name":"veil","type":"veil-cni",
		"agentSocket":"/run/x.sock","mtu":1420,"timeoutSeconds":5,
		"routes":["10.244.0.0/16",{"dst":"10.99.0.0/16"},{"dst":"10.1.0.0/16","gw":"169.254.1.1"}],
		"runtimeConfig":{},"capabilities":{"portMappings":true}}`))
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.99.0.0/16"), netip.MustParsePrefix("10.1.0.0/16")}
	got := c.Prefixes()
	if len(got) != len(want) {
		t.Fatalf("routes %v; want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("route %d = %s; want %s", i, got[i], want[i])
		}
	}
	if c.AgentSocket != "/run/x.sock" || c.MTU != 1420 || c.Timeout() != 5*time.Second {
		t.Errorf("parsed %+v", c)
	}
}

func TestParseConfigErrorsSayWhatToFix(t *testing.T) {
	base := `"cniVersion":"1.0.0","name":"veil","type":"veil-cni"`
	for _, tc := range []struct {
		name, conf, want string
	}{
		{"not json", `{"cniVersion":`, "not a JSON object"},
		{"unknown field", `{` + base + `,"mtuu":1400}`, `unknown field(s) "mtuu"`},
		{"mtu low", `{` + base + `,"mtu":100}`, "mtu 100 is out of range"},
		{"mtu type", `{` + base + `,"mtu":"big"}`, "mtu"},
		{"host bits", `{` + base + `,"routes":["10.244.1.0/16"]}`, "did you mean 10.244.0.0/16"},
		{"not cidr", `{` + base + `,"routes":["10.244.1.0"]}`, "not a CIDR"},
		{"ipv6 route", `{` + base + `,"routes":["::/0"]}`, "only IPv4"},
		{"gw", `{` + base + `,"routes":[{"dst":"10.0.0.0/8","gw":"10.0.0.1"}]}`, "drop the gw field"},
		{"duplicate route", `{` + base + `,"routes":["10.0.0.0/8","10.0.0.0/8"]}`, "listed twice"},
		{"relative socket", `{` + base + `,"agentSocket":"agent.sock"}`, "absolute path"},
		{"timeout", `{` + base + `,"timeoutSeconds":1000}`, "timeoutSeconds 1000"},
		{"ipam", `{` + base + `,"ipam":{"type":"host-local"}}`, "remove the ipam section"},
		{"no version", `{"name":"veil","type":"veil-cni"}`, "cniVersion is missing"},
		{"old version", `{"cniVersion":"0.3.1","name":"veil","type":"veil-cni"}`, `cniVersion "0.3.1" is not supported`},
		{"no type", `{"cniVersion":"1.0.0","name":"veil"}`, "type is missing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.conf))
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("ParseConfig: %v; want a *ConfigError", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
		})
	}
}
