package cni

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	types100 "github.com/containernetworking/cni/pkg/types/100"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/veilmesh/veil/agent/podnet"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
)

const podArgs = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u-1"

func addReq(id string) *agentv1.CNIRequest {
	r := cniReq(podArgs)
	r.ContainerId = id
	return r
}

func wantCode(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	st, ok := status.FromError(err)
	if !ok || st.Code() != code {
		t.Fatalf("error %v; want gRPC code %s", err, code)
	}
	if !strings.Contains(st.Message(), msg) {
		t.Fatalf("message %q does not say %q", st.Message(), msg)
	}
}

func TestHandlerAddDel(t *testing.T) {
	f := newFixture(t, "10.244.1.0/24")
	ctx := context.Background()
	resp, err := f.h.Add(ctx, addReq("c1"))
	if err != nil {
		t.Fatal(err)
	}
	res, err := types100.NewResult(resp.GetResultJson())
	if err != nil {
		t.Fatal(err)
	}
	r := res.(*types100.Result)
	if len(r.IPs) != 1 || r.IPs[0].Address.String() != "10.244.1.2/32" || r.IPs[0].Gateway.String() != "169.254.1.1" {
		t.Fatalf("result IPs %v", r.IPs)
	}
	if len(r.Routes) != 1 || r.Routes[0].Dst.String() != "10.244.0.0/16" {
		t.Fatalf("result routes %v; want the configured 10.244.0.0/16", r.Routes)
	}
	ep, ok := f.eps.get("c1")
	if !ok || ep.Namespace != "shop" || ep.Name != "web-0" || ep.IP.String() != "10.244.1.2" || ep.HostIfindex != 42 {
		t.Fatalf("registered endpoint %+v, %v", ep, ok)
	}
	al, _ := f.ip.Lookup("c1")
	if al.Namespace != "shop" || al.Name != "web-0" || al.UID != "u-1" {
		t.Errorf("allocation owner %+v", al.Owner)
	}

	// ADD retried: same address.
	resp2, err := f.h.Add(ctx, addReq("c1"))
	if err != nil {
		t.Fatal(err)
	}
	if string(resp2.GetResultJson()) != string(resp.GetResultJson()) {
		t.Errorf("retried ADD result differs:\n%s\n%s", resp2.GetResultJson(), resp.GetResultJson())
	}

	for i := range 2 {
		if _, err := f.h.Del(ctx, addReq("c1")); err != nil {
			t.Fatalf("DEL #%d: %v", i+1, err)
		}
	}
	if _, ok := f.ip.Lookup("c1"); ok {
		t.Error("address still allocated after DEL")
	}
	if _, ok := f.eps.get("c1"); ok || f.net.isWired("c1") {
		t.Error("endpoint or veth left after DEL")
	}
	// DEL with no netns (runtime already removed it) is fine too.
	req := addReq("never-added")
	req.Netns = ""
	if _, err := f.h.Del(ctx, req); err != nil {
		t.Fatalf("DEL of an unknown container: %v", err)
	}
}

func TestHandlerAddErrors(t *testing.T) {
	ctx := context.Background()
	t.Run("bad config", func(t *testing.T) {
		f := newFixture(t, "10.244.1.0/24")
		req := addReq("c1")
		req.Config = []byte(`{"cniVersion":"1.0.0","name":"veil","type":"veil-cni","mtu":9}`)
		_, err := f.h.Add(ctx, req)
		wantCode(t, err, codes.InvalidArgument, "mtu 9 is out of range")
	})
	t.Run("no pod args", func(t *testing.T) {
		f := newFixture(t, "10.244.1.0/24")
		req := addReq("c1")
		req.Args = ""
		_, err := f.h.Add(ctx, req)
		wantCode(t, err, codes.InvalidArgument, "K8S_POD_NAME")
	})
	t.Run("exhausted", func(t *testing.T) {
		f := newFixture(t, "10.244.1.0/30")
		if _, err := f.h.Add(ctx, addReq("c1")); err != nil {
			t.Fatal(err)
		}
		_, err := f.h.Add(ctx, addReq("c2"))
		wantCode(t, err, codes.ResourceExhausted, "pod CIDR 10.244.1.0/30 is exhausted: all 1 allocatable")
		if f.net.isWired("c2") {
			t.Error("veth created for a pod without address")
		}
	})
	t.Run("setup fails", func(t *testing.T) {
		f := newFixture(t, "10.244.1.0/24")
		f.net.setupErr = errBoom
		_, err := f.h.Add(ctx, addReq("c1"))
		wantCode(t, err, codes.Internal, "boom")
		if _, ok := f.ip.Lookup("c1"); ok {
			t.Error("address kept after failed setup")
		}
	})
	t.Run("register fails", func(t *testing.T) {
		f := newFixture(t, "10.244.1.0/24")
		f.eps.registerErr = status.Error(codes.Unavailable, "datapath not loaded")
		_, err := f.h.Add(ctx, addReq("c1"))
		wantCode(t, err, codes.Unavailable, "datapath not loaded")
		if _, ok := f.ip.Lookup("c1"); ok || f.net.isWired("c1") {
			t.Error("address or veth kept after failed register")
		}
		if got := strings.Join(f.net.calls, ","); got != "setup c1,teardown c1" {
			t.Errorf("pod network calls %s", got)
		}
	})
}

