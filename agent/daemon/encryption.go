package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"sort"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/veilmesh/veil/agent/wireguard"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/api/nodeinfo"
	"github.com/veilmesh/veil/policy/api/v1alpha1"
)

// startWireGuard opens this node's WireGuard device with its persistent key.
// Pods get the underlay MTU less WireGuard's overhead, so nothing fragments.
func (d *Daemon) startWireGuard(ctx context.Context, underlay string) error {
	key, err := wireguard.LoadOrCreateKey(filepath.Join(d.cfg.StateDir, "wireguard.key"))
	if err != nil {
		return err
	}
	link, err := netlink.LinkByName(underlay)
	if err != nil {
		return fmt.Errorf("find underlay %s: %w", underlay, err)
	}
	mtu, err := wireguard.PodMTU(link.Attrs().MTU)
	if err != nil {
		return err
	}
	wcfg := wireguard.Config{
		Interface: d.cfg.WireGuardIface, ListenPort: d.cfg.WireGuardPort, PrivateKey: key, MTU: mtu, Logger: d.log,
	}
	if d.cfg.NodeToNode {
		// The device's own UDP packets carry the mark, so the rule that
		// sends node traffic into the tunnel skips them.
		wcfg.FirewallMark = hostTunnelMark
	}
	dev, err := wireguard.Open(ctx, wcfg)
	if err != nil {
		return fmt.Errorf("open WireGuard device: %w", err)
	}
	d.wg, d.podMTU = dev, mtu
	d.mu.Lock()
	d.pub = key.PublicKey()
	d.mu.Unlock()
	d.log.Info("WireGuard up", "interface", d.cfg.WireGuardIface, "mode", dev.Mode(), "key", dev.Key(), "podMTU", mtu, "strict", d.cfg.StrictMode)
	return nil
}

// publishKey writes the node's public key, WireGuard endpoint and pod CIDR
// as annotations on its Node, retrying until the API server takes them.
func (d *Daemon) publishKey(ctx context.Context) {
	for {
		err := d.patchNodeAnnotations(ctx)
		if err == nil {
			return
		}
		d.log.Warn("publish WireGuard key; retrying", "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
	}
}

// peerNodeAddrs says whether peers' own addresses join their allowed IPs:
// for host traffic with node-to-node encryption, and in strict mode for pods'
// traffic to other nodes' addresses, which may only leave through the tunnel.
func (d *Daemon) peerNodeAddrs() bool { return d.cfg.NodeToNode || d.cfg.StrictMode }

// syncPeers makes every other node that published a key a peer, and marks
// the nodes with a tunnel in the ipcache. Malformed annotations and refused
// claims are reported, not guessed at: such a node gets no tunnel (and, in
// strict mode, no traffic), and never takes over another node's.
func (d *Daemon) syncPeers(ctx context.Context, c nodeinfo.Cluster) error {
	if d.wg == nil {
		return nil
	}
	peers, errs := wireguard.PeersFromNodes(c, d.cfg.NodeName, d.peerNodeAddrs())
	for _, e := range errs {
		d.log.Warn("node not peered", "error", e)
	}
	if err := d.wg.SetPeers(ctx, peers); err != nil {
		return fmt.Errorf("set WireGuard peers: %w", err)
	}
	d.recordTunnels(peers)
	if d.cfg.NodeToNode {
		// Everything a peer's allowed IPs hold: its addresses, and its pod
		// CIDRs, so a hostNetwork process reaching a remote pod is
		// encrypted as a pod would be.
		prefixes := map[netip.Prefix]bool{}
		for _, p := range peers {
			for _, a := range p.AllowedIPs {
				if a.Addr().Is4() {
					prefixes[a.Masked()] = true
				}
			}
		}
		if err := d.routeNodesThroughTunnel(prefixes); err != nil {
			return err
		}
	}
	return nil
}

// recordTunnels remembers which nodes are peers, marking the ipcache and
// the MeshNode status for rewriting when that changed.
func (d *Daemon) recordTunnels(peers []wireguard.Peer) {
	tunnels := map[string]bool{}
	for _, p := range peers {
		tunnels[p.Node] = true
	}
	d.mu.Lock()
	changed := len(tunnels) != len(d.tunnels)
	for n := range tunnels {
		if !d.tunnels[n] {
			changed = true
		}
	}
	d.tunnels = tunnels
	d.mu.Unlock()
	if changed {
		d.ipcacheDirty.Store(true)
		d.meshNodeChanged()
	}
}

// rotateKey replaces the node's key and republishes it; peers pick it up
// from the Node annotation.
func (d *Daemon) rotateKey(ctx context.Context) (old, cur string, err error) {
	if d.wg == nil {
		return "", "", fmt.Errorf("encryption is off on node %s", d.cfg.NodeName)
	}
	old = d.wg.Key().Fingerprint()
	key, err := d.wg.RotateKey(ctx)
	if err != nil {
		return old, "", fmt.Errorf("rotate WireGuard key: %w", err)
	}
	d.mu.Lock()
	d.pub = key.PublicKey()
	d.mu.Unlock()
	if err := d.patchNodeAnnotations(ctx); err != nil {
		return old, key.Fingerprint(), err
	}
	if err := key.ConfirmRotation(); err != nil {
		return old, key.Fingerprint(), fmt.Errorf("confirm key rotation: %w", err)
	}
	d.meshNodeChanged()
	d.log.Info("rotated WireGuard key", "old", old, "new", key.Fingerprint())
	return old, key.Fingerprint(), nil
}

// encryptionLoop keeps the MeshNode status current and rotates the key on
// schedule. The status is written at start, when statusChanged says the
// peers or the key changed, and every 15 s for the counters; a failed write
// is retried after a second.
func (d *Daemon) encryptionLoop(ctx context.Context) {
	status := time.NewTicker(15 * time.Second)
	defer status.Stop()
	var rotate <-chan time.Time
	if d.cfg.KeyRotationInterval > 0 && d.wg != nil {
		t := time.NewTicker(d.cfg.KeyRotationInterval)
		defer t.Stop()
		rotate = t.C
	}
	var retry <-chan time.Time
	for write := true; ; {
		if write {
			retry = nil
			if err := d.writeMeshNode(ctx); err != nil {
				d.log.Warn("record node status", "error", err)
				retry = time.After(time.Second)
			}
		}
		write = true
		select {
		case <-ctx.Done():
			return
		case <-status.C:
		case <-d.statusChanged:
		case <-retry:
		case <-rotate:
			if _, _, err := d.rotateKey(ctx); err != nil {
				d.log.Error("scheduled key rotation", "error", err)
			}
			// rotateKey announced a change of its own when it took.
			write = false
		}
	}
}

// meshNodeChanged asks encryptionLoop to write the MeshNode status now.
func (d *Daemon) meshNodeChanged() {
	select {
	case d.statusChanged <- struct{}{}:
	default:
	}
}

// writeMeshNode records this node's state in its MeshNode.
func (d *Daemon) writeMeshNode(ctx context.Context) error {
	st := v1alpha1.MeshNodeStatus{AgentVersion: Version, NodeIP: d.nodeIP.String(), Updated: metav1.Now()}
	if d.podCIDR.IsValid() {
		st.PodCIDRs = []string{d.podCIDR.String()}
	}
	st.Encryption = v1alpha1.EncryptionStatus{Mode: v1alpha1.EncryptionModeDisabled}
	if d.wg != nil {
		enc, err := d.encryptionStatus(ctx)
		if err != nil {
			return err
		}
		st.Encryption = enc
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	mn := d.veil.PolicyV1alpha1().MeshNodes()
	obj, err := mn.Get(cctx, d.cfg.NodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		obj, err = mn.Create(cctx, &v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: d.cfg.NodeName}}, metav1.CreateOptions{})
	}
	if err != nil {
		return fmt.Errorf("get MeshNode %s: %w", d.cfg.NodeName, err)
	}
	obj.Status = st
	if _, err := mn.UpdateStatus(cctx, obj, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("write MeshNode %s status: %w", d.cfg.NodeName, err)
	}
	return nil
}

