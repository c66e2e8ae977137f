package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/veilmesh/veil/lab/netns"
)

// bpffsDir is where the lab's nodes get their bpffs roots,
// <prefix>-<node> each.
const bpffsDir = "/sys/fs/bpf"

// nodeBPFFSRoot is the bpffs root of a lab node's agent.
func nodeBPFFSRoot(prefix, node string) string {
	return filepath.Join(bpffsDir, prefix+"-"+node)
}

// pinnedNodes lists the nodes of a lab with prefix that have a bpffs root.
func pinnedNodes(prefix string) []string {
	roots, _ := filepath.Glob(filepath.Join(bpffsDir, prefix+"-node-*"))
	var nodes []string
	for _, r := range roots {
		// Only the exact shape <prefix>-node-<n>: a lab named veil-lab must
		// not touch the pins of one named veil-lab-b.
		if labNetns(prefix, filepath.Base(r)) {
			nodes = append(nodes, strings.TrimPrefix(filepath.Base(r), prefix+"-"))
		}
	}
	return nodes
}

// agentCleanupTimeout bounds one veil-agent --cleanup: it only unpins and
// deletes, so a minute means it hangs.
const agentCleanupTimeout = time.Minute

// cleanupAgent removes what node's agent installed (pinned programs, links
// and maps, its WireGuard device and host routes) by running agentBin
// --cleanup, the agent's own uninstall, so the lab does not link the
// datapath package (and neither does meshctl through it).
//
// It runs in the node's network namespace, where the agent installed its
// devices and routes; when that namespace is gone, in a fresh empty one, so
// that the host's own routes and devices are never touched. The agent's
// socket and state directory point at a scratch directory: the lab's files
// are removed by the lab, by name.
func cleanupAgent(ctx context.Context, agentBin, prefix, node string) error {
	root := nodeBPFFSRoot(prefix, node)
	if agentBin == "" {
		return fmt.Errorf("remove pinned datapath %s of node %s: no veil-agent binary to run --cleanup with", root, node)
	}
	scratch, err := os.MkdirTemp("", "veil-lab-cleanup-")
	if err != nil {
		return fmt.Errorf("remove pinned datapath of node %s: %w", node, err)
	}
	defer os.RemoveAll(scratch)
	ctx, cancel := context.WithTimeout(ctx, agentCleanupTimeout)
	defer cancel()
	argv := agentCleanupCommand(agentBin, prefix, node, scratch, nodeNetnsExists(prefix, node))
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	// Only PATH: the caller's VEIL_* variables must not reach the agent's
	// configuration.
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("remove pinned datapath of node %s (veil-agent --cleanup): %w: %s", node, err, out)
	}
	if _, err := os.Stat(root); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove pinned datapath of node %s: veil-agent --cleanup left %s", node, root)
	}
	return nil
}

func nodeNetnsExists(prefix, node string) bool {
	_, err := os.Stat((&netns.Netns{Name: prefix + "-" + node}).Path())
	return err == nil
}

// agentCleanupCommand is the command line of cleanupAgent: veil-agent
// --cleanup with the node's bpffs root and WireGuard device, inside the
// node's network namespace (inNodeNetns) or a new empty one.
func agentCleanupCommand(agentBin, prefix, node, scratch string, inNodeNetns bool) []string {
	enter := []string{"unshare", "--net", "--"}
	if inNodeNetns {
		enter = []string{"nsenter", "--net=" + (&netns.Netns{Name: prefix + "-" + node}).Path(), "--"}
	}
	return append(enter, agentBin, "--cleanup",
		"--bpffs-root", nodeBPFFSRoot(prefix, node),
		"--wireguard-interface", wgName(prefix, node),
		"--socket", filepath.Join(scratch, "agent.sock"),
		"--state-dir", filepath.Join(scratch, "state"))
}
