package endpoints

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/veilmesh/veil/agent/cni"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
)

type fakeEnforcer struct {
	mu        sync.Mutex
	enforced  []Endpoint
	withdrawn []Endpoint
	err       error
}

func (f *fakeEnforcer) Enforce(_ context.Context, ep Endpoint) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.enforced = append(f.enforced, ep)
	return f.err
}

func (f *fakeEnforcer) Withdraw(_ context.Context, ep Endpoint) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.withdrawn = append(f.withdrawn, ep)
	return f.err
}

func info(name, container, ip string) cni.EndpointInfo {
	return cni.EndpointInfo{
		Namespace: "ns", Name: name, ContainerID: container, IP: netip.MustParseAddr(ip),
		HostVeth: "veil" + container, HostIfindex: 7,
		HostMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, PodMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2},
	}
}

func newTest(t *testing.T) (*Registry, *fakeEnforcer) {
	t.Helper()
	f := &fakeEnforcer{}
	return New(Config{StateDir: t.TempDir(), Enforcer: f, SaveEvery: 10 * time.Millisecond}), f
}

func TestRegisterSavesBeforeReturning(t *testing.T) {
	r, f := newTest(t)
	if err := r.RegisterEndpoint(context.Background(), info("a", "c1", "10.244.0.5")); err != nil {
		t.Fatal(err)
	}
	if len(f.enforced) != 1 || f.enforced[0].Pod.Name != "a" || !f.enforced[0].Pending {
		t.Fatalf("enforced %+v, want one pending endpoint a", f.enforced)
	}
	st, err := LoadState(r.cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Endpoints) != 1 || st.Endpoints[0].IP != netip.MustParseAddr("10.244.0.5") || st.Endpoints[0].ID != 1 {
		t.Fatalf("saved %+v", st.Endpoints)
	}
	host, pod, err := st.Endpoints[0].MACs()
	if err != nil || host.String() != "02:00:00:00:00:01" || pod.String() != "02:00:00:00:00:02" {
		t.Fatalf("MACs = %v %v %v", host, pod, err)
	}
}

func TestRegisterRefusesSecondContainer(t *testing.T) {
	r, _ := newTest(t)
	ctx := context.Background()
	if err := r.RegisterEndpoint(ctx, info("a", "c1", "10.244.0.5")); err != nil {
		t.Fatal(err)
	}
	if err := r.RegisterEndpoint(ctx, info("a", "c2", "10.244.0.6")); err == nil {
		t.Fatal("a second container of the same pod was accepted")
	}
	// The same container again (a retried ADD) keeps its id.
	if err := r.RegisterEndpoint(ctx, info("a", "c1", "10.244.0.5")); err != nil {
		t.Fatal(err)
	}
	if ep, _ := r.Get(policy.EndpointID{Namespace: "ns", Name: "a"}); ep.ID != 1 {
		t.Fatalf("id after retry = %d, want 1", ep.ID)
	}
}

func TestRegisterReportsEnforcerError(t *testing.T) {
	r, f := newTest(t)
	f.err = errors.New("map full")
	err := r.RegisterEndpoint(context.Background(), info("a", "c1", "10.244.0.5"))
	if !errors.Is(err, f.err) {
		t.Fatalf("err = %v, want it to wrap %v", err, f.err)
	}
}