func (d *Daemon) encryptionStatus(ctx context.Context) (v1alpha1.EncryptionStatus, error) {
	ws, err := d.wg.Status(ctx)
	if err != nil {
		return v1alpha1.EncryptionStatus{}, fmt.Errorf("read WireGuard status: %w", err)
	}
	enc := v1alpha1.EncryptionStatus{
		Mode: string(ws.Mode), Interface: ws.Interface, PublicKey: ws.PublicKey, Fingerprint: ws.Fingerprint,
		KeyCreated: metav1.NewTime(ws.KeyCreated), ListenPort: int32(ws.ListenPort), StrictMode: d.cfg.StrictMode,
	}
	// A peer is named by the node that holds its key: what this agent
	// believes, which the audit compares with what that node says.
	byKey := map[string]string{}
	for _, n := range d.resolvedCluster().Nodes {
		if n.Tunnel() {
			byKey[wgtypes.Key(n.PublicKey).String()] = n.Name
		}
	}
	for _, p := range ws.Peers {
		ps := v1alpha1.PeerStatus{
			Node: byKey[p.PublicKey], PublicKey: p.PublicKey, Endpoint: p.Endpoint.String(),
			RxBytes: p.RxBytes, TxBytes: p.TxBytes,
		}
		if ps.Node == "" {
			ps.Node = p.Endpoint.Addr().String()
		}
		for _, a := range p.AllowedIPs {
			ps.AllowedIPs = append(ps.AllowedIPs, a.String())
		}
		if !p.LastHandshake.IsZero() {
			t := metav1.NewTime(p.LastHandshake)
			ps.LastHandshake = &t
		}
		enc.Peers = append(enc.Peers, ps)
	}
	sort.Slice(enc.Peers, func(i, j int) bool { return enc.Peers[i].Node < enc.Peers[j].Node })
	enc.PeerCount = int32(len(enc.Peers))
	if d.cfg.StrictMode {
		if enc.GuardedDevices, err = d.dp.GuardedDevices(); err != nil {
			return enc, err
		}
		if enc.UnguardedDevices, err = d.dp.UnguardedDevices(); err != nil {
			return enc, err
		}
	}
	leaks, err := d.dp.Leaks()
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
			rec.Endpoint = d.flows.PodOf(l.Src)
			if rec.Endpoint == "" {
				rec.Endpoint = d.flows.PodOf(l.Dst)
			}
			enc.RecentLeaks = append(enc.RecentLeaks, rec)
		}
	}
	if cs, err := d.dp.Counters(); err == nil {
		enc.UnencryptedPackets = int64(cs.Remote.Packets)
	}
	return enc, nil
}

