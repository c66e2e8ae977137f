package cni

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	types100 "github.com/containernetworking/cni/pkg/types/100"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/veilmesh/veil/agent/ipam"
	"github.com/veilmesh/veil/agent/podnet"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
)

// Allocator hands out pod addresses (package ipam).
type Allocator interface {
	Allocate(ctx context.Context, containerID string, owner ipam.Owner) (netip.Addr, error)
	Release(ctx context.Context, containerID string) error
	Lookup(containerID string) (ipam.Allocation, bool)
}

// PodNetwork wires pods to the node (package podnet).
type PodNetwork interface {
	Setup(ctx context.Context, req podnet.Request) (podnet.Result, error)
	Teardown(ctx context.Context, containerID, netnsPath, ifname string) error
	Check(ctx context.Context, req podnet.Request) (podnet.Result, error)
}

// EndpointInfo is what ADD learned about a new pod's network. Its fields
// match the agent's own endpoint record, so one converts to the other.
type EndpointInfo struct {
	Namespace, Name string
	ContainerID     string
	IP              netip.Addr
	HostVeth        string
	HostIfindex     int
	HostMAC         net.HardwareAddr
	PodMAC          net.HardwareAddr
	// Netns is the pod's network namespace path (CNI_NETNS).
	Netns string
}

// EndpointRegistrar makes a wired pod a datapath endpoint and forgets it
// again. UnregisterEndpoint of an unknown container must succeed.
type EndpointRegistrar interface {
	RegisterEndpoint(ctx context.Context, info EndpointInfo) error
	UnregisterEndpoint(ctx context.Context, containerID string) error
}

// NodeNetwork is the PodNetwork of the node this process runs in.
type NodeNetwork struct{}

// Setup calls podnet.Setup.
func (NodeNetwork) Setup(ctx context.Context, req podnet.Request) (podnet.Result, error) {
	return podnet.Setup(ctx, req)
}

// Teardown calls podnet.Teardown.
func (NodeNetwork) Teardown(ctx context.Context, containerID, netnsPath, ifname string) error {
	return podnet.Teardown(ctx, containerID, netnsPath, ifname)
}

// Check calls podnet.Check.
func (NodeNetwork) Check(ctx context.Context, req podnet.Request) (podnet.Result, error) {
	return podnet.Check(ctx, req)
}

var (
	_ Allocator  = (*ipam.Allocator)(nil)
	_ PodNetwork = NodeNetwork{}
)

// undoTimeout bounds the rollback of a failed ADD, which runs even when the
// caller gave up (that is often why it failed).
const undoTimeout = 30 * time.Second

// Handler serves the agent's CNI calls: ADD allocates an address, wires the
// pod and registers the endpoint, undoing what it did if a step fails; DEL
// undoes all of it and may be repeated; CHECK verifies it. Errors are gRPC
// statuses whose code veil-cni maps to a CNI error code. Calls for one
// container are serialised (a timed-out ADD may still run when DEL comes);
// calls for different containers run concurrently.
type Handler struct {
	IPAM      Allocator
	Net       PodNetwork
	Endpoints EndpointRegistrar
	// MTU for pods whose network config says 0; 0 leaves it to Net (the
	// MTU of the node's default-route device).
	MTU int
	Log *slog.Logger

	mu    sync.Mutex
	locks map[string]chan struct{}
}

// lock serialises calls per container; the wait ends with ctx.
func (h *Handler) lock(ctx context.Context, containerID string) (func(), error) {
	for {
		h.mu.Lock()
		if h.locks == nil {
			h.locks = map[string]chan struct{}{}
		}
		held, busy := h.locks[containerID]
		if !busy {
			mine := make(chan struct{})
			h.locks[containerID] = mine
			h.mu.Unlock()
			return func() {
				h.mu.Lock()
				delete(h.locks, containerID)
				h.mu.Unlock()
				close(mine)
			}, nil
		}
		h.mu.Unlock()
		select {
		case <-held:
		case <-ctx.Done():
			return nil, status.Errorf(codes.DeadlineExceeded, "container %s: another CNI call for it is still running: %v", containerID, ctx.Err())
		}
	}
}

