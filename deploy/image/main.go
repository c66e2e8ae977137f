// Command image builds Veil's agent image without a container daemon
// (`make image`): one layer holding the static binaries veil-agent,
// veil-cni and veil-install-cni in /usr/bin and a minimal /etc/passwd, on
// an empty base, written with go-containerregistry as an OCI image layout
// in a tar file. Load it with `ctr -n k8s.io images import FILE` or
// `docker load -i FILE`.
//
//	go run ./deploy/image -o bin/veil-image.tar --tag ghcr.io/veilmesh/veil:0.1.0 \
//		--agent bin/veil-agent --cni bin/veil-cni --install-cni bin/veil-install-cni
//
// The output depends only on the inputs: timestamps are fixed, so the same
// binaries give the same image digest.
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// epoch is every timestamp in the image, for reproducible digests.
var epoch = time.Unix(0, 0).UTC()

// Paths of the binaries in the image; the DaemonSet's commands name them.
const (
	AgentPath      = "/usr/bin/veil-agent"
	CNIPath        = "/usr/bin/veil-cni"
	InstallCNIPath = "/usr/bin/veil-install-cni"
)

// Options say what goes into the image.
type Options struct {
	// Tag is the image reference recorded in the layout, e.g.
	// ghcr.io/veilmesh/veil:0.1.0.
	Tag string
	// Agent, CNI and InstallCNI are paths of the static binaries.
	Agent, CNI, InstallCNI string
	// Arch is the GOARCH the binaries were built for.
	Arch string
}

func main() {
	var o Options
	out := ""
	fs := flag.NewFlagSet("image", flag.ContinueOnError)
	fs.StringVar(&out, "o", "bin/veil-image.tar", "output file: an OCI image layout in a tar")
	fs.StringVar(&o.Tag, "tag", "ghcr.io/veilmesh/veil:dev", "image reference")
	fs.StringVar(&o.Agent, "agent", "bin/veil-agent", "static veil-agent binary")
	fs.StringVar(&o.CNI, "cni", "bin/veil-cni", "static veil-cni binary")
	fs.StringVar(&o.InstallCNI, "install-cni", "bin/veil-install-cni", "static veil-install-cni binary")
	fs.StringVar(&o.Arch, "arch", runtime.GOARCH, "architecture of the binaries")
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	img, err := Build(o)
	if err == nil {
		err = WriteOCITar(out, o.Tag, img)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "image: %v\n", err)
		os.Exit(1)
	}
	d, _ := img.Digest()
	fmt.Printf("wrote %s: %s %s\n", out, o.Tag, d)
}

