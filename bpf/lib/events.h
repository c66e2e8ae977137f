/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_EVENTS_H
#define __VEIL_EVENTS_H

#include "common.h"
#include "maps.h"
#include "parse.h"

static __always_inline void metric_add(__u32 idx, __u32 len)
{
	struct metric *m = bpf_map_lookup_elem(&veil_metrics, &idx);

	if (m) {
		m->packets++;
		m->bytes += len;
	}
}

/* flow_emit() - write one flow event; a full ring buffer is counted, not fatal. */
static __always_inline void flow_emit(struct __sk_buff *skb, struct packet *pkt, __u8 point,
				      __u8 verdict, __u8 reason, __u32 src_id, __u32 dst_id,
				      __u32 rule_id, __u32 flags)
{
	struct flow_event *ev = bpf_ringbuf_reserve(&veil_events, sizeof(*ev), 0);

	if (!ev) {
		metric_add(EVENT_LOST, 0);
		return;
	}
	ev->ts_ns = bpf_ktime_get_ns();
	ev->saddr = pkt->tuple.saddr;
	ev->daddr = pkt->tuple.daddr;
	ev->sport = pkt->tuple.sport;
	ev->dport = pkt->tuple.proto == IPPROTO_ICMP ? pkt->policy_port : pkt->tuple.dport;
	ev->proto = pkt->tuple.proto;
	ev->verdict = verdict;
	ev->reason = reason;
	ev->point = point;
	ev->flags = flags;
	ev->src_identity = src_id;
	ev->dst_identity = dst_id;
	ev->ifindex = skb->ifindex;
	ev->len = pkt->len;
	ev->rule_id = rule_id;
	ev->pad = 0;
	bpf_ringbuf_submit(ev, 0);
}

/*
 * drop() - count and report a drop, and tell TC to drop the packet. Frames
 * that are not IPv4 have no flow to report (no addresses, no ports): they
 * are counted only, so pods' IPv6 neighbour chatter cannot flood the log.
 */
static __always_inline int drop(struct __sk_buff *skb, struct packet *pkt, __u8 point, __u8 reason,
				__u32 src_id, __u32 dst_id, __u32 rule_id, __u32 flags)
{
	metric_add(reason, skb->len);
	if (reason != DROP_UNSUPPORTED_L3 && reason != DROP_INVALID_PACKET)
		flow_emit(skb, pkt, point, VERDICT_DENY, reason, src_id, dst_id, rule_id, flags);
	return TC_ACT_SHOT;
}

#endif /* __VEIL_EVENTS_H */
