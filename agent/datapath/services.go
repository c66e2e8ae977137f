package datapath

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/veilmesh/veil/agent/nsthread"
)

// Services: socket-level load balancing of ClusterIP Services. The cgroup
// socket programs (bpf/bpf_sock.c, bpf/lib/lb.h) connect an application's
// socket straight to a backend, so every packet after the connect is plain
// pod-to-pod traffic that policy judges by the backend's identity.

// ServiceKey is a Service address as clients use it.
type ServiceKey struct {
	VIP   netip.Addr // an IPv4 address
	Port  uint16
	Proto uint8 // IPPROTO_TCP, IPPROTO_UDP or IPPROTO_SCTP
	// External: a frontend for traffic from outside the node, translated
	// on the packet path when Config.NodePort is on, never by the socket
	// hooks: a NodePort (VIP 0.0.0.0: any address of this node), a
	// LoadBalancer ingress IP or an external IP.
	External bool
}

// NodePortVIP is the VIP of a NodePort's ServiceKey: any address of the node.
var NodePortVIP = netip.IPv4Unspecified()

func (k ServiceKey) String() string {
	s := fmt.Sprintf("%s/%s", netip.AddrPortFrom(k.VIP, k.Port), protoName(k.Proto))
	switch {
	case k.External && k.VIP == NodePortVIP:
		return fmt.Sprintf("nodeport %d/%s", k.Port, protoName(k.Proto))
	case k.External:
		return "external " + s
	}
	return s
}

func (k ServiceKey) scope() uint8 {
	if k.External {
		return uint8(podLbScopeLB_SCOPE_EXTERNAL)
	}
	return uint8(podLbScopeLB_SCOPE_CLUSTER)
}

// Service is a Service address and the endpoints that can serve it.
type Service struct {
	ServiceKey
	// Backends that can serve. Terminating ones are used only while no
	// other backend is left; without any, a client's connect or send
	// fails at once with ECONNREFUSED.
	Backends []Backend
	// Affinity, when not zero, is sessionAffinity ClientIP's timeout: a
	// client (a network namespace) is sent to the backend it last used as
	// long as that backend is still there and the client used it within
	// Affinity. Whole seconds, at most MaxAffinity.
	Affinity time.Duration
}

// MaxAffinity is the longest session affinity timeout Kubernetes accepts
// (a day).
const MaxAffinity = 86400 * time.Second

// Backend is one endpoint of a Service.
type Backend struct {
	IP   netip.Addr // an IPv4 address
	Port uint16
	// Terminating: the endpoint still serves but is going away
	// (EndpointSlice condition serving without ready).
	Terminating bool
}

// lbState holds the Services' maps, programs and allocated service ids.
type lbState struct {
	services, backends, revnat                 *ebpf.Map
	members, affinity, flows, stats            *ebpf.Map
	connect4, sendmsg4, recvmsg4, getpeername4 *ebpf.Program
	connect6, sendmsg6, recvmsg6, getpeername6 *ebpf.Program

	mu sync.Mutex
	// ids are the service ids in use (a service's backend slots are
	// id<<1 and id<<1|1); nil until read back from the pinned map.
	ids map[uint32]bool
	// next is where the search for a free id starts.
	next uint32
}

func (lb *lbState) maps() map[string]**ebpf.Map {
	return map[string]**ebpf.Map{
		"veil_lb4_services": &lb.services, "veil_lb4_backends": &lb.backends, "veil_lb4_revnat": &lb.revnat,
		"veil_lb4_members": &lb.members, "veil_lb4_affinity": &lb.affinity,
		"veil_lb4_flows": &lb.flows, "veil_lb4_stats": &lb.stats,
	}
}

// hooks lists the cgroup programs with their attach points; the name is
// the program's in the object and, without its prefix, its link pin's.
func (lb *lbState) hooks() []struct {
	name   string
	attach ebpf.AttachType
	prog   **ebpf.Program
} {
	return []struct {
		name   string
		attach ebpf.AttachType
		prog   **ebpf.Program
	}{
		{"veil_connect4", ebpf.AttachCGroupInet4Connect, &lb.connect4},
		{"veil_sendmsg4", ebpf.AttachCGroupUDP4Sendmsg, &lb.sendmsg4},
		{"veil_recvmsg4", ebpf.AttachCGroupUDP4Recvmsg, &lb.recvmsg4},
		{"veil_getpeername4", ebpf.AttachCgroupInet4GetPeername, &lb.getpeername4},
		{"veil_connect6", ebpf.AttachCGroupInet6Connect, &lb.connect6},
		{"veil_sendmsg6", ebpf.AttachCGroupUDP6Sendmsg, &lb.sendmsg6},
		{"veil_recvmsg6", ebpf.AttachCGroupUDP6Recvmsg, &lb.recvmsg6},
		{"veil_getpeername6", ebpf.AttachCgroupInet6GetPeername, &lb.getpeername6},
	}
}

