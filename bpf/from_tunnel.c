//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TC ingress of the WireGuard device: decrypted traffic from other nodes'
 * pods. The source identity comes from the ipcache by source address, which
 * is trustworthy here because WireGuard only accepts from a peer the
 * addresses its allowed-IPs bind to that peer's key. Then the destination's
 * ingress policy, and delivery into the pod. The device is L3: packets start
 * at the IP header.
 */
#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/forward.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/policy.h"

SEC("tc")
int veil_from_tunnel(struct __sk_buff *skb)
{
	struct endpoint_info *dst;
	struct packet pkt = {};
	struct decision in;
	struct peer sp = {};
	struct ct_entry *ct;
	__u32 flags = FLOW_F_INGRESS_DECIDED | FLOW_F_ENCRYPTED;
	int reply, reason;

	reason = parse_ipv4_l3(skb, &pkt);
	if (reason == DROP_UNSUPPORTED_L3)
		return TC_ACT_OK;

	dst = bpf_map_lookup_elem(&veil_endpoints, &pkt.tuple.daddr);
	if (!dst)
		return TC_ACT_OK;
	if (reason)
		return drop(skb, &pkt, OBS_FROM_TUNNEL, reason, 0, dst->identity, 0, flags);

	ct = ct_lookup(&pkt, &reply);
	if (ct) {
		metric_add(FWD_REPLY, pkt.len);
		return deliver_local_l3(skb, dst);
	}

	peer_of(pkt.tuple.saddr, &sp);
	policy_decide(dst, DIR_INGRESS, &sp, &pkt, &in);
	if (in.enforce == VERDICT_DENY)
		return drop(skb, &pkt, OBS_FROM_TUNNEL, DROP_POLICY_INGRESS, sp.identity,
			    dst->identity, in.rule_id, flags);
	if (in.audit == VERDICT_DENY) {
		flags |= FLOW_F_AUDIT;
		metric_add(FWD_AUDIT, pkt.len);
	}
	ct_create(&pkt, sp.identity, dst->identity, (flags & FLOW_F_AUDIT) ? CT_F_AUDIT : 0);
	flow_emit(skb, &pkt, OBS_FROM_TUNNEL, VERDICT_ALLOW, REASON_NONE, sp.identity,
		  dst->identity, in.rule_id, flags);
	return deliver_local_l3(skb, dst);
}

char __license[] SEC("license") = "Dual BSD/GPL";
