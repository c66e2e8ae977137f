package policysync

import (
	"cmp"
	"maps"
	"net/netip"
	"strings"

	"github.com/veilmesh/veil/agent/datapath"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/policy"
)

// The reference the tests hold the syncer's ipcache to: built from scratch
// the simple way, with maps of whole entries (as the syncer kept them
// before it kept them compact).

// refClaim is a remote pod's claim on an ipcache address.
type refClaim struct {
	pod   policy.EndpointID
	ip    netip.Addr
	entry datapath.IPCacheEntry
}

// wins reports whether a beats b for an address both hold.
func (a refClaim) wins(b refClaim) bool {
	return cmp.Or(cmp.Compare(a.entry.Identity, b.entry.Identity), a.entry.NodeIP.Compare(b.entry.NodeIP), cmp.Compare(a.entry.Kind, b.entry.Kind),
		strings.Compare(a.pod.Namespace, b.pod.Namespace), strings.Compare(a.pod.Name, b.pod.Name)) > 0
}

// wantIPCache is what the ipcache should hold for the resolved nodes and
// the compiler's pods.
func (s *Syncer) wantIPCache(c nodeinfo.Cluster) map[netip.Prefix]datapath.IPCacheEntry {
	nodes, nodeIPs := s.nodeIPCache(c)
	owners := map[netip.Addr][]refClaim{}
	for _, e := range s.cfg.Compiler.IPCache() {
		if !e.IP.Is4() || e.Node == s.cfg.NodeName {
			continue
		}
		nip, ok := nodeIPs[e.Node]
		if !ok {
			continue
		}
		owners[e.IP] = append(owners[e.IP], refClaim{pod: e.Pod, ip: e.IP, entry: datapath.IPCacheEntry{Identity: e.Identity, NodeIP: nip, Kind: datapath.RemotePod | s.tunnelKind(e.Node)}})
	}
	want := maps.Clone(nodes)
	for ip, os := range owners {
		best := os[0]
		for _, o := range os[1:] {
			if o.wins(best) {
				best = o
			}
		}
		want[netip.PrefixFrom(ip, 32)] = best.entry
	}
	return want
}
