//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Programs of the underlay device, the one toward other nodes.
 *
 * veil_from_netdev (TC ingress): packets for a local pod get the pod's
 * ingress policy, with the source identity taken from the ipcache by source
 * address, and are redirected into the pod. Everything else belongs to the
 * host and passes untouched.
 *
 * veil_to_netdev (TC egress, strict mode only): the last guard before the
 * wire. A packet from a local pod to a remote pod must have gone through
 * WireGuard, so here it can only be plaintext that something routed around
 * the tunnel. It is dropped and recorded as a leak.
 */
#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/forward.h"
#include "lib/ingress.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/policy.h"

SEC("tc")
int veil_from_netdev(struct __sk_buff *skb)
{
	struct endpoint_info *dst;
	struct packet pkt = {};
	struct peer sp = {};
	struct ct_entry *ct;
	int is_arp, reply, reason;

	reason = parse_ipv4(skb, &pkt, &is_arp);
	if (is_arp || reason == DROP_UNSUPPORTED_L3)
		return TC_ACT_OK;

	dst = bpf_map_lookup_elem(&veil_endpoints, &pkt.tuple.daddr);
	if (!dst)
		return TC_ACT_OK;
	if (reason)
		return drop(skb, &pkt, OBS_FROM_NETDEV, reason, 0, dst->identity, 0, 0);
	reason = remote_peer(&pkt, 0, &sp);
	if (reason)
		return drop(skb, &pkt, OBS_FROM_NETDEV, reason, 0, dst->identity, 0,
			    FLOW_F_INGRESS_DECIDED);

	/*
	 * Strict mode: pods of other nodes reach ours only through the tunnel,
	 * where WireGuard vouches for the source address. Plaintext claiming
	 * to come from a remote pod is refused.
	 */
	if (wg_ifindex && strict_mode) {
		struct lpm_v4_key k = { .prefixlen = 32, .addr = pkt.tuple.saddr };
		struct ipcache_info *src = bpf_map_lookup_elem(&veil_ipcache, &k);

		if (src && (src->flags & (IPCACHE_F_REMOTE_POD | IPCACHE_F_POD_CIDR))) {
			leak_record(&pkt, dst->id, DROP_LEAK);
			return drop(skb, &pkt, OBS_FROM_NETDEV, DROP_LEAK, src->identity, dst->identity,
				    0, FLOW_F_LEAK | FLOW_F_INGRESS_DECIDED);
		}
	}

	ct = ct_lookup(&pkt, &reply);
	if (ct) {
		metric_add(FWD_REPLY, pkt.len);
		return deliver_local(skb, dst);
	}

	if (ingress_decide(skb, &pkt, dst, &sp, OBS_FROM_NETDEV, 0) != TC_ACT_OK)
		return TC_ACT_SHOT;
	return deliver_local(skb, dst);
}

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
