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
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/veilmesh/veil/deploy/ociimage"
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
		err = ociimage.WriteOCITar(out, o.Tag, img)
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
