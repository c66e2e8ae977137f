// Package cni is Veil's CNI 1.0 plugin: the plugin side that kubelet runs
// (veil-cni forwards ADD, DEL and CHECK to the node's agent over its unix
// socket) and the agent side that serves those calls (ParseRequest, Handler,
// Result).
//
// The plugin does no work itself, so it needs no privileges beyond the agent
// socket and cannot leave half-configured state behind: the agent allocates
// the address, wires the pod and registers the endpoint, undoing its own work
// when a step fails. Errors reach the container runtime as CNI error JSON
// whose message says what to fix:
//
//	7    invalid network config, or a call the agent refuses as malformed
//	11   try again later: agent unreachable, not ready, too slow, or the
//	     node's pod CIDR is exhausted
//	50   (STATUS) the agent does not answer
//	999  anything else, with the agent's message
//
// Network config (every field but the first three optional):
//
//	{
//	  "cniVersion": "1.0.0",
//	  "name": "veil",
//	  "type": "veil-cni",
//	  "agentSocket": "/var/run/veil/agent.sock",
//	  "mtu": 0,
//	  "routes": ["0.0.0.0/0"],
//	  "timeoutSeconds": 30
//	}
//
// mtu 0 lets the agent choose; routes may also be CNI route objects
// ({"dst": "10.0.0.0/8"}) and all go via 169.254.1.1.
package cni

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
)

// SupportedVersions are the CNI spec versions veil-cni speaks.
var SupportedVersions = []string{"0.4.0", "1.0.0", "1.1.0"}

// Defaults for fields the network config leaves out.
const (
	DefaultAgentSocket = "/var/run/veil/agent.sock"
	DefaultTimeout     = 30 * time.Second
	maxTimeoutSeconds  = 300
)

// Route is a destination the pod sends through its gateway. In the network
// config it is either a CIDR string or a CNI route object {"dst": "…"}.
type Route struct {
	Dst netip.Prefix
}

// UnmarshalJSON accepts "10.0.0.0/8" and {"dst": "10.0.0.0/8"}.
func (r *Route) UnmarshalJSON(data []byte) error {
	s := ""
	if err := json.Unmarshal(data, &s); err != nil {
		var obj struct {
			Dst string `json:"dst"`
			GW  string `json:"gw"`
		}
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&obj); err != nil {
			return fmt.Errorf("a route is a CIDR string or {\"dst\": \"CIDR\"}, got %s", data)
		}
		if obj.GW != "" && obj.GW != GatewayIP.String() {
			return fmt.Errorf("route %s: gw %s is not supported: every pod route goes via %s; drop the gw field", obj.Dst, obj.GW, GatewayIP)
		}
		s = obj.Dst
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return fmt.Errorf("route %q is not a CIDR like 10.0.0.0/8", s)
	}
	if !p.Addr().Is4() {
		return fmt.Errorf("route %s: only IPv4 routes are supported", p)
	}
	if p.Masked() != p {
		return fmt.Errorf("route %s has host bits set; did you mean %s?", p, p.Masked())
	}
	r.Dst = p
	return nil
}

// MarshalJSON writes the object form, as CNI results do.
func (r Route) MarshalJSON() ([]byte, error) {
	return json.Marshal(map[string]string{"dst": r.Dst.String()})
}

// NetConf is veil-cni's network configuration.
type NetConf struct {
	types.PluginConf
	// AgentSocket is the agent's unix socket.
	AgentSocket string `json:"agentSocket,omitempty"`
	// MTU of the pod's interface; 0 lets the agent choose.
	MTU int `json:"mtu,omitempty"`
	// Routes the pod sends through its gateway; empty means 0.0.0.0/0.
	Routes []Route `json:"routes,omitempty"`
	// TimeoutSeconds bounds one call to the agent; 0 means 30.
	TimeoutSeconds int `json:"timeoutSeconds,omitempty"`
}

