/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_INGRESS_H
#define __VEIL_INGRESS_H

#include "common.h"
#include "config.h"
#include "conntrack.h"
#include "events.h"
#include "maps.h"
#include "parse.h"
#include "policy.h"

/**
 * remote_peer() - the identities of the source of a packet that another
 * machine sent, over the underlay or out of the tunnel.
 * Addresses of this host are never believed from the wire: the host
 * identity, which every ingress-isolated pod admits, belongs to packets of
 * this host's own stack only. Addresses of a node that is a WireGuard peer
 * (its pods, its pod CIDR) are believed only out of the tunnel, where the
 * peer's key vouches for them.
 * @from_tunnel: the packet came out of the WireGuard device.
 * Return: REASON_NONE, or the reason to drop the packet.
 */
static __always_inline int remote_peer(struct packet *pkt, int from_tunnel, struct peer *p)
{
	struct lpm_v4_key k = { .prefixlen = 32, .addr = pkt->tuple.saddr };
	struct ipcache_info *info = bpf_map_lookup_elem(&veil_ipcache, &k);
	__u32 *cid;

	if (pkt->tuple.saddr == node_ip || (info && info->identity == ID_HOST))
		return DROP_SPOOFED_SOURCE;
	if (!from_tunnel && info && (info->flags & IPCACHE_F_TUNNEL) &&
	    (info->flags & (IPCACHE_F_REMOTE_POD | IPCACHE_F_POD_CIDR)))
		return DROP_UNENCRYPTED_PEER;
	p->identity = info ? info->identity : ID_WORLD;
	cid = bpf_map_lookup_elem(&veil_cidrs, &k);
	p->cidr_identity = cid ? *cid : 0;
	return REASON_NONE;
}

/**
 * reply_rederive() - judge a TCP segment that found no connection as the
 * reply it may be. Entries get lost: the LRU evicts them when another pod
 * churns through connections, the garbage collector or an upgrade removes
 * them. A segment with ACK never opens a connection (the receiving stack
 * answers one it does not know with RST), so it may pass when policy
 * allows the connection it would answer: the opposite direction, to the
 * port it comes from. Its entry is then written again as that connection
 * was opened, so a lost entry never breaks an allowed connection. UDP
 * replies cannot be told from new datagrams: they are not re-derived. Nor
 * is a segment of a connection the agent revoked (CT_F_REVOKED): policy
 * alone cannot tell which side opened it.
 * @src, @sp: the sender: its endpoint when local (else NULL), its identities.
 * @dst, @dp: the receiver, likewise.
 * Return: 1 when the segment passes as a reply, else 0.
 */
static __always_inline int reply_rederive(struct packet *pkt, struct endpoint_info *src, struct peer *sp,
					  struct endpoint_info *dst, struct peer *dp)
{
	struct packet orig = *pkt;
	struct decision d;
	__u16 flags;

	if (pkt->tuple.proto != IPPROTO_TCP || !(pkt->tcp_flags & TCP_FLAG_ACK) || pkt->ct_revoked)
		return 0;
	ct_reverse(&pkt->tuple, &orig.tuple);
	orig.policy_port = orig.tuple.dport;
	orig.tcp_flags = 0;
	flags = ct_state_flags(pkt, 1);
	if (dst) {
		policy_decide(dst, DIR_EGRESS, sp, &orig, &d);
		if (d.enforce == VERDICT_DENY)
			return 0;
		if (d.audit == VERDICT_DENY)
			flags |= CT_F_AUDIT;
	}
	if (src) {
		policy_decide(src, DIR_INGRESS, dp, &orig, &d);
		if (d.enforce == VERDICT_DENY)
			return 0;
		if (d.audit == VERDICT_DENY)
			flags |= CT_F_AUDIT;
	}
	ct_create(&orig, dp->identity, sp->identity, flags);
	return 1;
}

/**
 * ingress_decide() - judge a new flow from @sp toward the local endpoint
 * @dst by @dst's ingress policy. An allowed flow is recorded in conntrack
 * and reported; a denied one is counted and reported, unless it passes as
 * the reply of a lost connection (reply_rederive()).
 * @flags: FLOW_F_* the caller knows (e.g. FLOW_F_ENCRYPTED).
 * Return: TC_ACT_OK when the packet may be delivered, else TC_ACT_SHOT.
 */
static __always_inline int ingress_decide(struct __sk_buff *skb, struct packet *pkt,
					  struct endpoint_info *dst, struct peer *sp, __u8 point,
					  __u32 flags)
{
	struct peer dp = { .identity = dst->identity };
	struct decision in;

	flags |= FLOW_F_INGRESS_DECIDED;
	policy_decide(dst, DIR_INGRESS, sp, pkt, &in);
	if (in.enforce == VERDICT_DENY) {
		if (reply_rederive(pkt, NULL, sp, dst, &dp)) {
			metric_add(FWD_REPLY, pkt->len);
			return TC_ACT_OK;
		}
		return drop(skb, pkt, point, DROP_POLICY_INGRESS, sp->identity, dst->identity,
			    in.rule_id, flags);
	}
	if (in.audit == VERDICT_DENY) {
		flags |= FLOW_F_AUDIT;
		metric_add(FWD_AUDIT, pkt->len);
	}
	/* What the stack delivered (to_pod) is answered through the stack. */
	ct_create(pkt, sp->identity, dst->identity,
		  ((flags & FLOW_F_AUDIT) ? CT_F_AUDIT : 0) | (point == OBS_TO_POD ? CT_F_VIA_STACK : 0));
	flow_emit(skb, pkt, point, VERDICT_ALLOW, REASON_NONE, sp->identity, dst->identity,
		  in.rule_id, flags);
	return TC_ACT_OK;
}

#endif /* __VEIL_INGRESS_H */
