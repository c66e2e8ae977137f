package apiserver

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/veilmesh/veil/agent/capture"
	"github.com/veilmesh/veil/agent/endpoints"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"

	"github.com/veilmesh/veil/agent/nsthread"
)

func (s *Server) RotateKey(ctx context.Context, _ *agentv1.RotateKeyRequest) (*agentv1.RotateKeyResponse, error) {
	if s.cfg.Encryption.TunnelInterface() == "" {
		return nil, status.Errorf(codes.FailedPrecondition, "encryption is off on node %s", s.cfg.NodeName)
	}
	old, cur, err := s.cfg.Encryption.RotateKey(ctx)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &agentv1.RotateKeyResponse{OldFingerprint: old, NewFingerprint: cur}, nil
}

// maxCapture bounds an audit capture.
const maxCapture = 10 * time.Second

func (s *Server) CaptureUnderlay(ctx context.Context, req *agentv1.CaptureRequest) (*agentv1.CaptureResponse, error) {
	c := s.cfg
	if req.Marker == "" {
		return nil, status.Error(codes.InvalidArgument, "capture needs a marker to look for")
	}
	dur := time.Duration(req.DurationMs) * time.Millisecond
	if dur <= 0 || dur > maxCapture {
		return nil, status.Errorf(codes.InvalidArgument, "capture duration must be 1ms..%s", maxCapture)
	}
	opts := capture.Options{Marker: []byte(req.Marker), WireGuardPort: uint16(c.WireGuardPort), PodRange: c.ClusterCIDR}
	resp := &agentv1.CaptureResponse{UnderlayInterface: c.Datapath.Underlay(), StartedUnixNano: time.Now().UnixNano()}
	var (
		wg            sync.WaitGroup
		under, tunnel capture.Summary
		uErr, tErr    error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		under, uErr = capture.For(ctx, resp.UnderlayInterface, dur, opts)
	}()
	if tun := c.Encryption.TunnelInterface(); tun != "" {
		resp.TunnelInterface = tun
		topts := opts
		topts.L3 = true
		wg.Add(1)
		go func() {
			defer wg.Done()
			tunnel, tErr = capture.For(ctx, resp.TunnelInterface, dur, topts)
		}()
	}
	wg.Wait()
	if uErr != nil {
		return nil, status.Error(codes.Internal, uErr.Error())
	}
	if tErr != nil {
		return nil, status.Error(codes.Internal, tErr.Error())
	}
	resp.UnderlayFrames = uint64(under.Frames)
	resp.WireguardFrames = uint64(under.WireGuard)
	resp.UnderlayMarkerFrames = uint64(under.Marker)
	resp.PlaintextPodFrames = uint64(under.PlainPod)
	resp.TunnelMarkerFrames = uint64(tunnel.Marker)
	return resp, nil
}

func (s *Server) SendMarker(ctx context.Context, req *agentv1.SendMarkerRequest) (*agentv1.SendMarkerResponse, error) {
	dst, err := netip.ParseAddr(req.Destination)
	if err != nil || !dst.Is4() {
		return nil, status.Errorf(codes.InvalidArgument, "destination %q is not an IPv4 address", req.Destination)
	}
	if req.Marker == "" || req.Port == 0 || req.Port > 65535 {
		return nil, status.Error(codes.InvalidArgument, "marker and port 1..65535 are required")
	}
	count := req.Count
	if count == 0 {
		count = 5
	}
	if count > 100 {
		return nil, status.Error(codes.InvalidArgument, "at most 100 markers per call")
	}
	var src *endpoints.Endpoint
	for _, e := range s.cfg.Endpoints.List() {
		if e.Netns != "" && (src == nil || e.Pod.String() < src.Pod.String()) {
			src = &e
		}
	}
	if src == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "node %s has no pod to send from", s.cfg.NodeName)
	}
	sent, err := sendFromNetns(src.Netns, netip.AddrPortFrom(dst, uint16(req.Port)), []byte(req.Marker), int(count))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "send marker from %s: %v", src.Pod, err)
	}
	return &agentv1.SendMarkerResponse{SourcePod: src.Pod.String(), SourceIp: src.IP.String(), Sent: uint32(sent)}, nil
}

// sendFromNetns sends UDP datagrams from inside a pod's network namespace.
func sendFromNetns(path string, to netip.AddrPort, payload []byte, count int) (int, error) {
	n := 0
	err := nsthread.DoPath(path, func() error {
		// Unconnected: an ICMP unreachable from the far pod must not turn
		// the following sends into errors.
		conn, err := net.ListenUDP("udp4", nil)
		if err != nil {
			return fmt.Errorf("open UDP socket: %w", err)
		}
		defer conn.Close()
		for i := 0; i < count; i++ {
			if _, err := conn.WriteToUDPAddrPort(payload, to); err != nil {
				return fmt.Errorf("send to %s: %w", to, err)
			}
			n++
			time.Sleep(50 * time.Millisecond)
		}
		return nil
	})
	return n, err
}
