// Package daemon is veil-agent: it learns this node's facts, loads the
// datapath, wires the agent's components (k8s, endpoints, encryption,
// policysync, flows, apiserver) and runs them in the order the node needs,
// and it keeps the registry of degraded components that Status, /readyz and
// the Prometheus metrics report.
//
// The datapath keeps enforcing the last state it was given whenever the API
// server, or the agent itself, is away; on return the agent converges.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/record"

	"github.com/vishvananda/netlink"

	"github.com/veilmesh/veil/agent/apiserver"
	"github.com/veilmesh/veil/agent/cni"
	"github.com/veilmesh/veil/agent/config"
	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/encryption"
	"github.com/veilmesh/veil/agent/endpoints"
	"github.com/veilmesh/veil/agent/flows"
	"github.com/veilmesh/veil/agent/ipam"
	"github.com/veilmesh/veil/agent/k8s"
	"github.com/veilmesh/veil/agent/memlimit"
	"github.com/veilmesh/veil/agent/podnet"
	"github.com/veilmesh/veil/agent/policysync"
	"github.com/veilmesh/veil/agent/services"
	"github.com/veilmesh/veil/agent/wireguard"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/api/client/clientset/versioned"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/policy"
)

// Version is the agent's version, set at link time.
var Version = "dev"

// Daemon is one node's agent.
type Daemon struct {
	cfg  config.Config
	log  *slog.Logger
	kube kubernetes.Interface
	veil versioned.Interface

	dp       *datapath.Datapath
	compiler *policy.Compiler
	nodeIP   netip.Addr
	podCIDR  netip.Prefix

	// watch holds the informers; listers read their caches.
	watch   *k8s.Watcher
	listers k8s.Listers
	// endpoints is the local endpoint registry; it also says whether the
	// agent has converged.
	endpoints *endpoints.Registry
	// enc is the node's encryption, policy the sync of policy into the
	// datapath; both are created once the datapath is loaded.
	enc    *encryption.Manager
	policy *policysync.Syncer
	// flows is created with the compiler it names flows from.
	flows    *flows.Log
	metrics  *agentMetrics
	started  time.Time
	apiUp    atomic.Bool
	degraded degradedSet
	// clusterCIDRs hold every node's pod CIDR (--cluster-cidr).
	clusterCIDRs []netip.Prefix
	// events records on Nodes through broadcaster.
	events      record.EventRecorder
	broadcaster record.EventBroadcaster
	// cni serves the CNI calls; nil until the pod network is ready.
	cni apiserver.CNIService
	// services keeps the node's Service map, flowNamer names flows'
	// Services; both nil without a datapath.
	services  *services.Controller
	flowNamer *services.FlowNamer
}

// New connects to the API server and prepares the agent; Run starts it.
func New(cfg config.Config, restCfg *rest.Config, log *slog.Logger) (*Daemon, error) {
	kube, err := kubernetes.NewForConfig(k8s.KubeClientConfig(restCfg))
	if err != nil {
		return nil, fmt.Errorf("create Kubernetes client: %w", err)
	}
	veil, err := versioned.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("create Veil client: %w", err)
	}
	clusterCIDR, err := netip.ParsePrefix(cfg.ClusterCIDR)
	if err != nil {
		return nil, fmt.Errorf("parse --cluster-cidr: %w", err)
	}
	events := record.NewBroadcaster()
	events.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: kube.CoreV1().Events("")})
	d := &Daemon{
		cfg: cfg, log: log, kube: kube, veil: veil,
		clusterCIDRs: []netip.Prefix{clusterCIDR.Masked()},
		events:       events.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "veil-agent", Host: cfg.NodeName}),
		broadcaster:  events,
		started:      time.Now(),
	}
	opts := k8s.Options{Resync: cfg.ResyncPeriod}
	if cfg.PodCacheCheckpoint {
		opts.Checkpoint = &k8s.CheckpointOptions{
			Path: filepath.Join(cfg.StateDir, k8s.CheckpointFile), Node: cfg.NodeName, MaxAge: cfg.PodCacheCheckpointMaxAge, Log: log,
		}
	}
	d.watch = k8s.NewWithOptions(kube, veil, opts)
	d.listers = d.watch.Listers
	d.endpoints = endpoints.New(endpoints.Config{StateDir: cfg.StateDir, Enforcer: d, Fill: d.fillState, Log: log})
	d.metrics = newAgentMetrics(d)
	return d, nil
}

