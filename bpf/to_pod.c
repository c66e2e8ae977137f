//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TC egress of a pod's host-side veth: packets the host stack routes to a pod
 * (from the host itself, or forwarded from elsewhere). Pod-to-pod traffic that
 * Veil redirects never passes here. The pod's ingress policy applies, with the
 * source identity taken from the address.
 */
#include "lib/common.h"
#include "lib/config.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/policy.h"

SEC("tc")
int veil_to_pod(struct __sk_buff *skb)
{
	struct endpoint_info *dst;
	struct packet pkt = {};
	struct decision in;
	struct peer sp = {};
	struct ct_entry *ct;
	__u32 flags = 0;
	int is_arp, reply, reason;

	reason = parse_ipv4(skb, &pkt, &is_arp);
	if (is_arp)
		return TC_ACT_OK;
	if (reason)
		return drop(skb, &pkt, OBS_TO_POD, reason, 0, 0, 0, 0);

	dst = bpf_map_lookup_elem(&veil_endpoints, &pkt.tuple.daddr);
	if (!dst)
		return drop(skb, &pkt, OBS_TO_POD, DROP_UNKNOWN_ENDPOINT, 0, 0, 0, 0);

	ct = ct_lookup(&pkt, &reply);
	if (ct) {
		metric_add(FWD_REPLY, pkt.len);
		return TC_ACT_OK;
	}

	if (pkt.tuple.saddr == node_ip) {
		sp.identity = 1 /* host */;
		peer_cidr(pkt.tuple.saddr, &sp);
	} else {
		peer_of(pkt.tuple.saddr, &sp);
	}
	policy_decide(dst, DIR_INGRESS, &sp, &pkt, &in);
	if (in.enforce == VERDICT_DENY)
		return drop(skb, &pkt, OBS_TO_POD, DROP_POLICY_INGRESS, sp.identity, dst->identity,
			    in.rule_id, FLOW_F_INGRESS_DECIDED);
	if (in.audit == VERDICT_DENY) {
		flags |= FLOW_F_AUDIT;
		metric_add(FWD_AUDIT, pkt.len);
	}
	ct_create(&pkt, sp.identity, dst->identity, (flags & FLOW_F_AUDIT) ? CT_F_AUDIT : 0);
	flow_emit(skb, &pkt, OBS_TO_POD, VERDICT_ALLOW, REASON_NONE, sp.identity, dst->identity,
		  in.rule_id, flags | FLOW_F_INGRESS_DECIDED);
	return TC_ACT_OK;
}

char __license[] SEC("license") = "Dual BSD/GPL";
