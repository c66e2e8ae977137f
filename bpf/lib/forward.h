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

/* Where an allowed packet from a pod goes. */
enum route_kind {
	ROUTE_STACK = 0,	/* this host or the world: the host stack */
	ROUTE_LOCAL = 1,	/* a pod on this node */
	ROUTE_TUNNEL = 2,	/* a remote pod, through WireGuard */
	ROUTE_PLAIN = 3,	/* a remote pod, over the underlay unencrypted */
	ROUTE_NO_TUNNEL = 4,	/* a remote pod, but strict mode has no tunnel to it */
};

struct route {
	__u32 kind;
	__u32 node_ip;
};

/**
 * route_of() - decide where a packet to @daddr goes. With encryption on,
 * remote pods, and other nodes' own addresses, are reached through the
 * tunnel when their node is a peer; without a peer, strict mode refuses and
 * permissive mode sends plaintext. In strict mode an address of the cluster's
 * pod range that the ipcache does not know yet (before the first sync) is
 * refused too: it may be a remote pod.
 */
static __always_inline void route_of(__u32 daddr, struct endpoint_info *dst, struct route *r)
{
	struct lpm_v4_key k = { .prefixlen = 32, .addr = daddr };
	struct ipcache_info *info;

	r->node_ip = 0;
	if (dst) {
		r->kind = ROUTE_LOCAL;
		return;
	}
	info = bpf_map_lookup_elem(&veil_ipcache, &k);
	if (!info || !info->node_ip || info->node_ip == node_ip) {
		r->kind = (strict_mode && wg_ifindex && in_cluster_cidr(daddr)) ? ROUTE_NO_TUNNEL :
										  ROUTE_STACK;
		return;
	}
	if (info->flags & IPCACHE_F_NODE) {
		/* Another node's own address: its host stack. Encrypted where
		 * it is a peer; plain packets to it leave through the host. */
		if (wg_ifindex && (info->flags & IPCACHE_F_TUNNEL))
			r->kind = ROUTE_TUNNEL;
		else if (wg_ifindex && strict_mode)
			r->kind = ROUTE_NO_TUNNEL;
		else
			r->kind = ROUTE_STACK;
		return;
	}
	if (!(info->flags & (IPCACHE_F_REMOTE_POD | IPCACHE_F_POD_CIDR))) {
		r->kind = ROUTE_STACK;
		return;
	}
	r->node_ip = info->node_ip;
	if (!wg_ifindex)
		r->kind = ROUTE_PLAIN;
	else if (info->flags & IPCACHE_F_TUNNEL)
		r->kind = ROUTE_TUNNEL;
	else if (strict_mode)
		r->kind = ROUTE_NO_TUNNEL;
	else
		r->kind = ROUTE_PLAIN;
}

/* forward() - act on a route (ROUTE_NO_TUNNEL is the caller's to drop). */
static __always_inline int forward(struct __sk_buff *skb, struct endpoint_info *dst, struct route *r)
{
	switch (r->kind) {
	case ROUTE_LOCAL:
		return deliver_local(skb, dst);
	case ROUTE_TUNNEL:
		/* The device is L3: the kernel strips the Ethernet header. The
		 * pod mark stays behind: what leaves the device is the tunnel's
		 * own UDP, which the guard must not take for a pod's. */
		skb->mark &= ~MARK_MASK;
		metric_add(FWD_TUNNEL, skb->len);
		return bpf_redirect(wg_ifindex, 0);
	case ROUTE_PLAIN:
		return forward_remote(skb, r->node_ip);
	default:
		metric_add(FWD_STACK, skb->len);
		return TC_ACT_OK;
	}
}

/**
 * deliver_local_l3() - hand a packet that arrived on an L3 device (no
 * Ethernet header) to a local pod: grow room for the header, write it as
 * the pod's gateway would, redirect into the pod.
 */
static __always_inline int deliver_local_l3(struct __sk_buff *skb, struct endpoint_info *dst)
{
	void *data, *data_end;
	struct ethhdr *eth;
	__u32 len = skb->len;

	if (bpf_skb_change_head(skb, ETH_HLEN, 0))
		return TC_ACT_SHOT;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	__builtin_memcpy(eth->h_dest, dst->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, dst->host_mac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	metric_add(FWD_LOCAL, len);
	return bpf_redirect_peer(dst->ifindex, 0);
}

/* leak_record() - remember pod traffic that strict mode kept off the wire. */
static __always_inline void leak_record(struct packet *pkt, __u32 endpoint_id, __u32 reason)
{
	__u64 now = bpf_ktime_get_ns();
	struct leak *l = bpf_map_lookup_elem(&veil_leaks, &pkt->tuple);
	struct leak fresh = {};

	if (l) {
		l->last_ns = now;
		__sync_fetch_and_add(&l->packets, 1);
		return;
	}
	fresh.first_ns = now;
	fresh.last_ns = now;
	fresh.packets = 1;
	fresh.endpoint_id = endpoint_id;
	fresh.reason = reason;
	bpf_map_update_elem(&veil_leaks, &pkt->tuple, &fresh, BPF_NOEXIST);
}

#endif /* __VEIL_FORWARD_H */
