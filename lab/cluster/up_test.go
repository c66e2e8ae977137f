package cluster

import (
	"archive/tar"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	policyv1alpha1 "github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/deploy/chart"
	"github.com/veilmesh/veil/lab/controlplane"
)

// TestClusterValues checks that the chart accepts the values of a cluster
// with and without kube-proxy and cgroup2, and that the agent gets the API
// server's address and its node's cgroup2 subtree where it needs them.
func TestClusterValues(t *testing.T) {
	root, err := controlplane.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		c         *Cluster
		wantEnv   bool
		wantMount bool
	}{
		{"nftables, no cgroup2", &Cluster{KubeProxy: KubeProxyNFTables}, false, false},
		{"none, cgroup2", &Cluster{KubeProxy: KubeProxyNone, cgroup2: "/sys/fs/cgroup/unified"}, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files, err := chart.Render(filepath.Join(root, "deploy", "helm", "veil"), deploy.Namespace, tc.c.Values())
			if err != nil {
				t.Fatalf("render the chart with %v: %v", tc.c.Values(), err)
			}
			var ds string
			for _, f := range files {
				if strings.Contains(f.Content, "kind: DaemonSet") {
					ds = f.Content
				}
			}
			if got := strings.Contains(ds, "KUBERNETES_SERVICE_HOST") && strings.Contains(ds, HubIP.String()); got != tc.wantEnv {
				t.Errorf("agent has the API server's hub address: %v; want %v\n%s", got, tc.wantEnv, ds)
			}
			if got := strings.Contains(ds, "path: "+NodeCgroupRoot); got != tc.wantMount {
				t.Errorf("agent mounts %s: %v; want %v", NodeCgroupRoot, got, tc.wantMount)
			}
		})
	}
}

func TestDNSObjects(t *testing.T) {
	_, role, binding, cm, dep, svc := dnsObjects("", 0)
	if svc.Spec.ClusterIP != DNSServiceIP.String() || svc.Name != DNSService || svc.Namespace != DNSNamespace {
		t.Errorf("DNS Service %s/%s at %s; want %s/%s at %s", svc.Namespace, svc.Name, svc.Spec.ClusterIP, DNSNamespace, DNSService, DNSServiceIP)
	}
	var protos []corev1.Protocol
	for _, p := range svc.Spec.Ports {
		if p.Port == 53 {
			protos = append(protos, p.Protocol)
		}
	}
	if !slices.Contains(protos, corev1.ProtocolUDP) || !slices.Contains(protos, corev1.ProtocolTCP) {
		t.Errorf("DNS Service ports %v; want 53 over UDP and TCP", svc.Spec.Ports)
	}
	if !ServiceCIDR.Contains(DNSServiceIP) {
		t.Errorf("DNS cluster IP %s outside the Service CIDR %s", DNSServiceIP, ServiceCIDR)
	}
	if binding.RoleRef.Name != role.Name || binding.Subjects[0].Name != dep.Spec.Template.Spec.ServiceAccountName {
		t.Errorf("binding %v does not bind role %s to the Deployment's ServiceAccount", binding, role.Name)
	}
	canListSlices := false
	for _, r := range role.Rules {
		canListSlices = canListSlices || slices.Contains(r.Resources, "endpointslices")
	}
	if !canListSlices {
		t.Errorf("CoreDNS may not list EndpointSlices: %v", role.Rules)
	}
	if !strings.Contains(cm.Data["Corefile"], "kubernetes cluster.local") || strings.Contains(cm.Data["Corefile"], "forward") {
		t.Errorf("Corefile serves cluster.local without forward? %q", cm.Data["Corefile"])
	}
	if env := dep.Spec.Template.Spec.Containers[0].Env; len(env) != 0 {
		t.Errorf("CoreDNS env without an API host: %v", env)
	}
	_, _, _, _, dep, _ = dnsObjects("10.250.0.1", 6443)
	env := dep.Spec.Template.Spec.Containers[0].Env
	if len(env) != 2 || env[0].Value != "10.250.0.1" || env[1].Value != "6443" {
		t.Errorf("CoreDNS env with the API host: %v; want KUBERNETES_SERVICE_HOST/PORT 10.250.0.1 6443", env)
	}
}

