// Package encryption owns this node's WireGuard encryption: the device and
// its key, the peers derived from the cluster's nodes, the key published on
// the Node (rotated on schedule and re-asserted when edited), the MeshNode
// status, and the host routes of node-to-node encryption.
package encryption

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/record"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/wireguard"
	"github.com/veilmesh/veil/api/client/clientset/versioned"
	"github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/policy"
)

// Device is the node's WireGuard device (wireguard.Device).
type Device interface {
	Interface() string
	Key() wireguard.Key
	SetPeers(ctx context.Context, peers []wireguard.Peer) error
	RotateKey(ctx context.Context) (wireguard.Key, error)
	Status(ctx context.Context) (wireguard.Status, error)
}

// Datapath is what the MeshNode status reports of the datapath.
type Datapath interface {
	GuardedDevices() ([]string, error)
	UnguardedDevices() ([]string, error)
	Leaks() ([]datapath.Leak, error)
	Counters() (datapath.Counters, error)
}

// Config is what a Manager needs.
type Config struct {
	NodeName string
	NodeIP   netip.Addr
	// PodCIDR is this node's pod range; invalid when it has none.
	PodCIDR netip.Prefix
	// Port is the WireGuard port peers reach this node on.
	Port                   int
	NodeToNode, StrictMode bool
	// KeyRotationInterval rotates the key that often; 0 never.
	KeyRotationInterval time.Duration
	AgentVersion        string
	// Device is nil when encryption is off; the MeshNode status says so.
	Device   Device
	Datapath Datapath
	Kube     kubernetes.Interface
	Veil     versioned.Interface
	// Events records on Nodes that their annotations were re-asserted.
	Events record.EventRecorder
	// Cluster returns the last resolution of the nodes' claims.
	Cluster func() nodeinfo.Cluster
	// PodOf names the pod that holds an address, "" when none does.
	PodOf func(netip.Addr) string
	// TunnelsChanged is called when the set of peered nodes changed.
	TunnelsChanged func()
	// HostRoutes makes the node's own traffic to exactly prefixes go
	// through the tunnel device (see hostTunnelPrefixes); nil means the
	// node's routing tables (routeThroughTunnel). Tests record instead.
	HostRoutes func(device string, prefixes map[netip.Prefix]bool) error
	Log        *slog.Logger
}

// Manager keeps the node's encryption in line with the cluster.
type Manager struct {
	cfg Config

	mu sync.Mutex
	// pub is the public key published; tunnels the nodes that are peers.
	pub     wgtypes.Key
	tunnels map[string]bool
	// statusChanged holds a token while the MeshNode status is stale.
	statusChanged chan struct{}
}

// New returns a manager; Run runs it.
func New(cfg Config) *Manager {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.HostRoutes == nil {
		cfg.HostRoutes = routeThroughTunnel
	}
	m := &Manager{cfg: cfg, statusChanged: make(chan struct{}, 1)}
	if cfg.Device != nil {
		m.pub = cfg.Device.Key().PublicKey()
	}
	return m
}

// DeviceConfig is what OpenDevice needs.
type DeviceConfig struct {
	StateDir   string
	Interface  string
	Port       int
	NodeToNode bool
	StrictMode bool
	// Underlay is the interface whose MTU pods' packets must fit in once
	// encrypted.
	Underlay string
	Log      *slog.Logger
}

