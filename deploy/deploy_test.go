package deploy

import (
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/veilmesh/veil/agent/config"
)

func agentContainer(t *testing.T, ds *appsv1.DaemonSet) corev1.Container {
	t.Helper()
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == AgentContainer {
			return c
		}
	}
	t.Fatalf("no container %q", AgentContainer)
	return corev1.Container{}
}

// TestAgentDaemonSet checks the properties the issue asks of the DaemonSet
// on the object users install.
func TestAgentDaemonSet(t *testing.T) {
	ds, err := AgentDaemonSet()
	if err != nil {
		t.Fatalf("AgentDaemonSet: %v", err)
	}
	spec := ds.Spec.Template.Spec
	if ds.Namespace != Namespace || spec.ServiceAccountName != ServiceAccountName {
		t.Errorf("namespace %q, service account %q; want %q, %q", ds.Namespace, spec.ServiceAccountName, Namespace, ServiceAccountName)
	}
	if !spec.HostNetwork || spec.HostPID || spec.PriorityClassName != "system-node-critical" {
		t.Errorf("hostNetwork %v, hostPID %v, priorityClassName %q; want true, false, system-node-critical", spec.HostNetwork, spec.HostPID, spec.PriorityClassName)
	}
	if !slices.ContainsFunc(spec.Tolerations, func(tl corev1.Toleration) bool {
		return tl.Operator == corev1.TolerationOpExists && tl.Key == "" && tl.Effect == ""
	}) {
		t.Errorf("tolerations %v do not tolerate every taint", spec.Tolerations)
	}
	us := ds.Spec.UpdateStrategy
	if us.Type != appsv1.RollingUpdateDaemonSetStrategyType || us.RollingUpdate == nil ||
		us.RollingUpdate.MaxUnavailable.String() != "1" || us.RollingUpdate.MaxSurge.String() != "0" {
		t.Errorf("update strategy %+v; want RollingUpdate maxUnavailable 1 maxSurge 0", us)
	}

	c := agentContainer(t, ds)
	sc := c.SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.Capabilities == nil {
		t.Fatalf("agent security context %+v; want privileged false and capabilities", sc)
	}
	wantCaps := []corev1.Capability{"BPF", "NET_ADMIN", "NET_RAW", "PERFMON", "SYS_ADMIN"}
	gotCaps := slices.Sorted(slices.Values(sc.Capabilities.Add))
	if !slices.Equal(gotCaps, wantCaps) || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("capabilities add %v drop %v; want add %v drop [ALL]", gotCaps, sc.Capabilities.Drop, wantCaps)
	}
	if c.LivenessProbe == nil || c.LivenessProbe.HTTPGet == nil || c.LivenessProbe.HTTPGet.Path != "/healthz" {
		t.Errorf("liveness probe %+v; want GET /healthz", c.LivenessProbe)
	}
	if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Errorf("readiness probe %+v; want GET /readyz", c.ReadinessProbe)
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
		t.Errorf("resource requests %v; want cpu and memory", c.Resources.Requests)
	}

	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m
	}
	for _, want := range []struct {
		hostPath, mountPath string
		propagation         *corev1.MountPropagationMode
	}{
		{"/sys/fs/bpf", "/sys/fs/bpf", ptr.To(corev1.MountPropagationHostToContainer)},
		{"/sys/fs/cgroup", "/sys/fs/cgroup", ptr.To(corev1.MountPropagationHostToContainer)},
		{"/var/lib/veil", "/var/lib/veil", nil},
		{"/var/run/veil", "/var/run/veil", nil},
		{"/run/netns", "/run/netns", ptr.To(corev1.MountPropagationHostToContainer)},
		{"/dev/net/tun", "/dev/net/tun", nil},
	} {
		found := false
		for name, v := range volumes {
			if v.HostPath == nil || v.HostPath.Path != want.hostPath {
				continue
			}
			found = true
			m, ok := mounts[name]
			if !ok || m.MountPath != want.mountPath || !ptrEqual(m.MountPropagation, want.propagation) {
				t.Errorf("host path %s mounted as %+v; want at %s with propagation %v", want.hostPath, m, want.mountPath, ptrString(want.propagation))
			}
		}
		if !found {
			t.Errorf("no hostPath volume %s", want.hostPath)
		}
	}

	if len(spec.InitContainers) != 1 {
		t.Fatalf("init containers %d; want 1 (install-cni)", len(spec.InitContainers))
	}
	ic := spec.InitContainers[0]
	icMounts := map[string]string{}
	for _, m := range ic.VolumeMounts {
		icMounts[volumes[m.Name].HostPath.Path] = m.MountPath
	}
	if icMounts["/opt/cni/bin"] == "" || icMounts["/etc/cni/net.d"] == "" {
		t.Errorf("install-cni mounts %v; want /opt/cni/bin and /etc/cni/net.d", icMounts)
	}
	if !strings.HasPrefix(c.Image, "ghcr.io/veilmesh/veil:") || ic.Image != c.Image {
		t.Errorf("images %q, %q; want one ghcr.io/veilmesh/veil:<version>", c.Image, ic.Image)
	}
}

