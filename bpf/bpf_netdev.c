//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Programs of the underlay device, the one toward other nodes.
 *
 * veil_from_netdev (TC ingress): packets for a local pod get the pod's
 * ingress policy, with the source identity taken from the ipcache by source
 * address, and are redirected into the pod. Everything else belongs to the
 * host and passes untouched.
 *
 * With kube-proxy replacement on (nodeport_enabled), from_netdev first
 * translates flows to NodePort/LoadBalancer frontends and the replies of
 * those it sent to other nodes (lib/nodeport.h).
 *
 * veil_to_netdev (TC egress, strict mode only): the last guard before the
 * wire. A packet from a local pod to a remote pod must have gone through
 * WireGuard, so here it can only be plaintext that something routed around
 * the tunnel. It is dropped and recorded as a leak.
 */
#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/forward.h"
#include "lib/ingress.h"
#include "lib/maps.h"
#include "lib/nodeport.h"
#include "lib/parse.h"
#include "lib/policy.h"

SEC("tc")
int veil_from_netdev(struct __sk_buff *skb)
{
	struct endpoint_info *dst;
	struct packet pkt = {};
	struct peer sp = {};
	struct ct_entry *ct;
	int is_arp, reply, reason;

	reason = parse_ipv4(skb, &pkt, &is_arp);
	if (is_arp || reason == DROP_UNSUPPORTED_L3)
		return TC_ACT_OK;

	if (nodeport_enabled && !reason) {
		int ret = nodeport_netdev(skb, &pkt);

		if (ret != NP_NOT_MINE)
			return ret;
	}

	dst = bpf_map_lookup_elem(&veil_endpoints, &pkt.tuple.daddr);
	if (!dst)
		return TC_ACT_OK;
	if (reason)
		return drop(skb, &pkt, OBS_FROM_NETDEV, reason, 0, dst->identity, 0, 0);
	reason = remote_peer(&pkt, 0, &sp);
	if (reason)
		return drop(skb, &pkt, OBS_FROM_NETDEV, reason, 0, dst->identity, 0,
			    FLOW_F_INGRESS_DECIDED);

	/*
	 * Strict mode: pods of other nodes reach ours only through the tunnel,
	 * where WireGuard vouches for the source address. Plaintext claiming
	 * to come from a remote pod is refused.
	 */
	if (wg_ifindex && strict_mode) {
		struct lpm_v4_key k = { .prefixlen = 32, .addr = pkt.tuple.saddr };
		struct ipcache_info *src = bpf_map_lookup_elem(&veil_ipcache, &k);

		if (src && (src->flags & (IPCACHE_F_REMOTE_POD | IPCACHE_F_POD_CIDR))) {
			leak_record(&pkt, dst->id, DROP_LEAK);
			return drop(skb, &pkt, OBS_FROM_NETDEV, DROP_LEAK, src->identity, dst->identity,
				    0, FLOW_F_LEAK | FLOW_F_INGRESS_DECIDED);
		}
	}

	ct = ct_lookup(&pkt, &reply);
	if (ct) {
		metric_add(FWD_REPLY, pkt.len);
		/* The stack carried the connection out: it takes the reply in
		 * (netfilter undoes its translation), and to_pod delivers. */
		if (ct->flags & CT_F_VIA_STACK)
			return TC_ACT_OK;
		return deliver_local(skb, dst);
	}

	/* The reply of a connection the pod opened through the stack, from
	 * where the stack translated it to (a ClusterIP's remote backend):
	 * netfilter turns it back, and to_pod judges it. */
	if (stack_client_reply(&pkt)) {
		metric_add(FWD_STACK, pkt.len);
		return TC_ACT_OK;
	}
	if (ingress_decide(skb, &pkt, dst, &sp, OBS_FROM_NETDEV, 0) != TC_ACT_OK)
		return TC_ACT_SHOT;
	return deliver_local(skb, dst);
}

/**
 * bound_elsewhere() - whether a packet to @daddr is headed for another node:
 * one of its pods, its pod range, its own addresses, or any address of the
 * cluster's pod range (known to the ipcache or not) but this node's pods.
 */
static __always_inline int bound_elsewhere(__u32 daddr, struct ipcache_info **info)
{
	struct lpm_v4_key k = { .prefixlen = 32, .addr = daddr };

	*info = NULL;
	if (bpf_map_lookup_elem(&veil_endpoints, &daddr))
		return 0;
	*info = bpf_map_lookup_elem(&veil_ipcache, &k);
	if (*info && (*info)->node_ip != node_ip &&
	    ((*info)->flags & (IPCACHE_F_REMOTE_POD | IPCACHE_F_POD_CIDR | IPCACHE_F_NODE)))
		return 1;
	return in_cluster_cidr(daddr);
}

SEC("tc")
int veil_to_netdev(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int from_pod = (skb->mark & MARK_MASK) == MARK_FROM_POD;
	struct endpoint_info *src;
	struct ipcache_info *dst;
	struct packet pkt = {};
	struct ethhdr *eth = data;
	struct iphdr *ip;
	int is_arp, reason;

	/*
	 * A packet is a pod's when from_pod marked it (its source may have been
	 * rewritten since) or its source is a local pod. Anything of a pod's
	 * that the guard cannot read is refused: it cannot be shown harmless.
	 */
	if ((void *)(eth + 1) > data_end)
		return from_pod ? drop(skb, &pkt, OBS_TO_NETDEV, DROP_INVALID_PACKET, 0, 0, 0, FLOW_F_LEAK) :
				  TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return from_pod ? drop(skb, &pkt, OBS_TO_NETDEV, DROP_UNSUPPORTED_L3, 0, 0, 0, FLOW_F_LEAK) :
				  TC_ACT_OK;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return from_pod ? drop(skb, &pkt, OBS_TO_NETDEV, DROP_INVALID_PACKET, 0, 0, 0, FLOW_F_LEAK) :
				  TC_ACT_OK;
	src = bpf_map_lookup_elem(&veil_endpoints, &ip->saddr);
	if (!from_pod && !src)
		return TC_ACT_OK;

	reason = parse_ipv4(skb, &pkt, &is_arp);
	if (reason) {
		/* Ports unknown (a later fragment, a cut header): the addresses
		 * still say where it goes. */
		pkt.tuple.saddr = ip->saddr;
		pkt.tuple.daddr = ip->daddr;
		pkt.tuple.proto = ip->protocol;
		if (!bound_elsewhere(ip->daddr, &dst))
			return TC_ACT_OK;
		leak_record(&pkt, src ? src->id : 0, DROP_LEAK);
		return drop(skb, &pkt, OBS_TO_NETDEV, reason, src ? src->identity : 0, 0, 0, FLOW_F_LEAK);
	}
	if (!bound_elsewhere(pkt.tuple.daddr, &dst))
		return TC_ACT_OK;
	leak_record(&pkt, src ? src->id : 0, DROP_LEAK);
	return drop(skb, &pkt, OBS_TO_NETDEV, DROP_LEAK, src ? src->identity : 0,
		    dst ? dst->identity : 0, 0, FLOW_F_LEAK);
}

char __license[] SEC("license") = "Dual BSD/GPL";