func (h *Handler) log() *slog.Logger {
	if h.Log == nil {
		return slog.Default()
	}
	return h.Log
}

func (h *Handler) mtu(conf *NetConf) int {
	if conf.MTU != 0 {
		return conf.MTU
	}
	return h.MTU
}

// Add wires a new pod and returns its CNI 1.0 result.
func (h *Handler) Add(ctx context.Context, req *agentv1.CNIRequest) (resp *agentv1.CNIResponse, err error) {
	start := time.Now()
	r, err := ParseRequest(req)
	if err != nil {
		return nil, toStatus(err)
	}
	if err := r.requirePod(); err != nil {
		return nil, toStatus(err)
	}
	log := h.log().With("op", "cni-add", "container", r.ContainerID, "pod", r.PodNamespace+"/"+r.PodName)
	unlock, err := h.lock(ctx, r.ContainerID)
	if err != nil {
		return nil, err
	}
	defer unlock()

	var undo []func(context.Context) error
	defer func() {
		if err == nil {
			return
		}
		log.Warn("CNI ADD failed; undoing", "error", err)
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
		defer cancel()
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](uctx); uerr != nil {
				log.Error("undo of failed CNI ADD incomplete", "error", uerr)
			}
		}
	}()

	ip, err := h.IPAM.Allocate(ctx, r.ContainerID, ipam.Owner{Namespace: r.PodNamespace, Name: r.PodName, UID: r.PodUID})
	if err != nil {
		return nil, toStatus(err)
	}
	undo = append(undo, func(ctx context.Context) error { return h.IPAM.Release(ctx, r.ContainerID) })

	routes := r.Config.Prefixes()
	pn, err := h.Net.Setup(ctx, podnet.Request{
		NetnsPath: r.Netns, IfName: r.IfName, ContainerID: r.ContainerID,
		IP: ip, MTU: h.mtu(r.Config), Routes: routes,
	})
	if err != nil {
		return nil, toStatus(err)
	}
	// Unregister also after a failed register (it may have got halfway),
	// and, as in Del, only once the interface is gone.
	undo = append(undo, func(ctx context.Context) error {
		if err := h.Net.Teardown(ctx, r.ContainerID, r.Netns, r.IfName); err != nil {
			return err
		}
		return h.Endpoints.UnregisterEndpoint(ctx, r.ContainerID)
	})
	if err := h.Endpoints.RegisterEndpoint(ctx, EndpointInfo{
		Namespace: r.PodNamespace, Name: r.PodName, ContainerID: r.ContainerID, IP: ip,
		HostVeth: pn.HostVeth, HostIfindex: pn.HostIfindex, HostMAC: pn.HostMAC, PodMAC: pn.PodMAC,
		Netns: r.Netns,
	}); err != nil {
		return nil, toStatus(fmt.Errorf("register endpoint %s/%s (%s): %w", r.PodNamespace, r.PodName, ip, err))
	}

	data, err := Result(Attachment{
		IP: ip, HostVeth: pn.HostVeth, HostMAC: pn.HostMAC, PodMAC: pn.PodMAC, MTU: pn.MTU,
		IfName: r.IfName, Netns: r.Netns, Routes: routes,
	})
	if err != nil {
		return nil, toStatus(err)
	}
	log.Info("pod wired", "ip", ip, "hostVeth", pn.HostVeth, "mtu", pn.MTU, "duration", time.Since(start))
	return &agentv1.CNIResponse{ResultJson: data}, nil
}

