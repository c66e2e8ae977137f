package lab

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestLabNetnsMatchesOnlyThisLab(t *testing.T) {
	for name, want := range map[string]bool{
		"veil-lab-ul":             true,
		"veil-lab-node-1":         true,
		"veil-lab-node-12":        true,
		"veil-lab-p-demo-backend": true,
		"veil-lab-b-node-1":       false,
		"veil-lab-b-ul":           false,
		"veil-lab-node-x":         false,
		"veil-labnode-1":          false,
		"other":                   false,
	} {
		if got := labNetns("veil-lab", name); got != want {
			t.Errorf("labNetns(veil-lab, %s) = %v, want %v", name, got, want)
		}
	}
}

func TestAgentCleanupCommand(t *testing.T) {
	for _, tc := range []struct {
		name        string
		inNodeNetns bool
		enter       []string
	}{
		{"node netns", true, []string{"nsenter", "--net=/run/netns/veil-lab-node-2", "--"}},
		// The node's namespace is gone: never the host's, a new empty one.
		{"no node netns", false, []string{"unshare", "--net", "--"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := agentCleanupCommand("/lab/bin/veil-agent", "veil-lab", "node-2", "/tmp/scratch", tc.inNodeNetns)
			want := append(tc.enter, "/lab/bin/veil-agent", "--cleanup",
				"--bpffs-root", "/sys/fs/bpf/veil-lab-node-2",
				"--wireguard-interface", wgName("veil-lab", "node-2"),
				"--socket", "/tmp/scratch/agent.sock",
				"--state-dir", "/tmp/scratch/state")
			if !slices.Equal(got, want) {
				t.Errorf("agentCleanupCommand = %q; want %q", got, want)
			}
		})
	}
}

func TestReadStateFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), StateFile)
	in := State{Prefix: "veil-lab", Kubeconfig: "/lab/kubeconfig", Nodes: []NodeState{{Name: "node-1", Socket: "/lab/node-1/agent.sock"}}}
	raw, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := ReadStateFile(path)
	if err != nil {
		t.Fatalf("ReadStateFile: %v", err)
	}
	if got.Kubeconfig != in.Kubeconfig || len(got.Nodes) != 1 || got.Nodes[0] != in.Nodes[0] {
		t.Errorf("ReadStateFile = %+v; want %+v", got, in)
	}
	if _, err := ReadStateFile(path + ".nope"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("ReadStateFile of a missing file: %v; want os.ErrNotExist", err)
	}
}