// Timeout is the bound on one call to the agent.
func (c *NetConf) Timeout() time.Duration {
	if c.TimeoutSeconds == 0 {
		return DefaultTimeout
	}
	return time.Duration(c.TimeoutSeconds) * time.Second
}

// Prefixes returns the configured routes, or 0.0.0.0/0 if there are none.
func (c *NetConf) Prefixes() []netip.Prefix {
	if len(c.Routes) == 0 {
		return []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}
	}
	out := make([]netip.Prefix, len(c.Routes))
	for i, r := range c.Routes {
		out[i] = r.Dst
	}
	return out
}

// knownKeys are the top-level keys a network config may carry: the spec's
// own, those runtimes inject (runtimeConfig, args, prevResult, GC's
// attachments), and veil-cni's.
var knownKeys = []string{
	"cniVersion", "name", "type", "capabilities", "ipam", "dns",
	"prevResult", "runtimeConfig", "args", "cni.dev/valid-attachments",
	"agentSocket", "mtu", "routes", "timeoutSeconds",
}

// ConfigError says what is wrong with a network config; it becomes CNI
// error code 7 (invalid network config).
type ConfigError struct {
	Msg string
}

func (e *ConfigError) Error() string { return "invalid veil-cni network config: " + e.Msg }

func configErrorf(format string, args ...any) error {
	return &ConfigError{Msg: fmt.Sprintf(format, args...)}
}

// ParseConfig decodes and validates a network config, filling defaults.
func ParseConfig(data []byte) (*NetConf, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, configErrorf("not a JSON object: %v", err)
	}
	var unknown []string
	for k := range raw {
		if !slices.Contains(knownKeys, k) {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		slices.Sort(unknown)
		return nil, configErrorf("unknown field(s) %s; veil-cni understands agentSocket, mtu, routes and timeoutSeconds besides the standard CNI fields",
			strings.Join(quoteAll(unknown), ", "))
	}
	conf := &NetConf{}
	if err := json.Unmarshal(data, conf); err != nil {
		return nil, configErrorf("%v", err)
	}
	if err := conf.validate(); err != nil {
		return nil, err
	}
	if conf.AgentSocket == "" {
		conf.AgentSocket = DefaultAgentSocket
	}
	return conf, nil
}

func (c *NetConf) validate() error {
	switch {
	case c.CNIVersion == "":
		return configErrorf("cniVersion is missing; use one of %s", strings.Join(SupportedVersions, ", "))
	case !slices.Contains(SupportedVersions, c.CNIVersion):
		return configErrorf("cniVersion %q is not supported; use one of %s", c.CNIVersion, strings.Join(SupportedVersions, ", "))
	case c.Name == "":
		return configErrorf("name is missing")
	case c.Type == "":
		return configErrorf("type is missing; it names the plugin binary, \"veil-cni\"")
	case c.IPAM.Type != "":
		return configErrorf("ipam type %q is not supported: veil-cni allocates pod addresses from the node's pod CIDR itself; remove the ipam section", c.IPAM.Type)
	case c.AgentSocket != "" && !filepath.IsAbs(c.AgentSocket):
		return configErrorf("agentSocket %q must be an absolute path, like %s", c.AgentSocket, DefaultAgentSocket)
	case c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535):
		return configErrorf("mtu %d is out of range: use 0 (the agent chooses) or 576..65535", c.MTU)
	case c.TimeoutSeconds < 0 || c.TimeoutSeconds > maxTimeoutSeconds:
		return configErrorf("timeoutSeconds %d is out of range: use 0 (default %s) or 1..%d", c.TimeoutSeconds, DefaultTimeout, maxTimeoutSeconds)
	}
	seen := map[netip.Prefix]bool{}
	for _, r := range c.Routes {
		if seen[r.Dst] {
			return configErrorf("route %s is listed twice", r.Dst)
		}
		seen[r.Dst] = true
	}
	return nil
}

func quoteAll(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = fmt.Sprintf("%q", s)
	}
	return out
}
