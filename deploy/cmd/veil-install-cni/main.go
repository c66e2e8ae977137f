// Command veil-install-cni is the DaemonSet's init container: it installs
// the veil-cni plugin binary into the node's CNI bin directory and writes
// the network config list 10-veil.conflist into its CNI config directory.
// Each file is written to a temporary name in its directory and renamed
// into place, so the container runtime never runs a half-copied plugin or
// reads a half-written config, and a rerun replaces both.
//
// The image has no shell, so this small static binary does what an init
// script would. VEIL_CNI_MTU sets the pod MTU (0 lets the agent choose).
package main

import (
	"bytes"
	"encoding/json"
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
}

func main() {
	o, err := parse(os.Args[1:], os.LookupEnv)
	if err != nil {
		fmt.Fprintf(os.Stderr, "veil-install-cni: %v\n", err)
		os.Exit(2)
	}
	if err := install(o); err != nil {
		fmt.Fprintf(os.Stderr, "veil-install-cni: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("installed %s and %s\n", filepath.Join(o.binDir, "veil-cni"), filepath.Join(o.confDir, ConfListName))
}

func parse(args []string, lookup func(string) (string, bool)) (options, error) {
	o := options{}
	fs := flag.NewFlagSet("veil-install-cni", flag.ContinueOnError)
	fs.StringVar(&o.pluginSrc, "plugin", "/usr/bin/veil-cni", "the veil-cni binary to install")
	fs.StringVar(&o.binDir, "cni-bin-dir", "/host/opt/cni/bin", "the node's CNI bin directory")
	fs.StringVar(&o.confDir, "cni-conf-dir", "/host/etc/cni/net.d", "the node's CNI config directory")
	fs.StringVar(&o.agentSocket, "agent-socket", cni.DefaultAgentSocket, "the agent's unix socket, as a path on the node")
	fs.IntVar(&o.mtu, "mtu", 0, "pod MTU; 0 lets the agent choose (env VEIL_CNI_MTU)")
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
	return o, nil
}

// confList returns the network config list, checked with veil-cni's own
// parser so a bad setting fails here rather than at the first pod.
func confList(o options) ([]byte, error) {
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
	list := map[string]any{"cniVersion": "1.0.0", "name": "veil", "plugins": []any{plugin}}
	out, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode network config list: %w", err)
	}
	return append(out, '\n'), nil
}

func install(o options) error {
	conf, err := confList(o)
	if err != nil {
		return err
	}
	src, err := os.Open(o.pluginSrc)
	if err != nil {
		return fmt.Errorf("open plugin: %w", err)
	}
	defer src.Close()
	if err := writeAtomic(filepath.Join(o.binDir, "veil-cni"), src, 0o755); err != nil {
		return fmt.Errorf("install plugin: %w", err)
	}
	if err := writeAtomic(filepath.Join(o.confDir, ConfListName), bytes.NewReader(conf), 0o644); err != nil {
		return fmt.Errorf("write network config: %w", err)
	}
	return nil
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
