//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TC egress of the underlay device, attached in strict mode only: the last
 * guard before the wire. A packet from a local pod to a remote pod must have
 * gone through WireGuard, so here it can only be plaintext that something
 * routed around the tunnel. It is dropped and recorded as a leak.
 */
#include "lib/common.h"
#include "lib/events.h"
#include "lib/forward.h"
#include "lib/maps.h"
#include "lib/parse.h"

SEC("tc")
int veil_to_netdev(struct __sk_buff *skb)
{
	struct lpm_v4_key k = { .prefixlen = 32 };
	struct endpoint_info *src;
	struct ipcache_info *dst;
	struct packet pkt = {};
	int is_arp, reason;

	reason = parse_ipv4(skb, &pkt, &is_arp);
	if (is_arp || reason)
		return TC_ACT_OK;
	src = bpf_map_lookup_elem(&veil_endpoints, &pkt.tuple.saddr);
	if (!src)
		return TC_ACT_OK;
	k.addr = pkt.tuple.daddr;
	dst = bpf_map_lookup_elem(&veil_ipcache, &k);
	if (!dst || !(dst->flags & (IPCACHE_F_REMOTE_POD | IPCACHE_F_POD_CIDR)))
		return TC_ACT_OK;
	leak_record(&pkt, src->id, DROP_LEAK);
	return drop(skb, &pkt, OBS_TO_NETDEV, DROP_LEAK, src->identity, dst->identity, 0, FLOW_F_LEAK);
}

char __license[] SEC("license") = "Dual BSD/GPL";
