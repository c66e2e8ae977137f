package daemon

import (
	"path/filepath"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/tests/controlplane"
)

// expectReach fails the test unless pod from reaches to:port exactly when
// want says so.
func (l *agentLab) expectReach(from, to string, port int, want bool) {
	l.t.Helper()
	err := l.reach(from, to, port)
	if want && err != nil {
		l.t.Errorf("%s → %s:%d denied, want allowed: %v", from, to, port, err)
	}
	if !want && err == nil {
		l.t.Errorf("%s → %s:%d delivered, want denied", from, to, port)
	}
}

// An agent killed right after CNI ADD returned (before any periodic save)
// must find the pod again on restart and keep enforcing its policy. With
// loseState, the endpoints are also cut from the state file, as if the
// agent had died between writing the datapath and saving: restore must
// adopt them from the pinned maps, not delete them.
func TestPrivilegedAgentCrashAfterCNIAddKeepsPodEnforced(t *testing.T) {
	for _, loseState := range []bool{false, true} {
		name := "sigkill"
		if loseState {
			name = "state-lost"
		}
		t.Run(name, func(t *testing.T) {
			l := newAgentLab(t, "crash"+name[:2])
			if _, err := l.kube.NetworkingV1().NetworkPolicies(testNS).Create(l.ctx(10*time.Second), onlyFromA(), metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			l.createPod("a", map[string]string{"app": "a"})
			l.createPod("b", map[string]string{"app": "b"})
			l.startAgent()
			l.waitConverged(30 * time.Second)

			l.cniAdd("a")
			l.cniAdd("b")
			l.killAgent()
			if loseState {
				l.dropSavedEndpoints()
			}

			l.serve("b", allowPort, deniedPort)
			l.expectReach("a", "b", deniedPort, false)

			l.startAgent()
			l.waitConverged(30 * time.Second)
			eps := l.endpointIPs()
			for _, name := range []string{"a", "b"} {
				if !eps[l.ips[name].String()] {
					t.Errorf("after the restart pod %s (%s) is no endpoint of the agent: %v", name, l.ips[name], eps)
				}
			}
			l.expectReach("a", "b", deniedPort, false)
			l.expectReach("a", "b", allowPort, true)
		})
	}
}

// dropSavedEndpoints removes every endpoint from the agent's state file.
func (l *agentLab) dropSavedEndpoints() {
	l.t.Helper()
	st, err := loadState(l.cfg.StateDir)
	if err != nil {
		l.t.Fatal(err)
	}
	if len(st.Endpoints) == 0 {
		l.t.Fatal("the state file holds no endpoint after CNI ADD returned")
	}
	st.Endpoints = nil
	if err := saveState(l.cfg.StateDir, st); err != nil {
		l.t.Fatal(err)
	}
}

// grant binds user to a ClusterRole with rules.
func (l *agentLab) grant(name, user string, rules ...rbacv1.PolicyRule) {
	l.t.Helper()
	ctx := l.ctx(10 * time.Second)
	rbac := l.kube.RbacV1()
	if _, err := rbac.ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name}, Rules: rules}, metav1.CreateOptions{}); err != nil {
		l.t.Fatal(err)
	}
	_, err := rbac.ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: user}},
	}, metav1.CreateOptions{})
	if err != nil {
		l.t.Fatal(err)
	}
}

// A pod wired while the agent cannot list NetworkPolicies yet (here: RBAC
// forbids it until granted, as during a rollout whose ClusterRole lags) must
// not be compiled against the empty policy set: nothing the policy denies may
// be delivered, before or after convergence. A pod whose Pod object is
// unknown is never allow-all either.
func TestPrivilegedAgentStartBeforePolicySyncFailsClosed(t *testing.T) {
	l := newAgentLab(t, "early")
	const user = "veil-agent-early"
	cfg, err := l.cp.UserConfig(user)
	if err != nil {
		t.Fatal(err)
	}
	l.cfg.Kubeconfig = filepath.Join(t.TempDir(), "agent.kubeconfig")
	if err := controlplane.WriteKubeconfig(l.cfg.Kubeconfig, cfg); err != nil {
		t.Fatal(err)
	}
	l.grant(user+"-core", user,
		rbacv1.PolicyRule{APIGroups: []string{"", "policy.veil.dev"}, Resources: []string{"*"}, Verbs: []string{"*"}})
	if _, err := l.kube.NetworkingV1().NetworkPolicies(testNS).Create(l.ctx(10*time.Second), onlyFromA(), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	l.createPod("a", map[string]string{"app": "a"})
	l.createPod("b", map[string]string{"app": "b"})

	l.startAgent()
	l.cniAdd("a")
	l.cniAdd("b")
	l.cniAdd("ghost") // no Pod object: the agent cannot compile it
	if st, err := l.status(); err != nil || st.Converged {
		t.Fatalf("agent converged without listing NetworkPolicies (%v, %v): the test would prove nothing", st, err)
	}
	l.serve("b", allowPort, deniedPort)
	l.serve("ghost", allowPort)
	l.expectReach("a", "b", deniedPort, false)
	l.expectReach("a", "ghost", allowPort, false)

	l.grant(user+"-netpol", user,
		rbacv1.PolicyRule{APIGroups: []string{"networking.k8s.io"}, Resources: []string{"networkpolicies"}, Verbs: []string{"get", "list", "watch"}})
	l.waitConverged(90 * time.Second)
	l.expectReach("a", "b", allowPort, true)
	l.expectReach("a", "b", deniedPort, false)
	l.expectReach("a", "ghost", allowPort, false)
}
