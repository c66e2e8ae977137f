package endpoints

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/identity"
)

// Endpoint is a pod on this node that CNI ADD wired up.
type Endpoint struct {
	Pod         policy.EndpointID `json:"pod"`
	ContainerID string            `json:"containerID"`
	ID          uint32            `json:"id"`
	IP          netip.Addr        `json:"ip"`
	HostVeth    string            `json:"hostVeth"`
	HostIfindex int               `json:"hostIfindex"`
	HostMAC     string            `json:"hostMAC"`
	PodMAC      string            `json:"podMAC"`
	Netns       string            `json:"netns,omitempty"`
	// Identity and acceleration opt-out last written to the datapath.
	Identity identity.ID `json:"identity"`
	NoAccel  bool        `json:"noAcceleration,omitempty"`
	// Pending: wired before the agent had converged with the API server,
	// so its compiled policy may lack rules not listed yet; it denies both
	// ways until convergence.
	Pending bool `json:"pending,omitempty"`
}

// MACs parses the endpoint's host-side and pod-side MAC addresses.
func (e *Endpoint) MACs() (host, pod net.HardwareAddr, err error) {
	if host, err = net.ParseMAC(e.HostMAC); err != nil {
		return nil, nil, fmt.Errorf("endpoint %s host MAC: %w", e.Pod, err)
	}
	if pod, err = net.ParseMAC(e.PodMAC); err != nil {
		return nil, nil, fmt.Errorf("endpoint %s pod MAC: %w", e.Pod, err)
	}
	return host, pod, nil
}

// State is what the agent keeps across restarts besides pinned maps: its
// endpoints, identity numbers, and the last known node facts (so it can
// come up while the API server is away).
type State struct {
	Endpoints      []*Endpoint            `json:"endpoints"`
	Identities     map[string]identity.ID `json:"identities"`
	CIDRIdentities map[string]identity.ID `json:"cidrIdentities"`
	NodeIP         netip.Addr             `json:"nodeIP,omitzero"`
	PodCIDR        netip.Prefix           `json:"podCIDR,omitzero"`
}

const stateFile = "agent-state.json"

// LoadState reads the state file in dir; a missing file is an empty state.
func LoadState(dir string) (*State, error) {
	raw, err := os.ReadFile(filepath.Join(dir, stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return &State{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read agent state: %w", err)
	}
	var st State
	if err := json.Unmarshal(raw, &st); err != nil {
		return nil, fmt.Errorf("parse agent state %s (move it aside to start afresh): %w", filepath.Join(dir, stateFile), err)
	}
	return &st, nil
}

// SaveState writes atomically and durably: a crash or a power loss leaves
// the old or the new file, and once it returns the new one survives both.
func SaveState(dir string, st *State) error {
	raw, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode agent state: %w", err)
	}
	tmp, err := os.CreateTemp(dir, stateFile+".tmp-*")
	if err != nil {
		return fmt.Errorf("write agent state: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(raw); err != nil {
		tmp.Close()
		return fmt.Errorf("write agent state: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("sync agent state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write agent state: %w", err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, stateFile)); err != nil {
		return fmt.Errorf("replace agent state: %w", err)
	}
	// The rename is durable only once the directory entry is.
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync agent state directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync agent state directory %s: %w", dir, err)
	}
	return nil
}
