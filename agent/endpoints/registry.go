// Package endpoints owns this node's endpoint registry: the pods CNI ADD
// wired, their datapath ids, whether they were wired before the agent
// converged, and the state file that carries them across restarts.
package endpoints

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/veilmesh/veil/agent/cni"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
)

// Enforcer puts an endpoint's datapath record and policy in place, and
// takes them out again; the registry calls it from the CNI calls.
type Enforcer interface {
	// Enforce writes a freshly claimed endpoint's record and policy.
	Enforce(ctx context.Context, ep Endpoint) error
	// Withdraw removes a released endpoint from the datapath.
	Withdraw(ctx context.Context, ep Endpoint) error
}

// Config is what a Registry needs.
type Config struct {
	// StateDir holds the state file.
	StateDir string
	// Enforcer is told about every endpoint CNI wires or unwires.
	Enforcer Enforcer
	// Fill adds to a state about to be saved what the file carries
	// besides endpoints (identity numbers, node facts); nil adds nothing.
	Fill func(*State)
	// SaveEvery bounds how long a change waits before Run saves it;
	// 0 means 2s.
	SaveEvery time.Duration
	Log       *slog.Logger
}

// Registry is the set of local endpoints. Its methods return copies, so
// callers never share a record with the lock that guards it.
type Registry struct {
	cfg Config

	mu        sync.Mutex
	eps       map[policy.EndpointID]*Endpoint
	nextID    uint32
	converged bool

	// saveMu orders snapshots with their writes, so an older snapshot never
	// replaces a newer file (CNI ADD saves while Run may too).
	saveMu sync.Mutex
	// changed holds a token while a change is not saved yet.
	changed chan struct{}
}

// New returns an empty registry.
func New(cfg Config) *Registry {
	if cfg.SaveEvery == 0 {
		cfg.SaveEvery = 2 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Registry{cfg: cfg, eps: map[policy.EndpointID]*Endpoint{}, nextID: 1, changed: make(chan struct{}, 1)}
}

var _ cni.EndpointRegistrar = (*Registry)(nil)

// RegisterEndpoint makes a freshly wired pod an endpoint: it is recorded,
// its datapath record and policy are written before this returns, so the
// pod's first packet is already policed, and it is saved, so an agent that
// dies from here on finds the endpoint in its state on restart instead of a
// stranger in its maps.
func (r *Registry) RegisterEndpoint(ctx context.Context, info cni.EndpointInfo) error {
	ep, err := r.claim(info)
	if err != nil {
		return err
	}
	r.Changed()
	if err := r.cfg.Enforcer.Enforce(ctx, ep); err != nil {
		return fmt.Errorf("register endpoint %s: %w", ep.Pod, err)
	}
	if err := r.Save(); err != nil {
		return fmt.Errorf("register endpoint %s: %w", ep.Pod, err)
	}
	return nil
}

func (r *Registry) claim(info cni.EndpointInfo) (Endpoint, error) {
	id := policy.EndpointID{Namespace: info.Namespace, Name: info.Name}
	r.mu.Lock()
	defer r.mu.Unlock()
	ep := r.eps[id]
	if ep != nil && ep.ContainerID != info.ContainerID {
		return Endpoint{}, fmt.Errorf("register endpoint %s: already wired for container %s", id, ep.ContainerID)
	}
	if ep == nil {
		ep = &Endpoint{Pod: id, ContainerID: info.ContainerID, ID: r.allocID()}
		r.eps[id] = ep
	}
	ep.IP, ep.HostVeth, ep.HostIfindex = info.IP, info.HostVeth, info.HostIfindex
	ep.HostMAC, ep.PodMAC = info.HostMAC.String(), info.PodMAC.String()
	ep.Netns = info.Netns
	ep.Identity = 0 // force the datapath write
	// Under mu: Converge flips converged and collects pending endpoints
	// under mu, so none is left pending after convergence.
	ep.Pending = !r.converged
	return *ep, nil
}

// UnregisterEndpoint forgets the endpoint of a container and withdraws it
// from the datapath. An unknown container is not an error (CNI DEL is
// idempotent).
func (r *Registry) UnregisterEndpoint(ctx context.Context, containerID string) error {
	r.mu.Lock()
	var ep *Endpoint
	for _, e := range r.eps {
		if e.ContainerID == containerID {
			ep = e
			break
		}
	}
	if ep != nil {
		delete(r.eps, ep.Pod)
	}
	r.mu.Unlock()
	if ep == nil {
		return nil
	}
	r.Changed()
	return errors.Join(r.cfg.Enforcer.Withdraw(ctx, *ep), r.Save())
}

// allocID returns an id no local endpoint holds. Callers hold r.mu.
func (r *Registry) allocID() uint32 {
	used := map[uint32]bool{}
	for _, e := range r.eps {
		used[e.ID] = true
	}
	for used[r.nextID] || r.nextID == 0 || r.nextID >= 1<<31 {
		r.nextID++
		if r.nextID >= 1<<31 {
			r.nextID = 1
		}
	}
	id := r.nextID
	r.nextID++
	return id
}

// Restore takes back the endpoints of the state file.
func (r *Registry) Restore(eps []*Endpoint) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ep := range eps {
		cp := *ep
		r.eps[ep.Pod] = &cp
		if ep.ID >= r.nextID {
			r.nextID = ep.ID + 1
		}
	}
}

