// Package datapath owns Veil's kernel datapath: it loads the eBPF programs of
// bpf/, pins their maps and links under a per-node bpffs root, attaches them
// to pod veths, the underlay device and the pods' cgroup, and gives the agent
// a small API over the maps (endpoints, ipcache, CIDRs, policy, flows,
// events, counters).
//
// Everything is pinned: a Datapath that is closed, or a process that dies,
// leaves enforcement running, and the next Load re-opens the same state and
// swaps in freshly loaded programs without detaching anything. Only Cleanup
// removes what Veil installed.
//
// A Datapath is safe for concurrent use.
package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Config says where the datapath lives on this node. The zero value of each
// field means its documented default.
type Config struct {
	// BPFFSRoot is the directory (inside a bpffs mount) that holds Veil's
	// pinned maps and links. Default /sys/fs/bpf/veil.
	BPFFSRoot string
	// CgroupPath is a cgroup v2 directory whose sockets get socket-level
	// acceleration. Empty disables acceleration.
	CgroupPath string
	// SkipAccelerationSelfTest accelerates without first checking, with a
	// transfer of the datapath's own, that this kernel redirects sockets'
	// data intact (see Acceleration).
	SkipAccelerationSelfTest bool
	// UnderlayInterface is the device toward other nodes; traffic arriving
	// on it for local pods is policed. Empty means a single-node datapath.
	UnderlayInterface string
	// NodeIP is this node's address on the underlay.
	NodeIP netip.Addr
	// WireGuardInterface is the WireGuard device; traffic to remote pods of
	// nodes marked Tunnel in the ipcache goes into it. Empty: no encryption.
	WireGuardInterface string
	// StrictMode never lets pod traffic reach another node unencrypted:
	// without a tunnel to the destination node it is dropped and recorded
	// as a leak, and a guard on the underlay's egress catches anything that
	// routed around the tunnel.
	StrictMode bool
	// ClusterCIDR is the cluster's pod range. In strict mode, pod traffic
	// to an address in it that the ipcache does not know yet is refused
	// rather than sent: it may be a remote pod. Invalid: not known.
	ClusterCIDR netip.Prefix
	// NodePort replaces kube-proxy for traffic that does not start at a
	// socket on the node: flows arriving on the underlay for a Service's
	// external frontends (External ServiceKeys: NodePorts, LoadBalancer
	// ingress and external IPs) are translated on the packet path, with
	// the reverse translation on their replies (bpf/lib/nodeport.h). Off
	// where kube-proxy runs: it handles them.
	NodePort bool
	// PodDevice tells a pod's host-side veth by its name, so the strict-mode
	// guard leaves it alone even before its endpoint is registered.
	PodDevice func(name string) bool `json:"-"`
	// LegacyTC attaches with clsact filters even where TCX exists.
	LegacyTC bool
	// CTTimeouts say how long an idle connection keeps its verdict before
	// its next packet is checked against policy again.
	CTTimeouts CTTimeouts
	// CTMaxEntries is the size of the connection table. Default 262144.
	// A table pinned by an agent with another size must be removed
	// (cleanup mode) before the new size applies.
	CTMaxEntries uint32
	// Maps size the maps that grow with the cluster (capacity.go).
	Maps MapSizes
	// Logger receives structured logs. Default slog.Default().
	Logger *slog.Logger

	selfTest selfTest
}

// DefaultBPFFSRoot is where Veil pins its state unless told otherwise.
const DefaultBPFFSRoot = "/sys/fs/bpf/veil"

// DefaultCTMaxEntries is the default size of the connection table.
const DefaultCTMaxEntries = 262144

// CTTimeouts are the idle lifetimes of connections, by protocol and TCP
// state, after which the next packet faces policy again and the garbage
// collector (RunConntrackGC) may delete the entry. Zero fields take the
// defaults, which are Cilium's (bpf/lib/conntrack.h, CT_*_LIFETIME_* and
// CT_CLOSE_TIMEOUT), with ICMP's from Linux conntrack.
type CTTimeouts struct {
	// TCPEstablished: a TCP connection whose responder answered.
	// Default 6h (Linux conntrack: 5 days).
	TCPEstablished time.Duration
	// TCPOpening: a TCP connection whose responder has not answered yet.
	// Default 60s (Linux: SYN_SENT 120s).
	TCPOpening time.Duration
	// TCPClosing: after a FIN from each side, or a RST. Default 10s
	// (Linux: CLOSE 10s, TIME_WAIT 120s).
	TCPClosing time.Duration
	// UDP: UDP, SCTP and every protocol without ports. Default 60s (Linux:
	// 30s unanswered, 120s once answered).
	UDP time.Duration
	// ICMP: an echo request and its replies. Default 30s (Linux:
	// nf_conntrack_icmp_timeout).
	ICMP time.Duration
}

