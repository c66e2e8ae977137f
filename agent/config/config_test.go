package config

import (
	"strings"
	"testing"
)

func env(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestParseFlagsEnvAndPrecedence(t *testing.T) {
	c, _, err := Parse([]string{"--state-dir=/flag"}, env(map[string]string{
		"NODE_NAME": "n1", "VEIL_STATE_DIR": "/env", "VEIL_CGROUP_ROOT": "", "VEIL_RESYNC_PERIOD": "1m",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if c.NodeName != "n1" || c.StateDir != "/flag" || c.CgroupRoot != "" || c.ResyncPeriod.Minutes() != 1 {
		t.Errorf("got %+v", c)
	}
	if c.SocketPath != "/var/run/veil/agent.sock" {
		t.Errorf("default socket = %q", c.SocketPath)
	}
	if !c.PodCacheCheckpoint || c.PodCacheCheckpointMaxAge.Minutes() != 10 {
		t.Errorf("pod cache checkpoint %v, max age %s; want on, 10m by default", c.PodCacheCheckpoint, c.PodCacheCheckpointMaxAge)
	}
	if c.SteadyGCPercent != 50 || c.StartupGCPercent != 400 {
		t.Errorf("collector percents %d once converged, %d at start; want 50 and 400 by default", c.SteadyGCPercent, c.StartupGCPercent)
	}
	if g, _, err := Parse([]string{"--steady-gc-percent=0"}, env(map[string]string{"NODE_NAME": "n1"})); err != nil || g.SteadyGCPercent != 0 {
		t.Errorf("--steady-gc-percent=0: %d, %v", g.SteadyGCPercent, err)
	}
	off, _, err := Parse([]string{"--pod-cache-checkpoint=false"}, env(map[string]string{"NODE_NAME": "n1", "VEIL_POD_CACHE_CHECKPOINT_MAX_AGE": "1m"}))
	if err != nil || off.PodCacheCheckpoint || off.PodCacheCheckpointMaxAge.Minutes() != 1 {
		t.Errorf("--pod-cache-checkpoint=false, VEIL_POD_CACHE_CHECKPOINT_MAX_AGE=1m: %+v, %v", off, err)
	}
}

func TestValidateNamesEveryProblem(t *testing.T) {
	_, _, err := Parse([]string{"--cluster-cidr=nope", "--node-ip=fe80::1", "--log-level=loud", "--wireguard-interface=much-too-long-name", "--memory-limit-ratio=2", "--startup-gc-percent=-1", "--pod-cache-checkpoint-max-age=-1s", "--steady-gc-percent=-5"}, env(nil))
	if err == nil {
		t.Fatal("want errors")
	}
	for _, want := range []string{"NODE_NAME", "--cluster-cidr", "--node-ip", "--log-level", "--wireguard-interface", "--memory-limit-ratio", "--startup-gc-percent", "--pod-cache-checkpoint-max-age", "--steady-gc-percent"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
	if _, _, err := Parse(nil, env(map[string]string{"VEIL_RESYNC_PERIOD": "soon"})); err == nil || !strings.Contains(err.Error(), "VEIL_RESYNC_PERIOD") {
		t.Errorf("bad env value: %v", err)
	}
	if _, _, err := Parse([]string{"--cleanup"}, env(nil)); err != nil {
		t.Errorf("cleanup needs no node name: %v", err)
	}
}