func ptrEqual[T comparable](a, b *T) bool {
	return (a == nil && b == nil) || (a != nil && b != nil && *a == *b)
}

func ptrString[T any](p *T) any {
	if p == nil {
		return "none"
	}
	return *p
}

func envMap(t *testing.T, env []string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, kv := range env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			t.Fatalf("env entry %q has no =", kv)
		}
		if _, dup := m[k]; dup {
			t.Fatalf("env %s appears twice", k)
		}
		m[k] = v
	}
	return m
}

// TestAgentInvocation checks that the agent's command and env, resolved as
// kubelet would, are a configuration veil-agent accepts, and that
// overrides win.
func TestAgentInvocation(t *testing.T) {
	argv, env, err := AgentInvocation("node-1", map[string]string{
		"VEIL_SOCKET":     "/run/lab/node-1/agent.sock",
		"VEIL_KUBECONFIG": "/run/lab/kubeconfig",
	})
	if err != nil {
		t.Fatalf("AgentInvocation: %v", err)
	}
	if !slices.Equal(argv, []string{"/usr/bin/veil-agent"}) {
		t.Errorf("argv = %q; want [/usr/bin/veil-agent]", argv)
	}
	m := envMap(t, env)
	cm, err := ConfigMap()
	if err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{
		"NODE_NAME":        "node-1",
		"VEIL_SOCKET":      "/run/lab/node-1/agent.sock",
		"VEIL_KUBECONFIG":  "/run/lab/kubeconfig",
		"VEIL_ENCRYPTION":  cm.Data["encryption"],
		"VEIL_STRICT_MODE": cm.Data["strict-mode"],
		"VEIL_CGROUP_ROOT": cm.Data["cgroup-root"],
		"VEIL_LOG_LEVEL":   cm.Data["log-level"],
		"VEIL_BPFFS_ROOT":  "/sys/fs/bpf/veil",
	} {
		if m[k] != want {
			t.Errorf("%s = %q; want %q", k, m[k], want)
		}
	}
	if env[len(env)-1] != "VEIL_KUBECONFIG=/run/lab/kubeconfig" {
		t.Errorf("added override not last: %q", env)
	}

	lookup := func(k string) (string, bool) { v, ok := m[k]; return v, ok }
	cfg, fs, err := config.Parse(argv[1:], lookup)
	if err != nil {
		t.Fatalf("veil-agent rejects the DaemonSet's configuration: %v", err)
	}
	if cfg.NodeName != "node-1" || cfg.SocketPath != "/run/lab/node-1/agent.sock" || cfg.Kubeconfig != "/run/lab/kubeconfig" ||
		cfg.StateDir != "/var/lib/veil" || cfg.BPFFSRoot != "/sys/fs/bpf/veil" || cfg.ClusterCIDR != cm.Data["cluster-cidr"] {
		t.Errorf("agent config %+v does not follow the env", cfg)
	}
	// Every VEIL_ variable names a flag of the agent, so none is silently
	// ignored.
	for k := range m {
		name, ok := strings.CutPrefix(k, "VEIL_")
		if !ok {
			continue
		}
		flag := strings.ToLower(strings.ReplaceAll(name, "_", "-"))
		f := fs.Lookup(flag)
		if f == nil {
			t.Errorf("%s names no veil-agent flag (--%s)", k, flag)
			continue
		}
		if f.Value.String() != m[k] && f.Value.Type() == "string" {
			t.Errorf("--%s = %q; want %q from %s", flag, f.Value, m[k], k)
		}
	}
}

