// Command veil-agent is Veil's node agent, run by the DaemonSet on every
// node. `veil-agent --help` lists its settings; each can also be set from
// the environment (VEIL_<FLAG>, and NODE_NAME).
//
// `veil-agent api-bridge` does not run an agent: it connects its stdin and
// stdout to the running agent's API socket (see api/agent/bridge), for
// meshctl, which runs it in the agent's pod through the API server.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/veilmesh/veil/agent/config"
	"github.com/veilmesh/veil/agent/daemon"
	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/agent/memlimit"
	"github.com/veilmesh/veil/api/agent/bridge"
)

// Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration.
func main() {
	datapath.MaybeRunSocketHelper()
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) > 0 && args[0] == bridge.Subcommand {
		return runBridge(args[1:], os.LookupEnv, os.Stdin, os.Stdout, os.Stderr)
	}
	cfg, _, err := config.Parse(args, os.LookupEnv)
	if errors.Is(err, pflag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "veil-agent: %v\n", err)
		return 2
	}
	if cfg.Version {
		fmt.Println("veil-agent", daemon.Version)
		return 0
	}
	log := newLogger(cfg)
	if cfg.Cleanup {
		if err := daemon.Cleanup(cfg); err != nil {
			log.Error("cleanup", "error", err)
			return 1
		}
		log.Info("removed everything Veil installed on this node")
		return 0
	}
	if st, err := memlimit.Apply(cfg.MemoryLimitRatio); err != nil {
		log.Warn("no soft memory limit", "error", err)
	} else if st.Limit > 0 {
		log.Info("soft memory limit set", "limit-bytes", st.Limit, "container-limit-bytes", st.Container, "ratio", cfg.MemoryLimitRatio)
	} else {
		log.Info("no soft memory limit", "reason", st.Reason)
	}
	restCfg, err := kubeConfig(cfg.Kubeconfig)
	if err != nil {
		log.Error("Kubernetes configuration", "error", err)
		return 2
	}
	d, err := daemon.New(cfg, restCfg, log)
	if err != nil {
		log.Error("start", "error", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := d.Run(ctx); err != nil {
		log.Error("agent stopped", "error", err)
		return 1
	}
	return 0
}

// runBridge is `veil-agent api-bridge [--socket PATH]`: the socket is the
// agent's (--socket, else VEIL_SOCKET, which the DaemonSet sets, else the
// default). Exit codes: 0 the caller or the agent ended the session, 1 the
// socket could not be reached, 2 bad arguments.
func runBridge(args []string, lookupEnv func(string) (string, bool), in io.Reader, out, errOut io.Writer) int {
	fs := pflag.NewFlagSet("veil-agent "+bridge.Subcommand, pflag.ContinueOnError)
	fs.SetOutput(errOut)
	socket := config.Default().SocketPath
	if v, ok := lookupEnv("VEIL_SOCKET"); ok && v != "" {
		socket = v
	}
	fs.StringVar(&socket, "socket", socket, "the agent's API socket (env VEIL_SOCKET)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(errOut, "veil-agent %s: %v\n", bridge.Subcommand, err)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(errOut, "veil-agent %s: unexpected arguments %q\n", bridge.Subcommand, fs.Args())
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := bridge.Serve(ctx, socket, in, out); err != nil {
		fmt.Fprintf(errOut, "veil-agent %s: %v\n", bridge.Subcommand, err)
		return 1
	}
	return 0
}

func kubeConfig(path string) (*rest.Config, error) {
	if path == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster configuration (outside a cluster, pass --kubeconfig): %w", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig %s: %w", path, err)
	}
	return cfg, nil
}

func newLogger(cfg config.Config) *slog.Logger {
	var level slog.Level
	level.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}
