package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/veilmesh/veil/agent/apiserver"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
)

// testServices is what the fake agent load-balances: a healthy Service
// with affinity and a terminating backend, one without backends, and one
// with a port whose target port name no endpoint declares.
func testServices() []*agentv1.Service {
	return []*agentv1.Service{
		{Namespace: "demo", Name: "backend", Type: "ClusterIP", ClusterIps: []string{"10.96.0.10"}, SessionAffinitySeconds: 10800,
			Ports: []*agentv1.ServicePort{
				{Name: "http", Port: 80, Protocol: "TCP", TargetPort: "8080", Backends: []*agentv1.ServiceBackend{
					{Ip: "10.0.1.5", Port: 8080, Node: "node-1", Pod: "demo/backend-1"},
					{Ip: "10.0.2.7", Port: 8080, Node: "node-2", Pod: "demo/backend-2"},
					{Ip: "10.0.2.9", Port: 8080, Node: "node-2", Pod: "demo/backend-3", Terminating: true},
				}},
				{Name: "dns", Port: 53, Protocol: "UDP", TargetPort: "53", Backends: []*agentv1.ServiceBackend{
					{Ip: "10.0.1.5", Port: 53, Node: "node-1", Pod: "demo/backend-1"},
				}},
			}},
		{Namespace: "demo", Name: "empty", Type: "ClusterIP", ClusterIps: []string{"10.96.0.11"},
			Ports: []*agentv1.ServicePort{{Port: 80, Protocol: "TCP", TargetPort: "80"}}},
		{Namespace: "kube-system", Name: "metrics", Type: "NodePort", ClusterIps: []string{"10.96.0.20"},
			Ports: []*agentv1.ServicePort{
				{Name: "web", Port: 443, Protocol: "TCP", TargetPort: "https", Backends: []*agentv1.ServiceBackend{
					{Ip: "10.0.1.8", Port: 8443, Node: "node-1", Pod: "kube-system/metrics-0"},
				}},
				{Name: "scrape", Port: 9100, Protocol: "TCP", TargetPort: "metrics",
					Problem: `no endpoint declares target port "metrics" (1 endpoints in the Service's slices)`},
			}},
	}
}

func (f *fakeAgent) ListServices(_ context.Context, req *agentv1.ListServicesRequest) (*agentv1.ListServicesResponse, error) {
	if req.Namespace == "unavailable" {
		return nil, status.Error(codes.Unavailable, "the agent does not load-balance Services (no datapath)")
	}
	resp := &agentv1.ListServicesResponse{}
	for _, s := range testServices() {
		if req.Namespace == "" || s.Namespace == req.Namespace {
			resp.Services = append(resp.Services, s)
		}
	}
	return resp, nil
}

func TestServicesGolden(t *testing.T) {
	socket := serve(t, newFakeAgent(t))
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
	}{
		{"live-services.txt", []string{"services"}, ExitOK},
		{"live-services-wide.txt", []string{"services", "--wide"}, ExitOK},
		{"live-services-demo.json", []string{"svc", "-n", "demo", "-o", "json"}, ExitOK},
		{"live-services-none.txt", []string{"services", "-n", "nope"}, ExitOK},
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

// TestServicesCounts: a backend counts once per Service however many ports
// it serves, and ready on one port wins over terminating on another.
func TestServicesCounts(t *testing.T) {
	out, stderr, code := runAgainst(t, serve(t, newFakeAgent(t)), "services", "-o", "json")
	if code != ExitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var r servicesReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatal(err)
	}
	got := map[string][2]int{}
	for _, s := range r.Services {
		got[s.Namespace+"/"+s.Name] = [2]int{s.Ready, s.Terminating}
	}
	want := map[string][2]int{"demo/backend": {2, 1}, "demo/empty": {0, 0}, "kube-system/metrics": {1, 0}}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: ready/terminating %v; want %v", k, got[k], w)
		}
	}
}

func TestServicesErrors(t *testing.T) {
	socket := serve(t, newFakeAgent(t))
	for _, tc := range []struct {
		args     []string
		wantCode int
		want     string
	}{
		{[]string{"services", "extra"}, ExitUsage, "unknown command"},
		{[]string{"services", "-o", "xml"}, ExitUsage, "xml"},
		{[]string{"services", "-n", "unavailable"}, ExitUnreachable, "no datapath"},
	} {
		_, stderr, code := runAgainst(t, socket, tc.args...)
		if code != tc.wantCode || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want %d and %q", tc.args, code, stderr, tc.wantCode, tc.want)
		}
	}
}

const servicesDir = "../testdata/services"

