package datapath

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/policy/policytypes"
	"github.com/veilmesh/veil/tests/testenv"
)

func TestMain(m *testing.M) {
	netns.MaybeRunHelper()
	MaybeRunSocketHelper()
	maybeRunLoader()
	maybeRunSvcClient()
	os.Exit(m.Run())
}

// Identities used by the tests' pods.
const (
	idA identity.ID = 1000
	idB identity.ID = 1001
	idC identity.ID = 1002
)

var (
	ipA = netip.MustParseAddr("10.244.1.2")
	ipB = netip.MustParseAddr("10.244.1.3")
	ipC = netip.MustParseAddr("10.244.2.2")
	ip1 = netip.MustParseAddr("10.99.0.1")
	ip2 = netip.MustParseAddr("10.99.0.2")
)

// testNet is two nodes joined by an underlay, pods a and b on node 1 and c
// on node 2, each node with its own datapath.
type testNet struct {
	t        testing.TB
	n1, n2   *netns.Node
	a, b, c  *netns.Pod
	dp1, dp2 *Datapath
	root1    string
	root2    string
	cg       *netns.Cgroup
}

type netOpts struct {
	legacyTC bool
	sockets  bool // attach socket acceleration on node 1
	noLoad   bool // leave loading node 1's datapath to the test
	nodePort bool // kube-proxy replacement on node 1 (Config.NodePort)
}

func newTestNet(t testing.TB, name string, o netOpts) *testNet {
	t.Helper()
	testenv.RequirePrivileged(t)
	prefix := fmt.Sprintf("veiltest-%d-%s", os.Getpid(), name)
	tn := &testNet{t: t,
		root1: filepath.Join("/sys/fs/bpf", prefix+"-n1"),
		root2: filepath.Join("/sys/fs/bpf", prefix+"-n2"),
	}
	t.Cleanup(tn.cleanup(prefix))

	var err error
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	tn.n1, err = netns.NewNode(prefix + "-n1")
	must(err)
	tn.n2, err = netns.NewNode(prefix + "-n2")
	must(err)
	must(netns.Connect(tn.n1, tn.n2, "und1", "und2", ip1, ip2))
	tn.a, err = tn.n1.AddPod(prefix+"-a", "veth-a", ipA)
	must(err)
	tn.b, err = tn.n1.AddPod(prefix+"-b", "veth-b", ipB)
	must(err)
	tn.c, err = tn.n2.AddPod(prefix+"-c", "veth-c", ipC)
	must(err)
	if o.sockets {
		tn.cg, err = netns.NewCgroup(prefix)
		must(err)
	}

	if !o.noLoad {
		tn.dp1 = tn.load(tn.n1, tn.config1(o))
		tn.register1(tn.dp1)
	}
	tn.dp2 = tn.load(tn.n2, Config{BPFFSRoot: tn.root2, UnderlayInterface: "und2", NodeIP: ip2, LegacyTC: o.legacyTC})
	must(tn.n2.Do(func() error { return tn.dp2.UpsertEndpoint(endpointOf(tn.c, 3, idC)) }))
	for _, ip := range []netip.Addr{ipA, ipB} {
		id := idA
		if ip == ipB {
			id = idB
		}
		must(tn.dp2.UpsertIPCache(netip.PrefixFrom(ip, 32), IPCacheEntry{Identity: id, NodeIP: ip1, Kind: RemotePod}))
	}
	must(tn.dp2.UpsertIPCache(netip.PrefixFrom(ip1, 32), IPCacheEntry{Identity: identity.RemoteNode, NodeIP: ip1, Kind: NodeAddr}))
	return tn
}

func (tn *testNet) config1(o netOpts) Config {
	cfg := Config{BPFFSRoot: tn.root1, UnderlayInterface: "und1", NodeIP: ip1, LegacyTC: o.legacyTC, NodePort: o.nodePort}
	if tn.cg != nil {
		cfg.CgroupPath = tn.cg.Path
	}
	return cfg
}

