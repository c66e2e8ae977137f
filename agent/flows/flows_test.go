package flows

import (
	"context"
	"net/netip"
	"testing"

	"github.com/veilmesh/veil/agent/datapath"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
)

func TestFlowLogKeepsTheNewestAndFansOut(t *testing.T) {
	l := New(Config{Size: 3})
	for i := 1; i <= 2; i++ {
		l.Add(&agentv1.Flow{SrcPort: uint32(i)})
	}
	past, ch := l.Snapshot(true)
	if len(past) != 2 || past[0].SrcPort != 1 {
		t.Fatalf("snapshot = %v", past)
	}
	for i := 3; i <= 5; i++ {
		l.Add(&agentv1.Flow{SrcPort: uint32(i)})
	}
	past, _ = l.Snapshot(false)
	if len(past) != 3 || past[0].SrcPort != 3 || past[2].SrcPort != 5 {
		t.Errorf("after wrapping: %v, want ports 3,4,5", past)
	}
	for want := uint32(3); want <= 5; want++ {
		if f := <-ch; f.SrcPort != want {
			t.Errorf("follower got %d, want %d", f.SrcPort, want)
		}
	}
	l.Unfollow(ch)
	l.Add(&agentv1.Flow{SrcPort: 6})
	select {
	case f := <-ch:
		t.Errorf("unfollowed channel still receives: %v", f)
	default:
	}
}

type fakePolicy struct{}

func (fakePolicy) Identities() []policy.IdentityInfo {
	return []policy.IdentityInfo{{ID: 300, Labels: identity.Labels{{Source: "pod", Key: "app", Value: "web"}}}}
}
func (fakePolicy) Endpoints() []policy.Endpoint {
	return []policy.Endpoint{{EndpointID: policy.EndpointID{Namespace: "x", Name: "web"}, IPs: []netip.Addr{netip.MustParseAddr("10.244.0.5")}}}
}
func (fakePolicy) Rule(id uint32) (policy.Rule, bool) { return policy.Rule{}, false }

type fakeSource []datapath.FlowEvent

func (f fakeSource) ReadEvents(_ context.Context, fn func(datapath.FlowEvent)) error {
	for _, ev := range f {
		fn(ev)
	}
	return nil
}

func TestRunDescribesAndKeepsEvents(t *testing.T) {
	var observed []string
	l := New(Config{NodeName: "n1", Policy: fakePolicy{}, Observed: func(f *agentv1.Flow) { observed = append(observed, f.Verdict) }})
	src := fakeSource{
		{Src: netip.MustParseAddr("10.244.0.5"), Dst: netip.MustParseAddr("1.1.1.1"), Proto: policytypes.ProtoTCP, DstPort: 443,
			Verdict: policytypes.Deny, SrcIdentity: 300, DstIdentity: identity.World},
		{Src: netip.MustParseAddr("1.1.1.1"), Dst: netip.MustParseAddr("10.244.0.5"), Flags: datapath.FlagAudit},
	}
	if err := l.Run(context.Background(), src); err != nil {
		t.Fatal(err)
	}
	if len(observed) != 2 || observed[0] != "DENIED" || observed[1] != "AUDIT" {
		t.Fatalf("observed verdicts %v", observed)
	}
	past, _ := l.Snapshot(false)
	if len(past) != 2 {
		t.Fatalf("kept %d flows, want 2", len(past))
	}
	f := past[0]
	if f.Node != "n1" || f.SrcPod != "x/web" || f.DstPod != "" || f.Protocol != "TCP" || f.DstPort != 443 {
		t.Errorf("flow = %+v", f)
	}
	if len(f.SrcLabels) != 1 || f.SrcLabels[0] != "pod:app=web" || len(f.DstLabels) != 1 || f.DstLabels[0] != "reserved:world" {
		t.Errorf("labels %v -> %v", f.SrcLabels, f.DstLabels)
	}
	if past[1].DstPod != "x/web" {
		t.Errorf("reply's destination pod %q, want x/web", past[1].DstPod)
	}
}

type fakeNamer map[[2]string]string

func (f fakeNamer) ServiceVia(client netip.Addr, backend netip.AddrPort, _ uint8) string {
	return f[[2]string{client.String(), backend.String()}]
}

// TestDescribeNamesTheService: a flow from a client to a backend it was
// load-balanced to, and the reply, name the Service; a flow to the pod
// directly does not.
func TestDescribeNamesTheService(t *testing.T) {
	l := New(Config{NodeName: "n1", Policy: fakePolicy{}, Services: fakeNamer{
		{"10.244.0.5", "10.244.1.7:8080"}: "demo/backend:80",
	}})
	client, backend := netip.MustParseAddr("10.244.0.5"), netip.MustParseAddr("10.244.1.7")
	for _, c := range []struct {
		name string
		ev   datapath.FlowEvent
		want string
	}{
		{"request", datapath.FlowEvent{Src: client, Dst: backend, SrcPort: 40000, DstPort: 8080, Proto: policytypes.ProtoTCP}, "demo/backend:80"},
		{"reply", datapath.FlowEvent{Src: backend, Dst: client, SrcPort: 8080, DstPort: 40000, Proto: policytypes.ProtoTCP}, "demo/backend:80"},
		{"another port of the pod", datapath.FlowEvent{Src: client, Dst: backend, SrcPort: 40000, DstPort: 9090, Proto: policytypes.ProtoTCP}, ""},
	} {
		if got := l.Describe(c.ev).Service; got != c.want {
			t.Errorf("%s: service %q; want %q", c.name, got, c.want)
		}
	}
}
