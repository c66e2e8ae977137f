package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/veilmesh/veil/agent/cni"
)

func env(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestInstall(t *testing.T) {
	dir := t.TempDir()
	plugin := filepath.Join(dir, "veil-cni")
	if err := os.WriteFile(plugin, []byte("plugin v1"), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"--plugin", plugin, "--cni-bin-dir", filepath.Join(dir, "bin"), "--cni-conf-dir", filepath.Join(dir, "net.d"), "--agent-socket", "/run/veil/x.sock"}
	o, err := parse(args, env(map[string]string{"VEIL_CNI_MTU": "1370"}))
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	if portmap, err := install(o); err != nil || portmap {
		t.Fatalf("install = portmap %v, %v; want no portmap (the bin dir has none), no error", portmap, err)
	}
	// A rerun (the init container runs on every pod start) replaces both.
	if err := os.WriteFile(plugin, []byte("plugin v2"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := install(o); err != nil {
		t.Fatalf("second install: %v", err)
	}

	got, err := os.ReadFile(filepath.Join(dir, "bin", "veil-cni"))
	if err != nil || !bytes.Equal(got, []byte("plugin v2")) {
		t.Fatalf("installed plugin = %q, %v; want %q", got, err, "plugin v2")
	}
	if fi, err := os.Stat(filepath.Join(dir, "bin", "veil-cni")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("plugin mode = %v, %v; want 0755", fi.Mode(), err)
	}
	data, err := os.ReadFile(filepath.Join(dir, "net.d", ConfListName))
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		CNIVersion string            `json:"cniVersion"`
		Name       string            `json:"name"`
		Plugins    []json.RawMessage `json:"plugins"`
	}
	if err := json.Unmarshal(data, &list); err != nil {
		t.Fatalf("conflist %s: %v", data, err)
	}
	if list.CNIVersion != "1.0.0" || list.Name != "veil" || len(list.Plugins) != 1 {
		t.Fatalf("conflist = %s", data)
	}
	// What libcni hands the plugin: the plugin's config plus the list's
	// cniVersion and name.
	var p map[string]any
	if err := json.Unmarshal(list.Plugins[0], &p); err != nil {
		t.Fatal(err)
	}
	p["cniVersion"], p["name"] = list.CNIVersion, list.Name
	pd, _ := json.Marshal(p)
	conf, err := cni.ParseConfig(pd)
	if err != nil {
		t.Fatalf("veil-cni rejects the installed config %s: %v", pd, err)
	}
	if conf.Type != "veil-cni" || conf.MTU != 1370 || conf.AgentSocket != "/run/veil/x.sock" {
		t.Fatalf("config = %+v; want type veil-cni, mtu 1370, socket /run/veil/x.sock", conf)
	}
	for _, d := range []string{"bin", "net.d"} {
		entries, _ := os.ReadDir(filepath.Join(dir, d))
		if len(entries) != 1 {
			t.Errorf("%s holds %d entries, want 1 (no temporary files left)", d, len(entries))
		}
	}
}

func TestInstallRejects(t *testing.T) {
	dir := t.TempDir()
	plugin := filepath.Join(dir, "veil-cni")
	if err := os.WriteFile(plugin, []byte("plugin"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
	}{
		{"mtu not a number", nil, map[string]string{"VEIL_CNI_MTU": "big"}},
		{"mtu out of range", []string{"--mtu", "100"}, nil},
		{"relative socket", []string{"--agent-socket", "agent.sock"}, nil},
		{"missing plugin", []string{"--plugin", filepath.Join(dir, "nope")}, nil},
		{"stray argument", []string{"extra"}, nil},
		{"portmap not a setting", []string{"--portmap", "yes"}, nil},
		{"portmap on, none on the node", nil, map[string]string{"VEIL_CNI_PORTMAP": "on"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"--plugin", plugin, "--cni-bin-dir", filepath.Join(dir, "bin"), "--cni-conf-dir", filepath.Join(dir, "net.d")}, tc.args...)
			o, err := parse(args, env(tc.env))
			if err == nil {
				_, err = install(o)
			}
			if err == nil {
				t.Fatal("install succeeded; want an error")
			}
			if _, err := os.Stat(filepath.Join(dir, "net.d", ConfListName)); err == nil {
				t.Fatal("a rejected install wrote a config")
			}
		})
	}
}

// conflistTypes returns the types of the plugins the installed config list
// chains, in order, and the list's plugins.
func conflistTypes(t *testing.T, path string) ([]string, []map[string]any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(data, &list); err != nil {
		t.Fatalf("conflist %s: %v", data, err)
	}
	var types []string
	for _, p := range list.Plugins {
		types = append(types, fmt.Sprint(p["type"]))
	}
	return types, list.Plugins
}

// TestInstallChainsPortmap: hostPort needs the portmap plugin chained
// after veil-cni with the portMappings capability, or the runtime never
// hands anyone a pod's port mappings (the upstream HostPort conformance
// test failed on the lab for that).
func TestInstallChainsPortmap(t *testing.T) {
	for _, tc := range []struct {
		name       string
		setting    map[string]string
		args       []string
		hasPortmap bool
		want       []string
	}{
		{"auto, node has portmap", nil, nil, true, []string{"veil-cni", "portmap"}},
		{"auto, node has none", nil, nil, false, []string{"veil-cni"}},
		{"on", map[string]string{"VEIL_CNI_PORTMAP": "on"}, nil, true, []string{"veil-cni", "portmap"}},
		{"off by env", map[string]string{"VEIL_CNI_PORTMAP": "off"}, nil, true, []string{"veil-cni"}},
		{"flag over env", map[string]string{"VEIL_CNI_PORTMAP": "off"}, []string{"--portmap", "auto"}, true, []string{"veil-cni", "portmap"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			plugin := filepath.Join(dir, "veil-cni")
			if err := os.WriteFile(plugin, []byte("plugin"), 0o600); err != nil {
				t.Fatal(err)
			}
			bin := filepath.Join(dir, "bin")
			if err := os.MkdirAll(bin, 0o755); err != nil {
				t.Fatal(err)
			}
			if tc.hasPortmap {
				if err := os.WriteFile(filepath.Join(bin, "portmap"), []byte("#!portmap"), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			args := append([]string{"--plugin", plugin, "--cni-bin-dir", bin, "--cni-conf-dir", filepath.Join(dir, "net.d")}, tc.args...)
			o, err := parse(args, env(tc.setting))
			if err != nil {
				t.Fatalf("parse: %v", err)
			}
			portmap, err := install(o)
			if err != nil {
				t.Fatalf("install: %v", err)
			}
			got, plugins := conflistTypes(t, filepath.Join(dir, "net.d", ConfListName))
			if !slices.Equal(got, tc.want) {
				t.Fatalf("chain = %v; want %v", got, tc.want)
			}
			if portmap != (len(tc.want) == 2) {
				t.Errorf("install says portmap %v; the chain is %v", portmap, got)
			}
			if len(plugins) == 2 {
				caps, _ := plugins[1]["capabilities"].(map[string]any)
				if caps["portMappings"] != true {
					t.Errorf("portmap's capabilities = %v; want portMappings: true", plugins[1]["capabilities"])
				}
			}
		})
	}
}
