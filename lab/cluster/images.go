package cluster

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/veilmesh/veil/deploy/ociimage"
	"github.com/veilmesh/veil/lab/controlplane"
)

// Images the lab builds and imports into every node; pods refer to them
// with imagePullPolicy IfNotPresent or Never, as there is no registry.
const (
	// PauseImage is every pod's sandbox image.
	PauseImage = "veil.lab/pause:1"
	// TestServerImage runs lab/cluster/image/testserver ("serve SPEC...",
	// "probe ADDR") as its entrypoint /testserver, and holds /client too.
	TestServerImage = "veil.lab/testserver:1"
	// ClientImage holds lab/cluster/image/client as its entrypoint
	// /client ("connect", "resolve").
	ClientImage = "veil.lab/client:1"
	// CoreDNSImage is the cluster DNS, controlplane.ClusterBinaries.CoreDNS
	// as its entrypoint /coredns.
	CoreDNSImage = "veil.lab/coredns:1"
)

// imageFile is a static binary in a lab image: built from pkg (relative
// to the repository root), or copied from path.
type imageFile struct {
	pkg, path string
	bin       string // path in the image
}

// labImage is an image of static binaries; the first is the entrypoint.
type labImage struct {
	tag   string
	files []imageFile
}

func labImages(bins controlplane.ClusterBinaries) []labImage {
	var (
		pause      = imageFile{pkg: "./lab/cluster/image/pause", bin: "/pause"}
		testserver = imageFile{pkg: "./lab/cluster/image/testserver", bin: "/testserver"}
		client     = imageFile{pkg: "./lab/cluster/image/client", bin: "/client"}
	)
	images := []labImage{
		{tag: PauseImage, files: []imageFile{pause}},
		{tag: TestServerImage, files: []imageFile{testserver, client}},
		{tag: ClientImage, files: []imageFile{client}},
	}
	if bins.CoreDNS != "" {
		images = append(images, labImage{tag: CoreDNSImage, files: []imageFile{{path: bins.CoreDNS, bin: "/coredns"}}})
	}
	return images
}

// buildImages builds the lab's images into dir as OCI image layout
// tarballs and returns their paths.
func buildImages(ctx context.Context, root, dir string, bins controlplane.ClusterBinaries) ([]string, error) {
	var paths []string
	built := map[string][]byte{}
	for _, im := range labImages(bins) {
		contents := map[string][]byte{}
		for _, f := range im.files {
			data, ok := built[f.bin]
			if !ok {
				src := f.path
				if f.pkg != "" {
					src = filepath.Join(dir, filepath.Base(f.bin))
					cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", src, f.pkg)
					cmd.Dir = root
					cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
					if out, err := cmd.CombinedOutput(); err != nil {
						return nil, fmt.Errorf("build %s for image %s: %w: %s", f.pkg, im.tag, err, out)
					}
				}
				var err error
				if data, err = os.ReadFile(src); err != nil {
					return nil, fmt.Errorf("read %s for image %s: %w", src, im.tag, err)
				}
				built[f.bin] = data
			}
			contents[f.bin] = data
		}
		img, err := binaryImage(im.files[0].bin, contents)
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", im.tag, err)
		}
		name := strings.NewReplacer("/", "-", ":", "-").Replace(strings.TrimPrefix(im.tag, "veil.lab/"))
		path := filepath.Join(dir, name+".tar")
		if err := ociimage.WriteOCITar(path, im.tag, img); err != nil {
			return nil, err
		}
		paths = append(paths, path)
	}
	return paths, nil
}

// epoch keeps the images reproducible.
var epoch = time.Unix(0, 0).UTC()

// binaryImage is an image of one layer holding files (path in the image →
// content, all executable) with entrypoint.
func binaryImage(entrypoint string, files map[string][]byte) (v1.Image, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, path := range slices.Sorted(maps.Keys(files)) {
		data := files[path]
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: path[1:], Mode: 0o755, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, fmt.Errorf("write layer: %w", err)
		}
		if _, err := tw.Write(data); err != nil {
			return nil, fmt.Errorf("write layer: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("write layer: %w", err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(buf.Bytes())), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("create layer: %w", err)
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	if img, err = mutate.AppendLayers(img, layer); err != nil {
		return nil, fmt.Errorf("append layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("read image config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = []string{entrypoint}
	return mutate.ConfigFile(img, cf)
}