func (t *CTTimeouts) setDefaults() {
	for _, f := range []struct {
		v   *time.Duration
		def time.Duration
	}{
		{&t.TCPEstablished, 6 * time.Hour}, {&t.TCPOpening, 60 * time.Second},
		{&t.TCPClosing, 10 * time.Second}, {&t.UDP, 60 * time.Second}, {&t.ICMP, 30 * time.Second},
	} {
		if *f.v == 0 {
			*f.v = f.def
		}
	}
}

func seconds(d time.Duration) uint32 { return uint32((d + time.Second - 1) / time.Second) }

func (c *Config) setDefaults() {
	if c.BPFFSRoot == "" {
		c.BPFFSRoot = DefaultBPFFSRoot
	}
	c.CTTimeouts.setDefaults()
	if c.CTMaxEntries == 0 {
		c.CTMaxEntries = DefaultCTMaxEntries
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Datapath is the loaded datapath of one node.
type Datapath struct {
	cfg Config
	log *slog.Logger

	mu sync.Mutex
	// maps, opened from the pins; shared by every program.
	endpoints, ipcache, cidrs, policy, ct, sockhash, events, metrics, sockstats *ebpf.Map
	// sockstate belongs to the socket programs alone.
	sockstate *ebpf.Map
	// programs, one per attach point.
	fromPod, toPod, fromNetdev, fromTunnel, toNetdev, sockops, skMsg *ebpf.Program
	leaks                                                            *ebpf.Map
	underlayIfindex, wgIfindex                                       int
	// policySlots remembers which policy keys each slot holds, so a replace
	// deletes exactly the previous generation.
	policySlots map[uint32][]podPolicyKey
	// retired: slots switched away from whose entries are deleted after a
	// grace period (SetPolicy, reclaim).
	retired map[uint32]bool
	closers []interface{ Close() error }
	// lb holds the Services' maps and socket programs (services.go).
	lb lbState

	// gcMu serialises garbage-collection passes; gcCursor is where the
	// next pass resumes.
	gcMu     sync.Mutex
	gcCursor ebpf.MapBatchCursor

	// capacity follows how full the maps are (capacity.go).
	capacity capacity

	// accelOff says why acceleration is off although configured; empty
	// when it is on. accelNote says why it runs untested. Set once by Load.
	accelOff, accelNote string
}

// Load checks the kernel, loads the programs, opens (or creates) the pinned
// maps and re-points every pinned link at the new programs.
func Load(cfg Config) (*Datapath, error) {
	cfg.setDefaults()
	if err := checkKernel(cfg); err != nil {
		return nil, err
	}
	for _, dir := range []string{cfg.BPFFSRoot, linksDir(cfg.BPFFSRoot), progsDir(cfg.BPFFSRoot)} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("create bpffs directory %s: %w", dir, err)
		}
	}
	d := &Datapath{cfg: cfg, log: cfg.Logger, policySlots: map[uint32][]podPolicyKey{}, retired: map[uint32]bool{}}
	if cfg.UnderlayInterface != "" {
		l, err := netlink.LinkByName(cfg.UnderlayInterface)
		if err != nil {
			return nil, fmt.Errorf("find underlay interface %q: %w", cfg.UnderlayInterface, err)
		}
		d.underlayIfindex = l.Attrs().Index
	}
	if cfg.WireGuardInterface != "" {
		l, err := netlink.LinkByName(cfg.WireGuardInterface)
		if err != nil {
			return nil, fmt.Errorf("find WireGuard interface %q: %w", cfg.WireGuardInterface, err)
		}
		d.wgIfindex = l.Attrs().Index
	}
	if cfg.StrictMode && cfg.WireGuardInterface == "" {
		return nil, errors.New("strict mode needs a WireGuard interface")
	}
	if err := d.load(); err != nil {
		d.Close()
		return nil, err
	}
	if err := d.indexPolicy(); err != nil {
		d.Close()
		return nil, err
	}
	if err := d.repointLinks(); err != nil {
		d.Close()
		return nil, err
	}
	if err := d.attachDevices(); err != nil {
		d.Close()
		return nil, err
	}
	if cfg.CgroupPath != "" {
		if err := d.startAcceleration(); err != nil {
			d.Close()
			return nil, err
		}
		// Services do not depend on acceleration: a kernel that fails its
		// self-test still load-balances.
		if err := d.attachServices(); err != nil {
			d.Close()
			return nil, err
		}
	}
	return d, nil
}

