package realcluster

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/veilmesh/veil/deploy"
	"github.com/veilmesh/veil/lab/cluster"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/tests/testenv"
)

// prefix names the test's cluster; a crashed run's leftovers are removed by
// it at the next start.
const prefix = "vrctest"

// TestPrivilegedRealCluster brings up a 2-node cluster, installs Veil from
// its chart, has the scheduler place a server and a client pod on different
// nodes, checks that the client reaches the server through Veil's datapath
// and that a NetworkPolicy stops it, and that tearing the cluster down
// leaves the host as it was.
func TestPrivilegedRealCluster(t *testing.T) {
	requireCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	c := startLab(t, ctx, labSpec{UpOptions: cluster.UpOptions{Options: cluster.Options{Prefix: prefix, Nodes: 2}}})
	clusterUp := c.Startup
	clients := c.clients
	installing := time.Now()
	c.installVeil(ctx, nil)
	ready := clusterUp + time.Since(installing)
	podCIDRs := map[string]netip.Prefix{}
	for _, nd := range c.Nodes {
		node, err := clients.CoreV1().Nodes().Get(ctx, nd.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		podCIDRs[nd.Name] = netip.MustParsePrefix(node.Spec.PodCIDR)
	}
	agents, err := clients.CoreV1().Pods(deploy.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=veil-agent"})
	if err != nil {
		t.Fatal(err)
	}
	agentNodes := map[string]bool{}
	for _, p := range agents.Items {
		if p.Status.Phase == corev1.PodRunning {
			agentNodes[p.Spec.NodeName] = true
		}
	}
	if len(agentNodes) != 2 {
		t.Fatalf("veil-agent pods running on %v; want both nodes", agentNodes)
	}

	c.waitServiceAccount(ctx, "default")
	created := time.Now()
	server := createPod(t, ctx, clients, "server", []string{"serve", ":8080"})
	serverRunning := time.Since(created)
	created = time.Now()
	client := createPod(t, ctx, clients, "client", []string{"probe", server.Status.PodIP + ":8080"})
	clientRunning := time.Since(created)
	if server.Spec.NodeName == client.Spec.NodeName {
		t.Fatalf("scheduler put both pods on %s despite the anti-affinity", server.Spec.NodeName)
	}
	for _, p := range []*corev1.Pod{server, client} {
		ip := netip.MustParseAddr(p.Status.PodIP)
		if cidr := podCIDRs[p.Spec.NodeName]; !cidr.Contains(ip) {
			t.Errorf("pod %s on %s has IP %s, outside the node's pod CIDR %s", p.Name, p.Spec.NodeName, ip, cidr)
		}
		t.Logf("pod %s on %s: %s", p.Name, p.Spec.NodeName, ip)
	}

	waitProbe(t, ctx, clients, "ok")
	t.Logf("pod create → Running (seen by polling every 250 ms): server %s, client %s; client create → first allowed connection seen %s",
		serverRunning.Round(time.Millisecond), clientRunning.Round(time.Millisecond), time.Since(created).Round(time.Millisecond))
	// Between nodes, pod traffic goes through the agents' WireGuard
	// devices: `wg show` on each node (through the control socket the
	// DaemonSet shares with the node) counts it.
	for _, nd := range c.Nodes {
		out, err := nd.Run(ctx, "wg", "show", "veil-wg0", "transfer")
		if err != nil {
			t.Fatalf("wg show on %s: %v", nd.Name, err)
		}
		if f := strings.Fields(out); len(f) != 3 || f[1] == "0" || f[2] == "0" {
			t.Errorf("WireGuard transfer on %s: %q; want bytes received and sent from the peer", nd.Name, out)
		}
	}
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "deny-server", Namespace: "default"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "server"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
		},
	}
	if _, err := clients.NetworkingV1().NetworkPolicies("default").Create(ctx, np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitProbe(t, ctx, clients, "fail")

	t.Logf("bring-up: cluster.Start %s, Veil installed and nodes Ready %s", clusterUp.Round(time.Millisecond), ready.Round(time.Millisecond))
	logMemory(t, c.Cluster, "the 2-node cluster")

	c.down()
}

// dumpPodLogs logs the last lines of every container of every pod, the
// previous instance's too (a crash-looping agent's reason is there).
func dumpPodLogs(t *testing.T, clients kubernetes.Interface) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pods, err := clients.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Logf("list pods: %v", err)
		return
	}
	for _, p := range pods.Items {
		t.Logf("--- pod %s/%s on %s: %s %v", p.Namespace, p.Name, p.Spec.NodeName, p.Status.Phase, p.Status.ContainerStatuses)
		for _, c := range append(p.Spec.InitContainers, p.Spec.Containers...) {
			for _, previous := range []bool{true, false} {
				out, err := clients.CoreV1().Pods(p.Namespace).GetLogs(p.Name, &corev1.PodLogOptions{
					Container: c.Name, Previous: previous, TailLines: new(int64(20)),
				}).DoRaw(ctx)
				if err == nil && len(out) > 0 {
					t.Logf("--- logs of %s/%s (previous %v):\n%s", p.Name, c.Name, previous, out)
				}
			}
		}
	}
}

// buildAgentImage runs `make image` into a temp dir.
func buildAgentImage(t testing.TB, ctx context.Context) string {
	t.Helper()
	root, err := controlplane.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cmd := exec.CommandContext(ctx, "make", "--no-print-directory", "-C", root, "image", "BIN="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make image: %v\n%s", err, out)
	}
	return filepath.Join(dir, "veil-image.tar")
}

