package cluster

import (
	"context"
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

// HubDial dials addr ("tcp" or "udp") from the hub's network namespace: a
// client beside the nodes on the underlay, outside the cluster (its
// address is HubIP, which no pod or node holds).
func (c *Cluster) HubDial(ctx context.Context, network, addr string) (net.Conn, error) {
	return c.hubDial(ctx, network, addr)
}

// HubDo runs fn on a thread in the hub's network namespace (for example to
// open a capture on the hub's side of a node's underlay link, "nN").
func (c *Cluster) HubDo(fn func() error) error { return c.hub.Do(fn) }
