// Package config holds veil-agent's configuration: every setting is a flag
// with a default and help text, and may also come from the environment
// (VEIL_<FLAG_NAME>, dashes as underscores), which is how the DaemonSet sets
// them. NODE_NAME is the one exception, because the downward API convention
// is to call it that.
package config

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/veilmesh/veil/agent/memlimit"
)

// Config is the agent's configuration.
type Config struct {
	NodeName   string
	Kubeconfig string

	BPFFSRoot         string
	CgroupRoot        string
	SkipAccelSelfTest bool
	UnderlayInterface string
	NodeIP            string
	ClusterCIDR       string
	WireGuardIface    string
	LegacyTC          bool
	// Sizes of the maps that grow with the cluster; 0 keeps the default.
	EndpointsMaxEntries, IPCacheMaxEntries, PolicyMaxEntries, ConntrackMaxEntries uint32

	Encryption string
	StrictMode bool
	// KubeProxyReplacement: no kube-proxy runs; the agent translates
	// NodePort, LoadBalancer and external-IP traffic itself.
	KubeProxyReplacement bool
	NodeToNode           bool
	WireGuardPort        int
	KeyRotationInterval  time.Duration

	StateDir    string
	SocketPath  string
	MetricsAddr string

	ResyncPeriod time.Duration
	// PodCacheCheckpoint keeps a checkpoint of the pod cache in StateDir
	// and resumes from it at start when it is at most
	// PodCacheCheckpointMaxAge old (0: any age).
	PodCacheCheckpoint       bool
	PodCacheCheckpointMaxAge time.Duration
	// MemoryLimitRatio: the Go runtime's soft memory limit is this share
	// of the container's memory limit (agent/memlimit); 0 turns it off,
	// and GOMEMLIMIT, when set, wins.
	MemoryLimitRatio float64
	// StartupGCPercent is GOGC until the first convergence; 0 leaves it.
	StartupGCPercent int
	// SteadyGCPercent is GOGC once converged; 0 puts back what was set
	// before the start.
	SteadyGCPercent int
	LogLevel        string
	LogFormat       string
	Cleanup         bool
	Version         bool
}

// Default returns the configuration an agent runs with when nothing is set.
func Default() Config {
	return Config{
		BPFFSRoot:      "/sys/fs/bpf/veil",
		CgroupRoot:     "/sys/fs/cgroup",
		ClusterCIDR:    "10.244.0.0/16",
		WireGuardIface: "veil-wg0",
		Encryption:     "wireguard",
		WireGuardPort:  51871,
		StateDir:       "/var/lib/veil",
		SocketPath:     "/var/run/veil/agent.sock",
		MetricsAddr:    ":9962",
		ResyncPeriod:   10 * time.Minute,

		PodCacheCheckpoint:       true,
		PodCacheCheckpointMaxAge: 10 * time.Minute,
		MemoryLimitRatio:         0.9,
		StartupGCPercent:         memlimit.DefaultStartupGCPercent,
		SteadyGCPercent:          memlimit.DefaultSteadyGCPercent,
		LogLevel:                 "info",
		LogFormat:                "text",
	}
}

