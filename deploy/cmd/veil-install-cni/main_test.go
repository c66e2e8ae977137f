package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
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
	if err := install(o); err != nil {
		t.Fatalf("install: %v", err)
	}
	// A rerun (the init container runs on every pod start) replaces both.
	if err := os.WriteFile(plugin, []byte("plugin v2"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := install(o); err != nil {
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
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"--plugin", plugin, "--cni-bin-dir", filepath.Join(dir, "bin"), "--cni-conf-dir", filepath.Join(dir, "net.d")}, tc.args...)
			o, err := parse(args, env(tc.env))
			if err == nil {
				err = install(o)
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
