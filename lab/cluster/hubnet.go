package cluster

import (
	"net"
	"strconv"

	"k8s.io/client-go/rest"
)

// HubNetnsPath is the hub's network namespace. A program started in it
// (nsenter --net=PATH) is on the cluster's network as a machine beside a
// real cluster's nodes is: it reaches the API server at HubConfig's
// address, the nodes' addresses and the pods, which the host does not.
func (c *Cluster) HubNetnsPath() string { return c.hub.Path() }

// HubConfig is Config for a client in the hub's network namespace: the API
// server's own address on the hub instead of the relay on the host's
// loopback.
func (c *Cluster) HubConfig() *rest.Config {
	cfg := rest.CopyConfig(c.Config)
	cfg.Host = "https://" + net.JoinHostPort(HubIP.String(), strconv.Itoa(apiPort))
	return cfg
}