// OpenDevice opens this node's WireGuard device with its persistent key.
// Pods get the underlay MTU less WireGuard's overhead, so nothing
// fragments: that is podMTU.
func OpenDevice(ctx context.Context, cfg DeviceConfig) (dev *wireguard.Device, podMTU int, err error) {
	key, err := wireguard.LoadOrCreateKey(filepath.Join(cfg.StateDir, "wireguard.key"))
	if err != nil {
		return nil, 0, err
	}
	link, err := netlink.LinkByName(cfg.Underlay)
	if err != nil {
		return nil, 0, fmt.Errorf("find underlay %s: %w", cfg.Underlay, err)
	}
	mtu, err := wireguard.PodMTU(link.Attrs().MTU)
	if err != nil {
		return nil, 0, err
	}
	wcfg := wireguard.Config{
		Interface: cfg.Interface, ListenPort: cfg.Port, PrivateKey: key, MTU: mtu, Logger: cfg.Log,
	}
	if cfg.NodeToNode {
		// The device's own UDP packets carry the mark, so the rule that
		// sends node traffic into the tunnel skips them.
		wcfg.FirewallMark = hostTunnelMark
	}
	dev, err = wireguard.Open(ctx, wcfg)
	if err != nil {
		return nil, 0, fmt.Errorf("open WireGuard device: %w", err)
	}
	cfg.Log.Info("WireGuard up", "interface", cfg.Interface, "mode", dev.Mode(), "key", dev.Key(), "podMTU", mtu, "strict", cfg.StrictMode)
	return dev, mtu, nil
}

// Run keeps the MeshNode status current, publishes the key and rotates it
// on schedule until ctx is done.
func (m *Manager) Run(ctx context.Context) {
	if m.cfg.Device == nil {
		m.statusLoop(ctx)
		return
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); m.publishKey(ctx) }()
	m.statusLoop(ctx)
	wg.Wait()
}

