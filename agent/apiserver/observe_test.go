package apiserver

import (
	"testing"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
)

func TestObserveFilters(t *testing.T) {
	f := &agentv1.Flow{
		SrcPod: "x/a", DstPod: "y/b", SrcIdentity: 300, DstIdentity: 301, Verdict: "DENIED",
		DstPort: 80, Protocol: "TCP", SrcLabels: []string{"pod:app=a", "meta:namespace=x"},
	}
	cases := []struct {
		name string
		req  *agentv1.ObserveRequest
		want bool
	}{
		{"no filter", &agentv1.ObserveRequest{}, true},
		{"from pod", &agentv1.ObserveRequest{FromPod: "x/a"}, true},
		{"wrong to pod", &agentv1.ObserveRequest{ToPod: "x/a"}, false},
		{"namespace of either side", &agentv1.ObserveRequest{Namespace: "y"}, true},
		{"namespace of neither", &agentv1.ObserveRequest{Namespace: "z"}, false},
		{"identity", &agentv1.ObserveRequest{Identity: 301}, true},
		{"verdict, any case", &agentv1.ObserveRequest{Verdict: "denied"}, true},
		{"other verdict", &agentv1.ObserveRequest{Verdict: "ALLOWED"}, false},
		{"port and protocol", &agentv1.ObserveRequest{Port: 80, Protocol: "tcp"}, true},
		{"other port", &agentv1.ObserveRequest{Port: 81}, false},
		{"label without source", &agentv1.ObserveRequest{Labels: []string{"app=a"}}, true},
		{"label with source", &agentv1.ObserveRequest{Labels: []string{"meta:namespace=x"}}, true},
		{"missing label", &agentv1.ObserveRequest{Labels: []string{"app=b"}}, false},
	}
	for _, c := range cases {
		if got := matches(c.req, f); got != c.want {
			t.Errorf("%s: matches = %v, want %v", c.name, got, c.want)
		}
	}
}
