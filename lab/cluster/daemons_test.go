package cluster

import (
	"slices"
	"testing"
)

func TestSplitNsenterUndoesStartProc(t *testing.T) {
	ns, argv, err := splitNsenter([]string{"nsenter", "--net=/run/netns/x-hub", "--mount=/d/ns/node-1.mnt", "--uts=/d/ns/node-1.uts", "--", "/bin/kubelet", "--config=/d/k.yaml", "--"})
	if err != nil {
		t.Fatal(err)
	}
	if want := (namespaces{net: "/run/netns/x-hub", mnt: "/d/ns/node-1.mnt", uts: "/d/ns/node-1.uts"}); ns != want {
		t.Errorf("namespaces = %+v; want %+v", ns, want)
	}
	if want := []string{"/bin/kubelet", "--config=/d/k.yaml", "--"}; !slices.Equal(argv, want) {
		t.Errorf("argv = %q; want %q", argv, want)
	}
	for _, bad := range [][]string{
		{"nsenter", "--net=/x"},
		{"nsenter", "--pid=/x", "--", "/bin/true"},
	} {
		if _, _, err := splitNsenter(bad); err == nil {
			t.Errorf("splitNsenter(%q) took it", bad)
		}
	}
}

func TestDaemonNamesTheKnownProcesses(t *testing.T) {
	c := &Cluster{procs: []*proc{{name: APIServerDaemon}, {name: KubeletDaemon("node-1")}}}
	if p, err := c.daemon(KubeletDaemon("node-1")); err != nil || p.name != "node-1-kubelet" {
		t.Errorf("daemon(node-1-kubelet) = %v, %v", p, err)
	}
	if _, err := c.daemon("node-9-kubelet"); err == nil || err.Error() != `no cluster process "node-9-kubelet" (there are: kube-apiserver, node-1-kubelet)` {
		t.Errorf("daemon(node-9-kubelet) error = %v", err)
	}
}
