package netns

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// cgroup2Mount returns where the cgroup v2 hierarchy is mounted
// (/sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones).
func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return "", fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 3 && fields[2] == "cgroup2" {
			return fields[1], nil
		}
	}
	return "", errors.New("no cgroup v2 hierarchy is mounted")
}

// Cgroup is a cgroup v2 directory the lab created.
type Cgroup struct {
	Path string
}

// NewCgroup creates a cgroup named name under the cgroup v2 mount.
func NewCgroup(name string) (*Cgroup, error) {
	root, err := cgroup2Mount()
	if err != nil {
		return nil, err
	}
	path := filepath.Join(root, name)
	if err := os.Mkdir(path, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", path, err)
	}
	return &Cgroup{Path: path}, nil
}

// Delete removes the cgroup once its processes are gone. It waits briefly,
// because a killed process leaves its cgroup asynchronously.
func (c *Cgroup) Delete() error {
	var err error
	for i := 0; i < 50; i++ {
		err = os.Remove(c.Path)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("remove cgroup %s: %w", c.Path, err)
}