// Adopt records an endpoint found in the datapath but not in the state
// file. It reports false, recording nothing, when its pod already has one.
func (r *Registry) Adopt(ep Endpoint) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, taken := r.eps[ep.Pod]; taken {
		return false
	}
	r.eps[ep.Pod] = &ep
	if ep.ID >= r.nextID {
		r.nextID = ep.ID + 1
	}
	return true
}

// Get returns the endpoint of a pod.
func (r *Registry) Get(id policy.EndpointID) (Endpoint, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ep, ok := r.eps[id]
	if !ok {
		return Endpoint{}, false
	}
	return *ep, true
}

// List returns every endpoint, ordered by pod.
func (r *Registry) List() []Endpoint {
	r.mu.Lock()
	out := make([]Endpoint, 0, len(r.eps))
	for _, e := range r.eps {
		out = append(out, *e)
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(a, b Endpoint) int { return compareID(a.Pod, b.Pod) })
	return out
}

// Len returns the number of endpoints.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.eps)
}

// Recorded notes what was last written to the datapath for an endpoint.
func (r *Registry) Recorded(id policy.EndpointID, ident identity.ID, noAccel bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ep, ok := r.eps[id]; ok {
		ep.Identity, ep.NoAccel = ident, noAccel
	}
}

// Converge marks the agent converged with the API server. It returns the
// endpoints that were pending (no longer, from now on) and the rest.
func (r *Registry) Converge() (pending, rest []Endpoint) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.converged = true
	for _, ep := range r.eps {
		if ep.Pending {
			ep.Pending = false
			pending = append(pending, *ep)
		} else {
			rest = append(rest, *ep)
		}
	}
	return pending, rest
}

// Converged reports whether Converge was called.
func (r *Registry) Converged() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.converged
}

// Changed asks Run to save the state soon.
func (r *Registry) Changed() {
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

// Save writes the state file now.
func (r *Registry) Save() error {
	r.saveMu.Lock()
	defer r.saveMu.Unlock()
	st := &State{}
	for _, ep := range r.List() {
		st.Endpoints = append(st.Endpoints, &ep)
	}
	if r.cfg.Fill != nil {
		r.cfg.Fill(st)
	}
	return SaveState(r.cfg.StateDir, st)
}

// Run saves the state at most every SaveEvery while changes arrive, until
// ctx is done.
func (r *Registry) Run(ctx context.Context) {
	t := time.NewTicker(r.cfg.SaveEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			select {
			case <-r.changed:
			default:
				continue
			}
			if err := r.Save(); err != nil {
				r.cfg.Log.Error("save state", "error", err)
				r.Changed()
			}
		}
	}
}

func compareID(a, b policy.EndpointID) int {
	if a.Namespace != b.Namespace {
		if a.Namespace < b.Namespace {
			return -1
		}
		return 1
	}
	switch {
	case a.Name < b.Name:
		return -1
	case a.Name > b.Name:
		return 1
	}
	return 0
}
