package cni

import (
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	types040 "github.com/containernetworking/cni/pkg/types/040"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
)

const testConf = `{"cniVersion":"1.0.0","name":"veil","type":"veil-cni","routes":["10.244.0.0/16"]}`

func cniReq(args string) *agentv1.CNIRequest {
	return &agentv1.CNIRequest{
		ContainerId: "c0ffee",
		Netns:       "/run/netns/pod",
		Ifname:      "eth0",
		Args:        args,
		Config:      []byte(testConf),
	}
}

func TestParseRequest(t *testing.T) {
	r, err := ParseRequest(cniReq("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=u-1;FOO=bar"))
	if err != nil {
		t.Fatal(err)
	}
	if r.PodNamespace != "shop" || r.PodName != "web-0" || r.PodUID != "u-1" || r.ContainerID != "c0ffee" || r.IfName != "eth0" {
		t.Errorf("parsed %+v", r)
	}
	if err := r.requirePod(); err != nil {
		t.Errorf("requirePod: %v", err)
	}
}

func TestParseRequestErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*agentv1.CNIRequest)
		want string
	}{
		{"unknown arg", func(r *agentv1.CNIRequest) { r.Args = "FOO=bar" }, "IgnoreUnknown"},
		{"bad container", func(r *agentv1.CNIRequest) { r.ContainerId = "a b" }, "CNI_CONTAINERID"},
		{"bad ifname", func(r *agentv1.CNIRequest) { r.Ifname = "a/b" }, "CNI_IFNAME"},
		{"bad config", func(r *agentv1.CNIRequest) { r.Config = []byte(`{"cniVersion":"1.0.0"}`) }, "name is missing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := cniReq("")
			tc.edit(req)
			_, err := ParseRequest(req)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ParseRequest: %v; want an error saying %q", err, tc.want)
			}
		})
	}
	r, err := ParseRequest(cniReq(""))
	if err != nil {
		t.Fatal(err)
	}
	var re *RequestError
	if err := r.requirePod(); !errors.As(err, &re) || !strings.Contains(err.Error(), "K8S_POD_NAMESPACE") {
		t.Errorf("requirePod without pod args: %v", err)
	}
}

func TestResultJSON(t *testing.T) {
	hostMAC, _ := net.ParseMAC("02:00:00:00:00:01")
	podMAC, _ := net.ParseMAC("02:00:00:00:00:02")
	data, err := Result(Attachment{
		IP: netip.MustParseAddr("10.244.1.5"), HostVeth: "veil0123456789a", HostMAC: hostMAC, PodMAC: podMAC, MTU: 1420,
		IfName: "eth0", Netns: "/run/netns/pod", Routes: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
	})
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	want := `{"cniVersion":"1.0.0","interfaces":[{"mac":"02:00:00:00:00:01","mtu":1420,"name":"veil0123456789a"},` +
		`{"mac":"02:00:00:00:00:02","mtu":1420,"name":"eth0","sandbox":"/run/netns/pod"}],` +
		`"ips":[{"address":"10.244.1.5/32","gateway":"169.254.1.1","interface":1}],` +
		`"routes":[{"dst":"0.0.0.0/0","gw":"169.254.1.1"}]}`
	var wantMap map[string]any
	json.Unmarshal([]byte(want), &wantMap)
	gotJSON, _ := json.Marshal(got)
	wantJSON, _ := json.Marshal(wantMap)
	if string(gotJSON) != string(wantJSON) {
		t.Errorf("result\n got %s\nwant %s", gotJSON, wantJSON)
	}

	// Older runtimes get the result converted by the CNI library.
	res, err := types100.NewResult(data)
	if err != nil {
		t.Fatal(err)
	}
	old, err := res.GetAsVersion("0.4.0")
	if err != nil {
		t.Fatal(err)
	}
	r040 := old.(*types040.Result)
	if len(r040.IPs) != 1 || r040.IPs[0].Address.String() != "10.244.1.5/32" {
		t.Errorf("0.4.0 result %+v", r040)
	}
}
