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

/*
 * ct_fresh() - whether an entry's idle lifetime has not passed. A packet on
 * another CPU may have touched it after @now was read.
 */
static __always_inline int ct_fresh(struct ct_entry *e, __u64 now)
{
	return now < e->last_seen_ns || now - e->last_seen_ns < (__u64)e->lifetime_s * 1000000000ULL;
}

/**
 * ct_lifetime() - how long a connection may stay idle, by protocol and, for
 * TCP, by state: opening until the responder answers, established, then
 * closing once both sides sent FIN or either sent RST, so that a closed
 * connection frees its slot within seconds.
 */
static __always_inline __u32 ct_lifetime(__u8 proto, __u16 flags)
{
	switch (proto) {
	case IPPROTO_TCP:
		if ((flags & CT_F_RST) || (flags & (CT_F_FIN_ORIG | CT_F_FIN_REPLY)) ==
						  (CT_F_FIN_ORIG | CT_F_FIN_REPLY))
			return ct_tcp_closing_s;
		if (!(flags & CT_F_REPLY_SEEN))
			return ct_tcp_opening_s;
		return ct_tcp_established_s;
	case IPPROTO_ICMP:
		return ct_icmp_s;
	default:
		return ct_udp_s;
	}
}

/*
 * ct_state_flags() - the CT_F_* flags a packet adds to its connection.
 * @reply: the packet travels against the connection's direction.
 */
static __always_inline __u16 ct_state_flags(struct packet *pkt, int reply)
{
	__u16 f = reply ? CT_F_REPLY_SEEN : 0;

	if (pkt->tuple.proto != IPPROTO_TCP)
		return f;
	if (pkt->tcp_flags & TCP_FLAG_RST)
		f |= CT_F_RST;
	if (pkt->tcp_flags & TCP_FLAG_FIN)
		f |= reply ? CT_F_FIN_REPLY : CT_F_FIN_ORIG;
	return f;
}

/*
 * ct_touch() - account a packet to its connection and move the
 * connection's state on. Flags and lifetime are written only when they
 * change, so the common packet does not dirty a cache line other CPUs read.
 */
static __always_inline void ct_touch(struct ct_entry *e, struct packet *pkt, int reply, __u64 now)
{
	__u16 flags = e->flags | ct_state_flags(pkt, reply);

	e->last_seen_ns = now;
	if (flags != e->flags) {
		e->flags = flags;
		e->lifetime_s = ct_lifetime(pkt->tuple.proto, flags);
	}
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
		return (e->flags & CT_F_REVOKED) ? NULL : e;
	ct_reverse(&pkt->quoted, &rev);
	e = bpf_map_lookup_elem(&veil_ct, &rev);
	if (e && ct_fresh(e, now))
		return (e->flags & CT_F_REVOKED) ? NULL : e;
	return NULL;
}

/**
 * ct_lookup() - find the connection a packet belongs to.
 * @reply: set to 1 when the packet travels against the connection's direction.
 * An ICMP error is matched to the connection it is about (ct_related()).
 * A revoked connection matches nothing and marks the packet (ct_revoked).
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
		if (e->flags & CT_F_REVOKED)
			goto revoked;
		ct_touch(e, pkt, 0, now);
		return e;
	}
	ct_reverse(&pkt->tuple, &rev);
	e = bpf_map_lookup_elem(&veil_ct, &rev);
	if (e && ct_fresh(e, now)) {
		if (e->flags & CT_F_REVOKED)
			goto revoked;
		*reply = 1;
		ct_touch(e, pkt, 1, now);
		return e;
	}
	return NULL;

revoked:
	/*
	 * Policy judges the packet, and a denied one may not pass as the
	 * reply of a lost connection: it is known not to be lost. A revoked
	 * entry found in the packet's direction also stops the search, so
	 * the packet cannot ride an entry its peer opened the other way.
	 */
	pkt->ct_revoked = 1;
	return NULL;
}

/*
 * ct_create() - record a connection that policy has just allowed. Of ICMP,
 * only an echo request opens one: an echo reply policy let through must
 * not make its own reverse, a request, ride as a reply.
 */
static __always_inline void ct_create(struct packet *pkt, __u32 src_id, __u32 dst_id, __u16 flags)
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
	e.flags = flags | ct_state_flags(pkt, 0);
	e.policy_port = pkt->policy_port;
	e.lifetime_s = ct_lifetime(pkt->tuple.proto, e.flags);
	bpf_map_update_elem(&veil_ct, &pkt->tuple, &e, BPF_ANY);
}

/*
 * stack_client_note() - remember the client end of a connection a local
 * pod opens through the host stack (veil_stack_clients). ICMP has no port
 * to tell its replies by: it is left out. A known end is only looked up,
 * which keeps it in the LRU without a write per packet.
 */
static __always_inline void stack_client_note(const struct packet *pkt)
{
	struct stack_client_key k = {
		.addr = pkt->tuple.saddr, .port = pkt->tuple.sport, .proto = pkt->tuple.proto,
	};
	__u8 one = 1;

	if (pkt->tuple.proto == IPPROTO_ICMP)
		return;
	if (!bpf_map_lookup_elem(&veil_stack_clients, &k))
		bpf_map_update_elem(&veil_stack_clients, &k, &one, BPF_ANY);
}

/*
 * stack_client_reply() - whether a packet that found no connection in
 * veil_ct goes to the client end of a connection a local pod opened through
 * the host stack: a reply from wherever the stack sent it (a remote backend
 * of a ClusterIP). The stack then takes it in, undoes its translation, and
 * to_pod judges it; a new flow that merely shares the port is judged there
 * by the pod's ingress policy all the same.
 */
static __always_inline int stack_client_reply(const struct packet *pkt)
{
	struct stack_client_key k = {
		.addr = pkt->tuple.daddr, .port = pkt->tuple.dport, .proto = pkt->tuple.proto,
	};

	if (pkt->tuple.proto == IPPROTO_ICMP)
		return 0;
	return bpf_map_lookup_elem(&veil_stack_clients, &k) != NULL;
}

#endif /* __VEIL_CONNTRACK_H */
