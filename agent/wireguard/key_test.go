package wireguard

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func TestLoadOrCreateKey(t *testing.T) {
	for _, tc := range []struct {
		name string
		fn   func(t *testing.T, path string)
	}{
		{"creates 0600 then loads the same key", func(t *testing.T, path string) {
			k1, err := LoadOrCreateKey(path)
			if err != nil {
				t.Fatal(err)
			}
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("mode %04o, want 0600", fi.Mode().Perm())
			}
			if d, _ := os.Stat(filepath.Dir(path)); d.Mode().Perm() != 0o700 {
				t.Errorf("dir mode %04o, want 0700", d.Mode().Perm())
			}
			k2, err := LoadOrCreateKey(path)
			if err != nil {
				t.Fatal(err)
			}
			if k1.PrivateKey() != k2.PrivateKey() || k1.PublicKey() != k1.PrivateKey().PublicKey() {
				t.Error("second load returned a different key")
			}
			if age := k2.Age(time.Now()); age < 0 || age > time.Minute {
				t.Errorf("key age %v", age)
			}
			if !k2.Created().Equal(fi.ModTime()) {
				t.Errorf("created %v, want mtime %v", k2.Created(), fi.ModTime())
			}
			// The file is what `wg genkey` writes, so wg tools read it.
			data, _ := os.ReadFile(path)
			if strings.TrimSpace(string(data)) != k1.PrivateKey().String() {
				t.Error("file is not the base64 key")
			}
		}},
		{"refuses looser permissions", func(t *testing.T, path string) {
			if _, err := LoadOrCreateKey(path); err != nil {
				t.Fatal(err)
			}
			for _, mode := range []os.FileMode{0o640, 0o604, 0o644, 0o666} {
				os.Chmod(path, mode)
				_, err := LoadOrCreateKey(path)
				if err == nil || !strings.Contains(err.Error(), "readable by others") {
					t.Errorf("mode %04o: err %v, want refusal", mode, err)
				}
			}
			os.Chmod(path, 0o400)
			if _, err := LoadOrCreateKey(path); err != nil {
				t.Errorf("mode 0400 is private enough: %v", err)
			}
		}},
		{"corrupt file is an error that does not quote it", func(t *testing.T, path string) {
			os.MkdirAll(filepath.Dir(path), 0o700)
			secretish := "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA=="
			for _, content := range []string{"", "not a key", secretish, strings.Repeat("A", 43) + "="} {
				os.WriteFile(path, []byte(content), 0o600)
				_, err := LoadOrCreateKey(path)
				if err == nil {
					t.Errorf("content %q accepted", content)
					continue
				}
				if content != "" && strings.Contains(err.Error(), content) {
					t.Errorf("error quotes the file: %v", err)
				}
			}
			// Never silently replaced: the identity stays what the operator has.
			if data, _ := os.ReadFile(path); !strings.HasPrefix(string(data), "AAAA") {
				t.Error("corrupt key file was overwritten")
			}
		}},
		{"not a regular file", func(t *testing.T, path string) {
			os.MkdirAll(path, 0o700)
			if _, err := LoadOrCreateKey(path); err == nil {
				t.Error("directory accepted as key file")
			}
		}},
		{"empty path", func(t *testing.T, _ string) {
			if _, err := LoadOrCreateKey(""); err == nil {
				t.Error("empty path accepted")
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.fn(t, filepath.Join(t.TempDir(), "veil", "wg.key"))
		})
	}
}

func TestKeyRotate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "wg.key")
	k1, err := LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := k1.Rotate()
	if err != nil {
		t.Fatal(err)
	}
	if k2.PrivateKey() == k1.PrivateKey() {
		t.Fatal("rotation kept the key")
	}
	if got, _ := LoadOrCreateKey(path); got.PrivateKey() != k2.PrivateKey() || !got.RotationPending() {
		t.Error("file does not hold the new key with the previous one pending")
	}
	if fi, err := os.Stat(path + ".prev"); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("previous key not kept privately: %v", err)
	}
	if _, err := k2.Rotate(); !errors.Is(err, ErrRotationPending) {
		t.Errorf("second rotation before confirm: %v, want ErrRotationPending", err)
	}
	back, err := k2.RollbackRotation()
	if err != nil {
		t.Fatal(err)
	}
	if back.PrivateKey() != k1.PrivateKey() {
		t.Error("rollback did not restore the old key")
	}
	k3, err := back.Rotate()
	if err != nil {
		t.Fatal(err)
	}
	if err := k3.ConfirmRotation(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path + ".prev"); !os.IsNotExist(err) {
		t.Error("confirmed rotation kept the previous key")
	}
	if _, err := k1.Rotate(); err == nil {
		t.Error("rotating a stale Key (file changed since) succeeded")
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("left files behind: %v", entries)
	}
	mem, _ := GenerateKey()
	if m2, err := mem.Rotate(); err != nil || m2.PrivateKey() == mem.PrivateKey() || m2.Path() != "" {
		t.Errorf("in-memory rotation: %v", err)
	}
}

func TestKeyNeverPrinted(t *testing.T) {
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	secret := k.PrivateKey().String()
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	log.Info("x", "key", k, "struct", struct{ K Key }{k})
	slog.New(slog.NewTextHandler(&buf, nil)).Info("y", "key", k)
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%d", "%x", "%q"} {
		fmt.Fprintf(&buf, verb+"\n", k)
		fmt.Fprintf(&buf, verb+"\n", &k)
	}
	raw := k.PrivateKey()
	for _, s := range []string{secret, fmt.Sprintf("%x", raw[:]), fmt.Sprint(raw[:])} {
		if strings.Contains(buf.String(), s) {
			t.Fatalf("private key printed: %s", buf.String())
		}
	}
	if !strings.Contains(buf.String(), k.Fingerprint()) {
		t.Errorf("fingerprint not shown: %s", buf.String())
	}
}

func TestFingerprint(t *testing.T) {
	// sha256 of 32 zero bytes except the first (a fixed vector).
	var pub wgtypes.Key
	pub[0] = 1
	if got := Fingerprint(pub); len(got) != 16 {
		t.Errorf("fingerprint %q, want 16 hex digits", got)
	}
	if Fingerprint(wgtypes.Key{}) != "" {
		t.Error("zero key has a fingerprint")
	}
	a, _ := GenerateKey()
	b, _ := GenerateKey()
	if a.Fingerprint() == b.Fingerprint() {
		t.Error("two keys share a fingerprint")
	}
}

func TestPodMTU(t *testing.T) {
	for _, tc := range []struct {
		underlay, want int
		wantErr        bool
	}{
		{1500, 1420, false},
		{9001, 8921, false},
		{1360, 1280, false},
		{1359, 0, true},
		{1280, 0, true},
		{0, 0, true},
		{-5, 0, true},
	} {
		got, err := PodMTU(tc.underlay)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("PodMTU(%d) = %d, %v; want %d, err %v", tc.underlay, got, err, tc.want, tc.wantErr)
		}
		if err != nil && !strings.Contains(err.Error(), "1360") {
			t.Errorf("error does not say what underlay is needed: %v", err)
		}
	}
}
