//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TC ingress of the device that brings traffic from other nodes. Packets for
 * a local pod get the pod's ingress policy, with the source identity taken
 * from the ipcache by source address, and are redirected into the pod.
 * Everything else belongs to the host and passes untouched.
 */
#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/forward.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/policy.h"

SEC("tc")
int veil_from_netdev(struct __sk_buff *skb)
{
	struct endpoint_info *dst;
	struct packet pkt = {};
	struct decision in;
	struct peer sp = {};
	struct ct_entry *ct;
	__u32 flags = FLOW_F_INGRESS_DECIDED;
	int is_arp, reply, reason;

	reason = parse_ipv4(skb, &pkt, &is_arp);
	if (is_arp || reason == DROP_UNSUPPORTED_L3)
		return TC_ACT_OK;

	dst = bpf_map_lookup_elem(&veil_endpoints, &pkt.tuple.daddr);
	if (!dst)
		return TC_ACT_OK;
	if (reason)
		return drop(skb, &pkt, OBS_FROM_NETDEV, reason, 0, dst->identity, 0, 0);

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

	peer_of(pkt.tuple.saddr, &sp);
	policy_decide(dst, DIR_INGRESS, &sp, &pkt, &in);
	if (in.enforce == VERDICT_DENY)
		return drop(skb, &pkt, OBS_FROM_NETDEV, DROP_POLICY_INGRESS, sp.identity,
			    dst->identity, in.rule_id, flags);
	if (in.audit == VERDICT_DENY) {
		flags |= FLOW_F_AUDIT;
		metric_add(FWD_AUDIT, pkt.len);
	}
	ct_create(&pkt, sp.identity, dst->identity, (flags & FLOW_F_AUDIT) ? CT_F_AUDIT : 0);
	flow_emit(skb, &pkt, OBS_FROM_NETDEV, VERDICT_ALLOW, REASON_NONE, sp.identity,
		  dst->identity, in.rule_id, flags);
	return deliver_local(skb, dst);
}

char __license[] SEC("license") = "Dual BSD/GPL";
