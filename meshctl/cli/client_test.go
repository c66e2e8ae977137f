package cli

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/veilmesh/veil/agent/apiserver"
	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/endpoints"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

// testNow is the clock of the live tests: the fake agent's times are
// relative to it.
var testNow = time.Date(2026, 11, 21, 10, 0, 0, 0, time.UTC)

// fakeAgent serves the agent API from a policy compiled from testdata, so
// that live answers are the compiler's, as a real agent's are. Trace and
// GetPolicy are the agent's own code (agent/apiserver) over that compiler,
// this node's pods and fake datapath counters.
type fakeAgent struct {
	agentv1.UnimplementedAgentServer
	real     *apiserver.Server
	compiled *policy.Compiler
	status   *agentv1.StatusResponse
	flows    []*agentv1.Flow
	// live flows are sent to a follower after the stored ones.
	live []*agentv1.Flow

	mu       sync.Mutex
	requests []*agentv1.ObserveRequest
}

func newFakeAgent(t *testing.T) *fakeAgent {
	t.Helper()
	src, err := (&manifestFlags{paths: []string{e2e, policies, auditDir}}).openSource(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeAgent{compiled: src.compiled, status: healthyStatus()}
	f.real = apiserver.New(apiserver.Config{
		NodeName: "node-1", Policy: src.compiled,
		Endpoints: localEndpoints{src.compiled}, Datapath: countingDatapath{src.compiled},
	})
	return f
}

// localEndpoints are the fake node's pods (localPods) as the agent's
// endpoint registry holds them.
type localEndpoints struct{ compiled *policy.Compiler }

var _ apiserver.Endpoints = localEndpoints{}

func (l localEndpoints) List() []endpoints.Endpoint {
	var out []endpoints.Endpoint
	for _, name := range localPods {
		ns, pod, _ := strings.Cut(name, "/")
		if ep, ok := l.Get(policy.EndpointID{Namespace: ns, Name: pod}); ok {
			out = append(out, ep)
		}
	}
	return out
}

func (l localEndpoints) Get(id policy.EndpointID) (endpoints.Endpoint, bool) {
	if !slices.Contains(localPods, id.String()) {
		return endpoints.Endpoint{}, false
	}
	ep, ok := l.compiled.Endpoint(id)
	if !ok || len(ep.IPs) == 0 {
		return endpoints.Endpoint{}, false
	}
	return endpoints.Endpoint{Pod: id, IP: ep.IPs[0], Identity: ep.Identity}, true
}

// countingDatapath counts 10 hits and 640 bytes per entry position of a
// local endpoint's compiled policy (the i-th entry 10·i hits).
type countingDatapath struct{ compiled *policy.Compiler }

var _ apiserver.Datapath = countingDatapath{}

func (d countingDatapath) PolicyCounters(ip netip.Addr) ([]datapath.PolicyCounter, error) {
	for _, name := range localPods {
		ns, pod, _ := strings.Cut(name, "/")
		ep, ok := d.compiled.Endpoint(policy.EndpointID{Namespace: ns, Name: pod})
		if !ok || !slices.Contains(ep.IPs, ip) {
			continue
		}
		var out []datapath.PolicyCounter
		for i, e := range ep.Entries {
			out = append(out, datapath.PolicyCounter{Key: e.Key, RuleID: e.RuleID, Hits: uint64(10 * (i + 1)), Bytes: uint64(640 * (i + 1))})
		}
		return out, nil
	}
	return nil, fmt.Errorf("no endpoint with address %s", ip)
}

func (countingDatapath) Endpoints() ([]datapath.Endpoint, error) { return nil, nil }
func (countingDatapath) Acceleration() (bool, string)            { return false, "" }
func (countingDatapath) Counters() (datapath.Counters, error)    { return datapath.Counters{}, nil }
func (countingDatapath) AcceleratedSockets() (int, error)        { return 0, nil }
func (countingDatapath) Underlay() string                        { return "eth0" }

func healthyStatus() *agentv1.StatusResponse {
	return &agentv1.StatusResponse{
		ApiVersion: "v1", AgentVersion: "v0.3.0", Node: "node-1", Healthy: true,
		ApiServerConnected: true, LastSyncUnixNano: testNow.Add(-5 * time.Second).UnixNano(),
		StartedUnixNano: testNow.Add(-(2*time.Hour + 3*time.Minute + 4*time.Second)).UnixNano(),
		Programs: []*agentv1.Program{
			{Name: "from-pod", AttachPoint: "tc ingress of pod veths", Attached: 3},
			{Name: "to-pod", AttachPoint: "tc egress of pod veths", Attached: 3},
			{Name: "from-netdev", AttachPoint: "tc ingress of the underlay", Attached: 1},
			{Name: "sockops", AttachPoint: "cgroup /sys/fs/cgroup/veil", Attached: 1},
			{Name: "sk_msg", AttachPoint: "veil_sockhash", Attached: 1},
		},
		Endpoints: 3, Identities: 14, Policies: 3, Converged: true, SocketAcceleration: true,
		PodCidr: "10.0.1.0/24",
		Counters: &agentv1.Counters{
			Drops:          map[string]uint64{"policy-denied-ingress": 42, "spoofed-source": 3, "policy-denied-egress": 42},
			ForwardedLocal: 1200, ForwardedRemote: 340, ForwardedStack: 17, Established: 5021, Audit: 2,
			SocketRedirectedBytes: 3 << 20, AcceleratedSockets: 4,
		},
	}
}

func degradedStatus() *agentv1.StatusResponse {
	st := healthyStatus()
	st.Healthy, st.Converged, st.ApiServerConnected = false, false, false
	st.InvalidPolicies = 1
	st.Counters.EventsLost = 7
	st.Degraded = []*agentv1.Degraded{
		{Component: "sync", Reason: "not converged with the API server yet"},
		{Component: "policy NetworkPolicy x/typo", Reason: `spec.ingress[0].ports[0].port: invalid port "http-"`},
	}
	return st
}

func (f *fakeAgent) Status(context.Context, *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	return f.status, nil
}

// localPods are the pods the fake's node runs.
var localPods = []string{"x/a", "x/b", "y/b"}

func (f *fakeAgent) ListEndpoints(context.Context, *agentv1.ListEndpointsRequest) (*agentv1.ListEndpointsResponse, error) {
	resp := &agentv1.ListEndpointsResponse{}
	for i, name := range localPods {
		ns, pod, _ := strings.Cut(name, "/")
		ep, ok := f.compiled.Endpoint(policy.EndpointID{Namespace: ns, Name: pod})
		if !ok {
			return nil, status.Errorf(codes.Internal, "no endpoint %s", name)
		}
		resp.Endpoints = append(resp.Endpoints, &agentv1.Endpoint{
			Namespace: ns, Name: pod, Ip: ep.IPs[0].String(), Id: uint32(100 + i), Identity: uint32(ep.Identity),
			Labels: f.labels(ep.Identity), Interface: "veil" + ns + pod, PolicyEntries: int32(len(ep.Entries)),
			IngressEnforced: ep.Defaults.IngressEnforce == policytypes.Deny, EgressEnforced: ep.Defaults.EgressEnforce == policytypes.Deny,
			ContainerId: "c0ffee" + ns + pod,
		})
	}
	return resp, nil
}

func (f *fakeAgent) labels(id identity.ID) []string {
	for _, info := range f.compiled.Identities() {
		if info.ID == id {
			var out []string
			for _, l := range info.Labels {
				out = append(out, l.String())
			}
			return out
		}
	}
	return nil
}

func (f *fakeAgent) ListIdentities(context.Context, *agentv1.ListIdentitiesRequest) (*agentv1.ListIdentitiesResponse, error) {
	resp := &agentv1.ListIdentitiesResponse{}
	for _, id := range []identity.ID{identity.Host, identity.World, identity.Unmanaged, identity.Health, identity.RemoteNode} {
		resp.Identities = append(resp.Identities, &agentv1.Identity{Id: uint32(id), Labels: []string{"reserved:" + id.ReservedName()}, Reserved: true})
	}
	count := map[identity.ID]int32{}
	for _, name := range localPods {
		ns, pod, _ := strings.Cut(name, "/")
		ep, _ := f.compiled.Endpoint(policy.EndpointID{Namespace: ns, Name: pod})
		count[ep.Identity]++
	}
	for _, info := range f.compiled.Identities() {
		resp.Identities = append(resp.Identities, &agentv1.Identity{Id: uint32(info.ID), Labels: f.labels(info.ID), Endpoints: count[info.ID]})
	}
	return resp, nil
}

func (f *fakeAgent) GetPolicy(ctx context.Context, req *agentv1.GetPolicyRequest) (*agentv1.GetPolicyResponse, error) {
	return f.real.GetPolicy(ctx, req)
}

func (f *fakeAgent) Trace(ctx context.Context, req *agentv1.TraceRequest) (*agentv1.TraceResponse, error) {
	return f.real.Trace(ctx, req)
}

// Observe records the request and sends the stored flows (the last N),
// then with follow the live ones, then waits for the client to go.
func (f *fakeAgent) Observe(req *agentv1.ObserveRequest, stream agentv1.Agent_ObserveServer) error {
	f.mu.Lock()
	f.requests = append(f.requests, req)
	f.mu.Unlock()
	flows := f.flows
	if req.Last > 0 && int(req.Last) < len(flows) {
		flows = flows[len(flows)-int(req.Last):]
	}
	if req.Follow {
		flows = append(flows[:len(flows):len(flows)], f.live...)
	}
	for _, fl := range flows {
		if err := stream.Send(fl); err != nil {
			return err
		}
	}
	if req.Follow {
		<-stream.Context().Done()
	}
	return nil
}

func (f *fakeAgent) observed() []*agentv1.ObserveRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.requests
}