// Node-to-node encryption: host traffic to a peer node's address is routed
// into the tunnel by a rule that every unmarked packet consults; WireGuard's
// own packets carry hostTunnelMark and keep the main table (the underlay).
const (
	hostTunnelMark  = 0x5650
	hostTunnelTable = 0x5650
	hostTunnelPrio  = 5650
)

func hostTunnelRule() *netlink.Rule {
	r := netlink.NewRule()
	r.Family = netlink.FAMILY_V4
	r.Priority = hostTunnelPrio
	r.Mark = hostTunnelMark
	mask := uint32(0xffffffff)
	r.Mask = &mask
	r.Invert = true
	r.Table = hostTunnelTable
	return r
}

// tunnelFallbackMetric orders the blackhole twin of every tunnel route after
// the route through the device: while the device exists its route wins;
// when a userspace device restarts (its TUN and routes vanish) the twin
// stays, so host traffic to peers fails closed instead of taking the main
// table's route over the underlay in plaintext.
const tunnelFallbackMetric = 4096

// routeNodesThroughTunnel makes the tunnel table hold exactly the peers'
// prefixes — each through the device, each with a blackhole behind it — and
// the rule that consults it exist.
func (d *Daemon) routeNodesThroughTunnel(prefixes map[netip.Prefix]bool) error {
	return routeThroughTunnel(d.wg.Interface(), prefixes)
}

func routeThroughTunnel(device string, prefixes map[netip.Prefix]bool) error {
	link, err := netlink.LinkByName(device)
	if err != nil {
		return fmt.Errorf("find WireGuard device: %w", err)
	}
	rules, err := netlink.RuleList(netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list routing rules: %w", err)
	}
	haveRule := false
	for _, r := range rules {
		if r.Priority == hostTunnelPrio && r.Table == hostTunnelTable {
			haveRule = true
		}
	}
	if !haveRule {
		if err := netlink.RuleAdd(hostTunnelRule()); err != nil {
			return fmt.Errorf("add node-to-node routing rule: %w", err)
		}
	}
	have, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: hostTunnelTable}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list node-to-node routes: %w", err)
	}
	type key struct {
		p        netip.Prefix
		fallback bool
	}
	present := map[key]bool{}
	for _, r := range have {
		p, ok := routePrefix(r)
		fallback := r.Type == unix.RTN_BLACKHOLE && r.Priority == tunnelFallbackMetric
		if ok && prefixes[p] && (fallback || r.LinkIndex == link.Attrs().Index) {
			present[key{p, fallback}] = true
			continue
		}
		if err := netlink.RouteDel(&r); err != nil {
			return fmt.Errorf("remove node-to-node route %s: %w", r.Dst, err)
		}
	}
	for p := range prefixes {
		dst := &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}
		if !present[key{p, true}] {
			hole := &netlink.Route{Table: hostTunnelTable, Type: unix.RTN_BLACKHOLE, Priority: tunnelFallbackMetric, Dst: dst}
			if err := netlink.RouteReplace(hole); err != nil {
				return fmt.Errorf("fail-closed route for %s: %w", p, err)
			}
		}
		if present[key{p, false}] {
			continue
		}
		route := &netlink.Route{LinkIndex: link.Attrs().Index, Table: hostTunnelTable, Scope: netlink.SCOPE_LINK, Dst: dst}
		if err := netlink.RouteReplace(route); err != nil {
			return fmt.Errorf("route %s through the tunnel: %w", p, err)
		}
	}
	return nil
}

func routePrefix(r netlink.Route) (netip.Prefix, bool) {
	if r.Dst == nil {
		return netip.Prefix{}, false
	}
	ip, ok := netip.AddrFromSlice(r.Dst.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	bits, _ := r.Dst.Mask.Size()
	return netip.PrefixFrom(ip.Unmap(), bits).Masked(), true
}

// removeHostTunnel undoes routeNodesThroughTunnel (cleanup mode).
func removeHostTunnel() error {
	var errs []error
	// One rule is installed; a few more passes catch duplicates of a crash.
	for i := 0; i < 8; i++ {
		if err := netlink.RuleDel(hostTunnelRule()); err != nil {
			break
		}
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: hostTunnelTable}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list node-to-node routes: %w", err)
	}
	for _, r := range routes {
		if err := netlink.RouteDel(&r); err != nil {
			errs = append(errs, fmt.Errorf("remove node-to-node route %s: %w", r.Dst, err))
		}
	}
	return errors.Join(errs...)
}
