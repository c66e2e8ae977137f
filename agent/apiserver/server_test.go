package apiserver

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/endpoints"
	"github.com/veilmesh/veil/agent/services"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

type fakeEndpoints []endpoints.Endpoint

func (f fakeEndpoints) List() []endpoints.Endpoint { return f }
func (f fakeEndpoints) Get(id policy.EndpointID) (endpoints.Endpoint, bool) {
	for _, e := range f {
		if e.Pod == id {
			return e, true
		}
	}
	return endpoints.Endpoint{}, false
}

type fakePolicy struct {
	eps     map[policy.EndpointID]policy.Endpoint
	invalid []*policy.PolicyError
}

func (f *fakePolicy) Endpoint(id policy.EndpointID) (policy.Endpoint, bool) {
	ep, ok := f.eps[id]
	return ep, ok
}
func (f *fakePolicy) Rule(uint32) (policy.Rule, bool)   { return policy.Rule{}, false }
func (f *fakePolicy) Rules() []policy.Rule              { return nil }
func (f *fakePolicy) Identities() []policy.IdentityInfo { return nil }
func (f *fakePolicy) Invalid() []*policy.PolicyError    { return f.invalid }
func (f *fakePolicy) Trace(_, _ policy.Peer, _ uint8, _ uint16) (policy.TraceResult, error) {
	return policy.TraceResult{}, errors.New("no trace in this fake")
}

type fakeDatapath struct{}

func (fakeDatapath) Endpoints() ([]datapath.Endpoint, error) { return nil, nil }
func (fakeDatapath) Acceleration() (bool, string)            { return false, "off in tests" }
func (fakeDatapath) Counters() (datapath.Counters, error)    { return datapath.Counters{}, nil }
func (fakeDatapath) AcceleratedSockets() (int, error)        { return 0, nil }
func (fakeDatapath) PolicyCounters(netip.Addr) ([]datapath.PolicyCounter, error) {
	return nil, nil
}
func (fakeDatapath) Underlay() string { return "eth0" }

type fakeHealth struct {
	converged bool
	degraded  map[string]string
}

func (f *fakeHealth) APIServerConnected() bool            { return true }
func (f *fakeHealth) LastSync() int64                     { return 42 }
func (f *fakeHealth) Converged() bool                     { return f.converged }
func (f *fakeHealth) Degraded() map[string]string         { return f.degraded }
func (f *fakeHealth) IdentityLabels(identity.ID) []string { return []string{"pod:app=a"} }

type fakeEncryption struct{ iface string }

func (f fakeEncryption) TunnelInterface() string { return f.iface }
func (f fakeEncryption) RotateKey(context.Context) (string, string, error) {
	return "old", "new", nil
}

func testServer(t *testing.T, eps fakeEndpoints, h *fakeHealth) *Server {
	t.Helper()
	return New(Config{
		SocketPath: filepath.Join(t.TempDir(), "agent.sock"), NodeName: "n1", AgentVersion: "test",
		PodCIDR: netip.MustParsePrefix("10.244.0.0/24"), StartedUnixNano: 1,
		Endpoints: eps, Policy: &fakePolicy{eps: map[policy.EndpointID]policy.Endpoint{}}, Datapath: fakeDatapath{},
		Health: h, Encryption: fakeEncryption{},
	})
}

func degradedComponents(resp *agentv1.StatusResponse) []string {
	var out []string
	for _, d := range resp.Degraded {
		out = append(out, d.Component)
	}
	return out
}

