package daemon

import (
	"slices"
	"strings"
	"sync"

	"github.com/veilmesh/veil/agent/policysync"
)

// degradedSet is the agent's registry of what works worse than it should,
// and why: components record into it, Status and /readyz report it. The
// zero value is empty and ready.
type degradedSet struct {
	mu sync.Mutex
	m  map[string]string
}

// Set records why component is degraded.
func (s *degradedSet) Set(component, reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]string{}
	}
	s.m[component] = reason
}

// Clear records that component works again.
func (s *degradedSet) Clear(component string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.m, component)
}

// All returns every degraded component with its reason.
func (s *degradedSet) All() map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]string, len(s.m))
	for k, v := range s.m {
		out[k] = v
	}
	return out
}

// failedClosed lists the reasons of endpoints that deny everything because
// their policy could not be written.
func (s *degradedSet) failedClosed() []string {
	var out []string
	for k, v := range s.All() {
		if strings.HasPrefix(k, policysync.FailedClosedPrefix) {
			out = append(out, v)
		}
	}
	slices.Sort(out)
	return out
}