// startAcceleration attaches the socket programs, unless the self-test finds
// that this kernel does not redirect sockets' data intact; then it makes
// sure no socket is accelerated and records why.
func (d *Datapath) startAcceleration() error {
	if !d.cfg.SkipAccelerationSelfTest {
		start := time.Now()
		err := d.testAcceleration()
		switch {
		case errors.Is(err, errSelfTestNotRun):
			// Nothing is known against this kernel: accelerate, and say
			// that it is untested.
			d.accelNote = "accelerating untested: " + err.Error()
			d.log.Warn("could not run the socket acceleration self-test; accelerating untested", "error", err)
		case err != nil:
			d.accelOff = "kernel self-test failed: " + err.Error()
			d.log.Error("socket acceleration is off: this kernel failed the self-test", "error", err)
			return d.stopAcceleration()
		default:
			d.log.Info("socket acceleration self-test passed", "duration", time.Since(start))
		}
	}
	return d.attachSockets()
}

// Acceleration reports whether sockets of pods are accelerated, and what an
// operator should know about it: why it is off although a cgroup was
// configured, or why it runs untested.
func (d *Datapath) Acceleration() (on bool, reason string) {
	if d.accelOff != "" {
		return false, d.accelOff
	}
	return d.cfg.CgroupPath != "", d.accelNote
}

func linksDir(root string) string { return filepath.Join(root, "links") }
func progsDir(root string) string { return filepath.Join(root, "progs") }

// checkKernel names the first missing kernel feature.
func checkKernel(cfg Config) error {
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		return fmt.Errorf("kernel BTF (/sys/kernel/btf/vmlinux) is missing: Veil needs a kernel built with CONFIG_DEBUG_INFO_BTF: %w", err)
	}
	mount := cfg.BPFFSRoot
	for {
		if _, err := os.Stat(mount); err == nil {
			break
		}
		parent := filepath.Dir(mount)
		if parent == mount {
			break
		}
		mount = parent
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mount, &st); err != nil {
		return fmt.Errorf("stat bpffs root %s: %w", cfg.BPFFSRoot, err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("%s is not on a bpffs mount: mount one with 'mount -t bpf bpf /sys/fs/bpf'", cfg.BPFFSRoot)
	}
	if cfg.CgroupPath != "" {
		if err := unix.Statfs(cfg.CgroupPath, &st); err != nil {
			return fmt.Errorf("stat cgroup %s: %w", cfg.CgroupPath, err)
		}
		if st.Type != unix.CGROUP2_SUPER_MAGIC {
			return fmt.Errorf("%s is not a cgroup v2 directory: socket acceleration needs cgroup v2", cfg.CgroupPath)
		}
	}
	return nil
}

// object is one compiled BPF object (one attach surface) and where its
// programs, and the maps only it has, go in a Datapath.
type object struct {
	name  string
	spec  func() (*ebpf.CollectionSpec, error)
	progs func(*Datapath) map[string]**ebpf.Program // program name in the object -> field
	maps  func(*Datapath) map[string]**ebpf.Map     // map name in the object -> field; may be nil
}