func (lb *lbState) progs() map[string]**ebpf.Program {
	m := map[string]**ebpf.Program{}
	for _, h := range lb.hooks() {
		m[h.name] = h.prog
	}
	return m
}

// attachServices attaches the Service hooks to the sockets' cgroup, or
// re-points their pinned links at the freshly loaded programs, so the cgroup
// is never without them across an agent restart.
func (d *Datapath) attachServices() error {
	for _, h := range d.lb.hooks() {
		pin := filepath.Join(linksDir(d.cfg.BPFFSRoot), "cgroup_"+h.name[len("veil_"):])
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			err = l.Update(*h.prog)
			l.Close()
			if err != nil {
				return fmt.Errorf("update pinned %s link: %w", h.name, err)
			}
			continue
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: d.cfg.CgroupPath, Attach: h.attach, Program: *h.prog})
		if err != nil {
			return fmt.Errorf("attach %s to cgroup %s: %w", h.name, d.cfg.CgroupPath, err)
		}
		err = l.Pin(pin)
		l.Close()
		if err != nil {
			return fmt.Errorf("pin %s link: %w", h.name, err)
		}
	}
	return nil
}

func lbKey(k ServiceKey) (sockLb4Key, error) {
	if !k.VIP.Is4() {
		return sockLb4Key{}, fmt.Errorf("service %s: only IPv4 service addresses are supported", k)
	}
	return sockLb4Key{Vip: ip4ToU32(k.VIP), Port: be16(k.Port), Proto: k.Proto, Pad: k.scope()}, nil
}

// activeBackends are the backends clients are sent to: the ready ones, or
// the terminating ones when no ready one is left.
func activeBackends(all []Backend) []Backend {
	var ready, terminating []Backend
	for _, b := range all {
		if b.Terminating {
			terminating = append(terminating, b)
		} else {
			ready = append(ready, b)
		}
	}
	if len(ready) > 0 {
		return ready
	}
	return terminating
}

// UpsertService creates or replaces a Service. The replacement is atomic
// for the socket programs: the new backends are written to the generation
// the service does not use, then the service entry switches to it in one
// update. A connect sees the old set or the new one, never a mix.
func (d *Datapath) UpsertService(s Service) (retErr error) {
	key, err := lbKey(s.ServiceKey)
	if err != nil {
		return err
	}
	if s.Affinity < 0 || s.Affinity > MaxAffinity || s.Affinity%time.Second != 0 {
		return fmt.Errorf("service %s: session affinity timeout %s: want whole seconds up to %s", s.ServiceKey, s.Affinity, MaxAffinity)
	}
	backends := activeBackends(s.Backends)
	for _, b := range backends {
		if !b.IP.Is4() {
			return fmt.Errorf("service %s: backend %s is not an IPv4 address", s.ServiceKey, b.IP)
		}
	}
	lb := &d.lb
	lb.mu.Lock()
	defer lb.mu.Unlock()
	if err := lb.loadIDs(); err != nil {
		return err
	}
	var cur sockLb4Service
	var slot uint32
	switch err := lb.services.Lookup(&key, &cur); {
	case err == nil:
		slot = cur.Slot ^ 1
	case errors.Is(err, ebpf.ErrKeyNotExist):
		id, err := lb.allocID()
		if err != nil {
			return fmt.Errorf("upsert service %s: %w", s.ServiceKey, err)
		}
		slot = id << 1
		// A new Service that cannot be written (a full map) leaves
		// neither backends nor its id behind.
		defer func() {
			if retErr != nil {
				retErr = errors.Join(retErr, lb.clearMembers(slot), lb.trim(slot, 0))
				delete(lb.ids, id)
			}
		}()
	default:
		return fmt.Errorf("look up service %s: %w", s.ServiceKey, err)
	}
	// The generation being written is the one before the current: its
	// members are of that older set.
	if err := lb.clearMembers(slot); err != nil {
		return fmt.Errorf("upsert service %s: %w", s.ServiceKey, err)
	}
	for i, b := range backends {
		v := sockLb4Backend{Ip: ip4ToU32(b.IP), Port: be16(b.Port)}
		if b.Terminating {
			v.Flags = uint16(sockLbBackendFlagsLB_BACKEND_F_TERMINATING)
		}
		if err := putLB(lb.backends, fmt.Sprintf("backend %d of service %s", i, s.ServiceKey), sockLb4BackendKey{Slot: slot, Index: uint32(i)}, v); err != nil {
			return err
		}
		if s.Affinity == 0 {
			continue
		}
		if err := putLB(lb.members, fmt.Sprintf("member %d of service %s", i, s.ServiceKey), sockLb4MemberKey{Slot: slot, Ip: v.Ip, Port: v.Port}, uint32(i)); err != nil {
			return err
		}
	}
	if err := lb.trim(slot, len(backends)); err != nil {
		return fmt.Errorf("upsert service %s: %w", s.ServiceKey, err)
	}
	val := sockLb4Service{Slot: slot, Count: uint32(len(backends)), AffinityS: uint32(s.Affinity / time.Second)}
	return putLB(lb.services, "service "+s.ServiceKey.String(), key, val)
}