// Build returns the agent image.
func Build(o Options) (v1.Image, error) {
	tag, err := name.NewTag(o.Tag, name.StrictValidation)
	if err != nil {
		return nil, fmt.Errorf("image tag %q: %w", o.Tag, err)
	}
	rootfs, err := rootfsTar(o)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(rootfs)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("create layer: %w", err)
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	img, err = mutate.AppendLayers(img, layer)
	if err != nil {
		return nil, fmt.Errorf("append layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("read image config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS = "linux"
	cf.Architecture = o.Arch
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = []string{AgentPath}
	cf.Config.Env = []string{"PATH=/usr/bin"}
	cf.Config.User = "0:0"
	cf.Config.Labels = map[string]string{
		"org.opencontainers.image.source":      "https://github.com/veilmesh/veil",
		"org.opencontainers.image.title":       "veil",
		"org.opencontainers.image.description": "Veil node agent and CNI plugin",
		"org.opencontainers.image.version":     tag.TagStr(),
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("set image config: %w", err)
	}
	return img, nil
}

// rootfsTar is the layer's content. The agent runs as root with added
// capabilities; /etc/passwd names root and nobody so tools that look users
// up work. /var/run links to /run, as on the nodes, so that the paths the
// runtime gives the CNI plugin (/var/run/netns/…) resolve in the container.
func rootfsTar(o Options) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dir := func(name string) error {
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX})
	}
	file := func(name string, mode int64, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	for _, d := range []string{"etc", "run", "tmp", "usr", "usr/bin", "var"} {
		if err := dir(d); err != nil {
			return nil, fmt.Errorf("write layer: %w", err)
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "var/run", Linkname: "../run", Mode: 0o777, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
		return nil, fmt.Errorf("write layer: %w", err)
	}
	files := []struct {
		path string
		mode int64
		data []byte
		src  string
	}{
		{path: "etc/passwd", mode: 0o644, data: []byte("root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n")},
		{path: "etc/group", mode: 0o644, data: []byte("root:x:0:\nnogroup:x:65534:\n")},
		{path: strings.TrimPrefix(AgentPath, "/"), mode: 0o755, src: o.Agent},
		{path: strings.TrimPrefix(CNIPath, "/"), mode: 0o755, src: o.CNI},
		{path: strings.TrimPrefix(InstallCNIPath, "/"), mode: 0o755, src: o.InstallCNI},
	}
	for _, f := range files {
		data := f.data
		if f.src != "" {
			var err error
			if data, err = readBinary(f.src); err != nil {
				return nil, err
			}
		}
		if err := file(f.path, f.mode, data); err != nil {
			return nil, fmt.Errorf("write %s into the layer: %w", f.path, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("write layer: %w", err)
	}
	return buf.Bytes(), nil
}

// readBinary reads a binary for the image and rejects what cannot run in
// it: the image has no libc, so only static ELF executables do.
func readBinary(path string) ([]byte, error) {
	if path == "" {
		return nil, fmt.Errorf("a binary path is empty")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read binary: %w", err)
	}
	if !bytes.HasPrefix(data, []byte("\x7fELF")) {
		return nil, fmt.Errorf("%s is not an ELF executable", path)
	}
	if bytes.Contains(data, []byte("/lib64/ld-linux")) || bytes.Contains(data, []byte("/lib/ld-linux")) || bytes.Contains(data, []byte("/lib/ld-musl")) {
		return nil, fmt.Errorf("%s is dynamically linked; build it with CGO_ENABLED=0", path)
	}
	return data, nil
}

// WriteOCITar writes img, named tag, as an OCI image layout packed in a tar
// file at path; the file appears complete or not at all.
func WriteOCITar(path, tag string, img v1.Image) error {
	t, err := name.NewTag(tag, name.StrictValidation)
	if err != nil {
		return fmt.Errorf("image tag %q: %w", tag, err)
	}
	dir, err := os.MkdirTemp("", "veil-image-*")
	if err != nil {
		return fmt.Errorf("create layout directory: %w", err)
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("create OCI layout: %w", err)
	}
	// containerd and Docker name the imported image after the first
	// annotation; the OCI spec's ref.name holds the tag alone.
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"io.containerd.image.name":          t.Name(),
		"org.opencontainers.image.ref.name": t.TagStr(),
	})); err != nil {
		return fmt.Errorf("write image into OCI layout: %w", err)
	}

	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create output directory: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("create output: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return fmt.Errorf("chmod %s: %w", tmp.Name(), err)
	}
	if err := tarDir(tmp, dir); err != nil {
		tmp.Close()
		return fmt.Errorf("pack OCI layout: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("rename into %s: %w", path, err)
	}
	return nil
}

// tarDir packs the regular files and directories below dir, in sorted
// order with fixed timestamps.
func tarDir(w io.Writer, dir string) error {
	var paths []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return err
	}
	slices.Sort(paths)
	tw := tar.NewWriter(w)
	for _, p := range paths {
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		h := &tar.Header{Name: filepath.ToSlash(rel), ModTime: epoch, Format: tar.FormatPAX}
		switch {
		case fi.IsDir():
			h.Typeflag, h.Name, h.Mode = tar.TypeDir, h.Name+"/", 0o755
			if err := tw.WriteHeader(h); err != nil {
				return err
			}
		case fi.Mode().IsRegular():
			h.Typeflag, h.Mode, h.Size = tar.TypeReg, 0o644, fi.Size()
			if err := tw.WriteHeader(h); err != nil {
				return err
			}
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, f)
			f.Close()
			if err != nil {
				return err
			}
		default:
			return fmt.Errorf("unexpected file %s in the layout", p)
		}
	}
	return tw.Close()
}
