/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_CONFIG_H
#define __VEIL_CONFIG_H

#include "common.h"

/*
 * Node configuration, set by the agent before load (cilium/ebpf rewrites
 * these constants), so the verifier sees them as known values.
 */
volatile const __u32 node_ip = 0;		/* underlay address, network byte order */
volatile const __u32 underlay_ifindex = 0;	/* device toward other nodes */
/* Idle lifetimes of connections (agent/datapath CTTimeouts), in seconds. */
volatile const __u32 ct_tcp_established_s = 21600;
volatile const __u32 ct_tcp_opening_s = 60;	/* the responder has not answered yet */
volatile const __u32 ct_tcp_closing_s = 10;	/* FIN from both sides, or RST */
volatile const __u32 ct_udp_s = 60;		/* UDP, SCTP, protocols without ports */
volatile const __u32 ct_icmp_s = 30;
volatile const __u32 wg_ifindex = 0;		/* WireGuard device; 0: encryption off */
volatile const __u32 strict_mode = 0;		/* 1: never send pod traffic to another node unencrypted */
volatile const __u32 cluster_cidr = 0;		/* the cluster's pod range, network byte order */
volatile const __u32 cluster_cidr_bits = 0;	/* its prefix length; 0: unknown */
volatile const __u32 nodeport_enabled = 0;	/* 1: translate NodePort/LoadBalancer traffic (no kube-proxy) */

/* in_cluster_cidr() - whether @addr is in the cluster's pod range. */
static __always_inline int in_cluster_cidr(__u32 addr)
{
	__u32 mask;

	if (!cluster_cidr_bits || cluster_cidr_bits > 32)
		return 0;
	mask = bpf_htonl(~0U << (32 - cluster_cidr_bits));
	return (addr & mask) == cluster_cidr;
}

#endif /* __VEIL_CONFIG_H */
