package cni

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"

	"github.com/veilmesh/veil/agent/ipam"
	"github.com/veilmesh/veil/agent/podnet"
)

// fakeNet is a PodNetwork that remembers what it wired.
type fakeNet struct {
	mu          sync.Mutex
	wired       map[string]podnet.Request
	setupErr    error
	teardownErr error
	calls       []string
}

func (f *fakeNet) Setup(ctx context.Context, req podnet.Request) (podnet.Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "setup "+req.ContainerID)
	if f.setupErr != nil {
		return podnet.Result{}, f.setupErr
	}
	if f.wired == nil {
		f.wired = map[string]podnet.Request{}
	}
	f.wired[req.ContainerID] = req
	mtu := req.MTU
	if mtu == 0 {
		mtu = 1500
	}
	return podnet.Result{
		HostVeth: podnet.HostVethName(req.ContainerID), HostIfindex: 42, MTU: mtu,
		HostMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, PodMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2},
	}, nil
}

func (f *fakeNet) Teardown(ctx context.Context, containerID, netnsPath, ifname string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "teardown "+containerID)
	if f.teardownErr != nil {
		return f.teardownErr
	}
	delete(f.wired, containerID)
	return nil
}

func (f *fakeNet) Check(ctx context.Context, req podnet.Request) (podnet.Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	w, ok := f.wired[req.ContainerID]
	if !ok {
		return podnet.Result{}, fmt.Errorf("check pod network for container %s: missing or wrong: node-side veth %s", req.ContainerID, podnet.HostVethName(req.ContainerID))
	}
	if w.IP != req.IP {
		return podnet.Result{}, fmt.Errorf("address %s/32 on eth0", req.IP)
	}
	return podnet.Result{HostVeth: podnet.HostVethName(req.ContainerID)}, nil
}

func (f *fakeNet) isWired(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.wired[id]
	return ok
}

// fakeEndpoints is an EndpointRegistrar with switchable failures.
type fakeEndpoints struct {
	mu            sync.Mutex
	eps           map[string]EndpointInfo
	registerErr   error
	unregisterErr error
}

func (f *fakeEndpoints) RegisterEndpoint(ctx context.Context, info EndpointInfo) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.registerErr != nil {
		return f.registerErr
	}
	if f.eps == nil {
		f.eps = map[string]EndpointInfo{}
	}
	f.eps[info.ContainerID] = info
	return nil
}

func (f *fakeEndpoints) UnregisterEndpoint(ctx context.Context, containerID string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.unregisterErr != nil {
		return f.unregisterErr
	}
	delete(f.eps, containerID)
	return nil
}

func (f *fakeEndpoints) get(id string) (EndpointInfo, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ep, ok := f.eps[id]
	return ep, ok
}

type fixture struct {
	h   *Handler
	ip  *ipam.Allocator
	net *fakeNet
	eps *fakeEndpoints
}

func newFixture(t testing.TB, cidr string) *fixture {
	t.Helper()
	a, err := ipam.Open(filepath.Join(t.TempDir(), "ipam.json"), netip.MustParsePrefix(cidr))
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{ip: a, net: &fakeNet{}, eps: &fakeEndpoints{}}
	f.h = &Handler{IPAM: a, Net: f.net, Endpoints: f.eps}
	return f
}

var errBoom = errors.New("boom")
