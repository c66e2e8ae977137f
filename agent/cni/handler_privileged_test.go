package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/veilmesh/veil/agent/ipam"
	"github.com/veilmesh/veil/agent/podnet"
	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/tests/testenv"
)

func testNetns(t testing.TB, suffix string) *netns.Netns {
	t.Helper()
	ns, err := netns.NewNetns(fmt.Sprintf("veiltest-%d-cni-%s", os.Getpid(), suffix))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ns.Delete(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return ns
}

// nodeNetns is a node namespace whose default route sits on underlay0
// (MTU 1400, address 10.99.0.1/24).
func nodeNetns(t testing.TB, suffix string) *netns.Netns {
	t.Helper()
	ns := testNetns(t, suffix)
	err := ns.Do(func() error {
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "underlay0", MTU: 1400}, PeerName: "underlay1"}
		if err := netlink.LinkAdd(v); err != nil {
			return err
		}
		for _, name := range []string{"underlay0", "underlay1"} {
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		if err := netlink.AddrAdd(v, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 99, 0, 1), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: v.Attrs().Index, Gw: net.IPv4(10, 99, 0, 254)})
	})
	if err != nil {
		t.Fatalf("prepare node namespace: %v", err)
	}
	return ns
}

// nodeAgent serves the CNI calls in the node namespace, as veil-agent does
// when it runs there: each call runs on a thread switched into it.
type nodeAgent struct {
	agentv1.UnimplementedAgentServer
	h    *Handler
	node *netns.Netns
}

func (a *nodeAgent) in(fn func() (*agentv1.CNIResponse, error)) (resp *agentv1.CNIResponse, err error) {
	if derr := a.node.Do(func() error { resp, err = fn(); return nil }); derr != nil {
		return nil, derr
	}
	return resp, err
}

func (a *nodeAgent) CNIAdd(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	return a.in(func() (*agentv1.CNIResponse, error) { return a.h.Add(ctx, req) })
}

func (a *nodeAgent) CNIDel(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	return a.in(func() (*agentv1.CNIResponse, error) { return a.h.Del(ctx, req) })
}

func (a *nodeAgent) CNICheck(ctx context.Context, req *agentv1.CNIRequest) (*agentv1.CNIResponse, error) {
	return a.in(func() (*agentv1.CNIResponse, error) { return a.h.Check(ctx, req) })
}

func TestPrivilegedPluginOnRealNetwork(t *testing.T) {
	testenv.RequirePrivileged(t)
	node := nodeNetns(t, "h-node")
	pod := testNetns(t, "h-pod")
	alloc, err := ipam.Open(filepath.Join(t.TempDir(), "ipam.json"), netip.MustParsePrefix("10.244.6.0/24"))
	if err != nil {
		t.Fatal(err)
	}
	eps := &fakeEndpoints{}
	h := &Handler{IPAM: alloc, Net: NodeNetwork{}, Endpoints: eps}
	sock := startAgent(t, &nodeAgent{h: h, node: node})
	id := fmt.Sprintf("privileged-%d", os.Getpid())
	conf := netConf(sock, "")
	call := cniCall{cmd: "ADD", id: id, args: podArgs, conf: conf, netns: pod.Path()}

	out := run(t, call)
	if out.exit != 0 {
		t.Fatalf("ADD: %s\n%s", out.stdout, out.stderr)
	}
	var res struct {
		Interfaces []struct{ Name, Mac string } `json:"interfaces"`
		IPs        []struct{ Address string }   `json:"ips"`
	}
	if err := json.Unmarshal([]byte(out.stdout), &res); err != nil {
		t.Fatal(err)
	}
	hostVeth := podnet.HostVethName(id)
	if res.IPs[0].Address != "10.244.6.2/32" || res.Interfaces[0].Name != hostVeth {
		t.Fatalf("result %s", out.stdout)
	}
	ep, ok := eps.get(id)
	if !ok || ep.HostVeth != hostVeth || ep.HostIfindex == 0 || ep.HostMAC.String() != res.Interfaces[0].Mac || ep.PodMAC.String() != res.Interfaces[1].Mac {
		t.Fatalf("registered endpoint %+v; result %s", ep, out.stdout)
	}
	if mtu, _ := pod.Run("ip", "-o", "link", "show", "eth0"); !strings.Contains(mtu, "mtu 1400") {
		t.Errorf("pod eth0 %q; want the underlay's mtu 1400", mtu)
	}
	connect(t, node, pod, "10.99.0.1:7071")

	var confMap map[string]any
	json.Unmarshal([]byte(conf), &confMap)
	var prev map[string]any
	json.Unmarshal([]byte(out.stdout), &prev)
	confMap["prevResult"] = prev
	checkConf, _ := json.Marshal(confMap)
	check := call
	check.cmd, check.conf = "CHECK", string(checkConf)
	if out := run(t, check); out.exit != 0 {
		t.Fatalf("CHECK after ADD: %s", out.stdout)
	}
	if _, err := pod.Run("ip", "route", "del", "10.99.0.0/16"); err != nil {
		t.Fatal(err)
	}
	wantCNIError(t, run(t, check), 999, "route 10.99.0.0/16 via 169.254.1.1 dev eth0 in "+pod.Path())

	del := call
	del.cmd = "DEL"
	for i := range 2 {
		if out := run(t, del); out.exit != 0 {
			t.Fatalf("DEL #%d: %s", i+1, out.stdout)
		}
	}
	if links, _ := node.Run("ip", "link", "show"); strings.Contains(links, hostVeth) {
		t.Errorf("%s left after DEL", hostVeth)
	}
	if _, ok := alloc.Lookup(id); ok {
		t.Error("address still allocated after DEL")
	}
	if err := pod.Delete(); err != nil {
		t.Fatal(err)
	}
	if out := run(t, del); out.exit != 0 {
		t.Fatalf("DEL after the netns is gone: %s", out.stdout)
	}
}

