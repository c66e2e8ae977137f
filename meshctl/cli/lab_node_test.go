package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/veilmesh/veil/deploy"
	labcluster "github.com/veilmesh/veil/lab/cluster"
)

// selfStart is this process's start time (clock ticks after boot), field
// 22 of /proc/self/stat: a record with it and this PID names a live
// supervisor.
func selfStart(t *testing.T) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return start
}

// runningLab leaves in a fresh dir the record of a running lab whose
// supervisor is this process and serves h on its socket until the test
// ends.
func runningLab(t *testing.T, h labcluster.ControlHandler) string {
	t.Helper()
	dir := t.TempDir()
	s := testLabRecord()
	s.SupervisorStart = selfStart(t)
	writeLabRecord(t, dir, s)
	l, err := labcluster.ListenControl(filepath.Join(dir, labcluster.ControlSocket))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- labcluster.ServeControl(ctx, l, h, slog.New(slog.DiscardHandler)) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ServeControl: %v", err)
		}
	})
	return dir
}

var testNode2 = labcluster.LabNodeState{Name: "node-2", IP: "10.250.0.12", PodCIDR: "10.244.1.0/24", Netns: "veillab-node-2"}

func TestLabNodeAdd(t *testing.T) {
	var deadline atomic.Int64
	dir := runningLab(t, labcluster.ControlHandler{AddNode: func(ctx context.Context) (labcluster.LabNodeState, error) {
		d, _ := ctx.Deadline()
		deadline.Store(int64(time.Until(d)))
		return testNode2, nil
	}})
	out, stderr, code := runLab(t, newFakeLabDeps(), "node", "add", "--dir", dir, "--wait", "90s")
	if code != ExitOK {
		t.Fatalf("node add: exit %d, stderr %q", code, stderr)
	}
	if !strings.Contains(stderr, "Adding node-2 to lab veillab …") {
		t.Errorf("node add: no progress on stderr: %q", stderr)
	}
	for _, want := range []string{"NODE", "INTERNAL IP", "POD CIDR", "node-2", "10.250.0.12", "10.244.1.0/24"} {
		if !strings.Contains(out, want) {
			t.Errorf("node add's table lacks %q:\n%s", want, out)
		}
	}
	if d := time.Duration(deadline.Load()); d <= 0 || d > 90*time.Second {
		t.Errorf("the supervisor's bound %s; want --wait's 90s", d)
	}

	out, _, code = runLab(t, newFakeLabDeps(), "node", "add", "--dir", dir, "-o", "json")
	var got labNodeAdded
	if err := json.Unmarshal([]byte(out), &got); err != nil || code != ExitOK {
		t.Fatalf("node add -o json: exit %d, %v:\n%s", code, err, out)
	}
	if got.Name != "node-2" || got.IP != testNode2.IP || got.PodCIDR != testNode2.PodCIDR || got.Netns != testNode2.Netns {
		t.Errorf("node add -o json: %+v; want %+v", got, testNode2)
	}
}

func TestLabNodeAddFails(t *testing.T) {
	dir := runningLab(t, labcluster.ControlHandler{AddNode: func(context.Context) (labcluster.LabNodeState, error) {
		return labcluster.LabNodeState{}, errors.New("add node node-2: wait for node-2 to register: context deadline exceeded")
	}})
	out, stderr, code := runLab(t, newFakeLabDeps(), "node", "add", "--dir", dir)
	if code != ExitFailure || out != "" || !strings.Contains(stderr, "wait for node-2 to register: context deadline exceeded") {
		t.Errorf("failed add: exit %d, out %q, stderr %q; want 1 and the supervisor's error", code, out, stderr)
	}
}

