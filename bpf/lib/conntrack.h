/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_CONNTRACK_H
#define __VEIL_CONNTRACK_H

#include "common.h"
#include "config.h"
#include "maps.h"
#include "parse.h"

static __always_inline void ct_reverse(const struct ct_key *k, struct ct_key *r)
{
	r->saddr = k->daddr;
	r->daddr = k->saddr;
	r->sport = k->dport;
	r->dport = k->sport;
	r->proto = k->proto;
	r->pad[0] = r->pad[1] = r->pad[2] = 0;
}

static __always_inline int ct_fresh(struct ct_entry *e, __u64 now)
{
	return now - e->last_seen_ns < (__u64)ct_idle_timeout_s * 1000000000ULL;
}

static __always_inline void ct_touch(struct ct_entry *e, struct packet *pkt, __u64 now)
{
	e->last_seen_ns = now;
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, pkt->len);
}

/* ct_opens() - whether a packet is a new connection attempt. */
static __always_inline int ct_opens(struct packet *pkt)
{
	return pkt->tuple.proto == IPPROTO_TCP &&
	       (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/**
 * ct_related() - the connection an ICMP error is about.
 * An error goes back to the sender of the packet it quotes: to the
 * connection's originator when it quotes a packet of the original
 * direction, to the responder when it quotes a reply. Quoting a packet its
 * destination did not send relates it to nothing. Anyone on the path may
 * send one (a router shrinking the path MTU), so the error's source is not
 * checked, and an error does not keep a connection alive.
 * Return: the entry, or NULL when policy must judge the error.
 */
static __always_inline struct ct_entry *ct_related(struct packet *pkt, __u64 now)
{
	struct ct_key rev;
	struct ct_entry *e;

	if (pkt->quoted.saddr != pkt->tuple.daddr)
		return NULL;
	e = bpf_map_lookup_elem(&veil_ct, &pkt->quoted);
	if (e && ct_fresh(e, now))
		return e;
	ct_reverse(&pkt->quoted, &rev);
	e = bpf_map_lookup_elem(&veil_ct, &rev);
	if (e && ct_fresh(e, now))
		return e;
	return NULL;
}

/**
 * ct_lookup() - find the connection a packet belongs to.
 * @reply: set to 1 when the packet travels against the connection's direction.
 * An ICMP error is matched to the connection it is about (ct_related()).
 * Return: the entry, or NULL when policy must judge the packet. A new
 * connection attempt (TCP SYN without ACK) matches no entry in either
 * direction: a reused tuple, and a peer opening toward a pod from the
 * reply tuple of the pod's own connection, are judged by policy.
 */
static __always_inline struct ct_entry *ct_lookup(struct packet *pkt, int *reply)
{
	struct ct_key rev;
	struct ct_entry *e;
	__u64 now = bpf_ktime_get_ns();

	*reply = 0;
	if (pkt->tuple.proto == IPPROTO_ICMP && pkt->icmp_kind == ICMP_K_ERROR)
		return ct_related(pkt, now);
	if (pkt->tuple.proto == IPPROTO_ICMP && pkt->icmp_kind == ICMP_K_OTHER)
		return NULL;
	if (ct_opens(pkt))
		return NULL;

	e = bpf_map_lookup_elem(&veil_ct, &pkt->tuple);
	if (e && ct_fresh(e, now)) {
		ct_touch(e, pkt, now);
		return e;
	}
	ct_reverse(&pkt->tuple, &rev);
	e = bpf_map_lookup_elem(&veil_ct, &rev);
	if (e && ct_fresh(e, now)) {
		*reply = 1;
		if (!(e->flags & CT_F_REPLY_SEEN))
			e->flags |= CT_F_REPLY_SEEN;
		ct_touch(e, pkt, now);
		return e;
	}
	return NULL;
}

/*
 * ct_create() - record a connection that policy has just allowed. Of ICMP,
 * only an echo request opens one: an echo reply policy let through must
 * not make its own reverse, a request, ride as a reply.
 */
static __always_inline void ct_create(struct packet *pkt, __u32 src_id, __u32 dst_id, __u32 flags)
{
	struct ct_entry e = {};

	if (pkt->tuple.proto == IPPROTO_ICMP && pkt->icmp_kind != ICMP_K_ECHO)
		return;
	e.created_ns = bpf_ktime_get_ns();
	e.last_seen_ns = e.created_ns;
	e.packets = 1;
	e.bytes = pkt->len;
	e.src_identity = src_id;
	e.dst_identity = dst_id;
	e.flags = flags;
	e.policy_port = pkt->policy_port;
	bpf_map_update_elem(&veil_ct, &pkt->tuple, &e, BPF_ANY);
}

#endif /* __VEIL_CONNTRACK_H */
