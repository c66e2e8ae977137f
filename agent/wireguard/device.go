package wireguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
)

// Mode names which WireGuard implementation runs a device.
type Mode string

const (
	ModeAuto      Mode = ""                                         // kernel if the kernel has WireGuard, else userspace
	ModeKernel    Mode = Mode(meshv1alpha1.EncryptionModeKernel)    // the kernel module
	ModeUserspace Mode = Mode(meshv1alpha1.EncryptionModeUserspace) // golang.zx2c4.com/wireguard in this process
)

const (
	// DefaultListenPort is WireGuard's customary port.
	DefaultListenPort = 51820
	// DefaultKeepalive keeps NAT and conntrack state alive between nodes and
	// lets a handshake happen before the first packet needs it.
	DefaultKeepalive = 25 * time.Second
	// DefaultMTU fits a 1500-byte underlay (see PodMTU).
	DefaultMTU = 1500 - Overhead
)

// Config describes the device to open. Zero values take the defaults.
type Config struct {
	Interface  string // required, e.g. "veil-wg"
	ListenPort int    // UDP port on the underlay; 0 = DefaultListenPort
	PrivateKey Key    // required; RotateKey writes its successor to the same file
	MTU        int    // 0 = DefaultMTU
	// Keepalive is every peer's persistent keepalive: 0 = DefaultKeepalive,
	// negative = off.
	Keepalive time.Duration
	// FirewallMark marks the device's UDP packets so that the datapath can
	// tell them from traffic that still needs encrypting; 0 = none.
	FirewallMark int
	// Mode forces an implementation; ModeAuto (the default) prefers the
	// kernel and falls back to userspace only when the kernel lacks WireGuard.
	Mode   Mode
	Logger *slog.Logger // nil = slog.Default()
}

// Peer is another node as this device should know it.
type Peer struct {
	PublicKey  wgtypes.Key
	Endpoint   netip.AddrPort
	AllowedIPs []netip.Prefix
	// Node is the peer's node name (for status; WireGuard ignores it).
	Node string
}

// Device is a WireGuard interface configured only through wgctrl, whichever
// implementation runs it, so that `wg show` and the agent see the same thing.
type Device struct {
	cfg       Config
	mode      Mode
	log       *slog.Logger
	ns        netns.NsHandle  // the namespace the device lives in
	nl        *netlink.Handle // bound to ns, usable from any thread
	wg        *wgctrl.Client  // its netlink socket was opened inside ns
	keepalive time.Duration

	mu     sync.Mutex // serialises configuration changes and Close
	key    Key
	us     *userspace // nil in kernel mode
	closed bool
	// adopted: the kernel device existed before Open (an agent restart);
	// a failed Open leaves it in place rather than cut its sessions.
	adopted bool
}

