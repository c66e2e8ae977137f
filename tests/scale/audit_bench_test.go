package scale

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/flowcontrol"

	"github.com/veilmesh/veil/api/client/clientset/versioned"
	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/meshctl/cli"
	"github.com/veilmesh/veil/tests/scaleshape"
)

// meshNodeObject is node i's MeshNode as an agent writes it for a
// consistent mesh of the n nodes whose keys are keys: WireGuard up, strict,
// every peer with a recent handshake. With full, every peer is listed, as
// agents before the compact status wrote it; else the peers are counted
// and digested, and only unhealthy ones (none here) listed.
func meshNodeObject(i, n int, keys []string, now time.Time, full bool) *meshv1alpha1.MeshNode {
	hs := metav1.NewTime(now.Add(-time.Minute))
	enc := meshv1alpha1.EncryptionStatus{
		Mode: meshv1alpha1.EncryptionModeUserspace, Interface: "veilwg0", PublicKey: keys[i],
		KeyCreated: metav1.NewTime(now.Add(-24 * time.Hour)), ListenPort: 51820, StrictMode: true,
		GuardedDevices: []string{"eth0"}, PeerCount: int32(n - 1),
	}
	peers := make([]meshv1alpha1.PeerStatus, 0, n-1)
	for j := range n {
		if j != i {
			peers = append(peers, meshv1alpha1.PeerStatus{
				Node: scaleshape.NodeName(j), PublicKey: keys[j], Endpoint: netip.AddrPortFrom(scaleshape.NodeIP(j), 51820).String(),
				AllowedIPs: []string{scaleshape.PodCIDR(j).String()}, LastHandshake: &hs, RxBytes: 1 << 20, TxBytes: 1 << 20,
			})
		}
	}
	if full {
		enc.Peers = peers
	} else {
		s, listed := meshv1alpha1.SummarizePeers(peers, peers, now, meshv1alpha1.DefaultHealthyHandshakeAge)
		enc.PeerSummary, enc.Peers = &s, listed
	}
	return &meshv1alpha1.MeshNode{
		ObjectMeta: metav1.ObjectMeta{Name: scaleshape.NodeName(i)},
		Status: meshv1alpha1.MeshNodeStatus{
			NodeIP: scaleshape.NodeIP(i).String(), PodCIDRs: []string{scaleshape.PodCIDR(i).String()}, AgentVersion: "bench",
			Updated: metav1.NewTime(now), Encryption: enc,
		},
	}
}

// auditFigures is one command's run at one size, by this meshctl (build
// "new") or by the baseline binary ("old").
type auditFigures struct {
	nodes int
	build string
	cmd   string
	wall  time.Duration
	bytes int
	code  int
	// rss is the process's peak resident memory.
	rss int64
}

// runMeshctl runs the meshctl binary at path with args, as a process, and
// reports its peak RSS.
func runMeshctl(ctx context.Context, path string, args []string) (stdout int, code int, stderr string, rss int64, err error) {
	var out, errOut bytes.Buffer
	c := exec.CommandContext(ctx, path, args...)
	c.Stdout, c.Stderr = &out, &errOut
	err = c.Run()
	if c.ProcessState != nil {
		if ru, ok := c.ProcessState.SysUsage().(*syscall.Rusage); ok {
			rss = ru.Maxrss << 10
		}
	}
	if x, ok := err.(*exec.ExitError); ok {
		return out.Len(), x.ExitCode(), errOut.String(), rss, nil
	}
	return out.Len(), 0, errOut.String(), rss, err
}

