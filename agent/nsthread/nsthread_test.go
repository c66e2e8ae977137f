package nsthread

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/veilmesh/veil/tests/testenv"
)

func TestDoPathMissingNamespaceNamesThePath(t *testing.T) {
	path := "/run/netns/veil-nsthread-does-not-exist"
	called := false
	err := DoPath(path, func() error { called = true; return nil })
	if err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("DoPath(%s) = %v, want an error naming the path", path, err)
	}
	if called {
		t.Fatal("fn ran although the namespace could not be opened")
	}
}

func TestPrivilegedDoRunsInTheNamespaceAndLeavesTheCallerOutside(t *testing.T) {
	testenv.RequirePrivileged(t)
	name := fmt.Sprintf("veil-nsthread-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	path := "/run/netns/" + name

	want, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer want.Close()

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	before, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer before.Close()
	if before.Equal(want) {
		t.Fatal("test set-up: the caller is already in the new namespace")
	}

	errFn := errors.New("from fn")
	var inside bool
	err = DoPath(path, func() error {
		cur, err := netns.Get()
		if err != nil {
			return err
		}
		defer cur.Close()
		inside = cur.Equal(want)
		return errFn
	})
	if !errors.Is(err, errFn) {
		t.Fatalf("DoPath returned %v, want fn's error wrapped", err)
	}
	if !inside {
		t.Fatal("fn did not run in the namespace at path")
	}
	after, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer after.Close()
	if !after.Equal(before) {
		t.Fatal("the caller's thread changed namespace")
	}
}