// serve starts srv on a fresh unix socket and returns its path. The
// directory is short: a socket path has to fit in 108 bytes.
func serve(t *testing.T, srv agentv1.AgentServer) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "meshctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "agent.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	agentv1.RegisterAgentServer(g, srv)
	go g.Serve(ln)
	t.Cleanup(g.Stop)
	return path
}

// testEnv is the environment of the live tests: a fixed clock, UTC, and
// only the given variables.
func testEnv(vars map[string]string) agentEnv {
	return agentEnv{getenv: func(k string) string { return vars[k] }, now: func() time.Time { return testNow }, loc: time.UTC}
}

// runLive runs meshctl in-process in env.
func runLive(t *testing.T, ctx context.Context, env agentEnv, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	code = mainWith(ctx, args, Streams{In: strings.NewReader(""), Out: &out, Err: &errb}, env)
	return out.String(), errb.String(), code
}

// runAgainst runs meshctl against the agent at socket.
func runAgainst(t *testing.T, socket string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	out, stderr, code := runLive(t, t.Context(), testEnv(nil), append([]string{"--socket", socket}, args...)...)
	return strings.ReplaceAll(out, socket, "SOCKET"), stderr, code
}

func TestSocketSelection(t *testing.T) {
	a, b := serve(t, newFakeAgent(t)), serve(t, newFakeAgent(t))
	other := newFakeAgent(t)
	other.status = healthyStatus()
	other.status.Node = "node-2"
	c := serve(t, other)
	for _, tc := range []struct {
		name       string
		vars       map[string]string
		args       []string
		wantCode   int
		wantOut    string
		wantStderr string
	}{
		{"--socket", nil, []string{"--socket", b}, ExitOK, "node-1", ""},
		{"VEIL_SOCKET", map[string]string{agentclient.EnvSocket: c}, nil, ExitOK, "node-2", ""},
		{"--socket beats VEIL_SOCKET", map[string]string{agentclient.EnvSocket: c}, []string{"--socket", a}, ExitOK, "node-1", ""},
		{"cluster node without kubeconfig", nil, []string{"--node", "node-2"}, ExitUsage, "", "reaches other nodes' agents through the API server, so point --kubeconfig at the cluster's kubeconfig"},
		{"--node and --socket", nil, []string{"--node", "node-2", "--socket", a}, ExitUsage, "", "not both"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, stderr, code := runLive(t, t.Context(), testEnv(tc.vars), append([]string{"status"}, tc.args...)...)
			if code != tc.wantCode {
				t.Errorf("exit code = %d; want %d\nstderr: %s", code, tc.wantCode, stderr)
			}
			if !strings.Contains(out, tc.wantOut) || !strings.Contains(stderr, tc.wantStderr) {
				t.Errorf("stdout = %q, stderr = %q; want them to contain %q and %q", out, stderr, tc.wantOut, tc.wantStderr)
			}
		})
	}
}

