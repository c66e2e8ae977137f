package wireguard_test

import (
	"context"
	"log/slog"
	"net/netip"

	corev1 "k8s.io/api/core/v1"

	"github.com/veilmesh/veil/agent/wireguard"
	"github.com/veilmesh/veil/api/nodeinfo"
)

// How an agent uses the package: run from a thread in the node's network
// namespace (the agent process is nsenter'd into it).
func Example() {
	ctx := context.Background()
	key, err := wireguard.LoadOrCreateKey("/var/lib/veil/wireguard.key")
	if err != nil {
		slog.Error("wireguard key", "err", err)
		return
	}
	mtu, err := wireguard.PodMTU(1500) // the underlay's MTU
	if err != nil {
		slog.Error("mtu", "err", err)
		return
	}
	dev, err := wireguard.Open(ctx, wireguard.Config{Interface: "veil-wg", PrivateKey: key, MTU: mtu})
	if err != nil {
		slog.Error("wireguard device", "err", err)
		return
	}
	defer dev.Close()

	// Publish: merge these into this node's annotations.
	_ = wireguard.Annotations(dev.Key().PublicKey(), netip.MustParseAddrPort("10.99.0.1:51820"),
		[]netip.Prefix{netip.MustParsePrefix("10.244.0.0/24")})

	// On every Node event: decide who holds what, then peer with everyone
	// else that published a key.
	var nodes []*corev1.Node // from the informer's lister
	cluster := nodeinfo.Resolve(nodes, nodeinfo.Options{
		Self: "node-a", ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
	})
	for _, c := range cluster.Conflicts {
		slog.Warn("claim refused", "err", c)
	}
	peers, errs := wireguard.PeersFromNodes(cluster, "node-a", false)
	for _, e := range errs {
		slog.Warn("node not peered", "err", e)
	}
	if err := dev.SetPeers(ctx, peers); err != nil {
		slog.Error("wireguard peers", "err", err)
	}

	// Rotation: new key on the device, republish at once, confirm later.
	next, err := dev.RotateKey(ctx)
	if err == nil {
		_ = wireguard.Annotations(next.PublicKey(), netip.MustParseAddrPort("10.99.0.1:51820"),
			[]netip.Prefix{netip.MustParsePrefix("10.244.0.0/24")})
		_ = next.ConfirmRotation() // once published
	}
}