// Flags registers every setting on fs, with c's current values as defaults.
func (c *Config) Flags(fs *pflag.FlagSet) {
	fs.StringVar(&c.NodeName, "node-name", c.NodeName, "name of this node's Node object (env NODE_NAME)")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", c.Kubeconfig, "kubeconfig file; empty means in-cluster configuration")
	fs.StringVar(&c.BPFFSRoot, "bpffs-root", c.BPFFSRoot, "bpffs directory for Veil's pinned maps and links")
	fs.StringVar(&c.CgroupRoot, "cgroup-root", c.CgroupRoot, "cgroup v2 directory whose pods get socket acceleration; empty disables it")
	fs.BoolVar(&c.SkipAccelSelfTest, "skip-acceleration-self-test", c.SkipAccelSelfTest, "accelerate sockets without first checking, with a short transfer in a child cgroup of --cgroup-root, that this kernel redirects their data intact")
	fs.StringVar(&c.UnderlayInterface, "underlay-interface", c.UnderlayInterface, "device toward other nodes; empty means the device that holds the node IP")
	fs.StringVar(&c.NodeIP, "node-ip", c.NodeIP, "this node's underlay IPv4 address; empty means the Node's InternalIP")
	fs.StringVar(&c.ClusterCIDR, "cluster-cidr", c.ClusterCIDR, "IPv4 CIDR that holds every pod CIDR of the cluster: a node's spec.podCIDRs are cut to it before they become its WireGuard allowed IPs, and a node claiming a range outside it is refused")
	fs.StringVar(&c.WireGuardIface, "wireguard-interface", c.WireGuardIface, "name of the WireGuard device")
	fs.BoolVar(&c.LegacyTC, "legacy-tc", c.LegacyTC, "attach with clsact filters even where TCX exists")
	fs.Uint32Var(&c.EndpointsMaxEntries, "endpoints-max-entries", c.EndpointsMaxEntries, "size of the local endpoints map; 0 means 1024")
	fs.Uint32Var(&c.IPCacheMaxEntries, "ipcache-max-entries", c.IPCacheMaxEntries, "size of the ipcache map (every remote pod, node address and pod CIDR); 0 means 65536")
	fs.Uint32Var(&c.PolicyMaxEntries, "policy-max-entries", c.PolicyMaxEntries, "size of the policy map (every local endpoint's entries, twice while one is replaced); 0 means 262144")
	fs.Uint32Var(&c.ConntrackMaxEntries, "conntrack-max-entries", c.ConntrackMaxEntries, "size of the connection table; 0 means 262144")
	fs.StringVar(&c.Encryption, "encryption", c.Encryption, "transparent encryption between nodes: wireguard or none")
	fs.BoolVar(&c.StrictMode, "strict-mode", c.StrictMode, "never send pod traffic to another node unencrypted: without a tunnel it is dropped and recorded as a leak")
	fs.BoolVar(&c.KubeProxyReplacement, "kube-proxy-replacement", c.KubeProxyReplacement, "no kube-proxy runs: translate NodePort, LoadBalancer and external-IP traffic arriving on the underlay in the datapath (leave it off where kube-proxy runs: it handles that traffic)")
	fs.BoolVar(&c.NodeToNode, "node-to-node-encryption", c.NodeToNode, "also encrypt host-network traffic between nodes (node addresses join each peer's allowed IPs and are routed through the tunnel)")
	fs.IntVar(&c.WireGuardPort, "wireguard-port", c.WireGuardPort, "UDP port of the WireGuard device on the underlay")
	fs.DurationVar(&c.KeyRotationInterval, "key-rotation-interval", c.KeyRotationInterval, "rotate the node's WireGuard key this often; 0 turns periodic rotation off")
	fs.StringVar(&c.StateDir, "state-dir", c.StateDir, "directory for the agent's persistent state (IPAM, identities, endpoints)")
	fs.StringVar(&c.SocketPath, "socket", c.SocketPath, "unix socket of the agent's API (mode 0600)")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", c.MetricsAddr, "address of /metrics, /healthz and /readyz; empty disables them")
	fs.DurationVar(&c.ResyncPeriod, "resync-period", c.ResyncPeriod, "informer resync period")
	fs.BoolVar(&c.PodCacheCheckpoint, "pod-cache-checkpoint", c.PodCacheCheckpoint, "keep a checkpoint of the pod cache in --state-dir and, after a restart, resume from it and watch from its version instead of listing every pod of the cluster again")
	fs.DurationVar(&c.PodCacheCheckpointMaxAge, "pod-cache-checkpoint-max-age", c.PodCacheCheckpointMaxAge, "list pods instead of resuming from a checkpoint older than this; 0 means any age (the API server still refuses a version it no longer holds, and the agent then lists)")
	fs.Float64Var(&c.MemoryLimitRatio, "memory-limit-ratio", c.MemoryLimitRatio, "set the Go runtime's soft memory limit to this share of the container's memory limit, so the garbage collector works harder near it instead of letting the heap grow past it; 0 turns it off; GOMEMLIMIT, when set, wins")
	fs.IntVar(&c.StartupGCPercent, "startup-gc-percent", c.StartupGCPercent, "the garbage collector's percent (as GOGC) until the agent first converges, so decoding the first lists of a large cluster costs fewer collections; 0 leaves it; GOGC, when set, wins")
	fs.IntVar(&c.SteadyGCPercent, "steady-gc-percent", c.SteadyGCPercent, "the garbage collector's percent (as GOGC) once the agent first converged: the resident size is about (1 + percent/100) times the live heap, and lower percents collect more often (50 holds about 0.8 times the memory of 100 for about 1.25 times the CPU per change); 0 leaves it as before the start; GOGC, when set, wins")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug, info, warn or error")
	fs.StringVar(&c.LogFormat, "log-format", c.LogFormat, "text or json")
	fs.BoolVar(&c.Cleanup, "cleanup", c.Cleanup, "remove everything Veil installed on this node (programs, pins, socket) and exit")
	fs.BoolVar(&c.Version, "version", c.Version, "print the version and exit")
}

