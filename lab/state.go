package lab

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
)

// StateFile is the name of the lab's state file in its directory. meshctl
// reads it through VEIL_LAB_STATE to reach a node's agent by name and to
// find the lab's kubeconfig.
const StateFile = "lab-state.json"

// State is what a script needs to drive the lab: the schema of StateFile,
// which meshctl lab writes and meshctl's --node resolver reads.
type State struct {
	Prefix     string      `json:"prefix"`
	Kubeconfig string      `json:"kubeconfig"`
	Nodes      []NodeState `json:"nodes"`
	Pods       []PodState  `json:"pods"`
}

// NodeState describes one node.
type NodeState struct {
	Name     string `json:"name"`
	Netns    string `json:"netns"`
	Underlay string `json:"underlay"`
	IP       string `json:"ip"`
	PodCIDR  string `json:"podCIDR"`
	AgentPID int    `json:"agentPID"`
	Socket   string `json:"socket"`
}

// PodState describes one pod.
type PodState struct {
	Pod   string `json:"pod"`
	Node  string `json:"node"`
	IP    string `json:"ip"`
	Netns string `json:"netns"`
}

// State returns the lab's current state.
func (l *Lab) State() State {
	st := State{Prefix: l.opts.Prefix}
	if l.CP != nil {
		st.Kubeconfig = l.CP.Kubeconfig
	}
	for _, n := range l.Nodes {
		st.Nodes = append(st.Nodes, NodeState{
			Name: n.Name, Netns: n.Netns.Name, Underlay: "eth0", IP: n.IP.String(),
			PodCIDR: n.PodCIDR.String(), AgentPID: n.AgentPID(), Socket: n.Socket,
		})
	}
	l.mu.Lock()
	for _, p := range l.Pods {
		ps := PodState{Pod: p.Key(), Node: p.Node.Name, Netns: p.Netns.Name}
		if p.IP.IsValid() {
			ps.IP = p.IP.String()
		}
		st.Pods = append(st.Pods, ps)
	}
	l.mu.Unlock()
	sort.Slice(st.Pods, func(i, j int) bool { return st.Pods[i].Pod < st.Pods[j].Pod })
	return st
}

// StatePath is where the lab keeps its state file.
func (l *Lab) StatePath() string { return filepath.Join(l.opts.Dir, StateFile) }

// writeState saves the state file atomically.
func (l *Lab) writeState() error {
	raw, err := json.MarshalIndent(l.State(), "", "  ")
	if err != nil {
		return fmt.Errorf("encode lab state: %w", err)
	}
	tmp := l.StatePath() + ".tmp"
	if err := os.WriteFile(tmp, append(raw, '\n'), 0o600); err != nil {
		return fmt.Errorf("write lab state: %w", err)
	}
	if err := os.Rename(tmp, l.StatePath()); err != nil {
		return fmt.Errorf("write lab state: %w", err)
	}
	return nil
}

// ReadState reads the state file in dir; the error wraps os.ErrNotExist
// when there is none.
func ReadState(dir string) (*State, error) {
	return ReadStateFile(filepath.Join(dir, StateFile))
}

// ReadStateFile reads a lab state file; the error wraps os.ErrNotExist
// when there is none.
func ReadStateFile(path string) (*State, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read lab state: %w", err)
	}
	var st State
	if err := json.Unmarshal(raw, &st); err != nil {
		return nil, fmt.Errorf("decode lab state %s: %w", path, err)
	}
	return &st, nil
}
