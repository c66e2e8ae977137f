package daemon

import (
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	agentv1 "github.com/veilmesh/veil/agent/api/v1"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/api/v1alpha1"
)

func TestFlowLogKeepsTheNewestAndFansOut(t *testing.T) {
	l := newFlowLog(3)
	for i := 1; i <= 2; i++ {
		l.add(&agentv1.Flow{SrcPort: uint32(i)})
	}
	past, ch := l.Snapshot(true)
	if len(past) != 2 || past[0].SrcPort != 1 {
		t.Fatalf("snapshot = %v", past)
	}
	for i := 3; i <= 5; i++ {
		l.add(&agentv1.Flow{SrcPort: uint32(i)})
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
	l.add(&agentv1.Flow{SrcPort: 6})
	select {
	case f := <-ch:
		t.Errorf("unfollowed channel still receives: %v", f)
	default:
	}
}

func TestAcceptedConditionAndStatusUpdates(t *testing.T) {
	ok := acceptedCondition(nil, 3)
	if ok.Status != metav1.ConditionTrue || ok.ObservedGeneration != 3 {
		t.Errorf("valid policy: %+v", ok)
	}
	bad := acceptedCondition(&policy.PolicyError{
		Policy: policy.PolicyRef{Kind: policy.KindMeshPolicy, Namespace: "x", Name: "p"},
		Field:  "spec.podSelector", Err: errString("bad operator"),
	}, 4)
	if bad.Status != metav1.ConditionFalse || bad.Reason != "Invalid" || bad.Message == "" {
		t.Errorf("invalid policy: %+v", bad)
	}
	st := &v1alpha1.PolicyStatus{}
	if !statusNeedsUpdate(st, ok) {
		t.Errorf("an empty status needs the condition")
	}
	st.Conditions = []metav1.Condition{ok}
	if statusNeedsUpdate(st, ok) {
		t.Errorf("an equal condition is rewritten")
	}
	if !statusNeedsUpdate(st, bad) {
		t.Errorf("a changed condition is not written")
	}
}

type errString string

func (e errString) Error() string { return string(e) }

func TestAccelerationOptOutValues(t *testing.T) {
	for v, want := range map[string]bool{"false": true, "Off": true, " disabled ": true, "no": true, "true": false, "": false, "maybe": false} {
		if got := optedOut(v); got != want {
			t.Errorf("optedOut(%q) = %v, want %v", v, got, want)
		}
	}
}