func TestUnreachable(t *testing.T) {
	dir, err := os.MkdirTemp("", "meshctl")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	missing := filepath.Join(dir, "missing.sock")
	// A socket file nobody listens on, as a crashed agent leaves it.
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"status, no socket", []string{"status", "--socket", missing}, "no socket there: is veil-agent running on this node?"},
		{"status, stale socket", []string{"status", "--socket", stale}, "nothing listens on the socket"},
		{"endpoints", []string{"endpoints", "--socket", missing}, "cannot reach veil-agent at " + missing},
		{"identities", []string{"identities", "--socket", missing}, "cannot reach veil-agent at " + missing},
		{"policy get", []string{"policy", "get", "x/a", "--socket", missing}, "cannot reach veil-agent at " + missing},
		{"trace", []string{"policy", "trace", "--from", "x/a", "--to", "x/b", "--port", "80", "--socket", missing}, "cannot reach veil-agent at " + missing},
		{"observe", []string{"observe", "--socket", missing}, "meshctl status --help"},
		{"observe --follow", []string{"observe", "--follow", "--socket", missing}, "cannot reach veil-agent at " + missing},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			out, stderr, code := runLive(t, t.Context(), testEnv(nil), tc.args...)
			if code != ExitUnreachable {
				t.Errorf("exit code = %d; want %d\nstderr: %s", code, ExitUnreachable, stderr)
			}
			if out != "" || !strings.Contains(stderr, tc.want) {
				t.Errorf("stdout = %q, stderr = %q; want it to contain %q", out, stderr, tc.want)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("took %s to report an unreachable agent", d)
			}
		})
	}
}