// register1 writes node 1's endpoints and ipcache.
func (tn *testNet) register1(dp *Datapath) {
	tn.t.Helper()
	err := tn.n1.Do(func() error {
		return errors.Join(
			dp.UpsertEndpoint(endpointOf(tn.a, 1, idA)),
			dp.UpsertEndpoint(endpointOf(tn.b, 2, idB)),
		)
	})
	if err == nil {
		err = errors.Join(
			dp.UpsertIPCache(netip.PrefixFrom(ipC, 32), IPCacheEntry{Identity: idC, NodeIP: ip2, Kind: RemotePod}),
			dp.UpsertIPCache(netip.MustParsePrefix("10.244.2.0/24"), IPCacheEntry{Identity: identity.World, NodeIP: ip2, Kind: PodCIDR}),
			dp.UpsertIPCache(netip.PrefixFrom(ip2, 32), IPCacheEntry{Identity: identity.RemoteNode, NodeIP: ip2, Kind: NodeAddr}),
		)
	}
	if err != nil {
		tn.t.Fatal(err)
	}
}

func endpointOf(p *netns.Pod, id uint32, ident identity.ID) Endpoint {
	return Endpoint{IP: p.IP, ID: id, Identity: ident, Ifindex: p.HostIfindex, HostMAC: p.HostMAC, MAC: p.MAC}
}

func (tn *testNet) load(n *netns.Node, cfg Config) *Datapath {
	tn.t.Helper()
	var dp *Datapath
	err := n.Do(func() error {
		var err error
		dp, err = Load(cfg)
		return err
	})
	if err != nil {
		tn.t.Fatalf("load datapath in %s: %v", n.Name, err)
	}
	return dp
}

func (tn *testNet) cleanup(prefix string) func() {
	return func() {
		for _, x := range []struct {
			dp   *Datapath
			node *netns.Node
		}{{tn.dp1, tn.n1}, {tn.dp2, tn.n2}} {
			if x.dp != nil && x.node != nil {
				x.node.Do(func() error { return x.dp.Cleanup() })
			}
		}
		for _, root := range []string{tn.root1, tn.root2} {
			if err := RemovePins(root); err != nil {
				tn.t.Errorf("remove pins: %v", err)
			}
		}
		for _, p := range []*netns.Pod{tn.a, tn.b, tn.c} {
			if p != nil {
				p.Delete()
			}
		}
		for _, n := range []*netns.Node{tn.n1, tn.n2} {
			if n != nil {
				n.Delete()
			}
		}
		if tn.cg != nil {
			if err := tn.cg.Delete(); err != nil {
				tn.t.Errorf("cleanup: %v", err)
			}
		}
		if err := netns.CleanupPrefix(prefix); err != nil {
			tn.t.Errorf("cleanup: %v", err)
		}
	}
}

// serveTCP runs an echo server on every port, inside the pod, until the test ends.
func serveTCP(t testing.TB, p *netns.Pod, ports ...int) {
	t.Helper()
	for _, port := range ports {
		var ln net.Listener
		err := p.Do(func() (err error) {
			ln, err = net.Listen("tcp", fmt.Sprintf("%s:%d", p.IP, port))
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					io.Copy(c, c)
				}()
			}
		}()
	}
}

func serveUDP(t testing.TB, p *netns.Pod, ports ...int) {
	t.Helper()
	for _, port := range ports {
		var pc net.PacketConn
		err := p.Do(func() (err error) {
			pc, err = net.ListenPacket("udp", fmt.Sprintf("%s:%d", p.IP, port))
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				n, addr, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(buf[:n], addr)
			}
		}()
	}
}

const probeTimeout = 700 * time.Millisecond

// tcpEcho connects from pod p to addr, optionally from a given local
// address, and checks that a message comes back.
func tcpEcho(p *netns.Pod, addr string, local netip.Addr) error {
	return netns.TCPEchoFrom(&p.Netns, local, addr, probeTimeout)
}

