// Command veil-cni is Veil's CNI plugin. The container runtime runs it with
// the CNI environment (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME,
// CNI_ARGS, CNI_PATH) and the network config on stdin; it forwards the call
// to veil-agent over the agent's unix socket and prints the result, or a CNI
// error, on stdout.
package main

import (
	"os"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/veilmesh/veil/agent/cni"
)

func main() {
	p := &cni.Plugin{Stdout: os.Stdout}
	skel.PluginMainFuncs(p.Funcs(), cni.VersionInfo(), cni.About)
}