func TestUnreachableGolden(t *testing.T) {
	_, stderr, code := runLive(t, t.Context(), testEnv(nil), "status", "--socket", "/nonexistent/veil/agent.sock")
	if code != ExitUnreachable {
		t.Errorf("exit code = %d; want %d", code, ExitUnreachable)
	}
	golden(t, "live-unreachable.txt", stderr)
}

// slowAgent answers Status only after the client has given up.
type slowAgent struct{ fakeAgent }

func (s *slowAgent) Status(ctx context.Context, _ *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func TestTimeout(t *testing.T) {
	socket := serve(t, &slowAgent{})
	_, stderr, code := runLive(t, t.Context(), testEnv(nil), "status", "--socket", socket, "--timeout", "200ms")
	if code != ExitUnreachable || !strings.Contains(stderr, "did not answer within 200ms") {
		t.Errorf("exit %d, stderr %q; want exit %d and a timeout message", code, stderr, ExitUnreachable)
	}
}

func TestVersionMismatch(t *testing.T) {
	for _, v := range []string{"v2", ""} {
		fa := newFakeAgent(t)
		fa.status = healthyStatus()
		fa.status.ApiVersion = v
		socket := serve(t, fa)
		for _, args := range [][]string{{"status"}, {"endpoints"}, {"observe"}, {"policy", "trace", "--from", "x/a", "--to", "x/b", "--port", "80"}} {
			out, stderr, code := runAgainst(t, socket, args...)
			if code != ExitUnreachable || out != "" {
				t.Errorf("%q with API %q: exit %d, stdout %q; want exit %d and no output", args, v, code, out, ExitUnreachable)
			}
			want := "serves API version " + v + ", this meshctl speaks v1"
			if v == "" {
				want = "serves API version (none)"
			}
			if !strings.Contains(stderr, want) || !strings.Contains(stderr, "agent version v0.3.0") {
				t.Errorf("%q with API %q: stderr %q; want it to contain %q", args, v, stderr, want)
			}
		}
	}
}

// unimplementedAgent is an older agent: it has Status only.
type unimplementedAgent struct {
	agentv1.UnimplementedAgentServer
}

func (unimplementedAgent) Status(context.Context, *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	return healthyStatus(), nil
}

func TestOlderAgent(t *testing.T) {
	socket := serve(t, unimplementedAgent{})
	_, stderr, code := runAgainst(t, socket, "identities")
	if code != ExitUnreachable || !strings.Contains(stderr, "does not implement it") {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
}

func TestAgentCommandsDocumentExitCodes(t *testing.T) {
	for _, args := range [][]string{{"status"}, {"endpoints"}, {"identities"}, {"observe"}, {"policy", "get"}, {"policy", "trace"}, {}} {
		out, _, code := runLive(t, t.Context(), testEnv(nil), append(args, "--help")...)
		if code != ExitOK || !strings.Contains(out, "Exit codes:") || !strings.Contains(out, "3  ") {
			t.Errorf("meshctl %s --help: exit %d, output lacks exit code 3:\n%s", strings.Join(args, " "), code, out)
		}
		for _, flag := range []string{"--socket", "--node", "--timeout"} {
			if !strings.Contains(out, flag) {
				t.Errorf("meshctl %s --help does not show %s", strings.Join(args, " "), flag)
			}
		}
	}
}
