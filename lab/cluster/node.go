package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"

	"github.com/veilmesh/veil/lab/netns"
)

// Node is a lab node: a network namespace on the hub's bridge, a mount
// namespace with its own /run, /var/lib, /var/log, /opt, /etc (an overlay,
// for /etc/cni/net.d) and bpffs, a UTS namespace named after the node, and
// containerd, kubelet and kube-proxy running in all three.
type Node struct {
	// Index is the node's number, from 1.
	Index int
	// Name is the Kubernetes Node's name and the node's hostname.
	Name string
	// IP is the node's underlay address, its InternalIP.
	IP netip.Addr
	// PodCIDR is the node's spec.podCIDR, allocated by the controller
	// manager.
	PodCIDR netip.Prefix
	// Netns is the node's network namespace.
	Netns *netns.Netns
	// Dir holds the node's state: what its mount namespace shows as
	// /var/lib, /var/log and /opt, its configs and certificates.
	Dir string

	c       *Cluster
	ns      namespaces
	kubelet *proc // whose exit ends waits for the node
}

// kernelTunables are the host-wide sysctls kubelet checks and, unless they
// hold these values, rewrites. Each node's mount namespace shows a file
// with the value over each, so kubelet is content and the host keeps its
// own.
var kernelTunables = map[string]string{
	"vm/overcommit_memory":      "1",
	"vm/panic_on_oom":           "0",
	"kernel/panic":              "10",
	"kernel/panic_on_oops":      "1",
	"kernel/keys/root_maxkeys":  "1000000",
	"kernel/keys/root_maxbytes": "25000000",
}

// cniPlugins are the host's plugins (Debian's containernetworking-plugins)
// copied into every node's /opt/cni/bin: containerd brings up each pod's
// loopback with "loopback"; the pod network is Veil's, and veil-install-cni
// chains "portmap" after it for hostPort, as on a node whose distribution
// ships the CNI plugins.
var cniPlugins = []string{"/usr/lib/cni/loopback", "/usr/lib/cni/portmap"}

// NodeCgroupRoot is where each node's mount namespace shows the node's own
// cgroup v2 subtree (veil-<prefix>/node-N of the host's cgroup2 mount),
// below which kubelet runs the node's pods: the chart's cgroupRoot in a lab
// (Cluster.Values), so that each agent attaches its socket programs to its
// own node's pods only, never to the host's cgroups. It is on the node's
// private /run.
const NodeCgroupRoot = "/run/veil-cgroup2"

// nodeMountScript builds the node's mount namespace; it runs in the new
// namespace (unshare), with NODE and D (the node's dir) set.
const nodeMountScript = `
hostname "$NODE"
mount -t tmpfs -o mode=0755 veil-run /run
mkdir -p /run/lock
mount --bind "$D/var-lib" /var/lib
mount --bind "$D/var-log" /var/log
mount --bind "$D/opt" /opt
mount -t overlay veil-etc -o "lowerdir=/etc,upperdir=$D/etc/upper,workdir=$D/etc/work" /etc
mkdir -p /etc/cni/net.d
mount -t bpf veil-bpf /sys/fs/bpf
for f in "$D"/sysctl/*; do
	mount --bind "$f" "/proc/sys/$(basename "$f" | tr . /)"
done
# The node's own cgroup v2 subtree, where kubelet puts its pods, at one path
# on every node: the chart's cgroupRoot (one value for all nodes), under
# which the agent attaches its socket programs.
if [ -n "$CG2" ]; then
	mkdir -p ` + NodeCgroupRoot + `
	mount --bind "$CG2" ` + NodeCgroupRoot + `
fi
# As on a systemd host: kubelet's HostToContainer volumes (bpffs, cgroups,
# /run/netns) need shared mounts. Still a slave of the host: nothing
# mounted here propagates to it.
mount --make-rshared /
`

