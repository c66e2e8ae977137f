package nodeinfo

import (
	"encoding/base64"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func TestKeyFingerprint(t *testing.T) {
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	pub := k.PublicKey()
	if got, want := KeyFingerprint(pub.String()), Fingerprint(pub); got != want || len(got) != 16 {
		t.Errorf("KeyFingerprint = %q; Fingerprint = %q, want equal, 16 hex digits", got, want)
	}
	for _, bad := range []string{"", "not base64!", base64.StdEncoding.EncodeToString([]byte("short")), wgtypes.Key{}.String()} {
		if got := KeyFingerprint(bad); got != "" {
			t.Errorf("KeyFingerprint(%q) = %q; want empty", bad, got)
		}
	}
}
