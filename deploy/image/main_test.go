package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/veilmesh/veil/deploy/ociimage"
)

const testVersion = "1.2.3-test"

// buildBinaries builds the image's static binaries as `make image` does.
func buildBinaries(t *testing.T) Options {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-trimpath",
		"-ldflags", "-s -w -X github.com/veilmesh/veil/agent/daemon.Version="+testVersion,
		"-o", dir+"/",
		"github.com/veilmesh/veil/agent/cmd/veil-agent",
		"github.com/veilmesh/veil/agent/cmd/veil-cni",
		"github.com/veilmesh/veil/deploy/cmd/veil-install-cni")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return Options{
		Tag:        "ghcr.io/veilmesh/veil:" + testVersion,
		Agent:      filepath.Join(dir, "veil-agent"),
		CNI:        filepath.Join(dir, "veil-cni"),
		InstallCNI: filepath.Join(dir, "veil-install-cni"),
		Arch:       "amd64",
	}
}

// untar extracts r into dir, refusing paths that leave it.
func untar(t *testing.T, r io.Reader, dir string) {
	t.Helper()
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatalf("read tar: %v", err)
		}
		p := filepath.Join(dir, h.Name)
		if !strings.HasPrefix(p, filepath.Clean(dir)+string(filepath.Separator)) {
			t.Fatalf("tar entry %q leaves the directory", h.Name)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeSymlink:
			if err := os.Symlink(h.Linkname, p); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode).Perm())
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(f, tr); err != nil {
				t.Fatal(err)
			}
			f.Close()
		default:
			t.Fatalf("unexpected tar entry %q type %c", h.Name, h.Typeflag)
		}
	}
}

// TestImage builds the binaries and the image tarball, reads the tarball
// back with go-containerregistry, extracts the image's filesystem and runs
// the binaries found in it.
func TestImage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds veil-agent, veil-cni and veil-install-cni")
	}
	o := buildBinaries(t)
	img, err := Build(o)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	out := filepath.Join(t.TempDir(), "veil-image.tar")
	if err := ociimage.WriteOCITar(out, o.Tag, img); err != nil {
		t.Fatalf("WriteOCITar: %v", err)
	}

	// Same inputs, same bytes.
	again := filepath.Join(t.TempDir(), "again.tar")
	img2, err := Build(o)
	if err == nil {
		err = ociimage.WriteOCITar(again, o.Tag, img2)
	}
	if err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(out)
	b, _ := os.ReadFile(again)
	if !bytes.Equal(a, b) {
		t.Error("two builds from the same binaries differ")
	}

	layoutDir := t.TempDir()
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	untar(t, f, layoutDir)
	f.Close()
	idx, err := layout.ImageIndexFromPath(layoutDir)
	if err != nil {
		t.Fatalf("read OCI layout: %v", err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("index holds %d manifests; want 1", len(im.Manifests))
	}
	desc := im.Manifests[0]
	if desc.Annotations["io.containerd.image.name"] != o.Tag || desc.Annotations["org.opencontainers.image.ref.name"] != testVersion {
		t.Errorf("annotations %v; want the image name %s and tag %s", desc.Annotations, o.Tag, testVersion)
	}
	if string(desc.MediaType) != "application/vnd.oci.image.manifest.v1+json" {
		t.Errorf("manifest media type %s; want OCI", desc.MediaType)
	}
	got, err := idx.Image(desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := got.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cf.Config.Entrypoint, []string{AgentPath}) || cf.OS != "linux" || cf.Architecture != "amd64" {
		t.Errorf("config entrypoint %q, platform %s/%s; want [%s] linux/amd64", cf.Config.Entrypoint, cf.OS, cf.Architecture, AgentPath)
	}

	root := t.TempDir()
	rc := mutate.Extract(got)
	untar(t, rc, root)
	rc.Close()
	passwd, err := os.ReadFile(filepath.Join(root, "etc", "passwd"))
	if err != nil || !strings.HasPrefix(string(passwd), "root:x:0:0:") {
		t.Errorf("/etc/passwd = %q, %v", passwd, err)
	}
	if l, err := os.Readlink(filepath.Join(root, "var", "run")); err != nil || l != "../run" {
		t.Errorf("/var/run links to %q, %v; want ../run", l, err)
	}

	agent := exec.Command(filepath.Join(root, AgentPath), "--version")
	agent.Env = []string{}
	outb, err := agent.CombinedOutput()
	t.Logf("%s --version: %s", AgentPath, outb)
	if err != nil || strings.TrimSpace(string(outb)) != "veil-agent "+testVersion {
		t.Errorf("%s --version = %q, %v; want %q", AgentPath, outb, err, "veil-agent "+testVersion)
	}

	cni := exec.Command(filepath.Join(root, CNIPath))
	cni.Env = []string{"CNI_COMMAND=VERSION"}
	cni.Stdin = strings.NewReader(`{"cniVersion":"1.0.0"}`)
	outb, err = cni.Output()
	t.Logf("CNI_COMMAND=VERSION %s: %s", CNIPath, outb)
	var v struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err != nil || json.Unmarshal(outb, &v) != nil || !slices.Contains(v.SupportedVersions, "1.0.0") {
		t.Errorf("CNI_COMMAND=VERSION %s = %q, %v; want supportedVersions with 1.0.0", CNIPath, outb, err)
	}

	if fi, err := os.Stat(filepath.Join(root, InstallCNIPath)); err != nil || fi.Mode().Perm()&0o111 == 0 {
		t.Errorf("%s: %v, %v; want an executable", InstallCNIPath, fi, err)
	}
}

func TestBuildRejects(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "script")
	if err := os.WriteFile(script, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		o    Options
		want string
	}{
		{"no tag", Options{Tag: "ghcr.io/veilmesh/veil", Agent: script}, "image tag"},
		{"missing binary", Options{Tag: "ghcr.io/veilmesh/veil:1", Agent: filepath.Join(dir, "nope"), CNI: script, InstallCNI: script}, "read binary"},
		{"not ELF", Options{Tag: "ghcr.io/veilmesh/veil:1", Agent: script, CNI: script, InstallCNI: script}, "not an ELF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Build(tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Build error = %v; want one containing %q", err, tc.want)
			}
		})
	}
}
