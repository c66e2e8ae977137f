//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * sk_msg on veil_sockhash: payload sent on an accelerated socket goes
 * straight into the peer socket's receive queue. Without a peer in the map
 * (evicted, or not yet joined) the message takes the normal TCP path, where
 * TC policy sees it.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/sock.h"

static __always_inline void sockstat_add(__u32 idx, __u32 len)
{
	struct metric *m = bpf_map_lookup_elem(&veil_sockstats, &idx);

	if (m) {
		m->packets++;
		m->bytes += len;
	}
}

SEC("sk_msg")
int veil_sk_msg(struct sk_msg_md *msg)
{
	struct sock_key peer = {};
	__u32 len = msg->size;
	__u32 family, l4, r4, l6[4], r6[4];

	/* Read every field once, unconditionally (see sockops.c). */
	family = msg->family;
	l4 = msg->local_ip4;
	r4 = msg->remote_ip4;
	l6[0] = msg->local_ip6[0];
	l6[1] = msg->local_ip6[1];
	l6[2] = msg->local_ip6[2];
	l6[3] = msg->local_ip6[3];
	r6[0] = msg->remote_ip6[0];
	r6[1] = msg->remote_ip6[1];
	r6[2] = msg->remote_ip6[2];
	r6[3] = msg->remote_ip6[3];
	peer.sport = bpf_ntohl(msg->remote_port);
	peer.dport = msg->local_port;

	if (family == AF_INET) {
		peer.sip = r4;
		peer.dip = l4;
	} else if (family == AF_INET6) {
		if (!v4_mapped(r6[0], r6[1], r6[2]) || !v4_mapped(l6[0], l6[1], l6[2]))
			return SK_PASS;
		peer.sip = r6[3];
		peer.dip = l6[3];
	} else {
		return SK_PASS;
	}

	if (bpf_msg_redirect_hash(msg, &veil_sockhash, &peer, BPF_F_INGRESS) == SK_PASS) {
		sockstat_add(SOCKSTAT_REDIRECTED, len);
		return SK_PASS;
	}
	sockstat_add(SOCKSTAT_PASSED, len);
	return SK_PASS;
}

char __license[] SEC("license") = "Dual BSD/GPL";
