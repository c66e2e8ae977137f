package wireguard

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/veilmesh/veil/api/nodeinfo"
)

// ErrRotationPending is returned by Rotate while the previous key of an
// earlier rotation is still kept: rotating again would throw away the only
// key some peers may still know.
var ErrRotationPending = errors.New("previous key rotation not confirmed")

// keyFileMode is the only mode a key file may have: anything group- or
// world-readable means the secret may already be out.
const keyFileMode = 0o600

// Key is a node's WireGuard identity: a Curve25519 private key, where it is
// stored and when it was made. The private half is deliberately hard to print:
// every fmt verb and slog show only the public fingerprint.
type Key struct {
	priv    wgtypes.Key
	pub     wgtypes.Key
	created time.Time
	path    string // "" for a key that lives only in memory
}

var (
	_ fmt.Formatter  = Key{}
	_ fmt.GoStringer = Key{}
	_ slog.LogValuer = Key{}
)

// GenerateKey returns a fresh key that lives only in memory (tests, tools).
func GenerateKey() (Key, error) {
	priv, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return Key{}, fmt.Errorf("generate wireguard key: %w", err)
	}
	return newKey(priv, time.Now(), ""), nil
}

func newKey(priv wgtypes.Key, created time.Time, path string) Key {
	return Key{priv: priv, pub: priv.PublicKey(), created: created, path: path}
}

// LoadOrCreateKey loads the private key stored at path, creating it (mode
// 0600, parent directory 0700) if it does not exist. A file that is readable
// by group or others, is not a regular file, or does not hold a key is an
// error: it is never silently replaced, because the key is the node's
// identity and a looser file may already have leaked.
func LoadOrCreateKey(path string) (Key, error) {
	if path == "" {
		return Key{}, errors.New("load wireguard key: empty path")
	}
	k, err := loadKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return k, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return Key{}, fmt.Errorf("create wireguard key directory: %w", err)
	}
	priv, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return Key{}, fmt.Errorf("generate wireguard key: %w", err)
	}
	// Link, not rename: two agents starting at once must not each believe
	// their own key won. The loser loads the winner's key below.
	if err := writeKeyFile(path, priv, false); err != nil && !errors.Is(err, fs.ErrExist) {
		return Key{}, err
	}
	return loadKey(path)
}

func loadKey(path string) (Key, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return Key{}, fmt.Errorf("load wireguard key: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return Key{}, fmt.Errorf("load wireguard key %s: not a regular file (%s)", path, fi.Mode().Type())
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return Key{}, fmt.Errorf("load wireguard key %s: mode %04o is readable by others, refusing to use it (want %04o; run chmod 600 %s after checking it did not leak, or delete it to get a new key)", path, perm, keyFileMode, path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return Key{}, fmt.Errorf("load wireguard key: %w", err)
	}
	// The error never quotes the content: a nearly valid file is a secret.
	priv, err := wgtypes.ParseKey(strings.TrimSpace(string(data)))
	if err != nil {
		return Key{}, fmt.Errorf("load wireguard key %s: file does not hold a base64 WireGuard key (%d bytes)", path, len(data))
	}
	if priv == (wgtypes.Key{}) {
		return Key{}, fmt.Errorf("load wireguard key %s: key is all zeros", path)
	}
	return newKey(priv, fi.ModTime(), path), nil
}

// writeKeyFile writes priv to path through a temporary file in the same
// directory, so that a crash leaves either the old or the new file, never a
// torn one. replace=false fails with fs.ErrExist instead of overwriting.
func writeKeyFile(path string, priv wgtypes.Key, replace bool) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write wireguard key: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	// CreateTemp already uses 0600; Chmod makes it independent of that.
	if err := f.Chmod(keyFileMode); err != nil {
		f.Close()
		return fmt.Errorf("write wireguard key: %w", err)
	}
	if _, err := f.WriteString(priv.String() + "\n"); err != nil {
		f.Close()
		return fmt.Errorf("write wireguard key: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write wireguard key: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write wireguard key: %w", err)
	}
	if replace {
		err = os.Rename(tmp, path)
	} else {
		err = os.Link(tmp, path)
	}
	if err != nil {
		return fmt.Errorf("write wireguard key: %w", err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync key directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync key directory: %w", err)
	}
	return nil
}

func prevPath(path string) string { return path + ".prev" }

// Rotate makes a new key and stores it at the key's path (atomically), keeping
// the current one beside it (path + ".prev") until ConfirmRotation: if the
// agent dies before peers learned the new public key, the operator can still
// RollbackRotation. While a previous key is kept, Rotate fails with
// ErrRotationPending. A key without a path is rotated in memory only.
func (k Key) Rotate() (Key, error) {
	if k.priv == (wgtypes.Key{}) {
		return Key{}, errors.New("rotate wireguard key: no key loaded")
	}
	if k.path == "" {
		return GenerateKey()
	}
	if _, err := os.Lstat(prevPath(k.path)); err == nil {
		return Key{}, fmt.Errorf("rotate wireguard key %s: %w", k.path, ErrRotationPending)
	}
	onDisk, err := loadKey(k.path)
	if err != nil {
		return Key{}, fmt.Errorf("rotate wireguard key: %w", err)
	}
	if onDisk.priv != k.priv {
		return Key{}, fmt.Errorf("rotate wireguard key %s: file no longer holds key %s (changed since it was loaded)", k.path, k.Fingerprint())
	}
	if err := writeKeyFile(prevPath(k.path), k.priv, true); err != nil {
		return Key{}, fmt.Errorf("rotate wireguard key: keep previous: %w", err)
	}
	priv, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return Key{}, fmt.Errorf("rotate wireguard key: %w", err)
	}
	if err := writeKeyFile(k.path, priv, true); err != nil {
		return Key{}, fmt.Errorf("rotate wireguard key: %w", err)
	}
	return loadKey(k.path)
}