func udpEcho(p *netns.Pod, addr string) error {
	return netns.UDPEcho(&p.Netns, addr, probeTimeout)
}

// sctpReaches sends one raw SCTP packet from p to dst:port and reports
// whether it arrived at the destination pod. The kernel here may have no
// SCTP module, so both ends use raw sockets; the datapath only reads ports.
func sctpReaches(t testing.TB, from, to *netns.Pod, port uint16) bool {
	t.Helper()
	var rfd int
	if err := to.Do(func() (err error) {
		rfd, err = syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, 132)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(rfd)
	tv := syscall.NsecToTimeval(int64(probeTimeout))
	syscall.SetsockoptTimeval(rfd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)

	marker := fmt.Sprintf("sctp-marker-%d-%d", port, time.Now().UnixNano())
	pkt := make([]byte, 12, 12+len(marker))
	pkt[0], pkt[1] = 0x9c, 0x40 // source port 40000
	pkt[2], pkt[3] = byte(port>>8), byte(port)
	pkt = append(pkt, marker...)
	if err := from.Do(func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, 132)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		return syscall.Sendto(fd, pkt, 0, &syscall.SockaddrInet4{Addr: to.IP.As4()})
	}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	deadline := time.Now().Add(probeTimeout)
	for time.Now().Before(deadline) {
		n, _, err := syscall.Recvfrom(rfd, buf, 0)
		if err != nil {
			return false
		}
		if contains(buf[:n], marker) {
			return true
		}
	}
	return false
}

func contains(b []byte, s string) bool {
	for i := 0; i+len(s) <= len(b); i++ {
		if string(b[i:i+len(s)]) == s {
			return true
		}
	}
	return false
}

// Compiled-policy helpers: tiny constructors in the spirit of tailscale's
// filter tests.
func allow(dir policytypes.Direction, id identity.ID, proto uint8, port uint16, plen uint8, rule uint32) policytypes.Entry {
	return policytypes.Entry{Key: policytypes.Key{Direction: dir, Identity: id, Proto: proto, Port: port, PortPrefixLen: plen},
		Enforce: policytypes.Allow, Audit: policytypes.Allow, RuleID: rule}
}

func deny(dir policytypes.Direction, id identity.ID, proto uint8, port uint16, plen uint8, rule uint32) policytypes.Entry {
	e := allow(dir, id, proto, port, plen, rule)
	e.Enforce, e.Audit = policytypes.Deny, policytypes.Deny
	return e
}

var ingressDefaultDeny = policytypes.Defaults{
	IngressEnforce: policytypes.Deny, IngressAudit: policytypes.Deny,
	EgressEnforce: policytypes.Allow, EgressAudit: policytypes.Allow,
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// loader process: used by the restart test to own the datapath in a process
// that can be killed.
const loaderEnv = "VEIL_TEST_LOADER"

type loaderSpec struct {
	Netns     string
	Config    Config
	Endpoints []Endpoint
	Policy    map[netip.Addr][]policytypes.Entry
	Defaults  policytypes.Defaults
}

func maybeRunLoader() {
	raw := os.Getenv(loaderEnv)
	if raw == "" {
		return
	}
	var spec loaderSpec
	if err := json.Unmarshal([]byte(raw), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "loader spec:", err)
		os.Exit(2)
	}
	dp, err := Load(spec.Config)
	if err == nil {
		for _, ep := range spec.Endpoints {
			if err = dp.UpsertEndpoint(ep); err != nil {
				break
			}
		}
	}
	if err == nil {
		for ip, entries := range spec.Policy {
			if err = dp.SetPolicy(ip, entries, spec.Defaults); err != nil {
				break
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loader:", err)
		os.Exit(1)
	}
	on, reason := dp.Acceleration()
	fmt.Printf("acceleration %v %s\n", on, reason)
	fmt.Println("ready")
	select {}
}