// publishKey writes the node's public key, WireGuard endpoint and pod CIDR
// as annotations on its Node, retrying until the API server takes them.
func (m *Manager) publishKey(ctx context.Context) {
	for {
		err := m.patchNodeAnnotations(ctx)
		if err == nil {
			return
		}
		m.cfg.Log.Warn("publish WireGuard key; retrying", "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
	}
}

// peerNodeAddrs: peers' own addresses join their allowed IPs. A node's own
// traffic to a peer's pods (kube-proxy's forwarded NodePort leg, hostNetwork
// pods, probes) leaves through the tunnel from the node's address
// (hostTunnelPrefixes), and pods' traffic to other nodes' addresses rides
// it too; with node-to-node encryption so does the host's traffic to those
// addresses.
const peerNodeAddrs = true

// SyncPeers makes every other node that published a key a peer, and
// remembers which nodes have a tunnel (see Tunnelled). Malformed annotations and refused
// claims are reported, not guessed at: such a node gets no tunnel (and, in
// strict mode, no traffic), and never takes over another node's.
func (m *Manager) SyncPeers(ctx context.Context, c nodeinfo.Cluster) error {
	if m.cfg.Device == nil {
		return nil
	}
	peers, errs := wireguard.PeersFromNodes(c, m.cfg.NodeName, peerNodeAddrs)
	for _, e := range errs {
		m.cfg.Log.Warn("node not peered", "error", e)
	}
	if err := m.cfg.Device.SetPeers(ctx, peers); err != nil {
		return fmt.Errorf("set WireGuard peers: %w", err)
	}
	m.recordTunnels(peers)
	if err := m.cfg.HostRoutes(m.cfg.Device.Interface(), hostTunnelPrefixes(peers, c, m.cfg.NodeToNode)); err != nil {
		return err
	}
	return nil
}

// hostTunnelPrefixes is what the node's own traffic must reach through the
// tunnel; nil means the host routes nothing into it.
//
// With node-to-node encryption it is everything a peer's allowed IPs hold:
// its addresses and its pod CIDRs. Otherwise it is the peers' pod CIDRs, in
// strict and permissive mode alike, so that what the host sends to a remote
// pod — a hostNetwork process, a probe, kube-proxy's forwarded NodePort
// leg, a pod's packet that kube-proxy translated to a remote backend — is
// encrypted as a pod's own traffic is, and fails closed with the tunnel
// (the peer accepts the node's address from the tunnel: its allowed IPs
// hold it, PeerNodeAddrs). A peer without a tunnel has no route here, so in
// permissive mode the host's traffic to it keeps the underlay.
func hostTunnelPrefixes(peers []wireguard.Peer, c nodeinfo.Cluster, nodeToNode bool) map[netip.Prefix]bool {
	podCIDRs := map[netip.Prefix]bool{}
	for _, n := range c.Nodes {
		for _, p := range n.PodCIDRs {
			podCIDRs[p.Masked()] = true
		}
	}
	prefixes := map[netip.Prefix]bool{}
	for _, p := range peers {
		for _, a := range p.AllowedIPs {
			if a.Addr().Is4() && (nodeToNode || podCIDRs[a.Masked()]) {
				prefixes[a.Masked()] = true
			}
		}
	}
	return prefixes
}

// recordTunnels remembers which nodes are peers, announcing a change to
// whoever flags them (the ipcache) and to the MeshNode status.
func (m *Manager) recordTunnels(peers []wireguard.Peer) {
	tunnels := map[string]bool{}
	for _, p := range peers {
		tunnels[p.Node] = true
	}
	m.mu.Lock()
	changed := len(tunnels) != len(m.tunnels)
	for n := range tunnels {
		if !m.tunnels[n] {
			changed = true
		}
	}
	m.tunnels = tunnels
	m.mu.Unlock()
	if changed {
		if m.cfg.TunnelsChanged != nil {
			m.cfg.TunnelsChanged()
		}
		m.statusChangedNow()
	}
}

// Tunnelled reports whether the named node is a peer.
func (m *Manager) Tunnelled(node string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.tunnels[node]
}

// TunnelInterface names the WireGuard device; "" when encryption is off.
func (m *Manager) TunnelInterface() string {
	if m.cfg.Device == nil {
		return ""
	}
	return m.cfg.Device.Interface()
}

// RotateKey replaces the node's key and republishes it; peers pick it up
// from the Node annotation.
func (m *Manager) RotateKey(ctx context.Context) (old, cur string, err error) {
	if m.cfg.Device == nil {
		return "", "", fmt.Errorf("encryption is off on node %s", m.cfg.NodeName)
	}
	old = m.cfg.Device.Key().Fingerprint()
	key, err := m.cfg.Device.RotateKey(ctx)
	if err != nil {
		return old, "", fmt.Errorf("rotate WireGuard key: %w", err)
	}
	m.mu.Lock()
	m.pub = key.PublicKey()
	m.mu.Unlock()
	if err := m.patchNodeAnnotations(ctx); err != nil {
		return old, key.Fingerprint(), err
	}
	if err := key.ConfirmRotation(); err != nil {
		return old, key.Fingerprint(), fmt.Errorf("confirm key rotation: %w", err)
	}
	m.statusChangedNow()
	m.cfg.Log.Info("rotated WireGuard key", "old", old, "new", key.Fingerprint())
	return old, key.Fingerprint(), nil
}

// statusSettle is how long a status write waits after what asked for it,
// so that changes arriving together (new peers, then the handshakes their
// first packets complete) land in one write that shows them all.
const statusSettle = time.Second

// statusLoop keeps the MeshNode status current and rotates the key on
// schedule. The status is written shortly after start, after the peers or
// the key changed, and every 15 s for the counters; a failed write is
// retried.
func (m *Manager) statusLoop(ctx context.Context) {
	status := time.NewTicker(15 * time.Second)
	defer status.Stop()
	var rotate <-chan time.Time
	if m.cfg.KeyRotationInterval > 0 && m.cfg.Device != nil {
		t := time.NewTicker(m.cfg.KeyRotationInterval)
		defer t.Stop()
		rotate = t.C
	}
	due := time.After(statusSettle)
	soon := func() {
		if due == nil {
			due = time.After(statusSettle)
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-status.C:
			soon()
		case <-m.statusChanged:
			soon()
		case <-rotate:
			// RotateKey announces the change when it takes.
			if _, _, err := m.RotateKey(ctx); err != nil {
				m.cfg.Log.Error("scheduled key rotation", "error", err)
			}
		case <-due:
			due = nil
			if err := m.writeMeshNode(ctx); err != nil {
				m.cfg.Log.Warn("record node status", "error", err)
				soon()
			}
		}
	}
}

// statusChangedNow asks statusLoop to write the MeshNode status soon.
func (m *Manager) statusChangedNow() {
	select {
	case m.statusChanged <- struct{}{}:
	default:
	}
}

// writeMeshNode records this node's state in its MeshNode.
func (m *Manager) writeMeshNode(ctx context.Context) error {
	st := v1alpha1.MeshNodeStatus{AgentVersion: m.cfg.AgentVersion, NodeIP: m.cfg.NodeIP.String(), Updated: metav1.Now()}
	if m.cfg.PodCIDR.IsValid() {
		st.PodCIDRs = []string{m.cfg.PodCIDR.String()}
	}
	st.Encryption = v1alpha1.EncryptionStatus{Mode: v1alpha1.EncryptionModeDisabled}
	if m.cfg.Device != nil {
		enc, err := m.encryptionStatus(ctx)
		if err != nil {
			return err
		}
		st.Encryption = enc
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	mn := m.cfg.Veil.MeshV1alpha1().MeshNodes()
	obj, err := mn.Get(cctx, m.cfg.NodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		obj, err = mn.Create(cctx, &v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: m.cfg.NodeName}}, metav1.CreateOptions{})
	}
	if err != nil {
		return fmt.Errorf("get MeshNode %s: %w", m.cfg.NodeName, err)
	}
	obj.Status = st
	if _, err := mn.UpdateStatus(cctx, obj, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("write MeshNode %s status: %w", m.cfg.NodeName, err)
	}
	return nil
}