// objects lists the BPF objects by attach surface. The first one also
// provides the map handles.
var objects = []object{
	{"pod", loadPod, func(d *Datapath) map[string]**ebpf.Program {
		return map[string]**ebpf.Program{"veil_from_pod": &d.fromPod, "veil_to_pod": &d.toPod}
	}, nil},
	{"netdev", loadNetdev, func(d *Datapath) map[string]**ebpf.Program {
		return map[string]**ebpf.Program{"veil_from_netdev": &d.fromNetdev, "veil_to_netdev": &d.toNetdev}
	}, nil},
	{"tunnel", loadTunnel, func(d *Datapath) map[string]**ebpf.Program {
		return map[string]**ebpf.Program{"veil_from_tunnel": &d.fromTunnel}
	}, nil},
	{"sock", loadSock, func(d *Datapath) map[string]**ebpf.Program {
		progs := map[string]**ebpf.Program{"veil_sockops": &d.sockops, "veil_sk_msg": &d.skMsg}
		for name, p := range d.lb.progs() {
			progs[name] = p
		}
		return progs
	}, func(d *Datapath) map[string]**ebpf.Map {
		maps := map[string]**ebpf.Map{"veil_sockconn": &d.sockstate}
		for name, m := range d.lb.maps() {
			maps[name] = m
		}
		return maps
	}},
}

// constants are the node configuration the programs see as known values.
func (d *Datapath) constants() map[string]any {
	var nodeIP uint32
	if d.cfg.NodeIP.Is4() {
		nodeIP = ip4ToU32(d.cfg.NodeIP)
	}
	var clusterAddr, clusterBits uint32
	if p := d.cfg.ClusterCIDR; p.IsValid() && p.Addr().Is4() {
		clusterAddr, clusterBits = ip4ToU32(p.Masked().Addr()), uint32(p.Bits())
	}
	return map[string]any{
		"node_ip":              nodeIP,
		"underlay_ifindex":     uint32(d.underlayIfindex),
		"ct_tcp_established_s": seconds(d.cfg.CTTimeouts.TCPEstablished),
		"ct_tcp_opening_s":     seconds(d.cfg.CTTimeouts.TCPOpening),
		"ct_tcp_closing_s":     seconds(d.cfg.CTTimeouts.TCPClosing),
		"ct_udp_s":             seconds(d.cfg.CTTimeouts.UDP),
		"ct_icmp_s":            seconds(d.cfg.CTTimeouts.ICMP),
		"wg_ifindex":           uint32(d.wgIfindex),
		"strict_mode":          boolU32(d.cfg.StrictMode),
		"cluster_cidr":         clusterAddr,
		"cluster_cidr_bits":    clusterBits,
		"nodeport_enabled":     boolU32(d.cfg.NodePort),
	}
}

// load loads every object with its maps pinned by name under the root, and
// pins the programs so their links can be re-pointed by the next load.
func (d *Datapath) load() error {
	if err := d.loadObjects(d.cfg.BPFFSRoot); err != nil {
		return err
	}
	for _, o := range objects {
		for name, p := range o.progs(d) {
			if err := repin(*p, filepath.Join(progsDir(d.cfg.BPFFSRoot), strings.TrimPrefix(name, "veil_"))); err != nil {
				return err
			}
		}
	}
	return nil
}

// loadObjects loads every object. With pinRoot set, maps are opened from (or
// created at) their pins; without it, the first object creates private maps
// and the others share them, which is what packet-level tests need.
func (d *Datapath) loadObjects(pinRoot string) error {
	consts := d.constants()
	var shared map[string]*ebpf.Map
	for _, o := range objects {
		spec, err := o.spec()
		if err != nil {
			return fmt.Errorf("parse %s object: %w", o.name, err)
		}
		for name, v := range consts {
			vs, ok := spec.Variables[name]
			if !ok {
				continue
			}
			if err := vs.Set(v); err != nil {
				return fmt.Errorf("configure %s object: set %s: %w", o.name, name, err)
			}
		}
		if m, ok := spec.Maps["veil_ct"]; ok {
			m.MaxEntries = d.cfg.CTMaxEntries
		}
		d.cfg.Maps.apply(spec)
		opts := &ebpf.CollectionOptions{}
		if pinRoot != "" {
			opts.Maps.PinPath = pinRoot
		} else {
			opts.MapReplacements = map[string]*ebpf.Map{}
			for name, m := range spec.Maps {
				m.Pinning = ebpf.PinNone
				if sm, ok := shared[name]; ok && strings.HasPrefix(name, "veil_") {
					opts.MapReplacements[name] = sm
				}
			}
		}
		coll, err := ebpf.NewCollectionWithOptions(spec, *opts)
		if err != nil {
			return explainLoadError(o.name, err)
		}
		d.closers = append(d.closers, closerFunc(func() error { coll.Close(); return nil }))
		if shared == nil {
			shared = coll.Maps
			if err := d.assignMaps(coll.Maps); err != nil {
				return err
			}
		}
		for name, field := range o.progs(d) {
			p, ok := coll.Programs[name]
			if !ok {
				return fmt.Errorf("%s object has no program %s", o.name, name)
			}
			*field = p
		}
		if o.maps == nil {
			continue
		}
		for name, field := range o.maps(d) {
			m, ok := coll.Maps[name]
			if !ok {
				return fmt.Errorf("%s object has no map %s", o.name, name)
			}
			*field = m
		}
	}
	if pinRoot != "" {
		return removeRetiredPins(pinRoot)
	}
	return nil
}