func TestStatusReportsWithoutRecording(t *testing.T) {
	h := &fakeHealth{degraded: map[string]string{"ipam": "no pod CIDR"}}
	s := testServer(t, nil, h)
	for range 2 {
		resp, err := s.Status(context.Background(), &agentv1.StatusRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if got := degradedComponents(resp); len(got) != 2 || got[0] != "ipam" || got[1] != "sync" || resp.Healthy {
			t.Fatalf("unconverged status: degraded %v, healthy %v", got, resp.Healthy)
		}
	}
	if len(h.degraded) != 1 {
		t.Fatalf("Status changed the degraded registry: %v", h.degraded)
	}
	h.converged = true
	resp, err := s.Status(context.Background(), &agentv1.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if got := degradedComponents(resp); len(got) != 1 || got[0] != "ipam" {
		t.Fatalf("converged status: degraded %v", got)
	}
	if resp.PodCidr != "10.244.0.0/24" || resp.Node != "n1" || resp.ApiVersion != APIVersion || !resp.Converged {
		t.Fatalf("status = %+v", resp)
	}
}

func TestListEndpointsShowsPendingAsDenyAll(t *testing.T) {
	id := policy.EndpointID{Namespace: "x", Name: "a"}
	eps := fakeEndpoints{{Pod: id, IP: netip.MustParseAddr("10.244.0.5"), ID: 1, Identity: 300, Pending: true}}
	s := testServer(t, eps, &fakeHealth{})
	s.cfg.Policy.(*fakePolicy).eps[id] = policy.Endpoint{EndpointID: id, Entries: make([]policytypes.Entry, 3)}
	resp, err := s.ListEndpoints(context.Background(), &agentv1.ListEndpointsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Endpoints) != 1 {
		t.Fatalf("endpoints = %v", resp.Endpoints)
	}
	e := resp.Endpoints[0]
	if e.PolicyEntries != 0 || !e.IngressEnforced || !e.EgressEnforced || e.Labels[0] != "pod:app=a" {
		t.Fatalf("pending endpoint listed as %+v, want deny-all", e)
	}
}

func TestRPCErrorCodes(t *testing.T) {
	s := testServer(t, nil, &fakeHealth{})
	ctx := context.Background()
	for _, c := range []struct {
		name string
		fn   func() error
		want codes.Code
	}{
		{"policy of unknown endpoint", func() error {
			_, err := s.GetPolicy(ctx, &agentv1.GetPolicyRequest{Namespace: "x", Name: "nope"})
			return err
		}, codes.NotFound},
		{"CNI before the pod network", func() error {
			_, err := s.CNIAdd(ctx, &agentv1.CNIRequest{})
			return err
		}, codes.Unavailable},
		{"rotate with encryption off", func() error {
			_, err := s.RotateKey(ctx, &agentv1.RotateKeyRequest{})
			return err
		}, codes.FailedPrecondition},
		{"marker with no pod to send from", func() error {
			_, err := s.SendMarker(ctx, &agentv1.SendMarkerRequest{Destination: "10.244.1.5", Marker: "m", Port: 9})
			return err
		}, codes.FailedPrecondition},
		{"capture without marker", func() error {
			_, err := s.CaptureUnderlay(ctx, &agentv1.CaptureRequest{DurationMs: 10})
			return err
		}, codes.InvalidArgument},
	} {
		if got := status.Code(c.fn()); got != c.want {
			t.Errorf("%s: code %v, want %v", c.name, got, c.want)
		}
	}
}

func TestServesOnARootOnlySocket(t *testing.T) {
	s := testServer(t, nil, &fakeHealth{converged: true, degraded: map[string]string{}})
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	fi, err := os.Stat(s.cfg.SocketPath)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Fatalf("socket mode %v, want 0600", perm)
	}
	conn, err := grpc.NewClient("unix://"+s.cfg.SocketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := agentv1.NewAgentClient(conn).Status(ctx, &agentv1.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if !resp.Healthy || resp.AgentVersion != "test" {
		t.Fatalf("status over the socket = %+v", resp)
	}
}

type fakeServices []services.ServiceView

func (f fakeServices) View(ns string) ([]services.ServiceView, error) {
	var out []services.ServiceView
	for _, v := range f {
		if ns == "" || v.Namespace == ns {
			out = append(out, v)
		}
	}
	return out, nil
}

func TestListServices(t *testing.T) {
	s := testServer(t, nil, &fakeHealth{})
	ctx := context.Background()
	if _, err := s.ListServices(ctx, &agentv1.ListServicesRequest{}); status.Code(err) != codes.Unavailable {
		t.Errorf("without the Service sync: %v; want Unavailable", err)
	}
	s.cfg.Services = fakeServices{
		{Namespace: "demo", Name: "backend", Type: "ClusterIP", ClusterIPs: []string{"10.96.0.10"}, Affinity: time.Minute,
			Ports: []services.PortView{{Name: "http", Port: 80, Protocol: "TCP", TargetPort: "8080", Backends: []services.BackendView{
				{IP: netip.MustParseAddr("10.244.1.3"), Port: 8080, Node: "n1", Pod: "demo/backend-1"},
				{IP: netip.MustParseAddr("10.244.2.2"), Port: 8080, Node: "n2", Terminating: true},
			}}, {Name: "metrics", Port: 9100, Protocol: "TCP", TargetPort: "metrics", Problem: "no endpoint declares it"}}},
		{Namespace: "kube-system", Name: "kube-dns", Type: "ClusterIP", ClusterIPs: []string{"10.96.0.53"}},
	}
	resp, err := s.ListServices(ctx, &agentv1.ListServicesRequest{Namespace: "demo"})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Services) != 1 {
		t.Fatalf("services of demo: %v", resp.Services)
	}
	got := resp.Services[0]
	if got.Name != "backend" || got.SessionAffinitySeconds != 60 || len(got.Ports) != 2 || got.ClusterIps[0] != "10.96.0.10" {
		t.Fatalf("service: %v", got)
	}
	http, metrics := got.Ports[0], got.Ports[1]
	if len(http.Backends) != 2 || http.Backends[0].Ip != "10.244.1.3" || http.Backends[0].Pod != "demo/backend-1" ||
		http.Backends[1].Node != "n2" || !http.Backends[1].Terminating || http.TargetPort != "8080" {
		t.Errorf("http port: %v", http)
	}
	if metrics.Problem == "" || len(metrics.Backends) != 0 {
		t.Errorf("metrics port: %v", metrics)
	}
	if all, err := s.ListServices(ctx, &agentv1.ListServicesRequest{}); err != nil || len(all.Services) != 2 {
		t.Errorf("all services: %v %v", all, err)
	}
}