// createPod creates a test-server pod that the scheduler must place away
// from the other test pods, and waits until it runs.
func createPod(t *testing.T, ctx context.Context, clients kubernetes.Interface, app string, args []string) *corev1.Pod {
	t.Helper()
	other := map[string]string{"server": "client", "client": "server"}[app]
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: app, Namespace: "default", Labels: map[string]string{"app": app}},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{
				Name:            app,
				Image:           cluster.TestServerImage,
				ImagePullPolicy: corev1.PullNever,
				Args:            args,
			}},
			Affinity: &corev1.Affinity{PodAntiAffinity: &corev1.PodAntiAffinity{
				RequiredDuringSchedulingIgnoredDuringExecution: []corev1.PodAffinityTerm{{
					LabelSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": other}},
					TopologyKey:   "kubernetes.io/hostname",
				}},
			}},
			TerminationGracePeriodSeconds: new(int64),
		},
	}
	if _, err := clients.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod %s: %v", app, err)
	}
	var got *corev1.Pod
	testenv.Eventually(t, 2*time.Minute, 250*time.Millisecond, func() error {
		p, err := clients.CoreV1().Pods("default").Get(ctx, app, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
			return fmt.Errorf("pod %s: %s on %q, conditions %v", app, p.Status.Phase, p.Spec.NodeName, p.Status.Conditions)
		}
		got = p
		return nil
	})
	return got
}

// waitProbe waits until the client's last probe result starts with want.
func waitProbe(t *testing.T, ctx context.Context, clients kubernetes.Interface, want string) {
	t.Helper()
	testenv.Eventually(t, time.Minute, 500*time.Millisecond, func() error {
		out, err := clients.CoreV1().Pods("default").GetLogs("client", &corev1.PodLogOptions{TailLines: new(int64(1))}).DoRaw(ctx)
		if err != nil {
			return err
		}
		if last := strings.TrimSpace(string(out)); !strings.HasPrefix(last, want) {
			return fmt.Errorf("client's last probe: %q; want %s", last, want)
		}
		return nil
	})
}

// snapshotHost records what of the host a cluster must leave as it was.
// State that no test may change (the host's routes, rules, nft and
// iptables rulesets, sysctls) is recorded whole; state that other
// packages' privileged tests, running in parallel under go test ./..., add
// and remove (network namespaces, mounts, cgroups, bpffs pins) only where
// this cluster could have left something: its names, and the paths its
// nodes mount over.
func snapshotHost(t *testing.T, prefix string) map[string]string {
	t.Helper()
	out := map[string]string{}
	cmds := map[string][]string{
		"routes":          {"ip", "route", "show", "table", "all"},
		"routes6":         {"ip", "-6", "route", "show", "table", "all"},
		"rules":           {"ip", "rule"},
		"nft ruleset":     {"nft", "list", "ruleset"},
		"iptables rules":  {"iptables-save"},
		"ip6tables rules": {"ip6tables-save"},
	}
	for k, argv := range cmds {
		b, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(argv, " "), err, b)
		}
		out[k] = dropComments(string(b))
	}
	for _, key := range []string{
		"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
		"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
		"net/ipv4/ip_forward", "net/netfilter/nf_conntrack_max", "net/ipv4/conf/all/route_localnet",
		"net/bridge/bridge-nf-call-iptables",
	} {
		b, err := os.ReadFile("/proc/sys/" + key)
		if err != nil {
			b = []byte("(absent)")
		}
		out["sysctl "+key] = strings.TrimSpace(string(b))
	}

	netnsList, err := os.ReadDir("/run/netns")
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var ours []string
	for _, e := range netnsList {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			ours = append(ours, e.Name())
		}
	}
	out["netns "+prefix+"-*"] = strings.Join(ours, "\n")

	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var mounts []string
	for _, line := range strings.Split(string(mi), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := f[4]
		nodeReplaced := mp == "/run" || mp == "/sys/fs/bpf" || slices.ContainsFunc(
			[]string{"/var/lib", "/var/log", "/opt", "/etc"},
			func(p string) bool { return mp == p || strings.HasPrefix(mp, p+"/") })
		if nodeReplaced || strings.Contains(mp, prefix) {
			mounts = append(mounts, strings.Join(f[4:], " "))
		}
	}
	slices.Sort(mounts)
	out["mounts"] = strings.Join(mounts, "\n")

	hierarchies, _ := filepath.Glob("/sys/fs/cgroup/*")
	var cgroups []string
	for _, h := range hierarchies {
		if _, err := os.Stat(filepath.Join(h, "veil-"+prefix)); err == nil {
			cgroups = append(cgroups, h+"/veil-"+prefix)
		}
	}
	out["cgroups"] = strings.Join(cgroups, "\n")

	// The agents pin under /sys/fs/bpf/veil, in each node's own bpffs.
	var pins []string
	filepath.WalkDir("/sys/fs/bpf/veil", func(path string, d os.DirEntry, err error) error {
		if err == nil {
			pins = append(pins, path)
		}
		return nil
	})
	out["bpffs /sys/fs/bpf/veil"] = strings.Join(pins, "\n")
	return out
}

// dropComments removes iptables-save's comment lines, which carry the time.
func dropComments(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(l, "#") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// running reports whether pid exists and is not a zombie.
func running(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state …; comm may hold spaces and parentheses.
	rest := string(b[strings.LastIndexByte(string(b), ')')+1:])
	return !strings.HasPrefix(strings.TrimSpace(rest), "Z")
}

func comm(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return strings.TrimSpace(string(b))
}

// testWriter sends the cluster's log to the test's output.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