// Open creates the device in the network namespace of the calling thread
// (lock the thread and switch it before calling; the device keeps working
// after that thread is gone), sets its key, port and MTU, and brings it up.
// In ModeAuto, an interface of the same name that is already a kernel
// WireGuard device is adopted, so that an agent restart keeps its sessions.
func Open(ctx context.Context, cfg Config) (*Device, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("open wireguard device %s: %w", cfg.Interface, err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("interface", cfg.Interface)

	// Every step below uses this thread's namespace; pin the goroutine to it
	// so that a caller who locked a thread into a namespace gets the device
	// there (LockOSThread nests, so the caller's lock survives).
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	d := &Device{cfg: cfg, log: log, key: cfg.PrivateKey, keepalive: cfg.keepalive()}
	ok := false
	defer func() {
		if !ok {
			d.release()
		}
	}()
	var err error
	if d.ns, err = netns.Get(); err != nil {
		return nil, fmt.Errorf("open wireguard device %s: get network namespace: %w", cfg.Interface, err)
	}
	if d.nl, err = netlink.NewHandleAt(d.ns); err != nil {
		return nil, fmt.Errorf("open wireguard device %s: netlink: %w", cfg.Interface, err)
	}
	if d.wg, err = wgctrl.New(); err != nil {
		return nil, fmt.Errorf("open wireguard device %s: wgctrl: %w", cfg.Interface, err)
	}

	switch cfg.Mode {
	case ModeKernel:
		err = d.openKernel()
	case ModeUserspace:
		err = d.openUserspace()
	default:
		err = d.openKernel()
		if err != nil && kernelUnsupported(err) {
			log.Info("kernel has no WireGuard, using the userspace implementation", "reason", err)
			err = d.openUserspace()
		}
	}
	if err != nil {
		return nil, err
	}
	if err := d.configure(); err != nil {
		if !d.adopted {
			d.removeLink()
		}
		return nil, err
	}
	ok = true
	log.Info("wireguard device open", "mode", d.mode, "listen_port", cfg.listenPort(), "mtu", cfg.mtu(), "key", d.key)
	return d, nil
}

func (c *Config) validate() error {
	if c.Interface == "" || len(c.Interface) >= unix.IFNAMSIZ {
		return fmt.Errorf("open wireguard device: interface name %q must have 1 to %d characters", c.Interface, unix.IFNAMSIZ-1)
	}
	if c.PrivateKey.IsZero() {
		return fmt.Errorf("open wireguard device %s: no private key", c.Interface)
	}
	if c.ListenPort < 0 || c.ListenPort > 65535 {
		return fmt.Errorf("open wireguard device %s: listen port %d out of range", c.Interface, c.ListenPort)
	}
	if c.MTU != 0 && (c.MTU < MinMTU || c.MTU > 65535) {
		return fmt.Errorf("open wireguard device %s: MTU %d out of range [%d, 65535]", c.Interface, c.MTU, MinMTU)
	}
	switch c.Mode {
	case ModeAuto, ModeKernel, ModeUserspace:
	default:
		return fmt.Errorf("open wireguard device %s: unknown mode %q", c.Interface, c.Mode)
	}
	return nil
}

func (c *Config) listenPort() int {
	if c.ListenPort == 0 {
		return DefaultListenPort
	}
	return c.ListenPort
}

func (c *Config) mtu() int {
	if c.MTU == 0 {
		return DefaultMTU
	}
	return c.MTU
}

func (c *Config) keepalive() time.Duration {
	switch {
	case c.Keepalive == 0:
		return DefaultKeepalive
	case c.Keepalive < 0:
		return 0
	}
	return c.Keepalive
}

// kernelUnsupported tells "this kernel has no WireGuard" (the only reason to
// fall back to userspace) from every other failure, which must surface:
// falling back on, say, EPERM would hide a misconfigured agent.
func kernelUnsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTSUP)
}

func (d *Device) openKernel() error {
	name := d.cfg.Interface
	link := &netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: d.cfg.mtu()}}
	err := d.nl.LinkAdd(link)
	if errors.Is(err, unix.EEXIST) {
		existing, lerr := d.nl.LinkByName(name)
		if lerr != nil {
			return fmt.Errorf("open wireguard device %s: exists but cannot be read: %w", name, lerr)
		}
		if existing.Type() != "wireguard" {
			return fmt.Errorf("open wireguard device %s: an interface of type %q already has that name", name, existing.Type())
		}
		d.log.Info("adopting existing kernel wireguard device")
		d.adopted, err = true, nil
	}
	if err != nil {
		return fmt.Errorf("open wireguard device %s: add kernel link: %w", name, err)
	}
	d.mode = ModeKernel
	return nil
}

// configure applies key, port and MTU through wgctrl and netlink, and brings
// the link up. Peers already on an adopted device are left for SetPeers.
func (d *Device) configure() error {
	name := d.cfg.Interface
	port := d.cfg.listenPort()
	priv := d.key.PrivateKey()
	wc := wgtypes.Config{PrivateKey: &priv, ListenPort: &port}
	if d.cfg.FirewallMark != 0 {
		wc.FirewallMark = &d.cfg.FirewallMark
	}
	if err := d.wg.ConfigureDevice(name, wc); err != nil {
		return fmt.Errorf("configure wireguard device %s: %w", name, err)
	}
	link, err := d.nl.LinkByName(name)
	if err != nil {
		return fmt.Errorf("configure wireguard device %s: %w", name, err)
	}
	if link.Attrs().MTU != d.cfg.mtu() {
		if err := d.nl.LinkSetMTU(link, d.cfg.mtu()); err != nil {
			return fmt.Errorf("configure wireguard device %s: set MTU %d: %w", name, d.cfg.mtu(), err)
		}
	}
	if err := d.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("configure wireguard device %s: set up: %w", name, err)
	}
	if d.us != nil {
		// The TUN reports "up" asynchronously; bringing the device up now
		// means the UDP socket exists when Open returns.
		if err := d.us.dev.Up(); err != nil {
			return fmt.Errorf("configure wireguard device %s: start: %w", name, err)
		}
	}
	return nil
}

