package cluster

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/deploy/chart"
	"github.com/veilmesh/veil/lab/controlplane"
)

func TestResolveNames(t *testing.T) {
	tests := []struct {
		name    string
		opts    Options
		want    names
		wantErr string
	}{
		{name: "defaults", opts: Options{}, want: names{prefix: "vrc", dir: filepath.Join(os.TempDir(), "veil-cluster-vrc")}},
		{name: "given", opts: Options{Prefix: "lab7", Dir: "/srv/lab"}, want: names{prefix: "lab7", dir: "/srv/lab"}},
		{name: "short prefix", opts: Options{Prefix: "ab"}, wantErr: "want 3 to 12"},
		{name: "prefix with a dash", opts: Options{Prefix: "a-b-c"}, wantErr: "want 3 to 12"},
		{name: "dir under /run", opts: Options{Dir: "/run/veil"}, wantErr: "below /run"},
		{name: "dir under /var/run", opts: Options{Dir: "/var/run/veil"}, wantErr: "below /var/run"},
		{name: "dir is /etc", opts: Options{Dir: "/etc"}, wantErr: "below /etc"},
		{name: "dir beside /opt", opts: Options{Dir: "/optional"}, want: names{prefix: "vrc", dir: "/optional"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := resolveNames(tc.opts)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("resolveNames(%+v) = %v, %v; want an error with %q", tc.opts, got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("resolveNames(%+v) = %+v, %v; want %+v", tc.opts, got, err, tc.want)
			}
		})
	}
}

func TestNames(t *testing.T) {
	n := names{prefix: "vrc", dir: "/tmp/x"}
	for _, tc := range []struct{ got, want string }{
		{n.hubNetns(), "vrc-hub"},
		{n.nodeNetns(2), "vrc-node-2"},
		{n.nodeCgroup(2), "veil-vrc/node-2"},
		{n.daemonCgroup(2), "veil-vrc/node-2-daemons"},
		{n.hostCgroup(2), "veil-vrc/node-2/host"},
		{n.nsDir(), "/tmp/x/ns"},
		{NodeName(3), "node-3"},
		{NodeIP(3).String(), "10.250.0.13"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %s; want %s", tc.got, tc.want)
		}
	}
}

func TestUnescapeMount(t *testing.T) {
	for in, want := range map[string]string{
		`/tmp/a`:             "/tmp/a",
		`/tmp/with\040space`: "/tmp/with space",
		`/tmp/tab\011x`:      "/tmp/tab\tx",
		`/tmp/trailing\`:     `/tmp/trailing\`,
	} {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q) = %q; want %q", in, got, want)
		}
	}
}

// TestLabValues checks that the chart accepts the lab's values and renders
// what the lab relies on: the namespace, and no cgroup mount.
func TestLabValues(t *testing.T) {
	root, err := controlplane.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	files, err := chart.Render(filepath.Join(root, "deploy", "helm", "veil"), deploy.Namespace, LabValues())
	if err != nil {
		t.Fatalf("render the chart with LabValues: %v", err)
	}
	var all []string
	for _, f := range files {
		all = append(all, f.Content)
	}
	objs, err := deploy.DecodeObjects([]byte(strings.Join(all, "\n---\n")))
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]bool{}
	for _, o := range objs {
		kinds[o.GetKind()] = true
		if o.GetKind() == "DaemonSet" {
			data, _ := yaml.Marshal(o.Object)
			if strings.Contains(string(data), "/sys/fs/cgroup") {
				t.Errorf("DaemonSet mounts /sys/fs/cgroup with cgroupRoot empty:\n%s", data)
			}
		}
	}
	for _, k := range []string{"Namespace", "DaemonSet", "ConfigMap", "ServiceAccount"} {
		if !kinds[k] {
			t.Errorf("rendered chart has no %s (kinds %v)", k, kinds)
		}
	}
}

// TestConfigs checks that the node configs the lab writes are well-formed
// YAML of the kinds kubelet and kube-proxy expect.
func TestConfigs(t *testing.T) {
	for _, tc := range []struct {
		name, data, kind string
	}{
		{"kubelet", fmt.Sprintf(kubeletConfig, "veil-vrc/node-1", containerdSocket, "10.250.0.11", "/p/k.crt", "/p/k.key", "/p/ca.crt", DNSServiceIP), "KubeletConfiguration"},
		{"kube-proxy nftables", fmt.Sprintf(kubeProxyConfig, "/p/kp.kubeconfig", "node-1", ClusterCIDR, KubeProxyNFTables), "KubeProxyConfiguration"},
		{"kube-proxy iptables", fmt.Sprintf(kubeProxyConfig, "/p/kp.kubeconfig", "node-1", ClusterCIDR, KubeProxyIPTables), "KubeProxyConfiguration"},
	} {
		var m map[string]any
		if err := yaml.Unmarshal([]byte(tc.data), &m); err != nil {
			t.Errorf("%s config: %v\n%s", tc.name, err, tc.data)
			continue
		}
		if m["kind"] != tc.kind {
			t.Errorf("%s config kind %v; want %s", tc.name, m["kind"], tc.kind)
		}
		if strings.Contains(tc.data, "%!") {
			t.Errorf("%s config has a formatting error:\n%s", tc.name, tc.data)
		}
	}
}

func TestParseKubeProxyMode(t *testing.T) {
	for in, want := range map[string]KubeProxyMode{"": KubeProxyNFTables, "none": KubeProxyNone, "iptables": KubeProxyIPTables, "nftables": KubeProxyNFTables} {
		if got, err := ParseKubeProxyMode(in); err != nil || got != want {
			t.Errorf("ParseKubeProxyMode(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"ipvs", "NFTABLES", "off"} {
		if got, err := ParseKubeProxyMode(in); err == nil || !strings.Contains(err.Error(), "want none, iptables or nftables") {
			t.Errorf("ParseKubeProxyMode(%q) = %q, %v; want an error naming the modes", in, got, err)
		}
	}
}

// TestCleanupKeepsForeignDir checks that Cleanup never deletes a dir that
// no cluster made, and removes one that a cluster did.
func TestCleanupKeepsForeignDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("Cleanup reads cgroups and network namespaces as root")
	}
	dir := filepath.Join(t.TempDir(), "precious")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "data"), []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Cleanup("vrcunit", dir); err == nil || !strings.Contains(err.Error(), "not a cluster's dir") {
		t.Fatalf("Cleanup of a foreign dir: %v; want a refusal", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "data")); err != nil {
		t.Fatalf("Cleanup touched a foreign dir: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, dirMarker), []byte("vrcunit\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Cleanup("vrcunit", dir); err != nil {
		t.Fatalf("Cleanup of a cluster's dir: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("cluster dir still there after Cleanup: %v", err)
	}
}