func (nd *Node) start(ctx context.Context, n names, images []string) error {
	c := nd.c
	nd.Dir = filepath.Join(c.Dir, nd.Name)
	for _, d := range []string{"var-lib", "var-log", "opt/cni/bin", "etc/upper", "etc/work", "sysctl", "pki"} {
		if err := os.MkdirAll(filepath.Join(nd.Dir, d), 0o755); err != nil {
			return fmt.Errorf("node %s: %w", nd.Name, err)
		}
	}
	for _, p := range cniPlugins {
		if err := copyFile(p, filepath.Join(nd.Dir, "opt/cni/bin", filepath.Base(p)), 0o755); err != nil {
			return fmt.Errorf("node %s: CNI plugin (make deps installs containernetworking-plugins): %w", nd.Name, err)
		}
	}
	for key, v := range kernelTunables {
		if err := os.WriteFile(filepath.Join(nd.Dir, "sysctl", strings.ReplaceAll(key, "/", ".")), []byte(v+"\n"), 0o644); err != nil {
			return fmt.Errorf("node %s: %w", nd.Name, err)
		}
	}
	if err := nd.network(n); err != nil {
		return fmt.Errorf("node %s: %w", nd.Name, err)
	}
	if err := makeCgroup(n.nodeCgroup(nd.Index)); err != nil {
		return err
	}
	if err := makeCgroup(n.daemonCgroup(nd.Index)); err != nil {
		return err
	}
	nd.ns = namespaces{
		net: nd.Netns.Path(),
		mnt: filepath.Join(n.nsDir(), nd.Name+".mnt"),
		uts: filepath.Join(n.nsDir(), nd.Name+".uts"),
	}
	for _, f := range []string{nd.ns.mnt, nd.ns.uts} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			return fmt.Errorf("node %s: %w", nd.Name, err)
		}
	}
	// slave: the host's later mounts still show in the node, nothing the
	// node mounts shows on the host.
	cg2 := ""
	if c.cgroup2 != "" {
		cg2 = filepath.Join(c.cgroup2, n.nodeCgroup(nd.Index))
	}
	if _, err := run(ctx, namespaces{}, c.path, "env", "NODE="+nd.Name, "D="+nd.Dir, "CG2="+cg2,
		"unshare", "--mount="+nd.ns.mnt, "--uts="+nd.ns.uts, "--propagation=slave",
		"sh", "-ec", nodeMountScript); err != nil {
		return fmt.Errorf("node %s: mount namespace: %w", nd.Name, err)
	}
	if err := nd.startContainerd(ctx, n, images); err != nil {
		return err
	}
	if err := nd.startKubelet(n); err != nil {
		return err
	}
	if c.KubeProxy == KubeProxyNone {
		return nil
	}
	return nd.startKubeProxy(n)
}

// network creates the node's namespace, wired to the hub's bridge, with a
// default route to the hub: the hub has no link out, so nothing leaves the
// lab.
func (nd *Node) network(n names) error {
	ns, err := netns.NewNetns(n.nodeNetns(nd.Index))
	if err != nil {
		return err
	}
	nd.Netns = ns
	h, err := ns.Handle()
	if err != nil {
		return err
	}
	defer h.Close()
	hubSide := fmt.Sprintf("n%d", nd.Index)
	if err := nd.c.hub.Do(func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hubSide}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(h))}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add underlay veth %s: %w", hubSide, err)
		}
		br, err := netlink.LinkByName("br0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetMaster(veth, br); err != nil {
			return fmt.Errorf("attach %s to the bridge: %w", hubSide, err)
		}
		return netlink.LinkSetUp(veth)
	}); err != nil {
		return err
	}
	return ns.Do(func() error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: prefixNet(netip.PrefixFrom(nd.IP, Underlay.Bits()))}); err != nil {
			return fmt.Errorf("address eth0: %w", err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: HubIP.AsSlice()}); err != nil {
			return fmt.Errorf("default route: %w", err)
		}
		// A node forwards its pods' traffic, as every Kubernetes node's OS
		// is set up to. The sysctl is the node's network namespace's own.
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0o644); err != nil {
			return fmt.Errorf("enable forwarding: %w", err)
		}
		return nil
	})
}

// containerdConfig is containerd 2.x's configuration for a node. The paths
// are the defaults, which are the node's own in its mount namespace.
const containerdConfig = `version = 3
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = %q

[plugins."io.containerd.cri.v1.runtime"]
  # The sandbox lacks CAP_SYS_RESOURCE, which a negative oom_score_adj
  # needs: without this, runc fails with "can't get final child's PID".
  restrict_oom_score_adj = true

[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["/opt/cni/bin"]
  conf_dir = "/etc/cni/net.d"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
  SystemdCgroup = false
`

const containerdSocket = "/run/containerd/containerd.sock"

func (nd *Node) startContainerd(ctx context.Context, n names, images []string) error {
	cfg := filepath.Join(nd.Dir, "containerd.toml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(containerdConfig, PauseImage)), 0o644); err != nil {
		return fmt.Errorf("node %s: %w", nd.Name, err)
	}
	p, err := nd.c.startProc(nd.Name+"-containerd", nd.ns, n.daemonCgroup(nd.Index), nd.c.bins.Containerd, "--config="+cfg)
	if err != nil {
		return err
	}
	ctr := func(ctx context.Context, args ...string) (string, error) {
		return run(ctx, nd.ns, nd.c.path, append([]string{nd.c.bins.Ctr, "--address=" + containerdSocket, "--namespace=k8s.io"}, args...)...)
	}
	// Not the socket file: a stale one survives a killed containerd.
	if err := waitFor(ctx, p, "containerd on "+nd.Name, func(ctx context.Context) error {
		_, err := ctr(ctx, "version")
		return err
	}); err != nil {
		return err
	}
	for _, img := range images {
		if _, err := ctr(ctx, "images", "import", img); err != nil {
			return fmt.Errorf("node %s: import image %s: %w", nd.Name, img, err)
		}
	}
	return nil
}