// ConfirmRotation forgets the previous key kept by Rotate. Call it once the
// new public key is published and peers handshake with it.
func (k Key) ConfirmRotation() error {
	if k.path == "" {
		return nil
	}
	if err := os.Remove(prevPath(k.path)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("confirm wireguard key rotation: %w", err)
	}
	return syncDir(filepath.Dir(k.path))
}

// RollbackRotation puts the previous key kept by Rotate back in place and
// returns it.
func (k Key) RollbackRotation() (Key, error) {
	if k.path == "" {
		return Key{}, errors.New("roll back wireguard key rotation: key has no file")
	}
	prev, err := loadKey(prevPath(k.path))
	if err != nil {
		return Key{}, fmt.Errorf("roll back wireguard key rotation: %w", err)
	}
	if err := os.Rename(prevPath(k.path), k.path); err != nil {
		return Key{}, fmt.Errorf("roll back wireguard key rotation: %w", err)
	}
	if err := syncDir(filepath.Dir(k.path)); err != nil {
		return Key{}, err
	}
	prev.path = k.path
	return prev, nil
}

// IsZero reports whether no key was loaded.
func (k Key) IsZero() bool { return k.priv == (wgtypes.Key{}) }

// PrivateKey returns the secret half, for configuring a device only.
func (k Key) PrivateKey() wgtypes.Key { return k.priv }

// PublicKey returns the public half, the one that is published.
func (k Key) PublicKey() wgtypes.Key { return k.pub }

// Fingerprint identifies the key in status and logs.
func (k Key) Fingerprint() string { return Fingerprint(k.pub) }

// Created is when the key was made (the key file's modification time: the
// file is only ever written whole, on creation and rotation).
func (k Key) Created() time.Time { return k.created }

// Age is how old the key is at now.
func (k Key) Age(now time.Time) time.Duration { return now.Sub(k.created) }

// Path is the key file ("" for an in-memory key).
func (k Key) Path() string { return k.path }

// RotationPending reports whether a previous key kept by Rotate is still
// waiting for ConfirmRotation. It looks at the file system each time, so it
// is true after an agent restart in the middle of a rotation.
func (k Key) RotationPending() bool {
	if k.path == "" {
		return false
	}
	_, err := os.Lstat(prevPath(k.path))
	return err == nil
}

// String shows the fingerprint, never the private key.
func (k Key) String() string { return "wireguard-key:" + k.Fingerprint() }

// GoString keeps %#v from dumping the private key.
func (k Key) GoString() string { return k.String() }

// Format keeps every fmt verb (%d and %x on a struct included) from reaching
// the private key.
func (k Key) Format(f fmt.State, _ rune) { fmt.Fprint(f, k.String()) }

// LogValue keeps slog from reaching the private key.
func (k Key) LogValue() slog.Value {
	return slog.GroupValue(slog.String("fingerprint", k.Fingerprint()), slog.Time("created", k.created))
}

// Fingerprint identifies a public key in status and logs (see
// nodeinfo.Fingerprint, which meshctl shares).
func Fingerprint(pub wgtypes.Key) string { return nodeinfo.Fingerprint(pub) }