func TestPrivilegedHandlerUndoesFailedAdd(t *testing.T) {
	testenv.RequirePrivileged(t)
	node := nodeNetns(t, "u-node")
	pod := testNetns(t, "u-pod")
	alloc, err := ipam.Open(filepath.Join(t.TempDir(), "ipam.json"), netip.MustParsePrefix("10.244.6.0/24"))
	if err != nil {
		t.Fatal(err)
	}
	eps := &fakeEndpoints{registerErr: errors.New("datapath: attach tcx: no such device")}
	h := &Handler{IPAM: alloc, Net: NodeNetwork{}, Endpoints: eps}
	req := addReq("undo-me")
	req.Netns = pod.Path()
	err = node.Do(func() error { _, err := h.Add(context.Background(), req); return err })
	if err == nil || !strings.Contains(err.Error(), "attach tcx") {
		t.Fatalf("Add with a failing registrar: %v", err)
	}
	if links, _ := node.Run("ip", "link", "show"); strings.Contains(links, podnet.HostVethName("undo-me")) {
		t.Error("veth left after a failed ADD")
	}
	if links, _ := pod.Run("ip", "link", "show"); strings.Contains(links, "eth0") {
		t.Error("pod eth0 left after a failed ADD")
	}
	if _, ok := alloc.Lookup("undo-me"); ok {
		t.Error("address kept after a failed ADD")
	}

	// A netns that does not exist: nothing allocated, a clear message.
	req.Netns = "/run/netns/veiltest-no-such-pod"
	err = node.Do(func() error { _, err := h.Add(context.Background(), req); return err })
	if err == nil || !strings.Contains(err.Error(), "network namespace not found") {
		t.Fatalf("Add into a missing netns: %v", err)
	}
	if len(alloc.List()) != 0 {
		t.Error("address kept after ADD into a missing netns")
	}
}

func connect(t *testing.T, server, client *netns.Netns, addr string) {
	t.Helper()
	var ln net.Listener
	if err := server.Do(func() (err error) { ln, err = net.Listen("tcp4", addr); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Write([]byte("ok"))
			c.Close()
		}
	}()
	err := client.Do(func() error {
		c, err := net.DialTimeout("tcp4", addr, 3*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		_, err = c.Read(make([]byte, 2))
		return err
	})
	if err != nil {
		t.Fatalf("pod → node %s: %v", addr, err)
	}
}