// Mode is the implementation running the device: "kernel" or "userspace".
func (d *Device) Mode() Mode { return d.mode }

// Interface is the device's name.
func (d *Device) Interface() string { return d.cfg.Interface }

// Key is the device's current key.
func (d *Device) Key() Key {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.key
}

// SetPeers makes the device's peers exactly peers. Only what differs is sent
// to the device, so unchanged peers keep their sessions, and a peer whose
// endpoint or allowed IPs changed is updated in place without a new
// handshake. Removals go first so that a prefix moving between peers is never
// refused.
func (d *Device) SetPeers(ctx context.Context, peers []Peer) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("set wireguard peers on %s: %w", d.cfg.Interface, net.ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("set wireguard peers on %s: %w", d.cfg.Interface, err)
	}
	want := make(map[wgtypes.Key]Peer, len(peers))
	for _, p := range peers {
		if p.PublicKey == (wgtypes.Key{}) {
			return fmt.Errorf("set wireguard peers on %s: peer with empty public key", d.cfg.Interface)
		}
		if p.PublicKey == d.key.PublicKey() {
			return fmt.Errorf("set wireguard peers on %s: peer %s is this device's own key", d.cfg.Interface, Fingerprint(p.PublicKey))
		}
		if _, dup := want[p.PublicKey]; dup {
			return fmt.Errorf("set wireguard peers on %s: peer %s listed twice", d.cfg.Interface, Fingerprint(p.PublicKey))
		}
		if !p.Endpoint.IsValid() || p.Endpoint.Port() == 0 {
			return fmt.Errorf("set wireguard peers on %s: peer %s has no endpoint", d.cfg.Interface, Fingerprint(p.PublicKey))
		}
		for _, a := range p.AllowedIPs {
			if !a.IsValid() {
				return fmt.Errorf("set wireguard peers on %s: peer %s has an invalid allowed IP", d.cfg.Interface, Fingerprint(p.PublicKey))
			}
		}
		want[p.PublicKey] = p
	}
	cur, err := d.wg.Device(d.cfg.Interface)
	if err != nil {
		return fmt.Errorf("set wireguard peers on %s: read device: %w", d.cfg.Interface, err)
	}
	changes := diffPeers(cur.Peers, peers, d.keepalive)
	if len(changes) == 0 {
		return nil
	}
	if err := d.wg.ConfigureDevice(d.cfg.Interface, wgtypes.Config{Peers: changes}); err != nil {
		return fmt.Errorf("set wireguard peers on %s: %w", d.cfg.Interface, err)
	}
	d.log.Debug("wireguard peers updated", "peers", len(peers), "changes", len(changes))
	return nil
}

// diffPeers returns the peer configs that turn cur into want: removals of
// vanished peers, then adds and in-place updates of changed ones.
func diffPeers(cur []wgtypes.Peer, want []Peer, keepalive time.Duration) []wgtypes.PeerConfig {
	wantBy := make(map[wgtypes.Key]Peer, len(want))
	for _, p := range want {
		wantBy[p.PublicKey] = p
	}
	curBy := make(map[wgtypes.Key]wgtypes.Peer, len(cur))
	var out []wgtypes.PeerConfig
	for _, c := range cur {
		curBy[c.PublicKey] = c
		if _, ok := wantBy[c.PublicKey]; !ok {
			out = append(out, wgtypes.PeerConfig{PublicKey: c.PublicKey, Remove: true})
		}
	}
	// Stable order keeps configuration and tests deterministic.
	sorted := slices.Clone(want)
	slices.SortFunc(sorted, func(a, b Peer) int { return slices.Compare(a.PublicKey[:], b.PublicKey[:]) })
	for _, p := range sorted {
		c, exists := curBy[p.PublicKey]
		if exists && samePeer(c, p, keepalive) {
			continue
		}
		ka := keepalive
		pc := wgtypes.PeerConfig{
			PublicKey:                   p.PublicKey,
			Endpoint:                    net.UDPAddrFromAddrPort(p.Endpoint),
			PersistentKeepaliveInterval: &ka,
			ReplaceAllowedIPs:           true,
			AllowedIPs:                  toIPNets(p.AllowedIPs),
			// A peer that exists is changed in place (its session and
			// counters stay); should it vanish meanwhile it is not
			// re-created from a stale view.
			UpdateOnly: exists,
		}
		out = append(out, pc)
	}
	return out
}

