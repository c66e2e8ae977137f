package datapath

import (
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/veilmesh/veil/policy/identity"
	"github.com/veilmesh/veil/tests/testenv"
)

func usageOf(t *testing.T, d *Datapath, name string) MapUse {
	t.Helper()
	us, err := d.MapUsage()
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range us {
		if u.Map == name {
			return u
		}
	}
	t.Fatalf("MapUsage lists no %s map: %+v", name, us)
	return MapUse{}
}

// Map sizes come from the configuration. A map filled to capacity refuses
// the next write with a MapFullError naming the map and its size (never a
// silent drop); MapUsage shows it full with the refused write counted,
// and a warning is logged once it is 90% full, again after it drained.
func TestMapCapacityFromConfigAndFull(t *testing.T) {
	var logs testenv.SyncBuffer
	p := newProgTest(t, Config{Maps: MapSizes{IPCache: 10, Endpoints: 4}, Logger: slog.New(slog.NewTextHandler(&logs, nil))}, false, false)
	d := p.d
	if got := d.ipcache.MaxEntries(); got != 10 {
		t.Fatalf("ipcache map has %d entries, want the configured 10", got)
	}
	prefix := func(i int) netip.Prefix { return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, 0, byte(i)}), 32) }
	for i := range 8 {
		if err := d.UpsertIPCache(prefix(i), IPCacheEntry{Identity: identity.World}); err != nil {
			t.Fatal(err)
		}
	}
	if u := usageOf(t, d, MapIPCache); u.Entries != 8 || u.Capacity != 10 || u.FullErrors != 0 {
		t.Errorf("ipcache use %+v, want 8 of 10", u)
	}
	if strings.Contains(logs.String(), "nearly full") {
		t.Errorf("warned at 80%%: %s", logs.String())
	}
	for i := 8; i < 10; i++ {
		if err := d.UpsertIPCache(prefix(i), IPCacheEntry{Identity: identity.World}); err != nil {
			t.Fatal(err)
		}
	}
	err := d.UpsertIPCache(prefix(10), IPCacheEntry{Identity: identity.World})
	var full *MapFullError
	if !errors.As(err, &full) || full.Map != MapIPCache || full.Capacity != 10 || !strings.Contains(err.Error(), "--ipcache-max-entries") {
		t.Fatalf("write to a full ipcache: %v, want a MapFullError for the ipcache of 10 entries", err)
	}
	u := usageOf(t, d, MapIPCache)
	if u.Entries != 10 || u.Fill() != 1 || u.FullErrors != 1 {
		t.Errorf("ipcache use %+v, want 10 of 10 with one refused write", u)
	}
	if n := strings.Count(logs.String(), "nearly full"); n != 1 || !strings.Contains(logs.String(), "map=ipcache") {
		t.Errorf("%d near-full warnings, want one for the ipcache: %s", n, logs.String())
	}
	usageOf(t, d, MapIPCache)
	if n := strings.Count(logs.String(), "nearly full"); n != 1 {
		t.Errorf("warned again while still full: %d warnings", n)
	}
	// Drained below 90% and filled again: warned again.
	for i := 5; i < 10; i++ {
		if err := d.DeleteIPCache(prefix(i)); err != nil {
			t.Fatal(err)
		}
	}
	usageOf(t, d, MapIPCache)
	for i := 5; i < 10; i++ {
		if err := d.UpsertIPCache(prefix(i), IPCacheEntry{Identity: identity.World}); err != nil {
			t.Fatal(err)
		}
	}
	usageOf(t, d, MapIPCache)
	if n := strings.Count(logs.String(), "nearly full"); n != 2 {
		t.Errorf("%d near-full warnings after draining and refilling, want 2", n)
	}

	// A hash map (the endpoints) says it is full differently (E2BIG).
	for i := range 4 {
		p.endpoint(netip.AddrFrom4([4]byte{10, 244, 1, byte(i + 1)}), uint32(i+1), identity.MinPod, 100+i)
	}
	err = d.putEndpoint(Endpoint{IP: netip.MustParseAddr("10.244.1.9"), ID: 9, Identity: identity.MinPod, Ifindex: 109, MAC: macPod, HostMAC: macHost}, false)
	if !errors.As(err, &full) || full.Map != MapEndpoints || full.Capacity != 4 {
		t.Fatalf("fifth endpoint in a map of 4: %v, want a MapFullError", err)
	}
	if u := usageOf(t, d, MapEndpoints); u.Entries != 4 || u.FullErrors != 1 {
		t.Errorf("endpoints use %+v", u)
	}
	// Sizes left at zero keep the defaults.
	if got, want := d.policy.MaxEntries(), uint32(262144); got != want {
		t.Errorf("policy map has %d entries, want the default %d", got, want)
	}
}
