package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"
)

// A supervisor answers requests on a unix socket in the lab's dir
// (ControlSocket, mode 0600: only root, who runs the lab, reaches it). The
// protocol is one JSON ControlRequest line from the client, one JSON
// ControlResponse line back, then the supervisor closes the connection. It
// answers one request at a time.

// ControlSocket is the supervisor's socket in a lab's dir.
const ControlSocket = "supervisor.sock"

// Requests a supervisor answers (ControlRequest.Op).
const OpAddNode = "add-node"

// Bounds of an add-node request: DefaultAddNodeTimeout when the request
// names none, at most MaxAddNodeTimeout.
const (
	DefaultAddNodeTimeout = 3 * time.Minute
	MaxAddNodeTimeout     = 10 * time.Minute
)

// controlReadTimeout bounds how long the supervisor waits for a request
// line: a client that connects and says nothing does not hold it up.
const controlReadTimeout = 10 * time.Second

// maxControlLine bounds a request or response line.
const maxControlLine = 64 << 10

// ControlRequest is a client's request.
type ControlRequest struct {
	Op string `json:"op"`
	// Timeout bounds the work (add-node: AddNode); 0 is the default.
	Timeout time.Duration `json:"timeoutNs,omitempty"`
}

// ControlResponse is the supervisor's answer: Error, or the result.
type ControlResponse struct {
	Error string `json:"error,omitempty"`
	// Node is the node an add-node request added, Took how long it took.
	Node *LabNodeState `json:"node,omitempty"`
	Took time.Duration `json:"tookNs,omitempty"`
}

// AddedNode is an add-node request's result.
type AddedNode struct {
	Node LabNodeState  `json:"node"`
	Took time.Duration `json:"tookNs"`
}

// ControlHandler does what a supervisor is asked.
type ControlHandler struct {
	// AddNode joins a node to the lab within ctx.
	AddNode func(ctx context.Context) (LabNodeState, error)
}

// ClusterNodeAdder is the ControlHandler.AddNode of a running cluster: it
// calls c.AddNode, then added (if not nil) with the new node, which may
// record it; an error of added is the request's.
func ClusterNodeAdder(c *Cluster, added func(LabNodeState) error) func(context.Context) (LabNodeState, error) {
	return func(ctx context.Context) (LabNodeState, error) {
		nd, err := c.AddNode(ctx)
		if err != nil {
			return LabNodeState{}, err
		}
		n := labNode(nd)
		if added != nil {
			if err := added(n); err != nil {
				return n, fmt.Errorf("record node %s: %w", n.Name, err)
			}
		}
		return n, nil
	}
}

// labNode is a cluster's node as a lab records it.
func labNode(nd *Node) LabNodeState {
	return LabNodeState{Name: nd.Name, IP: nd.IP.String(), PodCIDR: nd.PodCIDR.String(), Netns: nd.Netns.Name}
}

// ListenControl listens on the unix socket path (mode 0600). A socket left
// there by a supervisor that crashed is removed; one that answers is
// another supervisor's, and an error.
func ListenControl(path string) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("listen on %s: it exists and is not a socket", path)
		}
		if conn, err := net.DialTimeout("unix", path, time.Second); err == nil {
			conn.Close()
			return nil, fmt.Errorf("listen on %s: another supervisor answers on it", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// The socket stays ours to remove (Close), not the listener's: a
	// stale-socket check of a later supervisor must not race with it.
	l.SetUnlinkOnClose(false)
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		os.Remove(path)
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	return l, nil
}

// ServeControl answers requests on l with h, one at a time, until ctx
// ends; then it closes l and removes its socket. A request's work runs
// under ctx (so it ends with the supervisor) and its timeout.
func ServeControl(ctx context.Context, l *net.UnixListener, h ControlHandler, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	path := l.Addr().String()
	var once sync.Once
	closeL := func() { once.Do(func() { l.Close() }) }
	stop := context.AfterFunc(ctx, closeL)
	defer stop()
	defer os.Remove(path)
	defer closeL()
	for {
		conn, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept on %s: %w", path, err)
		}
		serveControlConn(ctx, conn, h, log)
	}
}

