// Command veil-install-cni is the DaemonSet's init container: it installs
// the veil-cni plugin binary into the node's CNI bin directory and writes
// the network config list 10-veil.conflist into its CNI config directory.
// Each file is written to a temporary name in its directory and renamed
// into place, so the container runtime never runs a half-copied plugin or
// reads a half-written config, and a rerun replaces both.
//
// The image has no shell, so this small static binary does what an init
// script would. VEIL_CNI_MTU sets the pod MTU (0 lets the agent choose).
//
// hostPort is the portmap plugin's, chained after veil-cni: the container
// runtime hands it the pod's port mappings (its portMappings capability)
// and it writes the node's DNAT rules. Veil does not ship portmap; most
// nodes have it from their distribution's CNI plugins package. --portmap
// (VEIL_CNI_PORTMAP) auto chains it when the node's CNI bin directory holds
// it, on requires it (the install fails when it is missing, rather than
// every pod's start), off leaves it out.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"github.com/veilmesh/veil/agent/cni"
)

// ConfListName is the file name of Veil's network config list; the runtime
// uses the first config in lexical order, and 10- sorts before the usual
// defaults.
const ConfListName = "10-veil.conflist"

// options are the installer's settings.
type options struct {
	pluginSrc   string
	binDir      string
	confDir     string
	agentSocket string
	mtu         int
	portmap     string
}

// The --portmap settings.
const (
	portmapAuto = "auto"
	portmapOn   = "on"
	portmapOff  = "off"
)

// portmapPlugin is the portmap plugin's binary name in the CNI bin dir.
const portmapPlugin = "portmap"

func main() {
	o, err := parse(os.Args[1:], os.LookupEnv)
	if err != nil {
		fmt.Fprintf(os.Stderr, "veil-install-cni: %v\n", err)
		os.Exit(2)
	}
	portmap, err := install(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "veil-install-cni: %v\n", err)
		os.Exit(1)
	}
	chain := "veil-cni"
	if portmap {
		chain += ", portmap (hostPort)"
	}
	fmt.Printf("installed %s and %s (chain: %s)\n", filepath.Join(o.binDir, "veil-cni"), filepath.Join(o.confDir, ConfListName), chain)
}

func parse(args []string, lookup func(string) (string, bool)) (options, error) {
	o := options{}
	fs := flag.NewFlagSet("veil-install-cni", flag.ContinueOnError)
	fs.StringVar(&o.pluginSrc, "plugin", "/usr/bin/veil-cni", "the veil-cni binary to install")
	fs.StringVar(&o.binDir, "cni-bin-dir", "/host/opt/cni/bin", "the node's CNI bin directory")
	fs.StringVar(&o.confDir, "cni-conf-dir", "/host/etc/cni/net.d", "the node's CNI config directory")
	fs.StringVar(&o.agentSocket, "agent-socket", cni.DefaultAgentSocket, "the agent's unix socket, as a path on the node")
	fs.IntVar(&o.mtu, "mtu", 0, "pod MTU; 0 lets the agent choose (env VEIL_CNI_MTU)")
	fs.StringVar(&o.portmap, "portmap", portmapAuto, "chain the node's portmap plugin for hostPort: auto (when the CNI bin dir has it), on, off (env VEIL_CNI_PORTMAP)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	mtuSet := false
	fs.Visit(func(f *flag.Flag) { mtuSet = mtuSet || f.Name == "mtu" })
	if v, ok := lookup("VEIL_CNI_MTU"); ok && !mtuSet {
		n, err := strconv.Atoi(v)
		if err != nil {
			return o, fmt.Errorf("VEIL_CNI_MTU=%q is not a number", v)
		}
		o.mtu = n
	}
	portmapSet := false
	fs.Visit(func(f *flag.Flag) { portmapSet = portmapSet || f.Name == "portmap" })
	if v, ok := lookup("VEIL_CNI_PORTMAP"); ok && v != "" && !portmapSet {
		o.portmap = v
	}
	switch o.portmap {
	case portmapAuto, portmapOn, portmapOff:
	default:
		return o, fmt.Errorf("portmap %q: want auto, on or off", o.portmap)
	}
	return o, nil
}

// chainPortmap tells whether the config list chains portmap, by o.portmap
// and whether the node's CNI bin dir holds an executable portmap.
func chainPortmap(o options) (bool, error) {
	if o.portmap == portmapOff {
		return false, nil
	}
	path := filepath.Join(o.binDir, portmapPlugin)
	fi, err := os.Stat(path)
	present := err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
	if o.portmap == portmapOn && !present {
		if err == nil {
			err = errors.New("not an executable file")
		}
		return false, fmt.Errorf("portmap is on but the node has no portmap plugin at %s (install the distribution's CNI plugins, or set it to auto or off): %w", path, err)
	}
	return present, nil
}

// confList returns the network config list, checked with veil-cni's own
// parser so a bad setting fails here rather than at the first pod.
func confList(o options, portmap bool) ([]byte, error) {
	plugin := map[string]any{"type": "veil-cni", "agentSocket": o.agentSocket}
	if o.mtu != 0 {
		plugin["mtu"] = o.mtu
	}
	asPlugin := map[string]any{"cniVersion": "1.0.0", "name": "veil"}
	for k, v := range plugin {
		asPlugin[k] = v
	}
	data, err := json.Marshal(asPlugin)
	if err != nil {
		return nil, fmt.Errorf("encode network config: %w", err)
	}
	if _, err := cni.ParseConfig(data); err != nil {
		return nil, err
	}
	plugins := []any{plugin}
	if portmap {
		// snat: connections to a hostPort on the node's loopback reach the
		// pod, from an address the pod can answer.
		plugins = append(plugins, map[string]any{"type": portmapPlugin, "capabilities": map[string]any{"portMappings": true}, "snat": true})
	}
	list := map[string]any{"cniVersion": "1.0.0", "name": "veil", "plugins": plugins}
	out, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode network config list: %w", err)
	}
	return append(out, '\n'), nil
}

// install installs the plugin and writes the config list, and tells
// whether the list chains portmap.
func install(o options) (portmap bool, err error) {
	portmap, err = chainPortmap(o)
	if err != nil {
		return false, err
	}
	conf, err := confList(o, portmap)
	if err != nil {
		return false, err
	}
	src, err := os.Open(o.pluginSrc)
	if err != nil {
		return false, fmt.Errorf("open plugin: %w", err)
	}
	defer src.Close()
	if err := writeAtomic(filepath.Join(o.binDir, "veil-cni"), src, 0o755); err != nil {
		return false, fmt.Errorf("install plugin: %w", err)
	}
	if err := writeAtomic(filepath.Join(o.confDir, ConfListName), bytes.NewReader(conf), 0o644); err != nil {
		return false, fmt.Errorf("write network config: %w", err)
	}
	return portmap, nil
}

// writeAtomic replaces path with r's content: a temporary file in the same
// directory, synced, then renamed over path.
func writeAtomic(path string, r io.Reader, mode os.FileMode) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("create temporary file in %s: %w", dir, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := io.Copy(tmp, r); err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Chmod(mode); err != nil {
		return fmt.Errorf("chmod %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("rename into %s: %w", path, err)
	}
	return nil
}