func (m *Manager) encryptionStatus(ctx context.Context) (v1alpha1.EncryptionStatus, error) {
	ws, err := m.cfg.Device.Status(ctx)
	if err != nil {
		return v1alpha1.EncryptionStatus{}, fmt.Errorf("read WireGuard status: %w", err)
	}
	enc := v1alpha1.EncryptionStatus{
		Mode: v1alpha1.EncryptionMode(ws.Mode), Interface: ws.Interface, PublicKey: ws.PublicKey, Fingerprint: ws.Fingerprint,
		KeyCreated: metav1.NewTime(ws.KeyCreated), ListenPort: int32(ws.ListenPort), StrictMode: m.cfg.StrictMode,
	}
	// A peer is named by the node that holds its key: what this agent
	// believes, which the audit compares with what that node says.
	c := m.cfg.Cluster()
	byKey := map[string]string{}
	for _, n := range c.Nodes {
		if n.Tunnel() {
			byKey[wgtypes.Key(n.PublicKey).String()] = n.Name
		}
	}
	configured := make([]v1alpha1.PeerStatus, 0, len(ws.Peers))
	for _, p := range ws.Peers {
		ps := v1alpha1.PeerStatus{
			Node: byKey[p.PublicKey], PublicKey: p.PublicKey, Endpoint: p.Endpoint.String(),
			AllowedIPs: prefixStrings(p.AllowedIPs), RxBytes: p.RxBytes, TxBytes: p.TxBytes,
		}
		if ps.Node == "" {
			ps.Node = p.Endpoint.Addr().String()
		}
		if !p.LastHandshake.IsZero() {
			t := metav1.NewTime(p.LastHandshake)
			ps.LastHandshake = &t
		}
		configured = append(configured, ps)
	}
	// Only the unhealthy peers are listed; the healthy ones are counted and
	// digested, so the MeshNode stays small at thousands of nodes.
	want, _ := wireguard.PeersFromNodes(c, m.cfg.NodeName, peerNodeAddrs)
	expected := make([]v1alpha1.PeerStatus, len(want))
	for i, p := range want {
		expected[i] = v1alpha1.PeerStatus{Node: p.Node, PublicKey: p.PublicKey.String(), Endpoint: p.Endpoint.String(), AllowedIPs: prefixStrings(p.AllowedIPs)}
	}
	summary, listed := v1alpha1.SummarizePeers(configured, expected, time.Now(), v1alpha1.DefaultHealthyHandshakeAge)
	enc.PeerCount = int32(len(configured))
	enc.PeerSummary = &summary
	enc.Peers = listed
	dp := m.cfg.Datapath
	if m.cfg.StrictMode {
		if enc.GuardedDevices, err = dp.GuardedDevices(); err != nil {
			return enc, err
		}
		if enc.UnguardedDevices, err = dp.UnguardedDevices(); err != nil {
			return enc, err
		}
	}
	leaks, err := dp.Leaks()
	if err != nil {
		return enc, err
	}
	sort.Slice(leaks, func(i, j int) bool { return leaks[i].Last.After(leaks[j].Last) })
	for i, l := range leaks {
		enc.Leaks += int64(l.Packets)
		if i < 10 {
			rec := v1alpha1.LeakRecord{
				Source: netip.AddrPortFrom(l.Src, l.SrcPort).String(), Destination: netip.AddrPortFrom(l.Dst, l.DstPort).String(),
				Protocol: policy.ProtoName(l.Proto), Reason: l.Reason.String(), Packets: int64(l.Packets),
				First: metav1.NewTime(l.First), Last: metav1.NewTime(l.Last),
			}
			rec.Endpoint = m.cfg.PodOf(l.Src)
			if rec.Endpoint == "" {
				rec.Endpoint = m.cfg.PodOf(l.Dst)
			}
			enc.RecentLeaks = append(enc.RecentLeaks, rec)
		}
	}
	if cs, err := dp.Counters(); err == nil {
		enc.UnencryptedPackets = int64(cs.Remote.Packets)
	}
	return enc, nil
}

