// Package ociimage writes container images as OCI image layouts packed in
// tar files, named so that `ctr -n k8s.io images import` and `docker load`
// take them: the project's images travel without a registry or a daemon.
package ociimage

import (
	"archive/tar"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
)

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

// epoch is every timestamp in the tar file, for reproducible digests.
var epoch = time.Unix(0, 0).UTC()
