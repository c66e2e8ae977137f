package controlplane

import (
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// copyPins copies the wrapper modules' key files into a temp dir, so the
// test can change a pin without touching the checkout.
func copyPins(t *testing.T) string {
	t.Helper()
	src, err := sourceDir()
	if err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	for _, set := range []buildSet{controlPlaneSet, kubernetesSet, containerdSet, corednsSet, e2eSet} {
		for _, name := range set.keyFiles {
			data, err := os.ReadFile(filepath.Join(src, name))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.MkdirAll(filepath.Dir(filepath.Join(dst, name)), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dst, name), data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	return dst
}

func TestCacheKey(t *testing.T) {
	dir := copyPins(t)
	key := func(toolchain string) string {
		t.Helper()
		k, err := cacheKey(dir, controlPlaneSet, toolchain)
		if err != nil {
			t.Fatalf("cacheKey: %v", err)
		}
		return k
	}
	base := key("go1.26.8 linux/amd64")
	if again := key("go1.26.8 linux/amd64"); again != base {
		t.Fatalf("cacheKey is not stable: %s then %s", base, again)
	}
	if other := key("go1.27.0 linux/amd64"); other == base {
		t.Errorf("cacheKey ignores the toolchain: %s for both", base)
	}

	gomod := filepath.Join(dir, "kube-apiserver", "go.mod")
	data, err := os.ReadFile(gomod)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(gomod, append(data, "\n// a new pin\n"...), 0o644); err != nil {
		t.Fatal(err)
	}
	if changed := key("go1.26.8 linux/amd64"); changed == base {
		t.Errorf("cacheKey ignores kube-apiserver/go.mod: %s before and after the change", base)
	}
}

// TestCacheKeySets checks that the sets are cached apart: each has its own
// key, and a change of one set's pins leaves the others' keys alone.
func TestCacheKeySets(t *testing.T) {
	dir := copyPins(t)
	const toolchain = "go1.26.8 linux/amd64"
	keys := func() []string {
		t.Helper()
		var out []string
		for _, set := range []buildSet{controlPlaneSet, kubernetesSet, containerdSet, corednsSet, e2eSet} {
			k, err := cacheKey(dir, set, toolchain)
			if err != nil {
				t.Fatalf("cacheKey: %v", err)
			}
			out = append(out, k)
		}
		return out
	}
	before := keys()
	for i := range before {
		for j := i + 1; j < len(before); j++ {
			if before[i] == before[j] {
				t.Fatalf("sets %d and %d share a cache key: %v", i, j, before)
			}
		}
	}
	gomod := filepath.Join(dir, "kubernetes", "go.mod")
	data, err := os.ReadFile(gomod)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(gomod, append(data, "\n// a new pin\n"...), 0o644); err != nil {
		t.Fatal(err)
	}
	after := keys()
	if after[0] != before[0] || after[2] != before[2] || after[3] != before[3] {
		t.Errorf("a kubernetes pin changed other sets' keys: %v, then %v", before, after)
	}
	if after[1] == before[1] {
		t.Errorf("cacheKey ignores kubernetes/go.mod: %s before and after the change", before[1])
	}
}

func TestCacheDir(t *testing.T) {
	t.Setenv("VEIL_CACHE", "/var/cache/veil-ci")
	got := CacheDir()
	if want := "/var/cache/veil-ci/controlplane"; got != want {
		t.Errorf("CacheDir() = %s; want %s", got, want)
	}

	t.Setenv("VEIL_CACHE", "")
	t.Setenv("XDG_CACHE_HOME", "/home/dev/.cache")
	got = CacheDir()
	if want := "/home/dev/.cache/veil/controlplane"; got != want {
		t.Errorf("CacheDir() = %s; want %s", got, want)
	}
}

func TestCertificates(t *testing.T) {
	ca, err := newAuthority("test-ca")
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca.certPEM) {
		t.Fatal("CA PEM does not parse")
	}
	parse := func(p keyPair) *x509.Certificate {
		t.Helper()
		block, _ := pem.Decode(p.certPEM)
		if block == nil {
			t.Fatal("certificate PEM does not decode")
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		key, _ := pem.Decode(p.keyPEM)
		if key == nil || key.Type != "PRIVATE KEY" {
			t.Fatalf("key PEM: got %v; want a PRIVATE KEY block", key)
		}
		return cert
	}

	serving, err := ca.serving("kube-apiserver", []string{"localhost"}, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	cert := parse(serving)
	if _, err := cert.Verify(x509.VerifyOptions{DNSName: "127.0.0.1", Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Errorf("serving certificate for 127.0.0.1: %v", err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{DNSName: "example.com", Roots: roots}); err == nil {
		t.Errorf("serving certificate verifies for example.com; want only its own names")
	}

	client, err := ca.client("alice", "system:masters", "dev")
	if err != nil {
		t.Fatal(err)
	}
	cert = parse(client)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("client certificate: %v", err)
	}
	groups := slices.Sorted(slices.Values(cert.Subject.Organization))
	if cert.Subject.CommonName != "alice" || !slices.Equal(groups, []string{"dev", "system:masters"}) {
		t.Errorf("client subject = %v; want CN=alice, O=dev and system:masters", cert.Subject)
	}
	if !cert.NotAfter.After(time.Now().Add(time.Hour)) {
		t.Errorf("client certificate expires at %v; want it valid for the whole run", cert.NotAfter)
	}
}

func TestFreePortsDistinct(t *testing.T) {
	ports, err := freePorts(8)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for _, p := range ports {
		if p <= 0 || seen[p] {
			t.Fatalf("freePorts(8) = %v; want 8 distinct ports", ports)
		}
		seen[p] = true
	}
}

func TestCacheDirWithoutHome(t *testing.T) {
	t.Setenv("VEIL_CACHE", "")
	t.Setenv("XDG_CACHE_HOME", "")
	t.Setenv("HOME", "")
	got := CacheDir()
	if want := filepath.Join(os.TempDir(), "veil-cache", "controlplane"); got != want {
		t.Errorf("CacheDir() = %s; want %s", got, want)
	}
}
