package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/util/exec"
)

// ExecResult is what a command run in a pod printed and how it ended.
type ExecResult struct {
	Stdout, Stderr string
	ExitCode       int
}

// Exec runs argv in the first container of pod ns/name through the API
// server, as `kubectl exec` does, and returns its output and exit code. An
// error means the command could not be run (or its stream broke), not that
// it exited non-zero.
func (c *Cluster) Exec(ctx context.Context, ns, pod string, argv []string, stdin io.Reader) (ExecResult, error) {
	var stdout, stderr bytes.Buffer
	code, err := ExecStreams(ctx, c.Config, ns, pod, "", argv, ExecIO{Stdin: stdin, Stdout: &stdout, Stderr: &stderr})
	return ExecResult{Stdout: stdout.String(), Stderr: stderr.String(), ExitCode: code}, err
}

// ExecIO are the streams of an exec; nil ones are not attached. With TTY,
// Stderr is merged into Stdout as a terminal does.
type ExecIO struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	TTY            bool
}

// ExecStreams runs argv in container (empty: the pod's first) of pod ns/pod
// through the API server of cfg, with streams attached, and returns the
// command's exit code. It tries the WebSocket protocol and falls back to
// SPDY, as kubectl does.
func ExecStreams(ctx context.Context, cfg *rest.Config, ns, pod, container string, argv []string, streams ExecIO) (int, error) {
	clients, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return 0, fmt.Errorf("create client: %w", err)
	}
	req := clients.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{
			Container: container,
			Command:   argv,
			Stdin:     streams.Stdin != nil,
			Stdout:    streams.Stdout != nil,
			Stderr:    streams.Stderr != nil && !streams.TTY,
			TTY:       streams.TTY,
		}, scheme.ParameterCodec)
	spdy, err := remotecommand.NewSPDYExecutor(cfg, "POST", req.URL())
	if err != nil {
		return 0, fmt.Errorf("exec in %s/%s: %w", ns, pod, err)
	}
	ws, err := remotecommand.NewWebSocketExecutor(cfg, "GET", req.URL().String())
	if err != nil {
		return 0, fmt.Errorf("exec in %s/%s: %w", ns, pod, err)
	}
	// Only when the upgrade failed: the command has not run then.
	exe, err := remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
	if err != nil {
		return 0, fmt.Errorf("exec in %s/%s: %w", ns, pod, err)
	}
	opts := remotecommand.StreamOptions{Stdin: streams.Stdin, Stdout: streams.Stdout, Tty: streams.TTY}
	if !streams.TTY {
		opts.Stderr = streams.Stderr
	}
	err = exe.StreamWithContext(ctx, opts)
	var exit exec.ExitError
	if errors.As(err, &exit) {
		return exit.ExitStatus(), nil
	}
	if err != nil {
		return 0, fmt.Errorf("exec in %s/%s: %w", ns, pod, err)
	}
	return 0, nil
}
