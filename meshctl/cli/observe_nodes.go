package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
	"github.com/veilmesh/veil/meshctl/agentclient"
)

// maxParallelAgents bounds how many agents meshctl dials at once.
const maxParallelAgents = 8

// clusterNodes lists the names of the cluster's nodes, sorted.
func clusterNodes(ctx context.Context, agent *agentOptions) ([]string, error) {
	kc, err := agent.kube.connect()
	if err != nil {
		return nil, err
	}
	lctx, cancel := context.WithTimeout(ctx, agent.timeout)
	defer cancel()
	nodes, err := kc.core.CoreV1().Nodes().List(lctx, metav1.ListOptions{})
	if err != nil {
		return nil, apiError("list nodes", kc.server, err)
	}
	names := make([]string, 0, len(nodes.Items))
	for _, n := range nodes.Items {
		names = append(names, n.Name)
	}
	slices.Sort(names)
	return names, nil
}

// nodeErrors collects why nodes could not be asked, to be shown, never
// dropped.
type nodeErrors struct {
	mu   sync.Mutex
	errs map[string]error
}

func (e *nodeErrors) add(node string, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.errs == nil {
		e.errs = map[string]error{}
	}
	e.errs[node] = err
}

// finish reports each node's error on w and gives the command's outcome:
// nil when every node answered; a refusal by RBAC that every node met is
// the command's own error (it is one fact, not one per node).
func (e *nodeErrors) finish(w io.Writer, total int) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.errs) == 0 {
		return nil
	}
	nodes := slices.Sorted(func(yield func(string) bool) {
		for n := range e.errs {
			if !yield(n) {
				return
			}
		}
	})
	var forbidden *agentclient.ForbiddenError
	if len(nodes) == total && errors.As(e.errs[nodes[0]], &forbidden) {
		return e.errs[nodes[0]]
	}
	for _, n := range nodes {
		fmt.Fprintf(w, "meshctl: node %s: %s\n", n, strings.ReplaceAll(e.errs[n].Error(), "\n", "\n  "))
	}
	return &exitError{code: ExitUnreachable, err: fmt.Errorf("%d of %d nodes could not be observed (see above)", len(nodes), total)}
}

// observeNodes runs req against every node's agent, a few at a time, and
// prints their flows through p: merged by time and cut to the last
// req.Last overall, or, with req.Follow, as they come.
func observeNodes(ctx context.Context, agent *agentOptions, req *agentv1.ObserveRequest, notBefore int64, p *flowPrinter, errOut io.Writer) error {
	agent.purpose = "observe --all-nodes"
	nodes, err := clusterNodes(ctx, agent)
	if err != nil {
		return err
	}
	if len(nodes) == 0 {
		return &exitError{code: ExitUnreachable, err: errors.New("the API server lists no nodes")}
	}
	var (
		errs  nodeErrors
		wg    sync.WaitGroup
		sem   = make(chan struct{}, maxParallelAgents)
		mu    sync.Mutex
		flows []*agentv1.Flow
		// printErr is the first error of writing a followed flow.
		printErr error
	)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, node := range nodes {
		wg.Go(func() {
			sem <- struct{}{}
			released := false
			release := func() {
				if !released {
					released = true
					<-sem
				}
			}
			defer release()
			c, err := agent.connectNode(ctx, node)
			if err != nil {
				if ctx.Err() == nil {
					errs.add(node, err)
				}
				return
			}
			defer c.Close()
			sctx, scancel := context.WithCancel(ctx)
			if !req.Follow {
				sctx, scancel = context.WithTimeout(ctx, c.Timeout)
			} else {
				// A followed stream lasts: it holds no dialling slot.
				release()
			}
			defer scancel()
			stream, err := c.Client.Observe(sctx, req)
			if err != nil {
				errs.add(node, callError(c, "observe", err))
				return
			}
			for {
				f, err := stream.Recv()
				if errors.Is(err, io.EOF) {
					return
				}
				if err != nil {
					if ctx.Err() == nil {
						errs.add(node, callError(c, "observe", err))
					}
					return
				}
				if f.TimeUnixNano < notBefore {
					continue
				}
				if f.Node == "" {
					f.Node = node
				}
				mu.Lock()
				if req.Follow {
					if printErr == nil {
						if printErr = p.print(f); printErr != nil {
							cancel()
						}
					}
				} else {
					flows = append(flows, f)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if printErr != nil {
		return printErr
	}
	// Oldest first across nodes; the last req.Last of them all.
	slices.SortStableFunc(flows, func(a, b *agentv1.Flow) int {
		if a.TimeUnixNano != b.TimeUnixNano {
			return int(min(max(a.TimeUnixNano-b.TimeUnixNano, -1), 1))
		}
		return strings.Compare(a.Node, b.Node)
	})
	if req.Last > 0 && len(flows) > int(req.Last) {
		flows = flows[len(flows)-int(req.Last):]
	}
	for _, f := range flows {
		if err := p.print(f); err != nil {
			return err
		}
	}
	if err := p.done(); err != nil {
		return err
	}
	return errs.finish(errOut, len(nodes))
}