// BenchmarkAuditEncryption creates VEIL_AUDIT_NODES (default 200,500)
// Nodes with WireGuard annotations and their MeshNodes, each with a
// consistent peer view as agents write it (counts and a digest; with
// VEIL_AUDIT_FULL=1 every peer listed, as older agents did), in a real API
// server, and runs this tree's meshctl (built once, run as a process)
// audit encryption and encryption status against it, default output and
// -o json: wall time, bytes written, peak RSS, and the bytes of Nodes and
// MeshNodes there are to read. With VEIL_AUDIT_BASELINE set to a meshctl
// binary (today's main, say), it runs the same commands with it side by
// side and prints the ratios (give it VEIL_AUDIT_FULL=1: main's meshctl
// reads only full lists). Run it once:
//
//	git archive main | tar -x -C /tmp/meshctl-main && (cd /tmp/meshctl-main && go build -o meshctl ./meshctl/cmd/meshctl)
//	VEIL_AUDIT_FULL=1 VEIL_AUDIT_BASELINE=/tmp/meshctl-main/meshctl go test ./tests/scale -run '^$' -bench AuditEncryption -benchtime 1x -timeout 10m
//	VEIL_AUDIT_NODES=5000 go test ./tests/scale -run '^$' -bench AuditEncryption -benchtime 1x -timeout 15m
//
// Full lists are n·(n-1) peer entries (about 200 bytes each): 5,000 nodes
// would be about 5 GB of MeshNode status, past etcd's default 2 GiB quota;
// the compact status is a few hundred bytes per healthy node.
func BenchmarkAuditEncryption(b *testing.B) {
	sizes := []int{200, 500}
	baseline := os.Getenv("VEIL_AUDIT_BASELINE")
	full := os.Getenv("VEIL_AUDIT_FULL") == "1"
	meshctl := filepath.Join(b.TempDir(), "meshctl")
	build := exec.Command("go", "build", "-o", meshctl, "github.com/veilmesh/veil/meshctl/cmd/meshctl")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("build meshctl: %v\n%s", err, out)
	}
	if v := os.Getenv("VEIL_AUDIT_NODES"); v != "" {
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 2 {
				b.Fatalf("VEIL_AUDIT_NODES: %q is not a node count of at least 2", f)
			}
			sizes = append(sizes, n)
		}
	}
	cp := controlplane.StartForTest(b, controlplane.Options{Timeout: 5 * time.Minute})
	cfg := rest.CopyConfig(cp.Config)
	cfg.RateLimiter = flowcontrol.NewFakeAlwaysRateLimiter()
	kube, veil := kubernetes.NewForConfigOrDie(cfg), versioned.NewForConfigOrDie(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var figs []auditFigures
	for b.Loop() {
		have := 0
		var keys []string
		for _, n := range sizes {
			start := time.Now()
			for len(keys) < n {
				keys = append(keys, "")
			}
			// Nodes first (their keys), then every MeshNode again: each
			// now peers with the new nodes too.
			if err := bulk(ctx, "Nodes", have, n, b.Logf, func(ctx context.Context, i int) error {
				node := nodeObject(i)
				keys[i] = node.Annotations["wireguard.veil.dev/public-key"]
				created, err := kube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
				if err != nil {
					return err
				}
				created.Status = nodeStatus(i)
				_, err = kube.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{})
				return err
			}); err != nil {
				b.Fatal(err)
			}
			now := time.Now()
			if err := bulk(ctx, "MeshNodes", 0, n, b.Logf, func(ctx context.Context, i int) error {
				want := meshNodeObject(i, n, keys, now, full)
				mn, err := veil.MeshV1alpha1().MeshNodes().Get(ctx, want.Name, metav1.GetOptions{})
				if err != nil {
					if mn, err = veil.MeshV1alpha1().MeshNodes().Create(ctx, want, metav1.CreateOptions{}); err != nil {
						return err
					}
				}
				mn.Status = want.Status
				_, err = veil.MeshV1alpha1().MeshNodes().UpdateStatus(ctx, mn, metav1.UpdateOptions{})
				return err
			}); err != nil {
				b.Fatal(err)
			}
			have = n
			b.Logf("%d Nodes and MeshNodes (%s peer entries) in %s", n, strconv.Itoa(n*(n-1)), time.Since(start).Round(time.Second))
			// One untimed read first: the first list after the writes is
			// slower (the API server and etcd still settle), whichever build
			// would run first. It also sizes what there is to read.
			mns, err := veil.MeshV1alpha1().MeshNodes().List(ctx, metav1.ListOptions{})
			if err != nil {
				b.Fatalf("warm-up list: %v", err)
			}
			nodes, err := kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
			if err != nil {
				b.Fatalf("warm-up list: %v", err)
			}
			mnBytes, _ := json.Marshal(mns)
			nodeBytes, _ := json.Marshal(nodes)
			b.Logf("%d nodes: MeshNodes %d bytes (%d per MeshNode), Nodes %d bytes", n, len(mnBytes), len(mnBytes)/n, len(nodeBytes))
			for _, args := range [][]string{
				{"audit", "encryption"}, {"audit", "encryption", "-o", "json"},
				{"encryption", "status"}, {"encryption", "status", "-o", "json"},
			} {
				full := append([]string{"--kubeconfig", cp.Kubeconfig, "--timeout", "2m"}, args...)
				// Creating 1,000 full-mesh MeshNodes takes minutes: the status
				// and handshake times written at the start must stay fresh.
				full = append(full, "--stale-after", "1h")
				if args[0] == "audit" {
					full = append(full, "--max-handshake-age", "1h")
				}
				t0 := time.Now()
				size, code, stderr, rss, err := runMeshctl(ctx, meshctl, full)
				if err != nil {
					b.Fatalf("meshctl %s: %v", strings.Join(args, " "), err)
				}
				f := auditFigures{nodes: n, build: "new", cmd: strings.Join(args, " "), wall: time.Since(t0), bytes: size, code: code, rss: rss}
				if code != cli.ExitOK {
					b.Fatalf("meshctl %s at %d nodes: exit %d, stderr %s", f.cmd, n, code, head(stderr, 2000))
				}
				figs = append(figs, f)
				b.Logf("meshctl %s at %d nodes: %s, %d bytes, RSS %d MiB", f.cmd, n, f.wall.Round(time.Millisecond), f.bytes, f.rss>>20)
				if baseline == "" {
					continue
				}
				t0 = time.Now()
				size, code, stderr, rss, err = runMeshctl(ctx, baseline, full)
				if err != nil {
					b.Fatalf("baseline meshctl %s: %v", f.cmd, err)
				}
				old := auditFigures{nodes: n, build: "old", cmd: f.cmd, wall: time.Since(t0), bytes: size, code: code, rss: rss}
				figs = append(figs, old)
				// The baseline may fail where this build does not: that is a finding, not an error.
				b.Logf("baseline meshctl %s at %d nodes: %s, %d bytes, RSS %d MiB, exit %d %s", f.cmd, n, old.wall.Round(time.Millisecond), old.bytes, old.rss>>20, code, head(strings.TrimSpace(stderr), 300))
			}
		}
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%-7s %-6s %-28s %12s %14s %8s %5s\n", "nodes", "build", "command", "wall", "stdout-bytes", "rss-MiB", "exit")
	for _, f := range figs {
		fmt.Fprintf(&sb, "%-7d %-6s %-28s %12s %14d %8d %5d\n", f.nodes, f.build, f.cmd, f.wall.Round(time.Millisecond), f.bytes, f.rss>>20, f.code)
	}
	// New against old at the same size, side by side.
	for _, f := range figs {
		for _, old := range figs {
			if f.build == "new" && old.build == "old" && old.nodes == f.nodes && old.cmd == f.cmd {
				if old.code != cli.ExitOK {
					fmt.Fprintf(&sb, "%s at %d nodes: old exits %d, new succeeds in %s\n", f.cmd, f.nodes, old.code, f.wall.Round(time.Millisecond))
					continue
				}
				fmt.Fprintf(&sb, "%s at %d nodes: new vs old: wall %.2fx, bytes %.4fx, RSS %.2fx\n", f.cmd, f.nodes,
					float64(f.wall)/float64(old.wall), float64(f.bytes)/float64(max(old.bytes, 1)), float64(f.rss)/float64(max(old.rss, 1)))
			}
		}
	}
	// Growth against the smallest size: linear in n·(n-1) peer entries is
	// the floor of any pair check.
	for _, f := range figs {
		for _, base := range figs {
			if base.nodes == sizes[0] && base.build == f.build && base.cmd == f.cmd && f.nodes != base.nodes {
				fmt.Fprintf(&sb, "%s %s: %d vs %d nodes: wall %.1fx, bytes %.1fx (peer entries %.1fx)\n", f.build, f.cmd, f.nodes, base.nodes,
					float64(f.wall)/float64(base.wall), float64(f.bytes)/float64(max(base.bytes, 1)),
					float64(f.nodes*(f.nodes-1))/float64(base.nodes*(base.nodes-1)))
			}
		}
	}
	b.Log(sb.String())
}

func head(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