// newServicesAgent is a fake agent whose policy is compiled from the
// Services testdata, whose pods back testServices().
func newServicesAgent(t *testing.T) *fakeAgent {
	t.Helper()
	src, err := (&manifestFlags{paths: []string{servicesDir}}).openSource(nil, io.Discard)
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

// TestTraceServiceGolden: a trace to a Service judges each backend on its
// own port, offline (backends from the selector over the manifests' pods,
// named target ports resolved per pod) and live (backends from the agent).
func TestTraceServiceGolden(t *testing.T) {
	socket := serve(t, newServicesAgent(t))
	offline := []string{"policy", "trace", "-f", servicesDir, "--from", "demo/frontend"}
	live := []string{"policy", "trace", "--from", "demo/frontend"}
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
	}{
		{"trace-svc-partial.txt", append(offline, "--to", "svc/demo/backend", "--port", "80"), ExitOK},
		{"trace-svc-partial-exit.txt", append(offline, "--to", "svc/demo/backend", "--port", "80", "--exit-code"), ExitFailure},
		{"trace-svc-udp.json", append(offline, "--to", "svc/demo/backend", "--port", "53/UDP", "-o", "json"), ExitOK},
		{"trace-svc-empty.txt", append(offline, "--to", "svc/demo/empty", "--port", "80", "--exit-code"), ExitFailure},
		{"trace-svc-live.txt", append(live, "--to", "svc/demo/backend", "--port", "80"), ExitOK},
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

// TestTraceServiceVerdicts: the backend each verdict belongs to, checked
// against a trace straight to that pod (the oracle), offline and live.
func TestTraceServiceVerdicts(t *testing.T) {
	socket := serve(t, newServicesAgent(t))
	for _, mode := range [][]string{{"-f", servicesDir}, nil} {
		args := append(append([]string{"policy", "trace"}, mode...), "--from", "demo/frontend", "--to", "svc/demo/backend", "--port", "80", "-o", "json")
		out, stderr, code := runAgainst(t, socket, args...)
		if code != ExitOK {
			t.Fatalf("%v: exit %d: %s", mode, code, stderr)
		}
		var r serviceTraceReport
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatal(err)
		}
		if len(r.Backends) == 0 {
			t.Fatalf("%v: no backends", mode)
		}
		for _, b := range r.Backends {
			direct := append(append([]string{"policy", "trace"}, mode...), "--from", "demo/frontend", "--to", b.Backend, "--port", fmt.Sprint(b.Port), "-o", "json")
			out, _, _ := runAgainst(t, socket, direct...)
			var d traceReport
			if err := json.Unmarshal([]byte(out), &d); err != nil {
				t.Fatal(err)
			}
			if b.Trace.Verdict != d.Verdict {
				t.Errorf("%v: backend %s through the Service %s; straight to the pod %s", mode, b.Backend, b.Trace.Verdict, d.Verdict)
			}
		}
	}
}

func TestTraceServiceErrors(t *testing.T) {
	socket := serve(t, newServicesAgent(t))
	offline := []string{"policy", "trace", "-f", servicesDir, "--from", "demo/frontend"}
	for _, tc := range []struct {
		args     []string
		wantCode int
		want     string
	}{
		{append(offline, "--to", "svc/demo", "--port", "80"), ExitUsage, "want svc/NAMESPACE/NAME"},
		{append(offline, "--to", "svc/demo/nope", "--port", "80"), ExitUsage, "service demo/nope is not in the manifests"},
		{append(offline, "--to", "svc/demo/backend", "--port", "81"), ExitUsage, "has no port 81/TCP; it has 80/TCP, 53/UDP"},
		{append(offline, "--to", "svc/demo/backend", "--port", "8/ICMP"), ExitUsage, "no ICMP ports"},
		{[]string{"policy", "trace", "--from", "demo/frontend", "--to", "svc/demo/nope", "--port", "80"}, ExitUsage, "node node-1 load-balances no service demo/nope"},
	} {
		_, stderr, code := runAgainst(t, socket, tc.args...)
		if code != tc.wantCode || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want %d and %q", tc.args, code, stderr, tc.wantCode, tc.want)
		}
	}
}

// TestObserveShowsTheService: a flow load-balanced through a Service says
// so in the table and in -o json; others do not.
func TestObserveShowsTheService(t *testing.T) {
	fa := newFakeAgent(t)
	fa.flows = []*agentv1.Flow{
		{TimeUnixNano: testNow.UnixNano(), Node: "node-1", SrcIp: "10.0.1.9", DstIp: "10.0.1.5", SrcPort: 43512, DstPort: 8080, Protocol: "TCP",
			Verdict: "ALLOWED", ObservationPoint: "to-pod", SrcPod: "demo/frontend", DstPod: "demo/backend-1", Service: "demo/backend:80"},
		{TimeUnixNano: testNow.UnixNano(), Node: "node-1", SrcIp: "10.0.1.9", DstIp: "10.0.1.5", SrcPort: 43513, DstPort: 8080, Protocol: "TCP",
			Verdict: "ALLOWED", ObservationPoint: "to-pod", SrcPod: "demo/frontend", DstPod: "demo/backend-1"},
	}
	socket := serve(t, fa)
	out, stderr, code := runAgainst(t, socket, "observe")
	if code != ExitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != 3 || !strings.Contains(lines[1], "demo/frontend 10.0.1.9:43512") ||
		!strings.Contains(lines[1], "demo/backend-1 10.0.1.5:8080 (via svc demo/backend:80)") || strings.Contains(lines[2], "via svc") {
		t.Errorf("table:\n%s", out)
	}
	out, _, _ = runAgainst(t, socket, "observe", "-o", "json")
	var first, second flowReport
	jl := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(jl) != 2 || json.Unmarshal([]byte(jl[0]), &first) != nil || json.Unmarshal([]byte(jl[1]), &second) != nil ||
		first.Service != "demo/backend:80" || second.Service != "" || strings.Contains(jl[1], "service") {
		t.Errorf("json:\n%s", out)
	}
}
