/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_PARSE_H
#define __VEIL_PARSE_H

#include "common.h"
#include "maps.h"

#define IP_MF_ 0x2000		/* more fragments */
#define IP_OFFSET_ 0x1fff	/* fragment offset, in 8-byte units */

#define ICMP_ECHOREPLY_ 0
#define ICMP_DEST_UNREACH_ 3
#define ICMP_ECHO_ 8
#define ICMP_TIME_EXCEEDED_ 11
#define ICMP_PARAMETERPROB_ 12

/* What an ICMP message is to conntrack (struct packet's icmp_kind). */
#define ICMP_K_OTHER 0		/* judged by policy, never tracked */
#define ICMP_K_ECHO 1		/* echo request: may open a connection */
#define ICMP_K_ECHO_REPLY 2	/* echo reply: only ever a reply */
#define ICMP_K_ERROR 3		/* an error that quotes a packet: see struct packet's quoted */

/* struct packet - the parsed headers of an IPv4 packet. */
struct packet {
	struct ct_key tuple;	/* as seen on the wire */
	__u16 policy_port;	/* L4 destination port, or ICMP type << 8 | code */
	__u8 tcp_flags;
	__u8 icmp_kind;		/* ICMP_K_* */
	__u32 len;
	struct ct_key quoted;	/* ICMP_K_ERROR: the tuple of the packet the error is about */
	__u8 ct_revoked;	/* set by ct_lookup(): the packet's connection was revoked */
};

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/**
 * parse_icmp_quote() - read the packet an ICMP error quotes (its IP header
 * and first 8 bytes of L4, RFC 792) into pkt->quoted, keyed as conntrack
 * keys that packet. A quote too short to hold its ports, of a later
 * fragment, or of a protocol conntrack does not key leaves the error
 * unrelated to any connection (ICMP_K_OTHER): policy judges it.
 */
static __always_inline void parse_icmp_quote(struct packet *pkt, struct iphdr *in, void *data_end)
{
	__u8 *l4;
	__u32 ihl;

	if ((void *)(in + 1) > data_end)
		return;
	ihl = in->ihl * 4;
	if (ihl < sizeof(*in) || (in->frag_off & bpf_htons(IP_OFFSET_)))
		return;
	l4 = (void *)in + ihl;
	if ((void *)(l4 + 8) > data_end)
		return;
	pkt->quoted.saddr = in->saddr;
	pkt->quoted.daddr = in->daddr;
	pkt->quoted.proto = in->protocol;
	switch (in->protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP_:
		pkt->quoted.sport = bpf_ntohs(*(__be16 *)l4);
		pkt->quoted.dport = bpf_ntohs(*(__be16 *)(l4 + 2));
		break;
	case IPPROTO_ICMP:
		if (l4[0] == ICMP_ECHO_)
			pkt->quoted.dport = bpf_ntohs(*(__be16 *)(l4 + 4));
		else if (l4[0] == ICMP_ECHOREPLY_)
			pkt->quoted.sport = bpf_ntohs(*(__be16 *)(l4 + 4));
		else
			return;
		break;
	default:
		return;
	}
	pkt->icmp_kind = ICMP_K_ERROR;
}

/**
 * parse_l4() - read the L4 fields of struct packet from the header at @l4.
 * Return: REASON_NONE, or DROP_INVALID_PACKET when the header is cut short.
 */
static __always_inline int parse_l4(struct packet *pkt, __u8 *l4, void *data_end)
{
	switch (pkt->tuple.proto) {
	case IPPROTO_TCP:
		if ((void *)(l4 + 14) > data_end)
			return DROP_INVALID_PACKET;
		pkt->tcp_flags = l4[13];
		/* fallthrough */
	case IPPROTO_UDP:
	case IPPROTO_SCTP_:
		if ((void *)(l4 + 4) > data_end)
			return DROP_INVALID_PACKET;
		pkt->tuple.sport = bpf_ntohs(*(__be16 *)l4);
		pkt->tuple.dport = bpf_ntohs(*(__be16 *)(l4 + 2));
		pkt->policy_port = pkt->tuple.dport;
		break;
	case IPPROTO_ICMP:
		if ((void *)(l4 + 8) > data_end)
			return DROP_INVALID_PACKET;
		pkt->policy_port = ((__u16)l4[0] << 8) | l4[1];
		/*
		 * The echo id stands in for the pinger's port: a request is
		 * keyed (0, id) and its reply (id, 0), so a reply is the
		 * reverse of its request, and a request from the other side
		 * with the same id matches nothing.
		 */
		if (l4[0] == ICMP_ECHO_) {
			pkt->icmp_kind = ICMP_K_ECHO;
			pkt->tuple.dport = bpf_ntohs(*(__be16 *)(l4 + 4));
		} else if (l4[0] == ICMP_ECHOREPLY_) {
			pkt->icmp_kind = ICMP_K_ECHO_REPLY;
			pkt->tuple.sport = bpf_ntohs(*(__be16 *)(l4 + 4));
		} else if (l4[0] == ICMP_DEST_UNREACH_ || l4[0] == ICMP_TIME_EXCEEDED_ ||
			   l4[0] == ICMP_PARAMETERPROB_) {
			parse_icmp_quote(pkt, (void *)(l4 + 8), data_end);
		}
		break;
	default:
		break;
	}
	return REASON_NONE;
}

