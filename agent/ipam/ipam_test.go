package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func open(t *testing.T, path, cidr string) *Allocator {
	t.Helper()
	a, err := Open(path, netip.MustParsePrefix(cidr))
	if err != nil {
		t.Fatalf("Open(%s): %v", cidr, err)
	}
	return a
}

func alloc(t *testing.T, a *Allocator, id string) netip.Addr {
	t.Helper()
	ip, err := a.Allocate(context.Background(), id, Owner{Namespace: "ns", Name: id})
	if err != nil {
		t.Fatalf("Allocate(%s): %v", id, err)
	}
	return ip
}

func TestAllocateSkipsReservedAndIsIdempotent(t *testing.T) {
	a := open(t, filepath.Join(t.TempDir(), "ipam.json"), "10.244.1.0/24")
	if got, want := a.Size(), uint64(253); got != want {
		t.Fatalf("Size() = %d; want %d", got, want)
	}
	ip := alloc(t, a, "c1")
	if want := netip.MustParseAddr("10.244.1.2"); ip != want {
		t.Fatalf("first address = %s; want %s", ip, want)
	}
	if again := alloc(t, a, "c1"); again != ip {
		t.Fatalf("retried Allocate = %s; want the same %s", again, ip)
	}
	if ip2 := alloc(t, a, "c2"); ip2 == ip {
		t.Fatalf("two containers got %s", ip)
	}
	al, ok := a.Lookup("c1")
	if !ok || al.IP != ip || al.Name != "c1" || al.Namespace != "ns" {
		t.Fatalf("Lookup(c1) = %+v, %v", al, ok)
	}
}

func TestExhaustionAndRelease(t *testing.T) {
	a := open(t, filepath.Join(t.TempDir(), "ipam.json"), "10.0.0.0/29")
	// /29: 8 addresses minus network, .1 and broadcast.
	seen := map[netip.Addr]bool{}
	for i := range 5 {
		ip := alloc(t, a, fmt.Sprintf("c%d", i))
		if seen[ip] {
			t.Fatalf("%s handed out twice", ip)
		}
		for _, reserved := range []string{"10.0.0.0", "10.0.0.1", "10.0.0.7"} {
			if ip == netip.MustParseAddr(reserved) {
				t.Fatalf("reserved address %s handed out", ip)
			}
		}
		seen[ip] = true
	}
	_, err := a.Allocate(context.Background(), "one-too-many", Owner{})
	if !errors.Is(err, ErrExhausted) {
		t.Fatalf("Allocate on a full pool: %v; want ErrExhausted", err)
	}
	var ee *ExhaustedError
	if !errors.As(err, &ee) || ee.Size != 5 {
		t.Fatalf("error %v; want an ExhaustedError with Size 5", err)
	}
	for _, want := range []string{"10.0.0.0/29", "all 5", "one-too-many"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	freed, _ := a.Lookup("c2")
	if err := a.Release(context.Background(), "c2"); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(context.Background(), "c2"); err != nil {
		t.Fatalf("second Release: %v; want nil (DEL is idempotent)", err)
	}
	if err := a.Release(context.Background(), "never-seen"); err != nil {
		t.Fatalf("Release of unknown container: %v", err)
	}
	if ip := alloc(t, a, "c9"); ip != freed.IP {
		t.Fatalf("after release got %s; want the freed %s", ip, freed.IP)
	}
}

func TestReleasedAddressIsReusedLast(t *testing.T) {
	a := open(t, filepath.Join(t.TempDir(), "ipam.json"), "10.0.0.0/24")
	first := alloc(t, a, "a")
	alloc(t, a, "b")
	if err := a.Release(context.Background(), "a"); err != nil {
		t.Fatal(err)
	}
	if ip := alloc(t, a, "c"); ip == first {
		t.Fatalf("just-released %s reused at once", first)
	}
}

func TestPersistenceAcrossReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "ipam.json")
	a := open(t, path, "10.244.1.0/24")
	ips := map[string]netip.Addr{}
	for _, id := range []string{"a", "b", "c"} {
		ips[id] = alloc(t, a, id)
	}
	if err := a.Release(context.Background(), "b"); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		t.Errorf("state file mode %v; want no group/other access", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("state directory holds %d entries; want only the state file (no temp files left)", len(entries))
	}

	b := open(t, path, "10.244.1.0/24")
	for _, id := range []string{"a", "c"} {
		if got := alloc(t, b, id); got != ips[id] {
			t.Errorf("after reopen %s got %s; want %s", id, got, ips[id])
		}
	}
	if _, ok := b.Lookup("b"); ok {
		t.Error("released allocation came back after reopen")
	}
	// New allocations continue after the last one, not in b's old slot.
	if got := alloc(t, b, "d"); got == ips["a"] || got == ips["b"] || got == ips["c"] {
		t.Errorf("new allocation after reopen got %s, reusing a recent address", got)
	}
}

