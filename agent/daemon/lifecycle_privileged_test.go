package daemon

import (
	"encoding/binary"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/endpoints"
	"github.com/veilmesh/veil/agent/policysync"
	"github.com/veilmesh/veil/lab/controlplane"
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

			l.createPod("gone", map[string]string{"app": "gone"})
			l.cniAdd("gone")
			l.cniAdd("a")
			l.cniAdd("b")
			l.killAgent()
			if loseState {
				l.dropSavedEndpoints()
			}
			// Its Pod goes while the agent is away; the runtime has not
			// called DEL yet. No policy selects it, so it allowed all.
			// (Grace period 0: no kubelet runs to finish a graceful delete.)
			if err := l.kube.CoreV1().Pods(testNS).Delete(l.ctx(10*time.Second), "gone", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
				t.Fatal(err)
			}

			l.serve("b", allowPort, deniedPort)
			l.serve("gone", allowPort)
			l.expectReach("a", "b", deniedPort, false)
			l.expectReach("a", "gone", allowPort, true)

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
			// Unmanaged now: deny-all, not its last policy.
			l.expectReach("a", "gone", allowPort, false)

			// The adopted endpoint leaves cleanly with its pod.
			l.cniDel("b")
			if l.endpointIPs()[l.ips["b"].String()] {
				t.Error("endpoint b still registered after CNI DEL")
			}
			pin := "ep_" + strings.ReplaceAll(l.ips["b"].String(), ".", "-")
			for _, name := range l.pinnedLinks() {
				if strings.HasPrefix(name, pin) {
					t.Errorf("pinned link %s left after CNI DEL", name)
				}
			}
		})
	}
}

// dropSavedEndpoints removes every endpoint from the agent's state file.
func (l *agentLab) dropSavedEndpoints() {
	l.t.Helper()
	st, err := endpoints.LoadState(l.cfg.StateDir)
	if err != nil {
		l.t.Fatal(err)
	}
	if len(st.Endpoints) == 0 {
		l.t.Fatal("the state file holds no endpoint after CNI ADD returned")
	}
	st.Endpoints = nil
	if err := endpoints.SaveState(l.cfg.StateDir, st); err != nil {
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

	// Probe the denied flow all the way through convergence.
	stop := make(chan struct{})
	probed := make(chan [2]int)
	go func() {
		var tries, delivered int
		for {
			select {
			case <-stop:
				probed <- [2]int{tries, delivered}
				return
			default:
			}
			tries++
			if l.reach("a", "b", deniedPort) == nil {
				delivered++
			}
		}
	}()
	l.grant(user+"-netpol", user,
		rbacv1.PolicyRule{APIGroups: []string{"networking.k8s.io"}, Resources: []string{"networkpolicies"}, Verbs: []string{"get", "list", "watch"}})
	granted := time.Now()
	l.waitConverged(90 * time.Second)
	t.Logf("converged %s after NetworkPolicies could be listed", time.Since(granted).Round(100*time.Millisecond))
	time.Sleep(time.Second)
	close(stop)
	if n := <-probed; n[1] > 0 {
		t.Errorf("denied flow a → b:%d delivered %d of %d times around convergence", deniedPort, n[1], n[0])
	} else {
		t.Logf("denied flow probed %d times around convergence, never delivered", n[0])
	}
	l.expectReach("a", "b", allowPort, true)
	l.expectReach("a", "b", deniedPort, false)
	l.expectReach("a", "ghost", allowPort, false)
}

// fillPolicyMap fills the node's pinned policy map with entries of a slot no
// endpoint uses (the key and value layouts of bpf/lib/maps.h), until it
// refuses one.
func (l *agentLab) fillPolicyMap() int {
	l.t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(l.cfg.BPFFSRoot, datapath.PolicyMap), nil)
	if err != nil {
		l.t.Fatal(err)
	}
	defer m.Close()
	key := make([]byte, m.KeySize())
	val := make([]byte, m.ValueSize())
	binary.LittleEndian.PutUint32(key[0:], 72) // slot, identity, direction
	binary.LittleEndian.PutUint32(key[4:], 0xfffffff0)
	for n := 0; ; n++ {
		binary.LittleEndian.PutUint32(key[8:], uint32(n))
		if err := m.Update(key, val, ebpf.UpdateNoExist); err != nil {
			return n
		}
	}
}

// A revocation that the policy map cannot hold must not leave the old
// policy in force: the endpoint denies, and the agent says which endpoint
// and which map.
func TestPrivilegedAgentPolicyMapFullFailsClosed(t *testing.T) {
	l := newAgentLab(t, "full")
	np, err := l.kube.NetworkingV1().NetworkPolicies(testNS).Create(l.ctx(10*time.Second), onlyFromA(), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	l.createPod("a", map[string]string{"app": "a"})
	l.createPod("b", map[string]string{"app": "b"})
	l.startAgent()
	l.waitConverged(30 * time.Second)
	l.cniAdd("a")
	l.cniAdd("b")
	l.serve("b", allowPort)
	l.expectReach("a", "b", allowPort, true)

	t.Logf("policy map full after %d filler entries", l.fillPolicyMap())
	// Revoke allowPort; the new rule needs more entries than the old.
	tcp := corev1.ProtocolTCP
	np.Spec.Ingress[0].Ports = nil
	for p := int32(9000); p < 9016; p++ {
		np.Spec.Ingress[0].Ports = append(np.Spec.Ingress[0].Ports,
			networkingv1.NetworkPolicyPort{Protocol: &tcp, Port: ptr(intstr.FromInt32(p))})
	}
	if _, err := l.kube.NetworkingV1().NetworkPolicies(testNS).Update(l.ctx(10*time.Second), np, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	var reason string
	for reason == "" && time.Now().Before(deadline) {
		st, err := l.status()
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range st.Degraded {
			if d.Component == policysync.FailedClosedPrefix+testNS+"/b" {
				reason = d.Reason
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if reason == "" {
		t.Fatal("agent does not report endpoint b as degraded after its policy update failed")
	}
	t.Logf("degraded: %s", reason)
	if !strings.Contains(reason, datapath.PolicyMap) || !strings.Contains(reason, l.ips["b"].String()) {
		t.Errorf("degraded reason %q does not name the map %s and the endpoint %s", reason, datapath.PolicyMap, l.ips["b"])
	}
	l.expectReach("a", "b", allowPort, false)
}

func ptr[T any](v T) *T { return &v }