static __always_inline void frag_key_of(struct iphdr *ip, struct frag_key *k)
{
	k->saddr = ip->saddr;
	k->daddr = ip->daddr;
	k->id = ip->id;
	k->proto = ip->protocol;
	k->pad = 0;
}

/**
 * frag_remember() - record the L4 fields of a datagram's first fragment,
 * parsed into @pkt, for its later fragments.
 */
static __always_inline void frag_remember(struct iphdr *ip, struct packet *pkt)
{
	struct frag_key k;
	struct frag_l4 v = {
		.sport = pkt->tuple.sport,
		.dport = pkt->tuple.dport,
		.policy_port = pkt->policy_port,
		.tcp_flags = pkt->tcp_flags,
		/*
		 * The quote of an ICMP error is not kept: errors fit in 576
		 * bytes, and later fragments of a bigger one face policy.
		 */
		.icmp_kind = pkt->icmp_kind == ICMP_K_ERROR ? ICMP_K_OTHER : pkt->icmp_kind,
	};

	frag_key_of(ip, &k);
	bpf_map_update_elem(&veil_frags, &k, &v, BPF_ANY);
}

/**
 * frag_recall() - give a later fragment the L4 fields of its datagram's
 * first fragment, so that it meets the same verdict.
 * Return: REASON_NONE, or DROP_FRAGMENT when the first fragment was not
 * seen (lost, reordered, or never sent): nothing can judge the fragment,
 * so it is dropped.
 */
static __always_inline int frag_recall(struct iphdr *ip, struct packet *pkt)
{
	struct frag_key k;
	struct frag_l4 *v;

	frag_key_of(ip, &k);
	v = bpf_map_lookup_elem(&veil_frags, &k);
	if (!v)
		return DROP_FRAGMENT;
	pkt->tuple.sport = v->sport;
	pkt->tuple.dport = v->dport;
	pkt->policy_port = v->policy_port;
	pkt->tcp_flags = v->tcp_flags;
	pkt->icmp_kind = v->icmp_kind;
	return REASON_NONE;
}

/**
 * parse_ip_at() - parse IPv4 + the first bytes of L4, at @ip.
 * A later fragment gets the L4 fields of its datagram's first fragment
 * (frag_recall()). The addresses are filled in whatever the reason, unless
 * the IP header itself is cut short or malformed.
 * Return: REASON_NONE, or the drop reason.
 */
static __always_inline int parse_ip_at(struct __sk_buff *skb, struct packet *pkt, struct iphdr *ip,
				       void *data_end)
{
	__u32 ihl;
	int reason;

	if ((void *)(ip + 1) > data_end)
		return DROP_INVALID_PACKET;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return DROP_INVALID_PACKET;

	pkt->tuple.saddr = ip->saddr;
	pkt->tuple.daddr = ip->daddr;
	pkt->tuple.proto = ip->protocol;
	pkt->tuple.sport = 0;
	pkt->tuple.dport = 0;
	pkt->policy_port = 0;
	pkt->tcp_flags = 0;
	pkt->icmp_kind = ICMP_K_OTHER;
	pkt->len = skb->len;

	if (ip->frag_off & bpf_htons(IP_OFFSET_))
		return frag_recall(ip, pkt);
	reason = parse_l4(pkt, (__u8 *)ip + ihl, data_end);
	if (reason == REASON_NONE && (ip->frag_off & bpf_htons(IP_MF_)))
		frag_remember(ip, pkt);
	return reason;
}

/**
 * parse_ipv4() - parse Ethernet + IPv4 + the first bytes of L4.
 * Return: REASON_NONE, or the drop reason. Non-IPv4 frames return
 * DROP_UNSUPPORTED_L3; ARP is left to the caller via *is_arp.
 */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct packet *pkt, int *is_arp)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	*is_arp = 0;
	if ((void *)(eth + 1) > data_end)
		return DROP_INVALID_PACKET;
	if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		*is_arp = 1;
		return REASON_NONE;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return DROP_UNSUPPORTED_L3;
	return parse_ip_at(skb, pkt, (void *)(eth + 1), data_end);
}

/**
 * parse_ipv4_l3() - parse a packet of an L3 device (no link-layer header),
 * such as a WireGuard device.
 */
static __always_inline int parse_ipv4_l3(struct __sk_buff *skb, struct packet *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return DROP_UNSUPPORTED_L3;
	return parse_ip_at(skb, pkt, data, data_end);
}

#endif /* __VEIL_PARSE_H */
