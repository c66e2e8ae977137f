package cluster

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/veilmesh/veil/deploy/ociimage"
)

// Images the lab builds and imports into every node; pods refer to them
// with imagePullPolicy IfNotPresent or Never, as there is no registry.
const (
	// PauseImage is every pod's sandbox image.
	PauseImage = "veil.lab/pause:1"
	// TestServerImage runs lab/cluster/image/testserver ("serve ADDR",
	// "probe ADDR") as its entrypoint /testserver.
	TestServerImage = "veil.lab/testserver:1"
)

// labImage is an image of one static binary built from this repository.
type labImage struct {
	tag string
	pkg string // relative to the repository root
	bin string // path in the image, the entrypoint
}

var labImages = []labImage{
	{tag: PauseImage, pkg: "./lab/cluster/image/pause", bin: "/pause"},
	{tag: TestServerImage, pkg: "./lab/cluster/image/testserver", bin: "/testserver"},
}

// buildImages builds the lab's images into dir as OCI image layout
// tarballs and returns their paths.
func buildImages(ctx context.Context, root, dir string) ([]string, error) {
	var paths []string
	for _, im := range labImages {
		bin := filepath.Join(dir, filepath.Base(im.bin))
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, im.pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("build %s for image %s: %w: %s", im.pkg, im.tag, err, out)
		}
		data, err := os.ReadFile(bin)
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", bin, err)
		}
		img, err := singleBinaryImage(im.bin, data)
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", im.tag, err)
		}
		path := filepath.Join(dir, filepath.Base(im.bin)+".tar")
		if err := ociimage.WriteOCITar(path, im.tag, img); err != nil {
			return nil, err
		}
		paths = append(paths, path)
	}
	return paths, nil
}

// epoch keeps the images reproducible.
var epoch = time.Unix(0, 0).UTC()

func singleBinaryImage(path string, data []byte) (v1.Image, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: path[1:], Mode: 0o755, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
		return nil, fmt.Errorf("write layer: %w", err)
	}
	if _, err := tw.Write(data); err != nil {
		return nil, fmt.Errorf("write layer: %w", err)
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
	cf.Config.Entrypoint = []string{path}
	return mutate.ConfigFile(img, cf)
}