// Run runs the agent until ctx is done. It leaves the datapath in place.
func (d *Daemon) Run(ctx context.Context) error {
	// Events queued while shutting down are sent before Run returns.
	defer d.broadcaster.Shutdown()
	if err := os.MkdirAll(d.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	st, err := endpoints.LoadState(d.cfg.StateDir)
	if err != nil {
		return err
	}
	if err := d.learnNode(ctx, st); err != nil {
		return err
	}
	underlay := d.cfg.UnderlayInterface
	if underlay == "" {
		if underlay, err = deviceWithAddr(d.nodeIP); err != nil {
			return err
		}
	}
	var dev *wireguard.Device
	podMTU := 0
	if d.cfg.Encryption == "wireguard" {
		dev, podMTU, err = encryption.OpenDevice(ctx, encryption.DeviceConfig{
			StateDir: d.cfg.StateDir, Interface: d.cfg.WireGuardIface, Port: d.cfg.WireGuardPort,
			NodeToNode: d.cfg.NodeToNode, StrictMode: d.cfg.StrictMode, Underlay: underlay, Log: d.log,
		})
		if err != nil {
			return err
		}
		// A userspace device ends with the process; a kernel one stays, so
		// established sessions survive an agent restart.
		defer dev.Release()
	}
	if d.dp, err = d.loadDatapath(underlay, dev); err != nil {
		return err
	}
	defer d.dp.Close()
	// Other nodes' endpoints are enforced by their own agents: compile ours.
	d.compiler, err = policy.New(policy.Options{Identities: st.Identities, CIDRIdentities: st.CIDRIdentities, Node: d.cfg.NodeName})
	if err != nil {
		return fmt.Errorf("create policy compiler: %w", err)
	}
	d.flows = flows.New(flows.Config{NodeName: d.cfg.NodeName, Policy: d.compiler, Observed: func(f *agentv1.Flow) {
		d.metrics.verdicts.WithLabelValues(f.Verdict).Inc()
	}, Services: (*serviceFlows)(d)})
	d.enc = d.newEncryption(dev)
	d.policy = policysync.New(policysync.Config{
		NodeName: d.cfg.NodeName, NodeIP: d.nodeIP, ClusterCIDRs: d.clusterCIDRs,
		Compiler: d.compiler, Datapath: d.dp, Endpoints: d.endpoints, Encryption: d.enc,
		Listers: d.listers, Kube: d.kube, Veil: d.veil, Events: d.events, Degraded: &d.degraded,
		Synced: func(took time.Duration) { d.metrics.reconcile.Observe(took.Seconds()) },
		// The first lists are decoded: collect garbage at the steady
		// percent, which keeps the resident size nearer the live heap.
		Converged: memlimit.StartupGC(d.cfg.StartupGCPercent, d.cfg.SteadyGCPercent, os.LookupEnv),
		Log:       d.log,
	})
	var alloc *ipam.Allocator
	if d.podCIDR.IsValid() {
		if alloc, err = ipam.Open(filepath.Join(d.cfg.StateDir, "ipam.json"), d.podCIDR); err != nil {
			return fmt.Errorf("open IPAM: %w", err)
		}
		d.cni = &cni.Handler{IPAM: alloc, Net: cni.NodeNetwork{}, Endpoints: d.endpoints, Log: d.log, MTU: podMTU}
	}
	if err := d.restoreEndpoints(st, alloc); err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Informers start before the first CNI call can arrive, so its
	// lister lookups see the cluster as soon as they have listed.
	if err := d.watch.OnChange(d.policy.Enqueue); err != nil {
		return err
	}
	// The Service map sync registers its informers before the factory starts.
	if d.dp != nil {
		d.startServices(ctx)
	}
	d.watch.Start(ctx)
	srv := d.newAPIServer()
	if err := srv.Start(); err != nil {
		return err
	}
	defer srv.Stop()
	if d.cfg.MetricsAddr != "" {
		stop, err := d.serveMetrics()
		if err != nil {
			return err
		}
		defer stop()
	}

	var wg sync.WaitGroup
	defer func() {
		cancel() // on an error return too, so the goroutines end
		wg.Wait()
	}()
	wg.Add(6)
	go func() { defer wg.Done(); d.enc.Run(ctx) }()
	// Writes the pod cache's checkpoint once more as the agent stops.
	go func() { defer wg.Done(); d.watch.RunCheckpoints(ctx) }()
	go func() { defer wg.Done(); d.readFlows(ctx) }()
	go func() { defer wg.Done(); d.probeAPIServer(ctx) }()
	go func() { defer wg.Done(); d.endpoints.Run(ctx) }()
	go func() { defer wg.Done(); d.dp.RunConntrackGC(ctx) }()
	if d.cfg.StrictMode {
		wg.Add(1)
		go func() { defer wg.Done(); d.guardLoop(ctx) }()
	}

	d.log.Info("waiting for informer caches")
	err = d.watch.WaitForCacheSync(ctx, 10*time.Second, func(waiting []string) {
		if waiting == nil {
			d.degraded.Clear("informers")
			return
		}
		d.log.Warn("informer caches still waiting", "types", waiting)
		d.degraded.Set("informers", "waiting for the first list of "+fmt.Sprint(waiting))
	})
	if err != nil {
		return err
	}
	d.log.Info("informer caches synced; converging")
	for _, k := range d.watch.Keys() {
		d.policy.Enqueue(k)
	}
	// One worker: the compiler serialises mutations anyway.
	wg.Add(1)
	go func() { defer wg.Done(); d.policy.Run(ctx) }()
	<-ctx.Done()
	d.log.Info("shutting down; the datapath keeps enforcing")
	return d.endpoints.Save()
}

// learnNode finds this node's address and pod CIDR from its Node object, or
// from the last saved state when the API server cannot be reached.
func (d *Daemon) learnNode(ctx context.Context, st *endpoints.State) error {
	var node *corev1.Node
	deadline := time.Now().Add(30 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		n, err := d.kube.CoreV1().Nodes().Get(cctx, d.cfg.NodeName, metav1.GetOptions{})
		cancel()
		if err == nil {
			node = n
			break
		}
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("node %q does not exist in the API server: check --node-name/NODE_NAME", d.cfg.NodeName)
		}
		if st.NodeIP.IsValid() || time.Now().After(deadline) || ctx.Err() != nil {
			if !st.NodeIP.IsValid() {
				return fmt.Errorf("get node %q: %w", d.cfg.NodeName, err)
			}
			d.log.Warn("API server unreachable; starting from saved node state", "error", err)
			d.degraded.Set("api-server", "unreachable at start: "+err.Error())
			break
		}
		time.Sleep(time.Second)
	}
	d.nodeIP, d.podCIDR = st.NodeIP, st.PodCIDR
	if node != nil {
		// Only the control plane's facts: the endpoint this agent published
		// last time may be from an earlier --node-ip.
		info, err := nodeinfo.Parse(node)
		if err != nil {
			d.log.Warn("parts of this node's Node are malformed", "error", err)
		}
		d.nodeIP, d.podCIDR = netip.Addr{}, netip.Prefix{}
		if i := slices.IndexFunc(info.InternalIPs, netip.Addr.Is4); i >= 0 {
			d.nodeIP = info.InternalIPs[i]
		}
		if i := slices.IndexFunc(info.PodCIDRs, func(p netip.Prefix) bool { return p.Addr().Is4() }); i >= 0 {
			d.podCIDR = info.PodCIDRs[i]
		}
	}
	if d.cfg.NodeIP != "" {
		d.nodeIP = netip.MustParseAddr(d.cfg.NodeIP)
	}
	if !d.nodeIP.IsValid() {
		return fmt.Errorf("node %q has no IPv4 InternalIP: set --node-ip", d.cfg.NodeName)
	}
	if !d.podCIDR.IsValid() {
		d.degraded.Set("ipam", "node "+d.cfg.NodeName+" has no spec.podCIDRs; pods cannot get addresses")
	}
	d.log.Info("node", "name", d.cfg.NodeName, "ip", d.nodeIP, "podCIDR", d.podCIDR)
	return nil
}

