package podnet

import (
	"context"
	"net/netip"
	"strings"
	"testing"
)

func TestHostVethName(t *testing.T) {
	a := HostVethName("0123456789abcdef")
	if len(a) > 15 || !strings.HasPrefix(a, "veil") || len(a) != 15 {
		t.Fatalf("HostVethName = %q; want veil + 11 hex chars", a)
	}
	if HostVethName("0123456789abcdef") != a {
		t.Fatal("HostVethName is not stable")
	}
	if HostVethName("0123456789abcdeg") == a {
		t.Fatal("different containers share a veth name")
	}
}

func TestSetupRejectsBadRequests(t *testing.T) {
	good := Request{NetnsPath: "/run/netns/x", IfName: "eth0", ContainerID: "c", IP: netip.MustParseAddr("10.0.0.2")}
	for _, tc := range []struct {
		name string
		edit func(*Request)
		want string
	}{
		{"no container", func(r *Request) { r.ContainerID = "" }, "container ID"},
		{"no netns", func(r *Request) { r.NetnsPath = "" }, "netns"},
		{"long ifname", func(r *Request) { r.IfName = "averyveryverylongname" }, "interface name"},
		{"slash ifname", func(r *Request) { r.IfName = "eth/0" }, "interface name"},
		{"ipv6", func(r *Request) { r.IP = netip.MustParseAddr("fd00::2") }, "IPv4"},
		{"no ip", func(r *Request) { r.IP = netip.Addr{} }, "IPv4"},
		{"mtu", func(r *Request) { r.MTU = 40 }, "MTU"},
		{"v6 route", func(r *Request) { r.Routes = []netip.Prefix{netip.MustParsePrefix("::/0")} }, "route"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := good
			tc.edit(&r)
			_, err := Setup(context.Background(), r)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Setup: %v; want an error mentioning %q", err, tc.want)
			}
		})
	}
}

func TestIsHostVethName(t *testing.T) {
	for _, c := range []struct {
		name string
		want bool
	}{
		{HostVethName("abc"), true},
		{HostVethName("another container"), true},
		{"veil0", false},
		{"veilwg0", false},
		{"eth0", false},
		{"veilABCDEF01234", false},
		{"veil0123456789a", true},
		{"veil0123456789ab", false},
	} {
		if got := IsHostVethName(c.name); got != c.want {
			t.Errorf("IsHostVethName(%q) = %v; want %v", c.name, got, c.want)
		}
	}
}
