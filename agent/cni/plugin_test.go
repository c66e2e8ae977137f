package cni

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
)

var (
	buildOnce sync.Once
	binDir    string
	binPath   string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// pluginBinary builds veil-cni once per test binary run.
func pluginBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "veil-cni-bin-")
		if buildErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "veil-cni")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/veilmesh/veil/agent/cmd/veil-cni").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build veil-cni: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// fakeAgent serves the CNI calls of the agent API through a Handler, or
// fails them all with fail.
type fakeAgent struct {
	agentv1.UnimplementedAgentServer
	h     *Handler
	fail  error
	delay time.Duration
}

func (a *fakeAgent) serve(ctx context.Context, fn func(context.Context, *agentv1.CNIRequest) (*agentv1.CNIResponse, error), req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	if a.delay > 0 {
		select {
		case <-time.After(a.delay):
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	if a.fail != nil {
		return nil, a.fail
	}
	return fn(ctx, req)
}

func (a *fakeAgent) Status(ctx context.Context, _ *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	if a.fail != nil {
		return nil, a.fail
	}
	return &agentv1.StatusResponse{ApiVersion: "v1", Healthy: true}, nil
}

func (a *fakeAgent) CNIAdd(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	return a.serve(ctx, a.h.Add, req)
}

func (a *fakeAgent) CNIDel(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	return a.serve(ctx, a.h.Del, req)
}

func (a *fakeAgent) CNICheck(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	return a.serve(ctx, a.h.Check, req)
}

// socketDir is short: unix socket paths are limited to 108 bytes.
func socketDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "veilcni")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func startAgent(t testing.TB, a agentv1.AgentServer) string {
	t.Helper()
	sock := filepath.Join(socketDir(t), "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	agentv1.RegisterAgentServer(srv, a)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return sock
}

type cniCall struct {
	cmd, id, args, conf string
	netns, ifname       string
	env                 map[string]string
}

type cniOutput struct {
	stdout, stderr string
	exit           int
}

// run executes the plugin the way kubelet's runtime does: CNI_* environment
// and the network config on stdin, nothing else.
func run(t testing.TB, c cniCall) cniOutput {
	t.Helper()
	bin := pluginBinary(t)
	if c.netns == "" {
		c.netns = "/run/netns/veiltest-fake-pod"
	}
	if c.ifname == "" {
		c.ifname = "eth0"
	}
	env := map[string]string{
		"CNI_COMMAND":     c.cmd,
		"CNI_CONTAINERID": c.id,
		"CNI_NETNS":       c.netns,
		"CNI_IFNAME":      c.ifname,
		"CNI_ARGS":        c.args,
		"CNI_PATH":        filepath.Dir(bin),
	}
	for k, v := range c.env {
		env[k] = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin)
	for k, v := range env {
		if v != "" {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
	}
	cmd.Stdin = strings.NewReader(c.conf)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	out := cniOutput{stdout: stdout.String(), stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		out.exit = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run veil-cni: %v", err)
	}
	return out
}

func netConf(sock string, extra string) string {
	return fmt.Sprintf(`{"cniVersion":"1.0.0","name":"veil","type":"veil-cni","agentSocket":%q,"routes":["10.244.0.0/16","10.99.0.0/16"]%s}`, sock, extra)
}

func withVersion(conf, v string) string {
	return strings.Replace(conf, `"cniVersion":"1.0.0"`, `"cniVersion":"`+v+`"`, 1)
}

// cniErr decodes the CNI error JSON of a failed call.
func cniErr(t testing.TB, out cniOutput) (code uint, msg, details string) {
	t.Helper()
	if out.exit == 0 {
		t.Fatalf("veil-cni succeeded; want an error. stdout: %s", out.stdout)
	}
	var e struct {
		Code    uint   `json:"code"`
		Msg     string `json:"msg"`
		Details string `json:"details"`
	}
	if err := json.Unmarshal([]byte(out.stdout), &e); err != nil {
		t.Fatalf("stdout is not CNI error JSON: %v\n%s", err, out.stdout)
	}
	return e.Code, e.Msg, e.Details
}

func wantCNIError(t testing.TB, out cniOutput, code uint, msgs ...string) {
	t.Helper()
	got, msg, details := cniErr(t, out)
	if got != code {
		t.Errorf("CNI error code %d (%s); want %d", got, msg, code)
	}
	for _, m := range msgs {
		if !strings.Contains(msg+" "+details, m) {
			t.Errorf("CNI error %q (details %q) does not say %q", msg, details, m)
		}
	}
}

func TestPluginVersion(t *testing.T) {
	out := run(t, cniCall{cmd: "VERSION"})
	if out.exit != 0 {
		t.Fatalf("VERSION failed: %s %s", out.stdout, out.stderr)
	}
	var v struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal([]byte(out.stdout), &v); err != nil {
		t.Fatal(err)
	}
	if strings.Join(v.SupportedVersions, ",") != "0.4.0,1.0.0,1.1.0" {
		t.Errorf("supportedVersions %v", v.SupportedVersions)
	}
	out = run(t, cniCall{})
	if out.exit != 0 || !strings.Contains(out.stderr, "veil-cni") || !strings.Contains(out.stderr, "1.1.0") {
		t.Errorf("no CNI_COMMAND: exit %d stderr %q; want the about text", out.exit, out.stderr)
	}
}

func TestPluginAddCheckDel(t *testing.T) {
	f := newFixture(t, "10.244.3.0/24")
	sock := startAgent(t, &fakeAgent{h: f.h})
	conf := netConf(sock, "")

	out := run(t, cniCall{cmd: "ADD", id: "ctr-1", args: podArgs, conf: conf})
	if out.exit != 0 {
		t.Fatalf("ADD failed: %s\n%s", out.stdout, out.stderr)
	}
	var res struct {
		CNIVersion string `json:"cniVersion"`
		Interfaces []struct {
			Name, Mac, Sandbox string
		} `json:"interfaces"`
		IPs []struct {
			Address, Gateway string
			Interface        *int
		} `json:"ips"`
		Routes []struct{ Dst, GW string } `json:"routes"`
	}
	if err := json.Unmarshal([]byte(out.stdout), &res); err != nil {
		t.Fatalf("ADD output is not a result: %v\n%s", err, out.stdout)
	}
	if res.CNIVersion != "1.0.0" || len(res.Interfaces) != 2 || len(res.IPs) != 1 || len(res.Routes) != 2 {
		t.Fatalf("result %s", out.stdout)
	}
	if res.Interfaces[1].Name != "eth0" || res.Interfaces[1].Sandbox != "/run/netns/veiltest-fake-pod" || res.Interfaces[0].Sandbox != "" {
		t.Errorf("interfaces %+v", res.Interfaces)
	}
	if ip := res.IPs[0]; ip.Address != "10.244.3.2/32" || ip.Gateway != "169.254.1.1" || ip.Interface == nil || *ip.Interface != 1 {
		t.Errorf("ips %+v", res.IPs)
	}
	if r := res.Routes[1]; r.Dst != "10.99.0.0/16" || r.GW != "169.254.1.1" {
		t.Errorf("routes %+v", res.Routes)
	}

	// CHECK with the ADD result as prevResult, as the runtime sends it.
	var confMap map[string]any
	json.Unmarshal([]byte(conf), &confMap)
	var prev map[string]any
	json.Unmarshal([]byte(out.stdout), &prev)
	confMap["prevResult"] = prev
	checkConf, _ := json.Marshal(confMap)
	out = run(t, cniCall{cmd: "CHECK", id: "ctr-1", args: podArgs, conf: string(checkConf)})
	if out.exit != 0 || strings.TrimSpace(out.stdout) != "" {
		t.Fatalf("CHECK: exit %d, stdout %q", out.exit, out.stdout)
	}

	for i := range 2 {
		out = run(t, cniCall{cmd: "DEL", id: "ctr-1", args: podArgs, conf: conf})
		if out.exit != 0 {
			t.Fatalf("DEL #%d: %s", i+1, out.stdout)
		}
	}
	if _, ok := f.ip.Lookup("ctr-1"); ok {
		t.Error("address still allocated after DEL")
	}
	out = run(t, cniCall{cmd: "CHECK", id: "ctr-1", args: podArgs, conf: string(checkConf)})
	wantCNIError(t, out, 999, "no address is allocated", "FailedPrecondition")
	// DEL without a netns: the runtime may have removed it already.
	out = run(t, cniCall{cmd: "DEL", id: "ctr-1", conf: conf, env: map[string]string{"CNI_NETNS": ""}, netns: "-"})
	if out.exit != 0 {
		t.Fatalf("DEL without CNI_NETNS: %s", out.stdout)
	}
}

func TestPluginConvertsResultToConfigVersion(t *testing.T) {
	f := newFixture(t, "10.244.4.0/24")
	sock := startAgent(t, &fakeAgent{h: f.h})
	for _, v := range []string{"0.4.0", "1.1.0"} {
		out := run(t, cniCall{cmd: "ADD", id: "ctr-" + v, args: podArgs, conf: withVersion(netConf(sock, ""), v)})
		if out.exit != 0 {
			t.Fatalf("ADD with cniVersion %s: %s", v, out.stdout)
		}
		var res struct {
			CNIVersion string `json:"cniVersion"`
			IPs        []map[string]any
		}
		if err := json.Unmarshal([]byte(out.stdout), &res); err != nil {
			t.Fatal(err)
		}
		if res.CNIVersion != v || len(res.IPs) != 1 {
			t.Errorf("cniVersion %s: result %s", v, out.stdout)
		}
		if v == "0.4.0" && res.IPs[0]["version"] != "4" {
			t.Errorf("0.4.0 result lacks ip version: %s", out.stdout)
		}
	}
	out := run(t, cniCall{cmd: "ADD", id: "ctr-old", args: podArgs, conf: withVersion(netConf(sock, ""), "0.3.1")})
	wantCNIError(t, out, 1, "incompatible CNI versions")
}

func TestPluginMalformedConfig(t *testing.T) {
	f := newFixture(t, "10.244.5.0/24")
	sock := startAgent(t, &fakeAgent{h: f.h})
	for _, tc := range []struct {
		name, conf string
		code       uint
		want       []string
	}{
		{"unknown field", netConf(sock, `,"mtuu":1400`), 7, []string{`unknown field(s) "mtuu"`, "agentSocket, mtu, routes"}},
		{"mtu", netConf(sock, `,"mtu":70000`), 7, []string{"mtu 70000 is out of range: use 0 (the agent chooses) or 576..65535"}},
		{"route", strings.Replace(netConf(sock, ""), "10.244.0.0/16", "10.244.0.1/16", 1), 7, []string{"route 10.244.0.1/16 has host bits set; did you mean 10.244.0.0/16?"}},
		{"relative socket", netConf("agent.sock", ""), 7, []string{"must be an absolute path"}},
		{"ipam", netConf(sock, `,"ipam":{"type":"host-local"}`), 7, []string{"remove the ipam section"}},
		// Input that is not JSON at all is refused by the CNI library before
		// veil-cni sees it, with the spec's decoding-failure code.
		{"not json", `{"cniVersion":"1.0.0",`, 6, []string{"unmarshal"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := run(t, cniCall{cmd: "ADD", id: "ctr-bad", args: podArgs, conf: tc.conf})
			wantCNIError(t, out, tc.code, tc.want...)
		})
	}
	if got := len(f.ip.List()); got != 0 {
		t.Errorf("%d addresses allocated by failed calls", got)
	}
	// The agent's own validation comes back as code 7 too.
	out := run(t, cniCall{cmd: "ADD", id: "ctr-noargs", conf: netConf(sock, "")})
	wantCNIError(t, out, 7, "K8S_POD_NAMESPACE")
	out = run(t, cniCall{cmd: "ADD", id: "ctr-x", conf: netConf(sock, ""), env: map[string]string{"CNI_IFNAME": ""}, ifname: "-"})
	wantCNIError(t, out, 4, "CNI_IFNAME")
}

func TestPluginAgentDown(t *testing.T) {
	dir := socketDir(t)
	missing := filepath.Join(dir, "agent.sock")
	for _, cmd := range []string{"ADD", "DEL", "CHECK"} {
		out := run(t, cniCall{cmd: cmd, id: "ctr-1", args: podArgs, conf: netConf(missing, "")})
		wantCNIError(t, out, 11, "is veil-agent running on this node? socket "+missing, "no such file or directory")
	}
	// A socket file left by a dead agent.
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	out := run(t, cniCall{cmd: "ADD", id: "ctr-1", args: podArgs, conf: netConf(stale, "")})
	wantCNIError(t, out, 11, "is veil-agent running on this node?", "connection refused")
}

func TestPluginAgentErrors(t *testing.T) {
	t.Run("exhausted", func(t *testing.T) {
		f := newFixture(t, "10.244.9.0/30")
		sock := startAgent(t, &fakeAgent{h: f.h})
		if out := run(t, cniCall{cmd: "ADD", id: "ctr-1", args: podArgs, conf: netConf(sock, "")}); out.exit != 0 {
			t.Fatal(out.stdout)
		}
		out := run(t, cniCall{cmd: "ADD", id: "ctr-2", args: podArgs, conf: netConf(sock, "")})
		wantCNIError(t, out, 11, "pod CIDR 10.244.9.0/30 is exhausted: all 1 allocatable addresses are in use")
		if out := run(t, cniCall{cmd: "DEL", id: "ctr-1", args: podArgs, conf: netConf(sock, "")}); out.exit != 0 {
			t.Fatal(out.stdout)
		}
		if out := run(t, cniCall{cmd: "ADD", id: "ctr-2", args: podArgs, conf: netConf(sock, "")}); out.exit != 0 {
			t.Fatalf("ADD after DEL freed the address: %s", out.stdout)
		}
	})
	t.Run("not ready", func(t *testing.T) {
		sock := startAgent(t, &fakeAgent{fail: status.Error(codes.Unavailable, "the agent's CNI service is not running yet")})
		out := run(t, cniCall{cmd: "ADD", id: "ctr-1", args: podArgs, conf: netConf(sock, "")})
		wantCNIError(t, out, 11, "veil-agent is not ready: the agent's CNI service is not running yet")
	})
	t.Run("internal", func(t *testing.T) {
		sock := startAgent(t, &fakeAgent{fail: status.Error(codes.Internal, "attach tcx to veil123: permission denied")})
		out := run(t, cniCall{cmd: "ADD", id: "ctr-1", args: podArgs, conf: netConf(sock, "")})
		wantCNIError(t, out, 999, "attach tcx to veil123: permission denied", "Internal")
	})
	t.Run("timeout", func(t *testing.T) {
		f := newFixture(t, "10.244.9.0/24")
		sock := startAgent(t, &fakeAgent{h: f.h, delay: 5 * time.Second})
		start := time.Now()
		out := run(t, cniCall{cmd: "ADD", id: "ctr-1", args: podArgs, conf: netConf(sock, `,"timeoutSeconds":1`)})
		wantCNIError(t, out, 11, "did not finish within 1s")
		if d := time.Since(start); d > 4*time.Second {
			t.Errorf("timed-out call took %s", d)
		}
	})
}

func TestPluginStatus(t *testing.T) {
	conf := func(sock string) string { return withVersion(netConf(sock, ""), "1.1.0") }
	sock := startAgent(t, &fakeAgent{})
	if out := run(t, cniCall{cmd: "STATUS", conf: conf(sock)}); out.exit != 0 {
		t.Fatalf("STATUS with the agent up: %s", out.stdout)
	}
	missing := filepath.Join(socketDir(t), "agent.sock")
	wantCNIError(t, run(t, cniCall{cmd: "STATUS", conf: conf(missing)}), 50, "is veil-agent running on this node?")
	sick := startAgent(t, &fakeAgent{fail: status.Error(codes.Unavailable, "starting")})
	wantCNIError(t, run(t, cniCall{cmd: "STATUS", conf: conf(sick)}), 50, "veil-agent is not ready: starting")
	// STATUS came with CNI 1.1; older configs may not ask for it.
	wantCNIError(t, run(t, cniCall{cmd: "STATUS", conf: netConf(sock, "")}), 1, "does not allow STATUS")
}
