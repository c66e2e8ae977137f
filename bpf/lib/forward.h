/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_FORWARD_H
#define __VEIL_FORWARD_H

#include "common.h"
#include "config.h"
#include "events.h"
#include "maps.h"

/**
 * deliver_local() - hand a packet straight to a pod on this node.
 * The frame is addressed as if the pod's gateway (its host-side veth) sent it,
 * then bpf_redirect_peer() moves it into the pod's namespace without passing
 * the host-side hooks or the host stack: no IP forwarding needed.
 */
static __always_inline int deliver_local(struct __sk_buff *skb, struct endpoint_info *dst)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 len = skb->len;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	__builtin_memcpy(eth->h_dest, dst->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, dst->host_mac, ETH_ALEN);
	metric_add(FWD_LOCAL, len);
	return bpf_redirect_peer(dst->ifindex, 0);
}

/**
 * forward_remote() - send a packet toward the node that hosts its destination.
 * The underlay is routed: the next hop is the destination node's address on
 * the underlay device, resolved by the kernel's neighbour table.
 */
static __always_inline int forward_remote(struct __sk_buff *skb, __u32 next_hop)
{
	struct bpf_redir_neigh nh = {
		.nh_family = AF_INET,
		.ipv4_nh = next_hop,
	};

	if (!underlay_ifindex)
		return TC_ACT_OK;
	metric_add(FWD_REMOTE, skb->len);
	return bpf_redirect_neigh(underlay_ifindex, &nh, sizeof(nh), 0);
}

/**
 * deliver() - forward a packet that policy allowed, from a pod.
 * Local pods get it directly; remote pods through the underlay; anything
 * else (this host, the world) goes to the host stack.
 */
static __always_inline int deliver(struct __sk_buff *skb, __u32 daddr, struct endpoint_info *dst)
{
	struct lpm_v4_key k = { .prefixlen = 32, .addr = daddr };
	struct ipcache_info *info;

	if (dst)
		return deliver_local(skb, dst);
	info = bpf_map_lookup_elem(&veil_ipcache, &k);
	if (info && info->node_ip && info->node_ip != node_ip &&
	    (info->flags & (IPCACHE_F_REMOTE_POD | IPCACHE_F_POD_CIDR)))
		return forward_remote(skb, info->node_ip);
	metric_add(FWD_STACK, skb->len);
	return TC_ACT_OK;
}

#endif /* __VEIL_FORWARD_H */