func TestLabNodeAddNeedsARunningLab(t *testing.T) {
	t.Run("no lab", func(t *testing.T) {
		dir := t.TempDir()
		_, stderr, code := runLab(t, newFakeLabDeps(), "node", "add", "--dir", dir)
		if code != ExitFailure || !strings.Contains(stderr, "no lab in "+dir) {
			t.Errorf("node add without a lab: exit %d, stderr %q; want 1 and 'no lab'", code, stderr)
		}
	})
	t.Run("crashed lab", func(t *testing.T) {
		dir := t.TempDir()
		writeLabRecord(t, dir, testLabRecord())
		_, stderr, code := runLab(t, newFakeLabDeps(), "node", "add", "--dir", dir)
		if code != ExitFailure || !strings.Contains(stderr, "is not running") {
			t.Errorf("node add to a crashed lab: exit %d, stderr %q; want 1 and 'not running'", code, stderr)
		}
	})
	t.Run("supervisor not listening", func(t *testing.T) {
		dir := t.TempDir()
		s := testLabRecord()
		s.SupervisorStart = selfStart(t)
		writeLabRecord(t, dir, s)
		_, stderr, code := runLab(t, newFakeLabDeps(), "node", "add", "--dir", dir)
		if code != ExitFailure || !strings.Contains(stderr, "no lab supervisor answers on "+filepath.Join(dir, labcluster.ControlSocket)) {
			t.Errorf("node add, nothing on the socket: exit %d, stderr %q; want 1 and 'no lab supervisor answers'", code, stderr)
		}
	})
}

func TestLabNodeAddArguments(t *testing.T) {
	for _, tc := range []struct {
		name string
		euid int
		args []string
		want string
	}{
		{"not root", 1000, nil, "lab node add needs root"},
		{"wait zero", 0, []string{"--wait", "0s"}, "--wait 0s: want more than 0"},
		{"wait too long", 0, []string{"--wait", "1h"}, "at most 10m0s"},
		{"bad output", 0, []string{"-o", "xml"}, "invalid output format"},
		{"argument", 0, []string{"node-3"}, "unknown command"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeLabDeps()
			f.euid = tc.euid
			f.env[envLabDir] = t.TempDir()
			_, stderr, code := runLab(t, f, append([]string{"node", "add"}, tc.args...)...)
			if code != ExitUsage || !strings.Contains(stderr, tc.want) {
				t.Errorf("node add %v: exit %d, stderr %q; want 2 and %q", tc.args, code, stderr, tc.want)
			}
		})
	}
}

func TestAgentReady(t *testing.T) {
	sel := map[string]string{"app.kubernetes.io/name": "veil-agent"}
	ds := &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Namespace: deploy.Namespace, Name: deploy.DaemonSetName},
		Spec:       appsv1.DaemonSetSpec{Selector: &metav1.LabelSelector{MatchLabels: sel}},
	}
	pod := func(name, node string, ready corev1.ConditionStatus) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: deploy.Namespace, Name: name, Labels: sel},
			Spec:       corev1.PodSpec{NodeName: node},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: ready}}},
		}
	}
	ctx := context.Background()
	if _, err := agentReady(ctx, fake.NewClientset(), "node-2"); err == nil || !strings.Contains(err.Error(), "get daemonset") {
		t.Errorf("Veil not installed: %v", err)
	}
	// The fake clientset ignores field selectors: each case has pods on
	// node-2 only; the real API server's selection is tested in
	// tests/realcluster.
	clients := fake.NewClientset(ds, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: deploy.Namespace, Name: "other", Labels: map[string]string{"app": "other"}}, Spec: corev1.PodSpec{NodeName: "node-2"}})
	if _, err := agentReady(ctx, clients, "node-2"); err == nil || !strings.Contains(err.Error(), "no agent pod on node-2") {
		t.Errorf("node without an agent: %v", err)
	}
	clients = fake.NewClientset(ds, pod("veil-agent-b", "node-2", corev1.ConditionFalse))
	if _, err := agentReady(ctx, clients, "node-2"); err == nil || !strings.Contains(err.Error(), "not ready") {
		t.Errorf("agent not ready: %v", err)
	}
	clients = fake.NewClientset(ds, pod("veil-agent-b", "node-2", corev1.ConditionTrue))
	if name, err := agentReady(ctx, clients, "node-2"); err != nil || name != "veil-agent-b" {
		t.Errorf("ready agent: %q, %v", name, err)
	}
}