func samePeer(c wgtypes.Peer, p Peer, keepalive time.Duration) bool {
	if c.PersistentKeepaliveInterval != keepalive {
		return false
	}
	if c.Endpoint == nil || c.Endpoint.AddrPort() != unmapAddrPort(p.Endpoint) {
		return false
	}
	return slices.Equal(canonPrefixes(fromIPNets(c.AllowedIPs)), canonPrefixes(p.AllowedIPs))
}

func unmapAddrPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func canonPrefixes(ps []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(ps))
	for _, p := range ps {
		out = append(out, netip.PrefixFrom(p.Addr().Unmap(), p.Bits()).Masked())
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(out)
}

func toIPNets(ps []netip.Prefix) []net.IPNet {
	out := make([]net.IPNet, 0, len(ps))
	for _, p := range ps {
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()).Masked()
		out = append(out, net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())})
	}
	return out
}

func fromIPNets(ns []net.IPNet) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(ns))
	for _, n := range ns {
		a, ok := netip.AddrFromSlice(n.IP)
		if !ok {
			continue
		}
		ones, _ := n.Mask.Size()
		out = append(out, netip.PrefixFrom(a.Unmap(), ones))
	}
	return out
}

// RotateKey gives the device a new private key, stored in place of the old
// one (which is kept until Key.ConfirmRotation), and returns it. Sessions are
// expired at once: traffic to a peer resumes when that peer has the new
// public key and handshakes again, so the caller must republish the
// annotation straight away (see the package documentation for the whole
// sequence). If the device refuses the key, the file is rolled back.
func (d *Device) RotateKey(ctx context.Context) (Key, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return Key{}, fmt.Errorf("rotate wireguard key on %s: %w", d.cfg.Interface, net.ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return Key{}, fmt.Errorf("rotate wireguard key on %s: %w", d.cfg.Interface, err)
	}
	next, err := d.key.Rotate()
	if err != nil {
		return Key{}, fmt.Errorf("rotate wireguard key on %s: %w", d.cfg.Interface, err)
	}
	priv := next.PrivateKey()
	if err := d.wg.ConfigureDevice(d.cfg.Interface, wgtypes.Config{PrivateKey: &priv}); err != nil {
		err = fmt.Errorf("rotate wireguard key on %s: set key: %w", d.cfg.Interface, err)
		if next.Path() != "" {
			if _, rerr := next.RollbackRotation(); rerr != nil {
				err = errors.Join(err, rerr)
			}
		}
		return Key{}, err
	}
	d.log.Info("wireguard key rotated", "old", d.key, "new", next)
	d.key = next
	return next, nil
}

// Status is what the device reports about itself and its peers.
type Status struct {
	Mode        Mode          `json:"mode"`
	Interface   string        `json:"interface"`
	PublicKey   string        `json:"publicKey"`
	Fingerprint string        `json:"fingerprint"`
	KeyCreated  time.Time     `json:"keyCreated"`
	KeyAge      time.Duration `json:"keyAge"`
	// RotationPending: a previous key is still kept (see Key.Rotate).
	RotationPending bool         `json:"rotationPending,omitempty"`
	ListenPort      int          `json:"listenPort"`
	FirewallMark    int          `json:"firewallMark,omitempty"`
	Peers           []PeerStatus `json:"peers"`
}

// PeerStatus is one peer as the device sees it. LastHandshake is zero before
// the first handshake.
type PeerStatus struct {
	PublicKey     string         `json:"publicKey"`
	Fingerprint   string         `json:"fingerprint"`
	Endpoint      netip.AddrPort `json:"endpoint"`
	AllowedIPs    []netip.Prefix `json:"allowedIPs"`
	LastHandshake time.Time      `json:"lastHandshake"`
	Keepalive     time.Duration  `json:"keepalive"`
	RxBytes       int64          `json:"rxBytes"`
	TxBytes       int64          `json:"txBytes"`
}