func TestDemo(t *testing.T) {
	for _, tc := range []struct {
		nodes   int
		backend string
	}{{1, "node-1"}, {2, "node-2"}, {3, "node-2"}} {
		apps := DemoApps(tc.nodes)
		got := map[string]string{}
		for _, a := range apps {
			got[a.Namespace+"/"+a.Name] = a.Node
			d := demoDeployment(a)
			if sel := d.Spec.Template.Spec.NodeSelector[corev1.LabelHostname]; sel != a.Node {
				t.Errorf("%d nodes: Deployment %s/%s selects node %q; want %s", tc.nodes, a.Namespace, a.Name, sel, a.Node)
			}
			if d.Spec.Template.Labels["app"] != a.Name || demoService(a).Spec.Selector["app"] != a.Name {
				t.Errorf("%s/%s: pods and Service selector disagree", a.Namespace, a.Name)
			}
		}
		want := map[string]string{"demo/frontend": "node-1", "demo/backend": tc.backend, "other/client": "node-1"}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("%d nodes: %s on %s; want %s", tc.nodes, k, got[k], v)
			}
		}
	}
	np, mp := demoPolicies()
	data, err := yaml.Marshal(np)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"app: backend", "app: frontend", "port: 80", "protocol: TCP"} {
		if !strings.Contains(string(data), want) {
			t.Errorf("demo NetworkPolicy lacks %q:\n%s", want, data)
		}
	}
	if mp.Spec.Mode != policyv1alpha1.ModeAudit {
		t.Errorf("demo MeshPolicy mode %q; want audit", mp.Spec.Mode)
	}
}

func TestBinaryImage(t *testing.T) {
	img, err := binaryImage("/testserver", map[string][]byte{"/testserver": []byte("server"), "/client": []byte("client")})
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cf.Config.Entrypoint, []string{"/testserver"}) {
		t.Errorf("entrypoint %v; want /testserver", cf.Config.Entrypoint)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %d, %v; want 1", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	got := map[string]string{}
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		got[h.Name] = string(b)
		if h.Mode&0o111 == 0 {
			t.Errorf("%s is not executable: %o", h.Name, h.Mode)
		}
	}
	if got["testserver"] != "server" || got["client"] != "client" || len(got) != 2 {
		t.Errorf("layer holds %v; want testserver and client", got)
	}
}

func TestLabState(t *testing.T) {
	dir := t.TempDir()
	if _, err := ReadLabState(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("ReadLabState of an empty dir: %v; want ErrNotExist", err)
	}
	start, _, err := procStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	s := &LabState{Prefix: "veillab", Dir: dir, KubeProxy: KubeProxyNone, Supervisor: os.Getpid(), SupervisorStart: start,
		Phase: LabReady, Phases: []Phase{{Name: "control plane up", Took: 3 * time.Second}}, Total: 20 * time.Second}
	if err := s.write(); err != nil {
		t.Fatal(err)
	}
	got, err := ReadLabState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Prefix != "veillab" || got.KubeProxy != KubeProxyNone || len(got.Phases) != 1 || got.Phases[0].Took != 3*time.Second || got.Total != 20*time.Second {
		t.Errorf("read back %+v", got)
	}
	if !got.SupervisorRunning() {
		t.Error("this process, recorded with its start time, is not seen running")
	}
	got.SupervisorStart++
	if got.SupervisorRunning() {
		t.Error("a process with another start time (a reused PID) is seen as the supervisor")
	}
	if err := os.WriteFile(filepath.Join(dir, StateFile), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadLabState(dir); err == nil || !strings.Contains(err.Error(), "decode lab state") {
		t.Errorf("ReadLabState of a broken record: %v; want a decode error", err)
	}
}

func TestDownWithoutLab(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "none")
	if err := Down(t.Context(), dir, "", time.Second); !errors.Is(err, ErrNoLab) {
		t.Errorf("Down of a dir without a lab: %v; want ErrNoLab", err)
	}
	if err := os.MkdirAll(filepath.Join(dir, ClusterDir), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := Down(t.Context(), dir, "", time.Second); err == nil || !strings.Contains(err.Error(), "--prefix") {
		t.Errorf("Down of a cluster dir without a record: %v; want an error asking for --prefix", err)
	}
}
