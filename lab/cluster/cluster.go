package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/veilmesh/veil/lab/controlplane"
	"github.com/veilmesh/veil/lab/netns"
)

// Addresses inside the lab. They never leave it, so they may overlap the
// host's; several clusters can run at once with different prefixes.
var (
	// Underlay is the bridged network of the hub and the nodes.
	Underlay = netip.MustParsePrefix("10.250.0.0/24")
	// HubIP is the hub's address on the underlay, where the API server
	// listens and the nodes' default route leads.
	HubIP = netip.MustParseAddr("10.250.0.1")
	// ClusterCIDR holds every node's pod CIDR (kube-controller-manager
	// allocates a /24 per node); it is the chart's default.
	ClusterCIDR = netip.MustParsePrefix("10.244.0.0/16")
	// ServiceCIDR is the Service cluster IP range.
	ServiceCIDR = netip.MustParsePrefix("10.96.0.0/16")
	// DNSServiceIP is the cluster IP of Service kube-system/kube-dns, the
	// kubelets' clusterDNS, by convention the tenth address of ServiceCIDR.
	DNSServiceIP = netip.MustParseAddr("10.96.0.10")
)

// dirMarker marks a cluster's working dir: Cleanup removes only a dir that
// has it, never one a caller pointed at by mistake.
const dirMarker = ".veil-cluster"

// apiPort is the API server's port on the hub.
const apiPort = 6443

// NodeIP returns the underlay address of node i (1-based).
func NodeIP(i int) netip.Addr {
	a := HubIP.As4()
	a[3] = byte(10 + i)
	return netip.AddrFrom4(a)
}

// NodeName returns the Kubernetes name of node i (1-based).
func NodeName(i int) string { return fmt.Sprintf("node-%d", i) }

// Options tune Start.
type Options struct {
	// Prefix names everything the cluster creates; default "vrc". 3 to 12
	// lower-case letters and digits.
	Prefix string
	// Nodes is the number of nodes; default 2.
	Nodes int
	// Dir is the working dir; default $TMPDIR/veil-cluster-<prefix>. It
	// must not be below /run, /var/lib, /var/log, /etc or /opt, which the
	// nodes replace with their own.
	Dir string
	// Binaries to run; zero means controlplane.BuildCluster (which is a
	// cache lookup after `make controlplane`).
	Binaries controlplane.ClusterBinaries
	// Images are OCI image tarballs imported into every node besides the
	// lab's own (PauseImage, TestServerImage), e.g. `make image`'s.
	Images []string
	// KubeProxy is how Services are translated besides Veil's own socket
	// load-balancing: kube-proxy in nftables mode (the default, also
	// ""), in iptables mode, or no kube-proxy at all. Either mode runs
	// inside the node's network namespace: the host's rulesets stay as
	// they are.
	KubeProxy KubeProxyMode
	// NodeCIDRMaskSize is the size of the pod CIDR the controller manager
	// gives each node; default 24. A smaller pod CIDR lets a test exhaust
	// a node's addresses with few pods.
	NodeCIDRMaskSize int
	// Logger receives progress; nil discards it.
	Logger *slog.Logger
}

// KubeProxyMode says whether and how the nodes run kube-proxy.
type KubeProxyMode string

// The kube-proxy modes a lab runs.
const (
	KubeProxyNone     KubeProxyMode = "none"
	KubeProxyIPTables KubeProxyMode = "iptables"
	KubeProxyNFTables KubeProxyMode = "nftables"
)

// ParseKubeProxyMode parses none, iptables or nftables; "" is nftables.
func ParseKubeProxyMode(s string) (KubeProxyMode, error) {
	switch m := KubeProxyMode(s); m {
	case "":
		return KubeProxyNFTables, nil
	case KubeProxyNone, KubeProxyIPTables, KubeProxyNFTables:
		return m, nil
	}
	return "", fmt.Errorf("kube-proxy mode %q: want none, iptables or nftables", s)
}

// Phase is a step of a bring-up and how long it took.
type Phase struct {
	Name string        `json:"name"`
	Took time.Duration `json:"tookNs"`
}

