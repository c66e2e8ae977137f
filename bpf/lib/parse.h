/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_PARSE_H
#define __VEIL_PARSE_H

#include "common.h"
#include "maps.h"

#define ICMP_ECHOREPLY_ 0
#define ICMP_ECHO_ 8

/* What an ICMP message is to conntrack (struct packet's icmp_kind). */
#define ICMP_K_OTHER 0		/* judged by policy, never tracked */
#define ICMP_K_ECHO 1		/* echo request: may open a connection */
#define ICMP_K_ECHO_REPLY 2	/* echo reply: only ever a reply */

/* struct packet - the parsed headers of an IPv4 packet. */
struct packet {
	struct ct_key tuple;	/* as seen on the wire */
	__u16 policy_port;	/* L4 destination port, or ICMP type << 8 | code */
	__u8 tcp_flags;
	__u8 icmp_kind;		/* ICMP_K_* */
	__u32 len;
};

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/**
 * parse_ip_at() - parse IPv4 + the first bytes of L4, at @ip.
 * Return: REASON_NONE, or the drop reason.
 */
static __always_inline int parse_ip_at(struct __sk_buff *skb, struct packet *pkt, struct iphdr *ip,
				       void *data_end)
{
	__u8 *l4;
	__u32 ihl;

	if ((void *)(ip + 1) > data_end)
		return DROP_INVALID_PACKET;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return DROP_INVALID_PACKET;
	/* Non-first fragments carry no ports: policy cannot be decided. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return DROP_FRAGMENT;

	pkt->tuple.saddr = ip->saddr;
	pkt->tuple.daddr = ip->daddr;
	pkt->tuple.proto = ip->protocol;
	pkt->tuple.sport = 0;
	pkt->tuple.dport = 0;
	pkt->policy_port = 0;
	pkt->tcp_flags = 0;
	pkt->icmp_kind = ICMP_K_OTHER;
	pkt->len = skb->len;

	l4 = (void *)ip + ihl;
	switch (ip->protocol) {
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
		}
		break;
	default:
		break;
	}
	return REASON_NONE;
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