// FromEnv applies VEIL_* variables (and NODE_NAME) for every flag that was
// not set on the command line. Command-line flags win.
func FromEnv(fs *pflag.FlagSet, lookup func(string) (string, bool)) error {
	var errs []error
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Changed {
			return
		}
		env := "VEIL_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if f.Name == "node-name" {
			if _, ok := lookup("NODE_NAME"); ok {
				env = "NODE_NAME"
			}
		}
		v, ok := lookup(env)
		if !ok {
			return
		}
		if err := fs.Set(f.Name, v); err != nil {
			errs = append(errs, fmt.Errorf("%s=%q: %w", env, v, err))
		}
	})
	return errors.Join(errs...)
}

// Validate reports every setting that cannot work.
func (c *Config) Validate() error {
	var errs []error
	if c.Cleanup || c.Version {
		return nil
	}
	if c.NodeName == "" {
		errs = append(errs, errors.New("node name is required: set --node-name or NODE_NAME"))
	}
	if p, err := netip.ParsePrefix(c.ClusterCIDR); err != nil || !p.Addr().Is4() {
		errs = append(errs, fmt.Errorf("--cluster-cidr %q is not an IPv4 CIDR", c.ClusterCIDR))
	}
	if c.NodeIP != "" {
		if a, err := netip.ParseAddr(c.NodeIP); err != nil || !a.Is4() {
			errs = append(errs, fmt.Errorf("--node-ip %q is not an IPv4 address", c.NodeIP))
		}
	}
	if c.StateDir == "" {
		errs = append(errs, errors.New("--state-dir must not be empty"))
	}
	if c.SocketPath == "" {
		errs = append(errs, errors.New("--socket must not be empty"))
	}
	if c.ResyncPeriod < 0 {
		errs = append(errs, errors.New("--resync-period must not be negative"))
	}
	if c.PodCacheCheckpointMaxAge < 0 {
		errs = append(errs, fmt.Errorf("--pod-cache-checkpoint-max-age %s must not be negative", c.PodCacheCheckpointMaxAge))
	}
	if c.SteadyGCPercent < 0 {
		errs = append(errs, fmt.Errorf("--steady-gc-percent %d must not be negative", c.SteadyGCPercent))
	}
	if c.StartupGCPercent < 0 {
		errs = append(errs, fmt.Errorf("--startup-gc-percent %d must not be negative", c.StartupGCPercent))
	}
	if c.MemoryLimitRatio < 0 || c.MemoryLimitRatio > 1 {
		errs = append(errs, fmt.Errorf("--memory-limit-ratio %g: want 0 (off) to 1", c.MemoryLimitRatio))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("--log-level %q: want debug, info, warn or error", c.LogLevel))
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		errs = append(errs, fmt.Errorf("--log-format %q: want text or json", c.LogFormat))
	}
	switch c.Encryption {
	case "wireguard", "none":
	default:
		errs = append(errs, fmt.Errorf("--encryption %q: want wireguard or none", c.Encryption))
	}
	if c.StrictMode && c.Encryption != "wireguard" {
		errs = append(errs, errors.New("--strict-mode needs --encryption=wireguard"))
	}
	if c.NodeToNode && c.Encryption != "wireguard" {
		errs = append(errs, errors.New("--node-to-node-encryption needs --encryption=wireguard"))
	}
	if c.WireGuardPort < 1 || c.WireGuardPort > 65535 {
		errs = append(errs, fmt.Errorf("--wireguard-port %d is not a port", c.WireGuardPort))
	}
	if c.KeyRotationInterval < 0 || (c.KeyRotationInterval > 0 && c.KeyRotationInterval < time.Minute) {
		errs = append(errs, fmt.Errorf("--key-rotation-interval %s: 0 (off) or at least 1m", c.KeyRotationInterval))
	}
	if len(c.WireGuardIface) > 15 {
		errs = append(errs, fmt.Errorf("--wireguard-interface %q is longer than 15 characters", c.WireGuardIface))
	}
	return errors.Join(errs...)
}

// Parse builds a Config from args and the environment.
func Parse(args []string, lookup func(string) (string, bool)) (Config, *pflag.FlagSet, error) {
	c := Default()
	fs := pflag.NewFlagSet("veil-agent", pflag.ContinueOnError)
	c.Flags(fs)
	if err := fs.Parse(args); err != nil {
		return c, fs, err
	}
	if err := FromEnv(fs, lookup); err != nil {
		return c, fs, err
	}
	return c, fs, c.Validate()
}