// Cluster is a running lab cluster. Its methods are safe for concurrent use.
type Cluster struct {
	// Prefix is Options.Prefix.
	Prefix string
	// Dir is the working dir: certificates, configs, logs, node state.
	Dir string
	// Config is a cluster-admin client config that reaches the API server
	// through the relay on the host's loopback.
	Config *rest.Config
	// Kubeconfig is a kubeconfig file for Config.
	Kubeconfig string
	// Nodes are the cluster's nodes, in order.
	Nodes []*Node
	// Startup is how long Start took, builds excluded.
	Startup time.Duration
	// KubeProxy is the nodes' kube-proxy mode.
	KubeProxy KubeProxyMode
	// Phases are Start's steps, in order, with how long each took.
	Phases []Phase

	log  *slog.Logger
	bins controlplane.ClusterBinaries
	path string // PATH of the cluster's processes
	root string // the Veil checkout
	// cgroup2 is the host's cgroup v2 mount, "" when there is none: then
	// the nodes have no NodeCgroupRoot.
	cgroup2 string
	hub     *netns.Netns
	ca      *controlplane.CA
	relay   net.Listener
	images  []string // imported into every node, AddNode's too

	// addMu serialises AddNode.
	addMu sync.Mutex

	mu    sync.Mutex
	procs []*proc

	stopOnce sync.Once
	stopErr  error
}

var prefixRE = regexp.MustCompile(`^[a-z0-9]{3,12}$`)

// names are the host-wide names of a cluster: everything Cleanup removes.
type names struct {
	prefix string
	dir    string
}

func (n names) hubNetns() string          { return n.prefix + "-hub" }
func (n names) nodeNetns(i int) string    { return fmt.Sprintf("%s-node-%d", n.prefix, i) }
func (n names) cgroup() string            { return "veil-" + n.prefix }
func (n names) hubCgroup() string         { return n.cgroup() + "/hub" }
func (n names) nodeCgroup(i int) string   { return fmt.Sprintf("%s/node-%d", n.cgroup(), i) }
func (n names) daemonCgroup(i int) string { return fmt.Sprintf("%s/node-%d-daemons", n.cgroup(), i) }
func (n names) nsDir() string             { return filepath.Join(n.dir, "ns") }

// hostCgroup is where RunInNodeCgroup puts node i's host processes: a
// child of the node's cgroup (hooks attached there apply to it, as those
// attached at a production node's cgroup root apply to its system
// services), below the cluster's cgroup (Cleanup removes it).
func (n names) hostCgroup(i int) string { return n.nodeCgroup(i) + "/host" }

func resolveNames(opts Options) (names, error) {
	prefix := opts.Prefix
	if prefix == "" {
		prefix = "vrc"
	}
	if !prefixRE.MatchString(prefix) {
		return names{}, fmt.Errorf("cluster prefix %q: want 3 to 12 lower-case letters and digits", prefix)
	}
	dir := opts.Dir
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "veil-cluster-"+prefix)
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return names{}, fmt.Errorf("cluster dir: %w", err)
	}
	for _, hidden := range []string{"/run", "/var/run", "/var/lib", "/var/log", "/etc", "/opt"} {
		if dir == hidden || strings.HasPrefix(dir, hidden+"/") {
			return names{}, fmt.Errorf("cluster dir %s: below %s, which nodes replace with their own", dir, hidden)
		}
	}
	return names{prefix: prefix, dir: dir}, nil
}

// Start brings up the hub (etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler) and the nodes (containerd, kubelet, kube-proxy), imports
// the images into every node and waits until every node is registered. The
// nodes stay NotReady until a CNI is installed (InstallVeil). Leftovers of
// an earlier cluster with the same prefix are removed first. On error,
// everything Start created is removed. The caller must call Stop.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	n, err := resolveNames(opts)
	if err != nil {
		return nil, err
	}
	if opts.Nodes == 0 {
		opts.Nodes = 2
	}
	if opts.Nodes < 1 || opts.Nodes > maxNodes {
		return nil, fmt.Errorf("cluster of %d nodes: want 1 to %d", opts.Nodes, maxNodes)
	}
	kubeProxy, err := ParseKubeProxyMode(string(opts.KubeProxy))
	if err != nil {
		return nil, err
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if opts.Binaries == (controlplane.ClusterBinaries{}) {
		if opts.Binaries, err = controlplane.BuildCluster(ctx); err != nil {
			return nil, err
		}
	}
	root, err := controlplane.RepoRoot()
	if err != nil {
		return nil, err
	}
	began := time.Now()
	if err := Cleanup(n.prefix, n.dir); err != nil {
		return nil, fmt.Errorf("remove an earlier cluster %s: %w", n.prefix, err)
	}
	log.Info("leftovers of an earlier cluster removed", "took", time.Since(began).Round(time.Millisecond))
	cleaned := time.Since(began)
	c := &Cluster{
		Prefix:    n.prefix,
		Dir:       n.dir,
		KubeProxy: kubeProxy,
		log:       log,
		bins:      opts.Binaries,
		root:      root,
		path: strings.Join([]string{
			filepath.Dir(opts.Binaries.Containerd), // the shim, found on PATH
			"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin",
		}, ":"),
	}
	if err := c.start(ctx, n, opts); err != nil {
		if stopErr := c.Stop(); stopErr != nil {
			err = errors.Join(err, stopErr)
		}
		return nil, err
	}
	c.Startup = time.Since(began)
	c.Phases = append([]Phase{{Name: "leftovers removed", Took: cleaned}}, c.Phases...)
	log.Info("cluster up", "prefix", n.prefix, "nodes", len(c.Nodes), "took", c.Startup.Round(time.Millisecond))
	return c, nil
}

