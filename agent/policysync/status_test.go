package policysync

import (
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/policy"
)

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