func (d *Daemon) loadDatapath(underlay string, dev *wireguard.Device) (*datapath.Datapath, error) {
	cfg := datapath.Config{
		BPFFSRoot:         d.cfg.BPFFSRoot,
		CgroupPath:        d.cfg.CgroupRoot,
		UnderlayInterface: underlay,
		NodeIP:            d.nodeIP,
		LegacyTC:          d.cfg.LegacyTC,
		StrictMode:        d.cfg.StrictMode,
		NodePort:          d.cfg.KubeProxyReplacement,
		PodDevice:         podnet.IsHostVethName,
		Logger:            d.log,
		CTMaxEntries:      d.cfg.ConntrackMaxEntries,
		Maps:              datapath.MapSizes{Endpoints: d.cfg.EndpointsMaxEntries, IPCache: d.cfg.IPCacheMaxEntries, Policy: d.cfg.PolicyMaxEntries},
	}
	cfg.SkipAccelerationSelfTest = d.cfg.SkipAccelSelfTest
	// Validated at start (config.Validate): the range strict mode refuses
	// to send unknown pod addresses of.
	if p, err := netip.ParsePrefix(d.cfg.ClusterCIDR); err == nil {
		cfg.ClusterCIDR = p
	}
	if dev != nil {
		cfg.WireGuardInterface = dev.Interface()
	}
	dp, err := datapath.Load(cfg)
	if err != nil {
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	// The datapath logged it; status and readyz keep showing why
	// acceleration is off, or runs untested.
	if _, reason := dp.Acceleration(); reason != "" {
		d.degraded.Set("socket-acceleration", reason)
	}
	return dp, nil
}

// readFlows describes the datapath's flow events until ctx is done.
func (d *Daemon) readFlows(ctx context.Context) {
	if err := d.flows.Run(ctx, d.dp); err != nil && !errors.Is(err, context.Canceled) {
		d.log.Error("flow events stopped", "error", err)
		d.degraded.Set("flow-events", err.Error())
	}
}

// probeAPIServer keeps apiUp current, so status can say whether the agent is
// enforcing live or last-known state.
func (d *Daemon) probeAPIServer(ctx context.Context) {
	t := time.NewTicker(3 * time.Second)
	defer t.Stop()
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := d.kube.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(cctx)
		cancel()
		up := err == nil
		if was := d.apiUp.Swap(up); was != up {
			d.log.Info("API server connectivity changed", "connected", up)
		}
		if up {
			d.degraded.Clear("api-server")
		} else if ctx.Err() == nil {
			d.degraded.Set("api-server", "unreachable: enforcing the last known state")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// newEncryption hands the encryption manager its view of the agent; dev is
// nil when encryption is off.
func (d *Daemon) newEncryption(dev *wireguard.Device) *encryption.Manager {
	cfg := encryption.Config{
		NodeName: d.cfg.NodeName, NodeIP: d.nodeIP, PodCIDR: d.podCIDR, Port: d.cfg.WireGuardPort,
		NodeToNode: d.cfg.NodeToNode, StrictMode: d.cfg.StrictMode,
		KeyRotationInterval: d.cfg.KeyRotationInterval, AgentVersion: Version,
		Datapath: d.dp, Kube: d.kube, Veil: d.veil, Events: d.events,
		// policy is created right after, and asked only once both run.
		Cluster:        func() nodeinfo.Cluster { return d.policy.ResolvedCluster() },
		PodOf:          d.flows.PodOf,
		TunnelsChanged: func() { d.policy.IPCacheStale() },
		Log:            d.log,
	}
	// Only a device that exists: a nil *Device would be a non-nil Device.
	if dev != nil {
		cfg.Device = dev
	}
	return encryption.New(cfg)
}

// Enforce hands the registry's CNI ADD to policy sync, which exists only
// once the compiler does.
func (d *Daemon) Enforce(ctx context.Context, ep endpoints.Endpoint) error {
	return d.policy.Enforce(ctx, ep)
}

// Withdraw hands the registry's CNI DEL to policy sync.
func (d *Daemon) Withdraw(ctx context.Context, ep endpoints.Endpoint) error {
	return d.policy.Withdraw(ctx, ep)
}

var _ endpoints.Enforcer = (*Daemon)(nil)

// fillState adds the identity numbers and node facts to a state about to
// be saved.
func (d *Daemon) fillState(st *endpoints.State) {
	st.NodeIP, st.PodCIDR = d.nodeIP, d.podCIDR
	if d.compiler != nil {
		st.Identities = d.compiler.IdentityState()
		st.CIDRIdentities = d.compiler.CIDRIdentityState()
	}
}

// Cleanup removes what Veil installed on this node: pinned programs, links
// and maps (detaching everything), the API socket and the agent's state.
func Cleanup(cfg config.Config) error {
	var errs []error
	errs = append(errs, datapath.RemovePins(cfg.BPFFSRoot))
	errs = append(errs, encryption.RemoveHostTunnel())
	if l, err := netlink.LinkByName(cfg.WireGuardIface); err == nil {
		if err := netlink.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("remove WireGuard device %s: %w", cfg.WireGuardIface, err))
		}
	}
	if err := os.Remove(cfg.SocketPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove socket: %w", err))
	}
	if err := os.RemoveAll(cfg.StateDir); err != nil {
		errs = append(errs, fmt.Errorf("remove state: %w", err))
	}
	return errors.Join(errs...)
}
