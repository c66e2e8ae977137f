package daemon

import (
	"errors"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"

	"github.com/veilmesh/veil/agent/config"
	"github.com/veilmesh/veil/policy/api/v1alpha1"
	veilfake "github.com/veilmesh/veil/policy/client/clientset/versioned/fake"
)

// The MeshNode status is written at start, retried when a write fails, and
// written again as soon as a change is announced, not on the next tick.
func TestMeshNodeStatusFollowsChanges(t *testing.T) {
	veil := veilfake.NewSimpleClientset()
	var updates, failures atomic.Int32
	veil.PrependReactor("update", "meshnodes", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetSubresource() != "status" {
			return false, nil, nil
		}
		if failures.Add(1) == 1 {
			return true, nil, errors.New("API server away")
		}
		updates.Add(1)
		return false, nil, nil
	})
	cfg := config.Default()
	cfg.NodeName = "self"
	d := &Daemon{cfg: cfg, log: slog.New(slog.DiscardHandler), veil: veil,
		nodeIP: netip.MustParseAddr("10.99.0.1"), statusChanged: make(chan struct{}, 1)}
	ctx := t.Context()
	done := make(chan struct{})
	go func() { defer close(done); d.encryptionLoop(ctx) }()
	// t.Context is cancelled before cleanups run.
	t.Cleanup(func() { <-done })

	waitFor := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitFor("the status after a failed write", func() bool { return updates.Load() == 1 })
	mn, err := veil.PolicyV1alpha1().MeshNodes().Get(ctx, "self", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if mn.Status.NodeIP != "10.99.0.1" || mn.Status.Encryption.Mode != v1alpha1.EncryptionModeDisabled {
		t.Fatalf("status = %+v", mn.Status)
	}
	d.meshNodeChanged()
	waitFor("the status after a change", func() bool { return updates.Load() == 2 })
}