func serveControlConn(ctx context.Context, conn *net.UnixConn, h ControlHandler, log *slog.Logger) {
	defer conn.Close()
	// The connection ends with the supervisor.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	conn.SetReadDeadline(time.Now().Add(controlReadTimeout))
	resp := handleControl(ctx, conn, h, log)
	raw, err := json.Marshal(resp)
	if err != nil {
		log.Error("lab supervisor: encode answer", "err", err)
		return
	}
	conn.SetWriteDeadline(time.Now().Add(controlReadTimeout))
	if _, err := conn.Write(append(raw, '\n')); err != nil {
		log.Warn("lab supervisor: answer", "err", err)
	}
}

func handleControl(ctx context.Context, conn *net.UnixConn, h ControlHandler, log *slog.Logger) ControlResponse {
	r := bufio.NewReaderSize(conn, 4096)
	line, err := readLine(r)
	if err != nil {
		return ControlResponse{Error: "read request: " + err.Error()}
	}
	var req ControlRequest
	if err := json.Unmarshal(line, &req); err != nil {
		return ControlResponse{Error: "bad request: " + err.Error()}
	}
	switch req.Op {
	case OpAddNode:
		if h.AddNode == nil {
			return ControlResponse{Error: "this supervisor does not add nodes"}
		}
		timeout := req.Timeout
		switch {
		case timeout < 0:
			return ControlResponse{Error: fmt.Sprintf("bad request: timeout %s", timeout)}
		case timeout == 0:
			timeout = DefaultAddNodeTimeout
		case timeout > MaxAddNodeTimeout:
			timeout = MaxAddNodeTimeout
		}
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		began := time.Now()
		n, err := h.AddNode(ctx)
		took := time.Since(began)
		if err != nil {
			log.Error("lab supervisor: add node", "err", err, "took", took.Round(time.Millisecond))
			return ControlResponse{Error: err.Error(), Took: took}
		}
		log.Info("lab supervisor: node added", "node", n.Name, "ip", n.IP, "podCIDR", n.PodCIDR, "took", took.Round(time.Millisecond))
		return ControlResponse{Node: &n, Took: took}
	default:
		return ControlResponse{Error: fmt.Sprintf("bad request: unknown op %q", req.Op)}
	}
}

// readLine reads one line of at most maxControlLine bytes.
func readLine(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		part, isPrefix, err := r.ReadLine()
		if err != nil {
			return nil, err
		}
		line = append(line, part...)
		if len(line) > maxControlLine {
			return nil, fmt.Errorf("line longer than %d bytes", maxControlLine)
		}
		if !isPrefix {
			return line, nil
		}
	}
}

// ErrNoSupervisor is the client's error when nothing answers on the
// socket.
var ErrNoSupervisor = errors.New("no lab supervisor answers")

// Control sends req to the supervisor on the socket path and returns its
// answer; an answer with Error is returned as is. ctx bounds the whole
// exchange.
func Control(ctx context.Context, path string, req ControlRequest) (ControlResponse, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return ControlResponse{}, fmt.Errorf("%w on %s: %w", ErrNoSupervisor, path, err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	raw, err := json.Marshal(req)
	if err != nil {
		return ControlResponse{}, fmt.Errorf("encode request: %w", err)
	}
	if _, err := conn.Write(append(raw, '\n')); err != nil {
		return ControlResponse{}, fmt.Errorf("send request to %s: %w", path, err)
	}
	line, err := readLine(bufio.NewReader(conn))
	if err != nil {
		if ctx.Err() != nil {
			err = context.Cause(ctx)
		}
		return ControlResponse{}, fmt.Errorf("read answer from %s: %w", path, err)
	}
	var resp ControlResponse
	if err := json.Unmarshal(line, &resp); err != nil {
		return ControlResponse{}, fmt.Errorf("decode answer from %s: %w", path, err)
	}
	return resp, nil
}

// RequestAddNode asks the supervisor on the socket path to add a node
// within timeout (0: DefaultAddNodeTimeout); ctx bounds the wait for its
// answer. A refusal or failure of the supervisor is an error.
func RequestAddNode(ctx context.Context, path string, timeout time.Duration) (AddedNode, error) {
	resp, err := Control(ctx, path, ControlRequest{Op: OpAddNode, Timeout: timeout})
	if err != nil {
		return AddedNode{}, fmt.Errorf("add node: %w", err)
	}
	if resp.Error != "" {
		return AddedNode{}, fmt.Errorf("add node: the lab supervisor: %s", resp.Error)
	}
	if resp.Node == nil {
		return AddedNode{}, fmt.Errorf("add node: the lab supervisor's answer names no node")
	}
	return AddedNode{Node: *resp.Node, Took: resp.Took}, nil
}