func TestHandlerDelStopsAtFirstFailure(t *testing.T) {
	f := newFixture(t, "10.244.1.0/24")
	ctx := context.Background()
	if _, err := f.h.Add(ctx, addReq("c1")); err != nil {
		t.Fatal(err)
	}
	f.eps.unregisterErr = errBoom
	_, err := f.h.Del(ctx, addReq("c1"))
	wantCode(t, err, codes.Internal, "unregister endpoint of container c1: boom")
	if _, ok := f.ip.Lookup("c1"); !ok {
		t.Fatal("address released while the endpoint may still refer to it")
	}
	f.eps.unregisterErr = nil
	if _, err := f.h.Del(ctx, addReq("c1")); err != nil {
		t.Fatalf("retried DEL: %v", err)
	}
	if _, ok := f.ip.Lookup("c1"); ok {
		t.Fatal("address kept after a successful DEL")
	}
}

// A pod whose interface survives a failed DEL keeps running (the runtime
// retries DEL), so it must stay an enforced endpoint until the interface is
// gone.
func TestHandlerDelKeepsEndpointWhileInterfaceExists(t *testing.T) {
	f := newFixture(t, "10.244.1.0/24")
	ctx := context.Background()
	if _, err := f.h.Add(ctx, addReq("c1")); err != nil {
		t.Fatal(err)
	}
	f.net.teardownErr = errBoom
	_, err := f.h.Del(ctx, addReq("c1"))
	wantCode(t, err, codes.Internal, "boom")
	if !f.net.isWired("c1") {
		t.Fatal("fake teardown removed the interface although it failed")
	}
	if _, ok := f.eps.get("c1"); !ok {
		t.Fatal("endpoint unregistered (programs detached) while its interface still exists")
	}
	if _, ok := f.ip.Lookup("c1"); !ok {
		t.Fatal("address released while the pod still holds it")
	}
	f.net.teardownErr = nil
	if _, err := f.h.Del(ctx, addReq("c1")); err != nil {
		t.Fatalf("retried DEL: %v", err)
	}
	if _, ok := f.eps.get("c1"); ok {
		t.Fatal("endpoint kept after a successful DEL")
	}
	if _, ok := f.ip.Lookup("c1"); ok {
		t.Fatal("address kept after a successful DEL")
	}
}

func checkReq(t *testing.T, id string, addResult []byte) *agentv1.CNIRequest {
	t.Helper()
	var conf map[string]any
	json.Unmarshal([]byte(testConf), &conf)
	var prev map[string]any
	if err := json.Unmarshal(addResult, &prev); err != nil {
		t.Fatal(err)
	}
	conf["prevResult"] = prev
	data, _ := json.Marshal(conf)
	r := addReq(id)
	r.Config = data
	return r
}

func TestHandlerCheck(t *testing.T) {
	f := newFixture(t, "10.244.1.0/24")
	ctx := context.Background()
	resp, err := f.h.Add(ctx, addReq("c1"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.h.Check(ctx, checkReq(t, "c1", resp.GetResultJson())); err != nil {
		t.Fatalf("CHECK after ADD: %v", err)
	}
	_, err = f.h.Check(ctx, addReq("c1"))
	wantCode(t, err, codes.InvalidArgument, "prevResult is missing")

	other := strings.Replace(string(resp.GetResultJson()), "10.244.1.2/32", "10.244.1.77/32", 1)
	_, err = f.h.Check(ctx, checkReq(t, "c1", []byte(other)))
	wantCode(t, err, codes.FailedPrecondition, "holds 10.244.1.2, which prevResult does not list")

	f.net.Teardown(ctx, "c1", "", "")
	_, err = f.h.Check(ctx, checkReq(t, "c1", resp.GetResultJson()))
	wantCode(t, err, codes.FailedPrecondition, "node-side veth")

	_, err = f.h.Check(ctx, checkReq(t, "unknown", resp.GetResultJson()))
	wantCode(t, err, codes.FailedPrecondition, "no address is allocated")
}

// blockingNet holds Setup until released, to show that DEL of the same
// container waits for a running ADD.
type blockingNet struct {
	fakeNet
	entered, release chan struct{}
}

func (b *blockingNet) Setup(ctx context.Context, req podnet.Request) (podnet.Result, error) {
	close(b.entered)
	<-b.release
	return b.fakeNet.Setup(ctx, req)
}

func TestHandlerSerialisesPerContainer(t *testing.T) {
	f := newFixture(t, "10.244.1.0/24")
	bn := &blockingNet{entered: make(chan struct{}), release: make(chan struct{})}
	f.h.Net = bn
	ctx := context.Background()
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := f.h.Add(ctx, addReq("c1")); err != nil {
			t.Error(err)
		}
	})
	<-bn.entered
	// Another container is not held up.
	if _, err := f.h.Del(ctx, addReq("c2")); err != nil {
		t.Fatal(err)
	}
	delDone := make(chan error, 1)
	go func() { _, err := f.h.Del(ctx, addReq("c1")); delDone <- err }()
	select {
	case err := <-delDone:
		t.Fatalf("DEL of c1 finished (%v) while its ADD was running", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(bn.release)
	wg.Wait()
	if err := <-delDone; err != nil {
		t.Fatal(err)
	}
	if _, ok := f.ip.Lookup("c1"); ok {
		t.Fatal("DEL that waited for ADD left the address allocated")
	}

	// A caller that gives up waiting gets DeadlineExceeded.
	bn2 := &blockingNet{entered: make(chan struct{}), release: make(chan struct{})}
	f.h.Net = bn2
	go f.h.Add(ctx, addReq("c3"))
	<-bn2.entered
	tctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	_, err := f.h.Del(tctx, addReq("c3"))
	wantCode(t, err, codes.DeadlineExceeded, "still running")
	close(bn2.release)
}

func TestToStatusKeepsWrappedStatus(t *testing.T) {
	err := toStatus(fmt.Errorf("register: %w", status.Error(codes.AlreadyExists, "pod wired elsewhere")))
	wantCode(t, err, codes.AlreadyExists, "register: pod wired elsewhere")
}