// kubeletConfig is the nodes' KubeletConfiguration; see
// notes/real-kubelet-lab.md for why each setting is what it is.
const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupRoot: /%[1]s
containerRuntimeEndpoint: unix://%[2]s
address: %[3]s
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: %[4]s
tlsPrivateKeyFile: %[5]s
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %[6]s}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: [%[7]s]
evictionHard: {memory.available: 100Mi, nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
# The images were imported, not pulled: they must never be collected.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
shutdownGracePeriod: 0s
`

func (nd *Node) startKubelet(n names) error {
	pki := func(name string) string { return filepath.Join(nd.c.Dir, "pki", name) }
	cfg := filepath.Join(nd.Dir, "kubelet.yaml")
	data := fmt.Sprintf(kubeletConfig, n.nodeCgroup(nd.Index), containerdSocket, nd.IP,
		pki(nd.Name+"-kubelet.crt"), pki(nd.Name+"-kubelet.key"), pki("ca.crt"), DNSServiceIP)
	if err := os.WriteFile(cfg, []byte(data), 0o644); err != nil {
		return fmt.Errorf("node %s: %w", nd.Name, err)
	}
	p, err := nd.c.startProc(nd.Name+"-kubelet", nd.ns, n.daemonCgroup(nd.Index), nd.c.bins.Kubelet,
		"--config="+cfg,
		"--kubeconfig="+pki(nd.Name+"-kubelet.kubeconfig"),
		"--hostname-override="+nd.Name,
		"--node-ip="+nd.IP.String(),
	)
	if err != nil {
		return err
	}
	nd.kubelet = p
	return nil
}

// kubeProxyConfig: iptables or nftables mode, inside the node's network
// namespace (iptables and nft act on the namespace they run in). oomScoreAdj
// 0 because the sandbox may not lower it; conntrack values 0 leave the
// host-wide conntrack limits alone.
const kubeProxyConfig = `apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %[1]s}
hostnameOverride: %[2]s
mode: %[4]s
clusterCIDR: %[3]s
oomScoreAdj: 0
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
`

func (nd *Node) startKubeProxy(n names) error {
	cfg := filepath.Join(nd.Dir, "kube-proxy.yaml")
	data := fmt.Sprintf(kubeProxyConfig, filepath.Join(nd.c.Dir, "pki", "kube-proxy.kubeconfig"), nd.Name, ClusterCIDR, nd.c.KubeProxy)
	if err := os.WriteFile(cfg, []byte(data), 0o644); err != nil {
		return fmt.Errorf("node %s: %w", nd.Name, err)
	}
	_, err := nd.c.startProc(nd.Name+"-kube-proxy", nd.ns, n.daemonCgroup(nd.Index), nd.c.bins.KubeProxy, "--config="+cfg)
	return err
}

// Run runs argv to completion inside the node (its network, mount and UTS
// namespaces) and returns its combined output.
func (nd *Node) Run(ctx context.Context, argv ...string) (string, error) {
	return run(ctx, nd.ns, nd.c.path, argv...)
}

// RunInNodeCgroup runs argv to completion as Run does, but started inside
// the node's cgroup v2 subtree (a child of it that it creates on first use,
// below the cluster's cgroup, so Stop and Cleanup remove it): where the
// chart's cgroupRoot (NodeCgroupRoot) makes Veil attach its socket
// programs, so argv's sockets are load-balanced and accelerated as a host
// process's on a production node whose cgroupRoot is the host's. Run's
// processes stay outside it. The process is created in the cgroup
// (CLONE_INTO_CGROUP), so none of its sockets escapes the hooks. It fails on
// a host without cgroup v2, where the nodes have no NodeCgroupRoot.
func (nd *Node) RunInNodeCgroup(ctx context.Context, argv ...string) (string, error) {
	if nd.c.cgroup2 == "" {
		return "", fmt.Errorf("run %s in node %s's cgroup: the host has no cgroup v2 hierarchy", strings.Join(argv, " "), nd.Name)
	}
	dir := filepath.Join(nd.c.cgroup2, nd.c.names().hostCgroup(nd.Index))
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return "", fmt.Errorf("create node %s's host cgroup: %w", nd.Name, err)
	}
	cg, err := os.Open(dir)
	if err != nil {
		return "", fmt.Errorf("open node %s's host cgroup: %w", nd.Name, err)
	}
	defer cg.Close()
	cmd := nsenterCommand(ctx, nd.ns, nd.c.path, argv...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	return output(cmd, argv)
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return out.Close()
}