// Status reads the device through wgctrl, so it reports what the
// implementation actually has, not what was last asked for.
func (d *Device) Status(ctx context.Context) (Status, error) {
	d.mu.Lock()
	key, closed := d.key, d.closed
	d.mu.Unlock()
	if closed {
		return Status{}, fmt.Errorf("wireguard status of %s: %w", d.cfg.Interface, net.ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return Status{}, fmt.Errorf("wireguard status of %s: %w", d.cfg.Interface, err)
	}
	dev, err := d.wg.Device(d.cfg.Interface)
	if err != nil {
		return Status{}, fmt.Errorf("wireguard status of %s: %w", d.cfg.Interface, err)
	}
	st := Status{
		Mode:            d.mode,
		Interface:       dev.Name,
		PublicKey:       dev.PublicKey.String(),
		Fingerprint:     Fingerprint(dev.PublicKey),
		ListenPort:      dev.ListenPort,
		FirewallMark:    dev.FirewallMark,
		RotationPending: key.RotationPending(),
		Peers:           make([]PeerStatus, 0, len(dev.Peers)),
	}
	// The key age is only meaningful for the key the device really uses.
	if dev.PublicKey == key.PublicKey() {
		st.KeyCreated = key.Created()
		st.KeyAge = time.Since(key.Created()).Round(time.Second)
	}
	for _, p := range dev.Peers {
		ps := PeerStatus{
			PublicKey:   p.PublicKey.String(),
			Fingerprint: Fingerprint(p.PublicKey),
			AllowedIPs:  canonPrefixes(fromIPNets(p.AllowedIPs)),
			Keepalive:   p.PersistentKeepaliveInterval,
			RxBytes:     p.ReceiveBytes,
			TxBytes:     p.TransmitBytes,
		}
		if p.Endpoint != nil {
			ps.Endpoint = unmapAddrPort(p.Endpoint.AddrPort())
		}
		if !p.LastHandshakeTime.IsZero() && p.LastHandshakeTime.Unix() > 0 {
			ps.LastHandshake = p.LastHandshakeTime
		}
		st.Peers = append(st.Peers, ps)
	}
	slices.SortFunc(st.Peers, func(a, b PeerStatus) int {
		switch {
		case a.PublicKey < b.PublicKey:
			return -1
		case a.PublicKey > b.PublicKey:
			return 1
		}
		return 0
	})
	return st, nil
}

// Close removes the device: the kernel link, or the userspace device with
// its goroutines, TUN and UAPI socket. Established tunnels end.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	err := d.removeLink()
	return errors.Join(err, d.release())
}

// Release lets go of a kernel device without removing it, so that an agent
// restart keeps the tunnels and their sessions (the next Open adopts it). A
// userspace device cannot outlive its process: Release removes it like
// Close.
func (d *Device) Release() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	var err error
	if d.us != nil {
		err = d.removeLink()
	}
	return errors.Join(err, d.release())
}

func (d *Device) removeLink() error {
	if d.us != nil {
		err := d.us.close()
		d.us = nil
		return err
	}
	if d.mode != ModeKernel || d.nl == nil {
		return nil
	}
	link, err := d.nl.LinkByName(d.cfg.Interface)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("remove wireguard device %s: %w", d.cfg.Interface, err)
	}
	if err := d.nl.LinkDel(link); err != nil {
		return fmt.Errorf("remove wireguard device %s: %w", d.cfg.Interface, err)
	}
	return nil
}

// release closes the handles Open made.
func (d *Device) release() error {
	var errs []error
	if d.us != nil {
		errs = append(errs, d.us.close())
		d.us = nil
	}
	if d.wg != nil {
		errs = append(errs, d.wg.Close())
		d.wg = nil
	}
	if d.nl != nil {
		d.nl.Close()
		d.nl = nil
	}
	if d.ns.IsOpen() {
		errs = append(errs, d.ns.Close())
		d.ns = netns.None()
	}
	return errors.Join(errs...)
}
