package apiserver

import (
	"strings"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
)

func (s *Server) Observe(req *agentv1.ObserveRequest, stream agentv1.Agent_ObserveServer) error {
	past, ch := s.cfg.Flows.Snapshot(req.Follow)
	if ch != nil {
		defer s.cfg.Flows.Unfollow(ch)
	}
	var selected []*agentv1.Flow
	for _, f := range past {
		if matches(req, f) {
			selected = append(selected, f)
		}
	}
	if req.Last > 0 && int(req.Last) < len(selected) {
		selected = selected[len(selected)-int(req.Last):]
	}
	for _, f := range selected {
		if err := stream.Send(f); err != nil {
			return err
		}
	}
	if ch == nil {
		return nil
	}
	for {
		select {
		case <-stream.Context().Done():
			return nil
		case f := <-ch:
			if matches(req, f) {
				if err := stream.Send(f); err != nil {
					return err
				}
			}
		}
	}
}

// matches applies an observe request's filters to a flow.
func matches(req *agentv1.ObserveRequest, f *agentv1.Flow) bool {
	if req.FromPod != "" && f.SrcPod != req.FromPod {
		return false
	}
	if req.ToPod != "" && f.DstPod != req.ToPod {
		return false
	}
	if req.Namespace != "" && !strings.HasPrefix(f.SrcPod, req.Namespace+"/") && !strings.HasPrefix(f.DstPod, req.Namespace+"/") {
		return false
	}
	if req.Identity != 0 && f.SrcIdentity != req.Identity && f.DstIdentity != req.Identity {
		return false
	}
	if req.Verdict != "" && !strings.EqualFold(req.Verdict, f.Verdict) {
		return false
	}
	if req.Port != 0 && f.DstPort != req.Port {
		return false
	}
	if req.Protocol != "" && !strings.EqualFold(req.Protocol, f.Protocol) {
		return false
	}
	for _, want := range req.Labels {
		if !hasLabel(f.SrcLabels, want) && !hasLabel(f.DstLabels, want) {
			return false
		}
	}
	return true
}

// hasLabel matches "key=value" against "source:key=value" labels, or a full
// "source:key=value".
func hasLabel(labels []string, want string) bool {
	for _, l := range labels {
		if l == want {
			return true
		}
		if _, rest, ok := strings.Cut(l, ":"); ok && rest == want {
			return true
		}
	}
	return false
}