// DeleteService removes a Service; its address is left to the network
// again. Deleting a Service that does not exist is not an error.
func (d *Datapath) DeleteService(k ServiceKey) error {
	key, err := lbKey(k)
	if err != nil {
		return err
	}
	lb := &d.lb
	lb.mu.Lock()
	defer lb.mu.Unlock()
	if err := lb.loadIDs(); err != nil {
		return err
	}
	var cur sockLb4Service
	if err := lb.services.Lookup(&key, &cur); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		return fmt.Errorf("look up service %s: %w", k, err)
	}
	if err := lb.services.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete service %s: %w", k, err)
	}
	if err := errors.Join(lb.clearMembers(cur.Slot), lb.clearMembers(cur.Slot^1),
		lb.trim(cur.Slot, 0), lb.trim(cur.Slot^1, 0)); err != nil {
		return fmt.Errorf("delete service %s: %w", k, err)
	}
	delete(lb.ids, cur.Slot>>1)
	return nil
}

// Services reads back every Service with the backends clients are sent to,
// ordered by address.
func (d *Datapath) Services() ([]Service, error) {
	lb := &d.lb
	lb.mu.Lock()
	defer lb.mu.Unlock()
	var (
		out []Service
		key sockLb4Key
		val sockLb4Service
	)
	it := lb.services.Iterate()
	for it.Next(&key, &val) {
		s := Service{
			ServiceKey: ServiceKey{VIP: u32ToIP4(key.Vip), Port: fromBE16(key.Port), Proto: key.Proto,
				External: key.Pad == uint8(podLbScopeLB_SCOPE_EXTERNAL)},
			Affinity: time.Duration(val.AffinityS) * time.Second,
		}
		for i := uint32(0); i < val.Count; i++ {
			var b sockLb4Backend
			if err := lb.backends.Lookup(sockLb4BackendKey{Slot: val.Slot, Index: i}, &b); err != nil {
				return nil, fmt.Errorf("read backend %d of service %s: %w", i, s.ServiceKey, err)
			}
			s.Backends = append(s.Backends, Backend{
				IP: u32ToIP4(b.Ip), Port: fromBE16(b.Port),
				Terminating: b.Flags&uint16(sockLbBackendFlagsLB_BACKEND_F_TERMINATING) != 0,
			})
		}
		out = append(out, s)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list services: %w", err)
	}
	slices.SortFunc(out, func(a, b Service) int {
		return cmp.Or(a.VIP.Compare(b.VIP), cmp.Compare(a.Port, b.Port), cmp.Compare(a.Proto, b.Proto),
			cmp.Compare(a.scope(), b.scope()))
	})
	return out, nil
}

// loadIDs reads the ids in use from the pinned services map, once: a
// restarted agent keeps the services it finds.
func (lb *lbState) loadIDs() error {
	if lb.ids != nil {
		return nil
	}
	ids := map[uint32]bool{}
	var (
		key sockLb4Key
		val sockLb4Service
	)
	it := lb.services.Iterate()
	for it.Next(&key, &val) {
		ids[val.Slot>>1] = true
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read service ids: %w", err)
	}
	lb.ids = ids
	return nil
}

// maxServiceID keeps id<<1|1 within 32 bits.
const maxServiceID = 1<<31 - 1

func (lb *lbState) allocID() (uint32, error) {
	if len(lb.ids) >= maxServiceID {
		return 0, errors.New("no free service id")
	}
	for {
		lb.next = lb.next%maxServiceID + 1
		if !lb.ids[lb.next] {
			lb.ids[lb.next] = true
			return lb.next, nil
		}
	}
}