func TestCorruptStateIsAnError(t *testing.T) {
	for _, tc := range []struct {
		name, content, want string
	}{
		{"truncated", `{"version":1,"cidr":"10.0.0.0/24","allocations":[{"contai`, "invalid JSON"},
		{"empty", "", "empty"},
		{"not json", "hello", "invalid JSON"},
		{"bad ip", `{"version":1,"cidr":"10.0.0.0/24","allocations":[{"containerID":"a","ip":"10.0.0.300"}]}`, "10.0.0.300"},
		{"duplicate ip", `{"version":1,"cidr":"10.0.0.0/24","allocations":[{"containerID":"a","ip":"10.0.0.5"},{"containerID":"b","ip":"10.0.0.5"}]}`, "held by both"},
		{"future version", `{"version":7,"cidr":"10.0.0.0/24","allocations":[]}`, "version 7"},
		{"unknown field", `{"version":1,"cidr":"10.0.0.0/24","allocations":[],"surprise":1}`, "surprise"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "ipam.json")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := Open(path, netip.MustParsePrefix("10.0.0.0/24"))
			if err == nil {
				t.Fatal("Open of a corrupt file succeeded; want an error")
			}
			for _, want := range []string{path, "corrupt", tc.want} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %q", err, want)
				}
			}
		})
	}
}

func TestCIDRChangeKeepsInsideAndReportsConflicts(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ipam.json")
	a := open(t, path, "10.244.1.0/24")
	inside := alloc(t, a, "inside") // 10.244.1.2, still valid in the /23
	for i := range 200 {
		alloc(t, a, fmt.Sprintf("filler%d", i))
	}
	if err := a.Release(context.Background(), "filler0"); err != nil {
		t.Fatal(err)
	}

	b := open(t, path, "10.244.0.0/23")
	if got := alloc(t, b, "inside"); got != inside {
		t.Fatalf("allocation inside the new CIDR changed: %s; want %s", got, inside)
	}
	if c := b.Conflicts(); len(c) != 0 {
		t.Fatalf("Conflicts() = %v; want none (all old addresses lie in the new CIDR)", c)
	}

	c := open(t, path, "10.99.0.0/24")
	conflicts := c.Conflicts()
	if len(conflicts) != 200 {
		t.Fatalf("Conflicts() has %d entries; want 200", len(conflicts))
	}
	_, err := c.Allocate(context.Background(), "inside", Owner{})
	if !errors.Is(err, ErrOutsideCIDR) {
		t.Fatalf("Allocate for a container holding an out-of-CIDR address: %v; want ErrOutsideCIDR", err)
	}
	if ip := alloc(t, c, "new"); !c.CIDR().Contains(ip) {
		t.Fatalf("new allocation %s outside %s", ip, c.CIDR())
	}
	if err := c.Release(context.Background(), "inside"); err != nil {
		t.Fatal(err)
	}
	if got := len(c.Conflicts()); got != 199 {
		t.Fatalf("after releasing one conflict %d remain; want 199", got)
	}
}

func TestOpenRejectsBadCIDR(t *testing.T) {
	for _, cidr := range []string{"10.0.0.0/31", "10.0.0.5/24", "fd00::/64"} {
		if _, err := Open(filepath.Join(t.TempDir(), "x.json"), netip.MustParsePrefix(cidr)); err == nil {
			t.Errorf("Open(%s) succeeded; want an error", cidr)
		}
	}
}

func TestConcurrentAllocateNeverDuplicates(t *testing.T) {
	a := open(t, filepath.Join(t.TempDir(), "ipam.json"), "10.0.0.0/26")
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		seen = map[netip.Addr]string{}
		full int
	)
	for i := range 80 {
		wg.Go(func() {
			id := fmt.Sprintf("c%d", i)
			ip, err := a.Allocate(context.Background(), id, Owner{})
			mu.Lock()
			defer mu.Unlock()
			if errors.Is(err, ErrExhausted) {
				full++
				return
			}
			if err != nil {
				t.Error(err)
				return
			}
			if prev, dup := seen[ip]; dup {
				t.Errorf("%s handed to %s and %s", ip, prev, id)
			}
			seen[ip] = id
		})
	}
	wg.Wait()
	if len(seen) != 61 || full != 19 {
		t.Fatalf("%d allocated, %d refused; want 61 and 19", len(seen), full)
	}
}

func TestCancelledContext(t *testing.T) {
	a := open(t, filepath.Join(t.TempDir(), "ipam.json"), "10.0.0.0/24")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := a.Allocate(ctx, "c", Owner{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Allocate with a cancelled context: %v", err)
	}
}
