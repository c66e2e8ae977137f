//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Programs of a pod's host-side veth.
 *
 * veil_from_pod (TC ingress): every packet a pod sends. Anti-spoofing,
 * conntrack, the source's egress policy, the destination's ingress policy
 * when it is local, then delivery.
 *
 * veil_to_pod (TC egress): packets the host stack routes to a pod (from the
 * host itself, or forwarded from elsewhere). Pod-to-pod traffic that Veil
 * redirects never passes here. The pod's ingress policy applies.
 */
#include "lib/common.h"
#include "lib/config.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/forward.h"
#include "lib/ingress.h"
#include "lib/maps.h"
#include "lib/nodeport.h"
#include "lib/parse.h"
#include "lib/policy.h"

/*
 * Types that no map or program signature names still need BTF so that bpf2go
 * generates them for Go (-type): the ring buffer's record, and every enum
 * whose values Go shares.
 */
const struct flow_event *unused_flow_event __attribute__((unused));
const enum verdict *unused_verdict __attribute__((unused));
const enum drop_reason *unused_drop_reason __attribute__((unused));
const enum forward_kind *unused_forward_kind __attribute__((unused));
const enum obs_point *unused_obs_point __attribute__((unused));
const enum direction *unused_direction __attribute__((unused));
const enum reserved_identity *unused_reserved_identity __attribute__((unused));
const enum endpoint_flags *unused_endpoint_flags __attribute__((unused));
const enum ipcache_flags *unused_ipcache_flags __attribute__((unused));
const enum policy_prefix *unused_policy_prefix __attribute__((unused));
const enum ct_flags *unused_ct_flags __attribute__((unused));
const enum flow_flags *unused_flow_flags __attribute__((unused));
const enum sockstat *unused_sockstat __attribute__((unused));
const enum mark *unused_mark __attribute__((unused));
const enum lb_scope *unused_lb_scope __attribute__((unused));
const enum np_flags *unused_np_flags __attribute__((unused));
const struct np_nat *unused_np_nat __attribute__((unused));

SEC("tc")
int veil_from_pod(struct __sk_buff *skb)
{
	struct endpoint_info *src, *dst;
	struct decision eg, in;
	struct peer sp = {}, dp = {};
	struct packet pkt = {};
	struct ct_entry *ct;
	struct route rt;
	__u32 flags = 0, rule_id;
	int is_arp, reply, reason;

	skb->mark = (skb->mark & ~MARK_MASK) | MARK_FROM_POD;
	reason = parse_ipv4(skb, &pkt, &is_arp);
	if (is_arp)
		return TC_ACT_OK;
	if (reason)
		return drop(skb, &pkt, OBS_FROM_POD, reason, 0, 0, 0, 0);

	src = bpf_map_lookup_elem(&veil_endpoints, &pkt.tuple.saddr);
	if (!src || src->ifindex != skb->ifindex)
		return drop(skb, &pkt, OBS_FROM_POD, DROP_SPOOFED_SOURCE, 0, 0, 0, 0);
	if (nodeport_enabled) {
		/* A reply to a NodePort client: back out as the frontend. */
		struct np_nat *n = np_lookup(&pkt.tuple, bpf_ktime_get_ns());

		if (n && (n->flags & NP_F_REPLY)) {
			ct_lookup(&pkt, &reply);
			return np_reply(skb, &pkt, ETH_HLEN);
		}
	}
	dst = bpf_map_lookup_elem(&veil_endpoints, &pkt.tuple.daddr);

	route_of(pkt.tuple.daddr, dst, &rt);
	ct = ct_lookup(&pkt, &reply);
	if (ct)
		goto established;

	sp.identity = src->identity;
	peer_cidr(pkt.tuple.saddr, &sp);
	if (dst) {
		dp.identity = dst->identity;
		peer_cidr(pkt.tuple.daddr, &dp);
	} else {
		peer_of(pkt.tuple.daddr, &dp);
	}

	policy_decide(src, DIR_EGRESS, &dp, &pkt, &eg);
	if (eg.enforce == VERDICT_DENY) {
		reason = DROP_POLICY_EGRESS;
		rule_id = eg.rule_id;
		goto denied;
	}
	if (eg.audit == VERDICT_DENY)
		flags |= FLOW_F_AUDIT;
	rule_id = eg.rule_id;

	if (dst) {
		policy_decide(dst, DIR_INGRESS, &sp, &pkt, &in);
		if (in.enforce == VERDICT_DENY) {
			reason = DROP_POLICY_INGRESS;
			rule_id = in.rule_id;
			flags = FLOW_F_INGRESS_DECIDED;
			goto denied;
		}
		if (in.audit == VERDICT_DENY)
			flags |= FLOW_F_AUDIT;
		if (in.rule_id) {
			rule_id = in.rule_id;
			flags |= FLOW_F_INGRESS_DECIDED;
		}
	}

	if (rt.kind == ROUTE_NO_TUNNEL) {
		leak_record(&pkt, src->id, DROP_NO_TUNNEL);
		return drop(skb, &pkt, OBS_FROM_POD, DROP_NO_TUNNEL, sp.identity, dp.identity, rule_id,
			    flags | FLOW_F_LEAK);
	}
	if (rt.kind == ROUTE_TUNNEL)
		flags |= FLOW_F_ENCRYPTED;
	ct_create(&pkt, sp.identity, dp.identity,
		  ((flags & FLOW_F_AUDIT) ? CT_F_AUDIT : 0) | (rt.kind == ROUTE_STACK ? CT_F_VIA_STACK : 0));
	if (rt.kind == ROUTE_STACK)
		stack_client_note(&pkt);
	if (flags & FLOW_F_AUDIT)
		metric_add(FWD_AUDIT, pkt.len);
	flow_emit(skb, &pkt, OBS_FROM_POD, VERDICT_ALLOW, REASON_NONE, sp.identity, dp.identity,
		  rule_id, flags);
	return forward(skb, dst, &rt);

denied:
	/* A denied segment may answer a connection whose entry was lost. */
	if (!reply_rederive(&pkt, src, &sp, dst, &dp))
		return drop(skb, &pkt, OBS_FROM_POD, reason, sp.identity, dp.identity, rule_id, flags);
established:
	if (rt.kind == ROUTE_NO_TUNNEL) {
		leak_record(&pkt, src->id, DROP_NO_TUNNEL);
		return drop(skb, &pkt, OBS_FROM_POD, DROP_NO_TUNNEL, src->identity, 0, 0, FLOW_F_LEAK);
	}
	metric_add(FWD_REPLY, pkt.len);
	/* A connection the host stack carried (kube-proxy's translation, the
	 * host's own) is answered through it too: netfilter undoes the
	 * translation and sees both directions. */
	if (ct && (ct->flags & CT_F_VIA_STACK)) {
		if (!reply)
			stack_client_note(&pkt);
		metric_add(FWD_STACK, pkt.len);
		return TC_ACT_OK;
	}
	return forward(skb, dst, &rt);
}

SEC("tc")
int veil_to_pod(struct __sk_buff *skb)
{
	struct endpoint_info *dst;
	struct packet pkt = {};
	struct peer sp = {};
	struct ct_entry *ct;
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
		sp.identity = ID_HOST;
		peer_cidr(pkt.tuple.saddr, &sp);
	} else {
		peer_of(pkt.tuple.saddr, &sp);
	}
	return ingress_decide(skb, &pkt, dst, &sp, OBS_TO_POD, 0);
}

char __license[] SEC("license") = "Dual BSD/GPL";