// Del removes what Add created. Missing pieces are fine, so DEL may be
// repeated, also after a failed or partial ADD. The interface goes first:
// while it exists the pod can send, so its endpoint (programs and policy)
// stays until the interface is gone, also when teardown fails and the
// runtime retries. The steps stop at the first failure, so the address is
// released only once nothing refers to it any more.
func (h *Handler) Del(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	r, err := ParseRequest(req)
	if err != nil {
		return nil, toStatus(err)
	}
	log := h.log().With("op", "cni-del", "container", r.ContainerID)
	unlock, err := h.lock(ctx, r.ContainerID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := h.Net.Teardown(ctx, r.ContainerID, r.Netns, r.IfName); err != nil {
		return nil, toStatus(err)
	}
	if err := h.Endpoints.UnregisterEndpoint(ctx, r.ContainerID); err != nil {
		return nil, toStatus(fmt.Errorf("unregister endpoint of container %s: %w", r.ContainerID, err))
	}
	al, held := h.IPAM.Lookup(r.ContainerID)
	if err := h.IPAM.Release(ctx, r.ContainerID); err != nil {
		return nil, toStatus(err)
	}
	if held {
		log.Info("pod unwired", "ip", al.IP, "pod", al.Namespace+"/"+al.Name)
	}
	return &agentv1.CNIResponse{}, nil
}

// Check verifies that the pod's address is still allocated to it, matches
// prevResult, and that its interfaces, address and routes are in place.
func (h *Handler) Check(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	r, err := ParseRequest(req)
	if err != nil {
		return nil, toStatus(err)
	}
	if r.Netns == "" {
		return nil, toStatus(&RequestError{Msg: "CNI_NETNS is empty: CHECK needs the pod's network namespace"})
	}
	prev, err := r.Config.prevResult()
	if err != nil {
		return nil, toStatus(err)
	}
	if prev == nil {
		return nil, toStatus(configErrorf("prevResult is missing: CHECK verifies the result of ADD, which the runtime must pass"))
	}
	unlock, err := h.lock(ctx, r.ContainerID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	al, ok := h.IPAM.Lookup(r.ContainerID)
	if !ok {
		return nil, status.Errorf(codes.FailedPrecondition, "check container %s: no address is allocated to it", r.ContainerID)
	}
	if !prevHasIP(prev, al.IP) {
		return nil, status.Errorf(codes.FailedPrecondition, "check container %s: it holds %s, which prevResult does not list", r.ContainerID, al.IP)
	}
	pn, err := h.Net.Check(ctx, podnet.Request{
		NetnsPath: r.Netns, IfName: r.IfName, ContainerID: r.ContainerID,
		IP: al.IP, MTU: h.mtu(r.Config), Routes: r.Config.Prefixes(),
	})
	if err != nil {
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	}
	for _, itf := range prev.Interfaces {
		if itf.Sandbox == "" && itf.Name != pn.HostVeth {
			return nil, status.Errorf(codes.FailedPrecondition, "check container %s: prevResult names node-side interface %s, the pod's is %s",
				r.ContainerID, itf.Name, pn.HostVeth)
		}
	}
	return &agentv1.CNIResponse{}, nil
}

func prevHasIP(prev *types100.Result, ip netip.Addr) bool {
	for _, c := range prev.IPs {
		if a, ok := netip.AddrFromSlice(c.Address.IP); ok && a.Unmap() == ip {
			return true
		}
	}
	return false
}

// toStatus maps an error to the gRPC code veil-cni turns into a CNI code:
// InvalidArgument → 7, ResourceExhausted and Unavailable → 11, others 999.
func toStatus(err error) error {
	var se interface{ GRPCStatus() *status.Status }
	if errors.As(err, &se) {
		// A registrar may answer with a status of its own; keep its code
		// and drop the "rpc error: code = … desc =" noise from the text.
		st := se.GRPCStatus()
		inner, _ := se.(error)
		if inner == nil || inner == err {
			return st.Err()
		}
		return status.Error(st.Code(), strings.Replace(err.Error(), inner.Error(), st.Message(), 1))
	}
	var (
		ce *ConfigError
		re *RequestError
	)
	code := codes.Internal
	switch {
	case errors.As(err, &ce), errors.As(err, &re):
		code = codes.InvalidArgument
	case errors.Is(err, ipam.ErrExhausted):
		code = codes.ResourceExhausted
	case errors.Is(err, ipam.ErrOutsideCIDR), errors.Is(err, podnet.ErrNetnsNotFound):
		code = codes.FailedPrecondition
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	}
	return status.Error(code, err.Error())
}