// retiredPins are maps earlier versions pinned and this one no longer uses:
// veil_sockstate held socket state without the connection's identity (now
// veil_sockconn). Removing a pin only drops its name: an earlier program
// still attached keeps its map until this version's replaces it.
var retiredPins = []string{"veil_sockstate"}

func removeRetiredPins(pinRoot string) error {
	for _, name := range retiredPins {
		if err := os.Remove(filepath.Join(pinRoot, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove retired pin %s: %w", name, err)
		}
	}
	return nil
}

// explainLoadError turns the load errors an operator can act on into advice.
func explainLoadError(name string, err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("load %s object: verifier rejected a program: %+v", name, ve)
	}
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		return fmt.Errorf("load %s object: a pinned map was made by an incompatible version; run the agent's cleanup mode: %w", name, err)
	}
	return fmt.Errorf("load %s object: %w", name, err)
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }

// assignMaps takes the handles of the shared maps.
func (d *Datapath) assignMaps(maps map[string]*ebpf.Map) error {
	for name, field := range map[string]**ebpf.Map{
		"veil_endpoints": &d.endpoints, "veil_ipcache": &d.ipcache, "veil_cidrs": &d.cidrs,
		"veil_policy": &d.policy, "veil_ct": &d.ct, "veil_sockhash": &d.sockhash,
		"veil_events": &d.events, "veil_metrics": &d.metrics, "veil_sockstats": &d.sockstats,
		"veil_leaks": &d.leaks,
	} {
		m, ok := maps[name]
		if !ok {
			return fmt.Errorf("pod object has no map %s", name)
		}
		*field = m
	}
	return nil
}

// repin pins p at path, replacing a program pinned there by an earlier load.
func repin(p *ebpf.Program, path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unpin %s: %w", path, err)
	}
	if err := p.Pin(path); err != nil {
		return fmt.Errorf("pin program %s: %w", path, err)
	}
	return nil
}

// Underlay is the name of the device toward other nodes.
func (d *Datapath) Underlay() string { return d.cfg.UnderlayInterface }

func boolU32(b bool) uint32 {
	if b {
		return 1
	}
	return 0
}

// attachDevices attaches the node-level programs: traffic from other nodes
// on the underlay, decrypted traffic on the WireGuard device, and (strict
// mode) the guard on the egress of every device that leads off the node,
// which is removed when strict mode is off.
func (d *Datapath) attachDevices() error {
	if d.underlayIfindex != 0 {
		if err := d.attachTC(d.underlayIfindex, guardPrefix+d.cfg.UnderlayInterface, ingress, d.fromNetdev); err != nil {
			return err
		}
	}
	if err := d.GuardDevices(); err != nil {
		return err
	}
	if d.wgIfindex != 0 {
		if err := d.attachTC(d.wgIfindex, "tunnel_"+d.cfg.WireGuardInterface, ingress, d.fromTunnel); err != nil {
			return err
		}
	}
	return nil
}

// attachSockets attaches sockops to the cgroup and sk_msg to the sockhash.
func (d *Datapath) attachSockets() error {
	pin := filepath.Join(linksDir(d.cfg.BPFFSRoot), "sockops")
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		err = l.Update(d.sockops)
		l.Close()
		if err != nil {
			return fmt.Errorf("update pinned sockops link: %w", err)
		}
	} else {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: d.cfg.CgroupPath, Attach: ebpf.AttachCGroupSockOps, Program: d.sockops})
		if err != nil {
			return fmt.Errorf("attach sockops to cgroup %s: %w", d.cfg.CgroupPath, err)
		}
		err = l.Pin(pin)
		l.Close()
		if err != nil {
			return fmt.Errorf("pin sockops link: %w", err)
		}
	}
	// A map-attached program lives as long as the (pinned) sockhash; attaching
	// again replaces the previous one.
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target: d.sockhash.FD(), Program: d.skMsg, Attach: ebpf.AttachSkMsgVerdict,
	}); err != nil {
		return fmt.Errorf("attach sk_msg to sockhash: %w", err)
	}
	return nil
}