func (c *Cluster) names() names { return names{prefix: c.Prefix, dir: c.Dir} }

func (c *Cluster) start(ctx context.Context, n names, opts Options) error {
	began := time.Now()
	if err := os.MkdirAll(c.Dir, 0o755); err != nil {
		return fmt.Errorf("create cluster dir: %w", err)
	}
	if err := os.WriteFile(filepath.Join(c.Dir, dirMarker), []byte(c.Prefix+"\n"), 0o644); err != nil {
		return fmt.Errorf("mark cluster dir: %w", err)
	}
	for _, d := range []string{"logs", "pki", "images", "hub", "ns"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, d), 0o755); err != nil {
			return fmt.Errorf("create cluster dir: %w", err)
		}
	}
	// Persistent mount and UTS namespaces are bind mounts of nsfs files,
	// which must sit on a private mount: otherwise the bind would
	// propagate into the namespace it holds.
	if err := syscall.Mount(n.nsDir(), n.nsDir(), "", syscall.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s: %w", n.nsDir(), err)
	}
	if err := syscall.Mount("", n.nsDir(), "", syscall.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make %s private: %w", n.nsDir(), err)
	}
	if err := makeCgroup(n.hubCgroup()); err != nil {
		return err
	}
	cg2, err := cgroup2Mount()
	if err != nil {
		return err
	}
	c.cgroup2 = cg2
	images, err := buildImages(ctx, c.root, filepath.Join(c.Dir, "images"), c.bins)
	if err != nil {
		return err
	}
	for _, img := range opts.Images {
		// Absolute: ctr runs in the node's mount namespace, where the
		// working dir is /.
		abs, err := filepath.Abs(img)
		if err != nil {
			return fmt.Errorf("image %s: %w", img, err)
		}
		images = append(images, abs)
	}
	c.images = images
	c.log.Info("lab images built", "took", time.Since(began).Round(time.Millisecond))
	c.phase("lab images built", &began)
	if err := c.writePKI(opts.Nodes); err != nil {
		return err
	}
	if err := c.startHub(ctx, n, opts.NodeCIDRMaskSize); err != nil {
		return err
	}
	c.log.Info("control plane up", "took", time.Since(began).Round(time.Millisecond))
	c.phase("control plane up", &began)
	c.Nodes = make([]*Node, opts.Nodes)
	for i := range c.Nodes {
		c.Nodes[i] = &Node{Index: i + 1, Name: NodeName(i + 1), IP: NodeIP(i + 1), c: c}
	}
	// Nodes come up side by side: most of their time is waiting.
	errs := make([]error, len(c.Nodes))
	var wg sync.WaitGroup
	for i, node := range c.Nodes {
		wg.Go(func() { errs[i] = node.start(ctx, n, images) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	clients, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("create client: %w", err)
	}
	for _, node := range c.Nodes {
		if err := c.registered(ctx, clients, node); err != nil {
			return err
		}
	}
	c.phase("nodes registered", &began)
	return nil
}

// registered waits until node is registered with a pod CIDR and has the
// hub route that CIDR to it. The hub is the underlay's router, as a cloud
// network's route table is: it routes each node's pod CIDR to the node, so
// that pods reach the API server on the hub and its replies find them.
func (c *Cluster) registered(ctx context.Context, clients kubernetes.Interface, node *Node) error {
	if err := waitFor(ctx, node.kubelet, "node "+node.Name+" registered with a pod CIDR", func(ctx context.Context) error {
		k, err := clients.CoreV1().Nodes().Get(ctx, node.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if k.Spec.PodCIDR == "" {
			return errors.New("no pod CIDR yet")
		}
		node.PodCIDR, err = netip.ParsePrefix(k.Spec.PodCIDR)
		return err
	}); err != nil {
		return err
	}
	if err := c.hub.Do(func() error {
		return netlink.RouteAdd(&netlink.Route{Dst: prefixNet(node.PodCIDR), Gw: node.IP.AsSlice()})
	}); err != nil {
		return fmt.Errorf("hub route to %s's pod CIDR %s: %w", node.Name, node.PodCIDR, err)
	}
	return nil
}

// phase records that a step ended now, and restarts its clock.
func (c *Cluster) phase(name string, since *time.Time) {
	c.Phases = append(c.Phases, Phase{Name: name, Took: time.Since(*since)})
	*since = time.Now()
}

// startHub creates the hub namespace with the underlay bridge and starts
// the control plane in it, and the relay to the API server.
func (c *Cluster) startHub(ctx context.Context, n names, nodeCIDRMask int) error {
	if nodeCIDRMask == 0 {
		nodeCIDRMask = 24
	}
	if nodeCIDRMask <= ClusterCIDR.Bits() || nodeCIDRMask > 30 {
		return fmt.Errorf("node CIDR mask size %d: want %d to 30", nodeCIDRMask, ClusterCIDR.Bits()+1)
	}
	hub, err := netns.NewNetns(n.hubNetns())
	if err != nil {
		return err
	}
	c.hub = hub
	if err := hub.Do(func() error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("add bridge: %w", err)
		}
		if err := netlink.AddrAdd(br, &netlink.Addr{IPNet: prefixNet(netip.PrefixFrom(HubIP, Underlay.Bits()))}); err != nil {
			return fmt.Errorf("address bridge: %w", err)
		}
		return netlink.LinkSetUp(br)
	}); err != nil {
		return fmt.Errorf("hub %s: %w", hub.Name, err)
	}
	ns := namespaces{net: hub.Path()}
	pki := func(name string) string { return filepath.Join(c.Dir, "pki", name) }

	etcd, err := c.startProc("etcd", ns, n.hubCgroup(), c.bins.Etcd,
		"--name=hub",
		"--data-dir="+filepath.Join(c.Dir, "hub", "etcd"),
		"--listen-client-urls=http://127.0.0.1:2379",
		"--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380",
		"--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=hub=http://127.0.0.1:2380",
		// The data is thrown away with the cluster; fsync only costs time.
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	if err != nil {
		return err
	}
	if err := waitFor(ctx, etcd, "etcd", func(ctx context.Context) error {
		return c.hubHTTPGet(ctx, "http://127.0.0.1:2379/health")
	}); err != nil {
		return err
	}

	apiserver, err := c.startProc("kube-apiserver", ns, n.hubCgroup(), c.bins.KubeAPIServer,
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address="+HubIP.String(),
		"--advertise-address="+HubIP.String(),
		fmt.Sprintf("--secure-port=%d", apiPort),
		"--cert-dir="+filepath.Join(c.Dir, "pki"),
		"--tls-cert-file="+pki("apiserver.crt"),
		"--tls-private-key-file="+pki("apiserver.key"),
		"--client-ca-file="+pki("ca.crt"),
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+pki("sa.pub"),
		"--service-account-signing-key-file="+pki("sa.key"),
		"--service-cluster-ip-range="+ServiceCIDR.String(),
		// logs, exec and port-forward: the API server dials kubelets on
		// their node IPs, which it reaches over the hub's bridge.
		"--kubelet-client-certificate="+pki("apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+pki("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority="+pki("ca.crt"),
		"--kubelet-preferred-address-types=InternalIP,Hostname",
		"--allow-privileged=true",
		"--profiling=false",
	)
	if err != nil {
		return err
	}
	if err := c.startRelay(); err != nil {
		return err
	}
	clients, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("create admin client: %w", err)
	}
	if err := waitFor(ctx, apiserver, "kube-apiserver /readyz", func(ctx context.Context) error {
		_, err := clients.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	}); err != nil {
		return err
	}

	kcm, err := c.startProc("kube-controller-manager", ns, n.hubCgroup(), c.bins.KubeControllerManager,
		"--kubeconfig="+pki("kube-controller-manager.kubeconfig"),
		"--authentication-kubeconfig="+pki("kube-controller-manager.kubeconfig"),
		"--authorization-kubeconfig="+pki("kube-controller-manager.kubeconfig"),
		"--bind-address=127.0.0.1",
		"--leader-elect=false",
		"--allocate-node-cidrs=true",
		"--cluster-cidr="+ClusterCIDR.String(),
		fmt.Sprintf("--node-cidr-mask-size=%d", nodeCIDRMask),
		"--service-cluster-ip-range="+ServiceCIDR.String(),
		"--service-account-private-key-file="+pki("sa.key"),
		"--root-ca-file="+pki("ca.crt"),
		"--use-service-account-credentials=true",
		"--profiling=false",
	)
	if err != nil {
		return err
	}
	scheduler, err := c.startProc("kube-scheduler", ns, n.hubCgroup(), c.bins.KubeScheduler,
		"--kubeconfig="+pki("kube-scheduler.kubeconfig"),
		"--authentication-kubeconfig="+pki("kube-scheduler.kubeconfig"),
		"--authorization-kubeconfig="+pki("kube-scheduler.kubeconfig"),
		"--bind-address=127.0.0.1",
		"--leader-elect=false",
		"--profiling=false",
	)
	if err != nil {
		return err
	}
	// Both serve /healthz on their hub loopback once they have synced.
	for _, w := range []struct {
		p   *proc
		url string
	}{{kcm, "https://127.0.0.1:10257/healthz"}, {scheduler, "https://127.0.0.1:10259/healthz"}} {
		if err := waitFor(ctx, w.p, w.p.name+" /healthz", func(ctx context.Context) error {
			return c.hubHTTPGet(ctx, w.url)
		}); err != nil {
			return err
		}
	}
	return nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// Stop removes the cluster: every process (kubelets and containers
// included, by the lab's cgroups), mount, namespace and cgroup, and Dir. It
// is safe to call more than once.
func (c *Cluster) Stop() error {
	c.stopOnce.Do(func() {
		var errs []error
		if c.relay != nil {
			c.relay.Close()
		}
		// kubelets first, so none restarts a container being killed.
		c.mu.Lock()
		procs := append([]*proc(nil), c.procs...)
		c.mu.Unlock()
		for i := len(procs) - 1; i >= 0; i-- {
			procs[i].stop(5 * time.Second)
		}
		errs = append(errs, Cleanup(c.Prefix, c.Dir))
		c.stopErr = errors.Join(errs...)
	})
	return c.stopErr
}

// Cleanup removes, by exact name, everything a cluster with prefix and dir
// may have left after a crash: the processes in its cgroups (containers and
// their shims included), the bind mounts holding its nodes' mount and UTS
// namespaces (and with them every mount inside), its network namespaces,
// its cgroups in every hierarchy, and dir. An empty dir means the default.
func Cleanup(prefix, dir string) error {
	n, err := resolveNames(Options{Prefix: prefix, Dir: dir})
	if err != nil {
		return err
	}
	var errs []error
	if err := killCgroup(n.cgroup(), 15*time.Second); err != nil {
		errs = append(errs, err)
	}
	if err := unmountBelow(n.nsDir()); err != nil {
		errs = append(errs, err)
	}
	if err := netns.CleanupMatching(func(name string) bool {
		return name == n.hubNetns() || strings.HasPrefix(name, n.prefix+"-node-")
	}); err != nil {
		errs = append(errs, err)
	}
	if err := removeCgroup(n.cgroup()); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	// Only a dir a cluster made, and only with nothing mounted below it:
	// RemoveAll would otherwise walk into whatever is mounted there.
	if entries, err := os.ReadDir(n.dir); errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("read cluster dir: %w", err)
	} else if len(entries) == 0 {
		return nil
	}
	if _, err := os.Stat(filepath.Join(n.dir, dirMarker)); err != nil {
		return fmt.Errorf("remove %s: not a cluster's dir (no %s), not touching it: %w", n.dir, dirMarker, err)
	}
	mounts, err := mountsBelow(n.dir)
	if err != nil {
		return err
	}
	if len(mounts) > 0 {
		return fmt.Errorf("remove %s: still mounted below it: %v", n.dir, mounts)
	}
	if err := os.RemoveAll(n.dir); err != nil {
		return fmt.Errorf("remove cluster dir: %w", err)
	}
	return nil
}