func TestUnregisterIsIdempotent(t *testing.T) {
	r, f := newTest(t)
	ctx := context.Background()
	if err := r.UnregisterEndpoint(ctx, "unknown"); err != nil || len(f.withdrawn) != 0 {
		t.Fatalf("unknown container: err %v, withdrawn %v", err, f.withdrawn)
	}
	if err := r.RegisterEndpoint(ctx, info("a", "c1", "10.244.0.5")); err != nil {
		t.Fatal(err)
	}
	if err := r.UnregisterEndpoint(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if len(f.withdrawn) != 1 || r.Len() != 0 {
		t.Fatalf("withdrawn %v, %d left", f.withdrawn, r.Len())
	}
	st, err := LoadState(r.cfg.StateDir)
	if err != nil || len(st.Endpoints) != 0 {
		t.Fatalf("state after DEL: %+v, %v", st, err)
	}
}

func TestIDsSkipThoseInUse(t *testing.T) {
	r, _ := newTest(t)
	r.Restore([]*Endpoint{{Pod: policy.EndpointID{Namespace: "ns", Name: "old"}, ID: 1<<31 - 1}})
	if !r.Adopt(Endpoint{Pod: policy.EndpointID{Namespace: "ns", Name: "adopted"}, ID: 1}) {
		t.Fatal("adopt refused")
	}
	if r.Adopt(Endpoint{Pod: policy.EndpointID{Namespace: "ns", Name: "adopted"}, ID: 9}) {
		t.Fatal("adopted a second endpoint for one pod")
	}
	if err := r.RegisterEndpoint(context.Background(), info("new", "c1", "10.244.0.5")); err != nil {
		t.Fatal(err)
	}
	// Past the top of the range the ids wrap, skipping 1 (adopted).
	if ep, _ := r.Get(policy.EndpointID{Namespace: "ns", Name: "new"}); ep.ID != 2 {
		t.Fatalf("id = %d, want 2", ep.ID)
	}
}

func TestConvergeEndsPending(t *testing.T) {
	r, _ := newTest(t)
	ctx := context.Background()
	if err := r.RegisterEndpoint(ctx, info("early", "c1", "10.244.0.5")); err != nil {
		t.Fatal(err)
	}
	r.Restore([]*Endpoint{{Pod: policy.EndpointID{Namespace: "ns", Name: "restored"}, ID: 5}})
	pending, rest := r.Converge()
	if len(pending) != 1 || pending[0].Pod.Name != "early" || pending[0].Pending {
		t.Fatalf("pending = %+v", pending)
	}
	if len(rest) != 1 || rest[0].Pod.Name != "restored" {
		t.Fatalf("rest = %+v", rest)
	}
	if !r.Converged() {
		t.Fatal("not converged after Converge")
	}
	if err := r.RegisterEndpoint(ctx, info("late", "c2", "10.244.0.6")); err != nil {
		t.Fatal(err)
	}
	for _, ep := range r.List() {
		if ep.Pending {
			t.Errorf("%s pending after convergence", ep.Pod)
		}
	}
}

func TestRecordedAndCopies(t *testing.T) {
	r, _ := newTest(t)
	if err := r.RegisterEndpoint(context.Background(), info("a", "c1", "10.244.0.5")); err != nil {
		t.Fatal(err)
	}
	id := policy.EndpointID{Namespace: "ns", Name: "a"}
	ep, _ := r.Get(id)
	ep.Identity = 99 // a copy: the registry keeps its own
	if got, _ := r.Get(id); got.Identity != 0 {
		t.Fatalf("a caller's copy changed the registry: identity %d", got.Identity)
	}
	r.Recorded(id, identity.ID(300), true)
	if got, _ := r.Get(id); got.Identity != 300 || !got.NoAccel {
		t.Fatalf("after Recorded: %+v", got)
	}
}

func TestRunSavesChanges(t *testing.T) {
	r, _ := newTest(t)
	r.cfg.Fill = func(st *State) { st.NodeIP = netip.MustParseAddr("10.99.0.1") }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); r.Run(ctx) }()
	defer func() { cancel(); <-done }()
	r.Restore([]*Endpoint{{Pod: policy.EndpointID{Namespace: "ns", Name: "a"}, ID: 3}})
	r.Changed()
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := LoadState(r.cfg.StateDir)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Endpoints) == 1 && st.NodeIP.IsValid() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("state not saved: %+v", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestLoadState(t *testing.T) {
	dir := t.TempDir()
	st, err := LoadState(dir)
	if err != nil || len(st.Endpoints) != 0 {
		t.Fatalf("missing file: %+v, %v", st, err)
	}
	if err := os.WriteFile(filepath.Join(dir, stateFile), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadState(dir); err == nil {
		t.Fatal("a corrupt state file was accepted")
	}
}
