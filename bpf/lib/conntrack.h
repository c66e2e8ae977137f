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

/**
 * ct_lookup() - find the connection a packet belongs to.
 * @reply: set to 1 when the packet travels against the connection's direction.
 * Return: the entry, or NULL when the packet starts a new flow. A TCP SYN
 * without ACK always starts a new flow so that a reused tuple is re-checked.
 */
static __always_inline struct ct_entry *ct_lookup(struct packet *pkt, int *reply)
{
	struct ct_key rev;
	struct ct_entry *e;
	__u64 now = bpf_ktime_get_ns();

	*reply = 0;
	if (pkt->tuple.proto == IPPROTO_ICMP && !pkt->is_icmp_echo)
		return NULL;

	if (!(pkt->tuple.proto == IPPROTO_TCP &&
	      (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)) {
		e = bpf_map_lookup_elem(&veil_ct, &pkt->tuple);
		if (e && ct_fresh(e, now)) {
			ct_touch(e, pkt, now);
			return e;
		}
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

/* ct_create() - record a connection that policy has just allowed. */
static __always_inline void ct_create(struct packet *pkt, __u32 src_id, __u32 dst_id, __u32 flags)
{
	struct ct_entry e = {};

	if (pkt->tuple.proto == IPPROTO_ICMP && !pkt->is_icmp_echo)
		return;
	e.created_ns = bpf_ktime_get_ns();
	e.last_seen_ns = e.created_ns;
	e.packets = 1;
	e.bytes = pkt->len;
	e.src_identity = src_id;
	e.dst_identity = dst_id;
	e.flags = flags;
	bpf_map_update_elem(&veil_ct, &pkt->tuple, &e, BPF_ANY);
}

#endif /* __VEIL_CONNTRACK_H */
