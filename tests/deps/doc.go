// Package deps holds the test that keeps Veil's shipped binaries apart from
// code they must not link: no shipped binary depends on tests/, and meshctl
// does not depend on the agent's datapath (its BPF objects belong to the
// agent; the lab reaches them through veil-agent --cleanup). It also keeps
// the datapath off the policy compiler: agent/datapath imports only the
// leaf types of policy/policytypes.
package deps