// stopAcceleration detaches sockops (an earlier run may have pinned it), so
// no socket joins the sockhash, and moves the sockets that did join to the
// TCP path.
func (d *Datapath) stopAcceleration() error {
	pin := filepath.Join(linksDir(d.cfg.BPFFSRoot), "sockops")
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		err = l.Unpin()
		// Closing the last reference to an unpinned link detaches it.
		l.Close()
		if err != nil {
			return fmt.Errorf("unpin sockops link: %w", err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open pinned sockops link: %w", err)
	}
	_, err := d.fallBackToTCP(func(podSockKey) bool { return true })
	return err
}

// fallBackToTCP moves the accelerated sockets that match to the TCP path for
// the rest of their lives: each keeps what was already redirected to its
// peer, in order. Sockets that joined under an earlier Veil (no state; their
// sk_msg program knows none) leave the sockhash instead, which frees what
// was redirected into them and not yet read. It returns how many sockets it
// moved.
func (d *Datapath) fallBackToTCP(match func(podSockKey) bool) (int, error) {
	var (
		k      podSockKey
		cookie uint64
		keys   []podSockKey
	)
	it := d.sockhash.Iterate()
	for it.Next(&k, &cookie) {
		if match(k) {
			keys = append(keys, k)
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("scan accelerated sockets: %w", err)
	}
	n := 0
	for _, k := range keys {
		var st sockSockState
		err := d.sockstate.Lookup(&k, &st)
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			err = d.sockhash.Delete(&k)
		case err != nil:
			return n, fmt.Errorf("read accelerated socket state: %w", err)
		case st.TcpPath != 0:
			continue
		default:
			st.TcpPath = 1
			err = d.sockstate.Update(&k, &st, ebpf.UpdateExist)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue // closed meanwhile
		}
		if err != nil {
			return n, fmt.Errorf("move accelerated socket to the TCP path: %w", err)
		}
		n++
	}
	return n, nil
}

// Close releases this process's handles. Pinned state keeps enforcing.
func (d *Datapath) Close() error {
	var errs []error
	for i := len(d.closers) - 1; i >= 0; i-- {
		errs = append(errs, d.closers[i].Close())
	}
	d.closers = nil
	return errors.Join(errs...)
}

// Cleanup detaches and removes everything Veil installed under the root:
// links (so programs leave every device and the cgroup) and maps. The
// Datapath is closed afterwards.
func (d *Datapath) Cleanup() error {
	var errs []error
	if d.cfg.LegacyTC {
		errs = append(errs, d.detachLegacyAll())
	}
	if d.cfg.CgroupPath != "" && d.sockhash != nil {
		err := link.RawDetachProgram(link.RawDetachProgramOptions{Target: d.sockhash.FD(), Program: d.skMsg, Attach: ebpf.AttachSkMsgVerdict})
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("detach sk_msg: %w", err))
		}
	}
	errs = append(errs, d.Close())
	errs = append(errs, RemovePins(d.cfg.BPFFSRoot))
	return errors.Join(errs...)
}

// RemovePins unpins every link, program and map under root, detaching the
// links' programs, and removes the directory. It works without a loaded
// Datapath, so a cleanup can run even when loading fails.
func RemovePins(root string) error {
	var errs []error
	entries, _ := os.ReadDir(linksDir(root))
	for _, e := range entries {
		path := filepath.Join(linksDir(root), e.Name())
		if l, err := link.LoadPinnedLink(path, nil); err == nil {
			if err := l.Unpin(); err != nil {
				errs = append(errs, fmt.Errorf("unpin link %s: %w", path, err))
			}
			// Closing the last reference to an unpinned link detaches it.
			l.Close()
			continue
		}
		if err := os.Remove(path); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", path, err))
		}
	}
	if err := os.RemoveAll(root); err != nil {
		errs = append(errs, fmt.Errorf("remove bpffs root %s: %w", root, err))
	}
	return errors.Join(errs...)
}