// trim deletes the backends of slot from index from on; a generation's
// backends are contiguous from 0.
func (lb *lbState) trim(slot uint32, from int) error {
	for i := uint32(from); ; i++ {
		err := lb.backends.Delete(sockLb4BackendKey{Slot: slot, Index: i})
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("delete backend %d of slot %d: %w", i, slot, err)
		}
	}
}

// ErrServiceMapFull is returned (wrapped) when a Service map has no room
// for another entry.
var ErrServiceMapFull = errors.New("service map full")

// putLB writes one entry of a Service map, telling a full map apart.
func putLB(m *ebpf.Map, what string, key, val any) error {
	err := m.Put(key, val)
	if errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOMEM) {
		return fmt.Errorf("write %s: %w (%d entries): %w", what, ErrServiceMapFull, m.MaxEntries(), err)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", what, err)
	}
	return nil
}

// ServiceStats are the socket programs' translation counters.
type ServiceStats struct {
	// Translated counts connects and sends sent to a backend.
	Translated uint64
	// Refused counts connects and sends refused for want of a backend.
	Refused uint64
}

// ServiceStats sums the translation counters over CPUs.
func (d *Datapath) ServiceStats() (ServiceStats, error) {
	sum := func(k sockLbStat) (uint64, error) {
		var per []uint64
		if err := d.lb.stats.Lookup(uint32(k), &per); err != nil {
			return 0, fmt.Errorf("read service counter %d: %w", k, err)
		}
		var n uint64
		for _, v := range per {
			n += v
		}
		return n, nil
	}
	t, err := sum(sockLbStatLB_STAT_TRANSLATED)
	if err != nil {
		return ServiceStats{}, err
	}
	r, err := sum(sockLbStatLB_STAT_REFUSED)
	return ServiceStats{Translated: t, Refused: r}, err
}

// ServiceTranslation is the last time a client was sent to a backend in
// place of a Service.
type ServiceTranslation struct {
	// Service is the address the client asked for.
	Service netip.AddrPort
	// Age is how long ago.
	Age time.Duration
}

// LastTranslation looks up the last translation of client (a network
// namespace cookie, see NetnsCookie) to backend; ok is false when there
// was none (or it was evicted: the map keeps the newest 65536).
func (d *Datapath) LastTranslation(netns uint64, backend netip.AddrPort, proto uint8) (ServiceTranslation, bool, error) {
	if !backend.Addr().Is4() {
		return ServiceTranslation{}, false, nil
	}
	key := sockLb4FlowKey{Netns: netns, Ip: ip4ToU32(backend.Addr()), Port: be16(backend.Port()), Proto: proto}
	var v sockLb4Flow
	if err := d.lb.flows.Lookup(&key, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return ServiceTranslation{}, false, nil
		}
		return ServiceTranslation{}, false, fmt.Errorf("look up translation to %s: %w", backend, err)
	}
	var now unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &now); err != nil {
		return ServiceTranslation{}, false, fmt.Errorf("read the monotonic clock: %w", err)
	}
	return ServiceTranslation{
		Service: netip.AddrPortFrom(u32ToIP4(v.Vip), fromBE16(v.Port)),
		Age:     max(time.Duration(now.Nano()-int64(v.TimeNs)), 0),
	}, true, nil
}

// NetnsCookie is the cookie the kernel gives the network namespace at path
// (the socket programs key clients by it): read with SO_NETNS_COOKIE from a
// socket made in that namespace.
func NetnsCookie(path string) (uint64, error) {
	var cookie uint64
	err := nsthread.DoPath(path, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open socket: %w", err)
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		if err != nil {
			return fmt.Errorf("read netns cookie: %w", err)
		}
		return nil
	})
	return cookie, err
}

// clearMembers deletes the member entries of slot's backends; a slot's
// backends are contiguous from 0.
func (lb *lbState) clearMembers(slot uint32) error {
	for i := uint32(0); ; i++ {
		var b sockLb4Backend
		err := lb.backends.Lookup(sockLb4BackendKey{Slot: slot, Index: i}, &b)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read backend %d of slot %d: %w", i, slot, err)
		}
		err = lb.members.Delete(sockLb4MemberKey{Slot: slot, Ip: b.Ip, Port: b.Port})
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete member %d of slot %d: %w", i, slot, err)
		}
	}
}

func protoName(p uint8) string {
	switch p {
	case 6:
		return "TCP"
	case 17:
		return "UDP"
	case 132:
		return "SCTP"
	}
	return fmt.Sprint(p)
}
