package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// copyTree copies the regular files below src into dst.
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return writeFile(filepath.Join(dst, rel), data)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestGeneratedFilesCurrent runs the generator on a copy of the chart and
// CRDs and compares its output byte for byte with the committed files, so
// that a chart change without `make manifests` fails.
func TestGeneratedFilesCurrent(t *testing.T) {
	repo := filepath.Join("..", "..")
	tmp := t.TempDir()
	copyTree(t, filepath.Join(repo, "helm"), filepath.Join(tmp, "helm"))
	copyTree(t, filepath.Join(repo, "crds"), filepath.Join(tmp, "crds"))
	// A stale generated manifest is removed; a hand-written file is kept.
	if err := writeFile(filepath.Join(tmp, "manifests", "99-stale.yaml"), []byte(header+"kind: Stale\n")); err != nil {
		t.Fatal(err)
	}
	if err := writeFile(filepath.Join(tmp, "manifests", "extra.yaml"), []byte("kind: Mine\n")); err != nil {
		t.Fatal(err)
	}
	if err := run([]string{"-deploy", tmp}); err != nil {
		t.Fatalf("veil-manifests: %v", err)
	}
	if _, err := os.Stat(filepath.Join(tmp, "manifests", "99-stale.yaml")); !os.IsNotExist(err) {
		t.Errorf("stale generated manifest kept: %v", err)
	}
	if _, err := os.Stat(filepath.Join(tmp, "manifests", "extra.yaml")); err != nil {
		t.Errorf("hand-written file removed: %v", err)
	}
	os.Remove(filepath.Join(tmp, "manifests", "extra.yaml"))

	for _, dir := range []string{"manifests", filepath.Join("helm", "veil", "crds")} {
		got, _ := filepath.Glob(filepath.Join(tmp, dir, "*.yaml"))
		want, _ := filepath.Glob(filepath.Join(repo, dir, "*.yaml"))
		if len(got) != len(want) {
			t.Errorf("%s: generator writes %d files, %d are committed (run make manifests)", dir, len(got), len(want))
		}
	}
	files, _ := filepath.Glob(filepath.Join(tmp, "manifests", "*.yaml"))
	files = append(files, filepath.Join(tmp, "kustomization.yaml"))
	crds, _ := filepath.Glob(filepath.Join(tmp, "helm", "veil", "crds", "*.yaml"))
	for _, p := range append(files, crds...) {
		rel, _ := filepath.Rel(tmp, p)
		got, _ := os.ReadFile(p)
		want, err := os.ReadFile(filepath.Join(repo, rel))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("deploy/%s is stale or missing (run make manifests): %v", rel, err)
		}
	}
}

func TestNoCRDs(t *testing.T) {
	tmp := t.TempDir()
	copyTree(t, filepath.Join("..", "..", "helm"), filepath.Join(tmp, "helm"))
	if err := run([]string{"-deploy", tmp}); err == nil {
		t.Fatal("generator succeeded without CRDs; want an error")
	}
}