func prefixStrings(ps []netip.Prefix) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.String()
	}
	return out
}

// Annotations are the wireguard.veil.dev/* annotations this node's agent
// publishes; nil while encryption is off.
func (m *Manager) Annotations() map[string]string {
	m.mu.Lock()
	pub := m.pub
	m.mu.Unlock()
	if pub == (wgtypes.Key{}) {
		return nil
	}
	var cidrs []netip.Prefix
	if m.cfg.PodCIDR.IsValid() {
		cidrs = append(cidrs, m.cfg.PodCIDR)
	}
	return wireguard.Annotations(pub, netip.AddrPortFrom(m.cfg.NodeIP, uint16(m.cfg.Port)), cidrs)
}

// patchNodeAnnotations writes this node's annotations.
func (m *Manager) patchNodeAnnotations(ctx context.Context) error {
	ann := m.Annotations()
	if ann == nil {
		return nil
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
	if err != nil {
		return fmt.Errorf("encode annotations of node %s: %w", m.cfg.NodeName, err)
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = m.cfg.Kube.CoreV1().Nodes().Patch(cctx, m.cfg.NodeName, types.MergePatchType, patch, metav1.PatchOptions{})
	if err != nil {
		return fmt.Errorf("annotate node %s: %w", m.cfg.NodeName, err)
	}
	return nil
}

// ReasonAnnotationsReasserted is the reason of the Event recorded on a Node
// whose annotations were put back.
const ReasonAnnotationsReasserted = "VeilAnnotationsReasserted"

// Reassert puts this node's annotations back when the Node
// shows something else (someone edited or removed them): peers must only
// ever learn this node's key and address from this node's agent.
func (m *Manager) Reassert(ctx context.Context, n *corev1.Node) error {
	want := m.Annotations()
	var drifted []string
	for k, v := range want {
		if n.Annotations[k] != v {
			drifted = append(drifted, k)
		}
	}
	if len(drifted) == 0 {
		return nil
	}
	slices.Sort(drifted)
	m.cfg.Log.Warn("node annotations drifted; re-asserting", "node", n.Name, "annotations", drifted)
	m.cfg.Events.Eventf(&corev1.ObjectReference{Kind: "Node", Name: n.Name, UID: types.UID(n.Name)}, corev1.EventTypeWarning, ReasonAnnotationsReasserted,
		"annotations %v did not match what the node's Veil agent publishes; re-asserted", drifted)
	return m.patchNodeAnnotations(ctx)
}