func TestInvocationErrors(t *testing.T) {
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: ConfigMapName}, Data: map[string]string{"a": "1"}}
	ds := func(c corev1.Container) *appsv1.DaemonSet {
		d := &appsv1.DaemonSet{}
		d.Spec.Template.Spec.Containers = []corev1.Container{c}
		return d
	}
	agent := func(env ...corev1.EnvVar) corev1.Container {
		return corev1.Container{Name: AgentContainer, Command: []string{"/veil-agent"}, Env: env}
	}
	cmRef := func(name, key string, optional bool) corev1.EnvVar {
		return corev1.EnvVar{Name: "X", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{
			LocalObjectReference: corev1.LocalObjectReference{Name: name}, Key: key, Optional: &optional,
		}}}
	}
	field := func(path string) corev1.EnvVar {
		return corev1.EnvVar{Name: "X", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
	}
	for _, tc := range []struct {
		name      string
		ds        *appsv1.DaemonSet
		node      string
		overrides map[string]string
		wantErr   string
		wantEnv   []string
	}{
		{name: "no agent container", ds: ds(corev1.Container{Name: "other", Command: []string{"x"}}), node: "n", wantErr: "no container"},
		{name: "no command", ds: ds(corev1.Container{Name: AgentContainer}), node: "n", wantErr: "no command"},
		{name: "expansion", ds: ds(corev1.Container{Name: AgentContainer, Command: []string{"x"}, Args: []string{"--a=$(B)"}}), node: "n", wantErr: "expansion"},
		{name: "missing key", ds: ds(agent(cmRef(ConfigMapName, "b", false))), node: "n", wantErr: `no key "b"`},
		{name: "optional missing key", ds: ds(agent(cmRef(ConfigMapName, "b", true))), node: "n", wantEnv: nil},
		{name: "other configmap", ds: ds(agent(cmRef("other", "a", false))), node: "n", wantErr: "not in the manifests"},
		{name: "secret", ds: ds(agent(corev1.EnvVar{Name: "X", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{}}})), node: "n", wantErr: "overrides"},
		{name: "secret overridden", ds: ds(agent(corev1.EnvVar{Name: "X", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{}}})), overrides: map[string]string{"X": "s"}, wantEnv: []string{"X=s"}},
		{name: "pod IP", ds: ds(agent(field("status.podIP"))), node: "n", wantErr: "status.podIP"},
		{name: "empty node name", ds: ds(agent(field("spec.nodeName"))), wantErr: "node name is empty"},
		{name: "node name", ds: ds(agent(field("spec.nodeName"), cmRef(ConfigMapName, "a", false))), node: "n", wantErr: "", wantEnv: []string{"X=n", "X=1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, env, err := invocation(tc.ds, cm, tc.node, tc.overrides)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v; want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			if !slices.Equal(env, tc.wantEnv) {
				t.Errorf("env = %q; want %q", env, tc.wantEnv)
			}
		})
	}
}

func TestDecodeObjects(t *testing.T) {
	objs, err := DecodeObjects([]byte("---\n# only a comment\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\n"))
	if err != nil || len(objs) != 1 || objs[0].GetName() != "a" {
		t.Fatalf("DecodeObjects = %v, %v; want ConfigMap a", objs, err)
	}
	for _, bad := range []string{"metadata:\n  name: a\n", "a: [\n", "- 1\n"} {
		if _, err := DecodeObjects([]byte(bad)); err == nil {
			t.Errorf("DecodeObjects(%q) succeeded; want an error", bad)
		}
	}
}
