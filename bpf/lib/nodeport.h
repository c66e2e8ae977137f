/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_NODEPORT_H
#define __VEIL_NODEPORT_H

/*
 * NodePort, LoadBalancer and external IPs without kube-proxy: traffic that
 * does not start at a socket on the node is translated on the packet path.
 *
 * The agent writes a Service's external frontends into veil_lb4_services
 * with the key's scope byte LB_SCOPE_EXTERNAL (lib/lb.h): a NodePort as
 * address 0 (any address of this node), a LoadBalancer ingress IP or
 * external IP as itself. The socket hooks use them only for a socket's own
 * connection to such an address (lb4_lookup()); a ClusterIP from outside
 * is not translated here.
 *
 * A new flow (TCP SYN, any UDP datagram) to a frontend on the underlay gets
 * a backend, and two entries in veil_np_nat, both keyed by a tuple as it
 * arrives: the client's packets (client -> frontend) and the backend's
 * replies. Then:
 *
 * - Local backend: destination rewritten to the backend, the client's
 *   address kept. The backend's ingress policy judges the client (world,
 *   or what the ipcache knows of it). Replies leave the pod (from_pod) with
 *   their source rewritten to the frontend and go straight out of the
 *   underlay device.
 * - Remote backend: destination rewritten to the backend, source to this
 *   node's address and a port of its own (SNAT), so the reply comes back
 *   here; the packet then takes the pod route to that node, through the
 *   WireGuard tunnel when encryption is on (strict mode refuses without a
 *   tunnel). The backend's node judges it as coming from this node. The
 *   reply (from_tunnel, or from_netdev without encryption) is rewritten back
 *   to frontend -> client and sent out of the underlay device.
 *
 * externalTrafficPolicy Local needs nothing here: the agent writes only the
 * node's own backends for such a frontend, so no flow is ever SNATed, and a
 * node without one writes none: the host stack refuses the flow (TCP RST,
 * ICMP port unreachable), as no socket listens on the port.
 */

#include "common.h"
#include "config.h"
#include "conntrack.h"
#include "events.h"
#include "forward.h"
#include "ingress.h"
#include "lb.h"
#include "maps.h"
#include "parse.h"
#include "policy.h"

/* Flags of struct np_nat. */
enum np_flags {
	NP_F_REPLY = 1 << 0,	/* rewrites a backend's reply back toward the client */
	NP_F_REMOTE = 1 << 1,	/* the backend is on another node: the client's source was NATed */
};

/*
 * struct np_nat - how a translated flow's packets are rewritten, keyed by
 * the tuple (struct ct_key) the packet arrives with. Ports in host byte
 * order, as in struct ct_key.
 */
struct np_nat {
	__u64 last_ns;		/* bpf_ktime_get_ns() of the last packet */
	__u32 saddr;		/* the packet's source after the rewrite */
	__u32 daddr;		/* its destination after the rewrite */
	__u16 sport;
	__u16 dport;
	__u32 flags;		/* NP_F_* */
};

/* Source ports this node NATs clients of remote backends to: above the
 * kernel's default ephemeral range, so the host's own connections to a
 * backend do not share them. */
#define NP_PORT_MIN 61000
#define NP_PORT_RANGE 4536
#define NP_PORT_TRIES 8

/* What a nodeport function returns for a packet that is not its own. */
#define NP_NOT_MINE (-1)

/* Translated NodePort/LoadBalancer flows, both directions. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct ct_key);
	__type(value, struct np_nat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_np_nat SEC(".maps");

/* np_lifetime_ns() - how long a translation may stay idle. */
static __always_inline __u64 np_lifetime_ns(__u8 proto)
{
	return (__u64)(proto == IPPROTO_TCP ? ct_tcp_established_s : ct_udp_s) * 1000000000ULL;
}

/* np_lookup() - a fresh translation of a packet's tuple, or NULL. */
static __always_inline struct np_nat *np_lookup(struct ct_key *tuple, __u64 now)
{
	struct np_nat *n = bpf_map_lookup_elem(&veil_np_nat, tuple);

	if (!n)
		return NULL;
	if (now > n->last_ns && now - n->last_ns > np_lifetime_ns(tuple->proto))
		return NULL;
	n->last_ns = now;
	return n;
}

/**
 * np_rewrite() - rewrite a TCP or UDP packet's addresses and ports, with
 * their checksums (IP header and the L4 pseudo-header).
 * @l3off: offset of the IP header in the packet
 * @from: the tuple as it is
 * @to: the tuple as it shall be
 * Return: 0, or -1 when the packet could not be rewritten.
 */
static __always_inline int np_rewrite(struct __sk_buff *skb, __u32 l3off, struct ct_key *from,
				      struct ct_key *to)
{
	__u32 l4off, csumoff, mangled = 0;
	__u8 vhl;
	__be16 op, np;

	if (bpf_skb_load_bytes(skb, l3off, &vhl, 1))
		return -1;
	l4off = l3off + (vhl & 0x0f) * 4;
	if (from->proto == IPPROTO_TCP) {
		csumoff = l4off + 16;
	} else if (from->proto == IPPROTO_UDP) {
		csumoff = l4off + 6;
		mangled = BPF_F_MARK_MANGLED_0;
	} else {
		return -1;
	}
	if (from->saddr != to->saddr) {
		if (bpf_l4_csum_replace(skb, csumoff, from->saddr, to->saddr, BPF_F_PSEUDO_HDR | mangled | 4) ||
		    bpf_l3_csum_replace(skb, l3off + 10, from->saddr, to->saddr, 4) ||
		    bpf_skb_store_bytes(skb, l3off + 12, &to->saddr, 4, 0))
			return -1;
	}
	if (from->daddr != to->daddr) {
		if (bpf_l4_csum_replace(skb, csumoff, from->daddr, to->daddr, BPF_F_PSEUDO_HDR | mangled | 4) ||
		    bpf_l3_csum_replace(skb, l3off + 10, from->daddr, to->daddr, 4) ||
		    bpf_skb_store_bytes(skb, l3off + 16, &to->daddr, 4, 0))
			return -1;
	}
	if (from->sport != to->sport) {
		op = bpf_htons(from->sport);
		np = bpf_htons(to->sport);
		if (bpf_l4_csum_replace(skb, csumoff, op, np, mangled | 2) ||
		    bpf_skb_store_bytes(skb, l4off, &np, 2, 0))
			return -1;
	}
	if (from->dport != to->dport) {
		op = bpf_htons(from->dport);
		np = bpf_htons(to->dport);
		if (bpf_l4_csum_replace(skb, csumoff, op, np, mangled | 2) ||
		    bpf_skb_store_bytes(skb, l4off + 2, &np, 2, 0))
			return -1;
	}
	return 0;
}

/* np_apply() - the tuple a translation turns @in into. */
static __always_inline void np_apply(struct ct_key *in, struct np_nat *n, struct ct_key *out)
{
	*out = *in;
	out->saddr = n->saddr;
	out->daddr = n->daddr;
	out->sport = n->sport;
	out->dport = n->dport;
}

/**
 * np_send_out() - send a reply, rewritten toward its client, out of the
 * underlay device (the kernel resolves the next hop), or into the tunnel
 * when the client is a WireGuard peer's address. A packet of an L3 device
 * (@l3 set: from the tunnel) gets an Ethernet header first.
 */
static __always_inline int np_send_out(struct __sk_buff *skb, __u32 daddr, int l3)
{
	struct route rt;
	__be16 proto = bpf_htons(ETH_P_IP);

	/* The source is this node's now: not a pod's packet for the guard. */
	skb->mark &= ~MARK_MASK;
	route_of(daddr, NULL, &rt);
	if (rt.kind == ROUTE_TUNNEL) {
		metric_add(FWD_TUNNEL, skb->len);
		return bpf_redirect(wg_ifindex, 0);
	}
	if (!underlay_ifindex)
		return TC_ACT_OK;
	if (l3) {
		if (bpf_skb_change_head(skb, ETH_HLEN, 0) ||
		    bpf_skb_store_bytes(skb, 12, &proto, 2, 0))
			return TC_ACT_SHOT;
	}
	metric_add(FWD_REMOTE, skb->len);
	return bpf_redirect_neigh(underlay_ifindex, NULL, 0, 0);
}

/**
 * np_reply() - rewrite a backend's reply to a translated flow back toward
 * the client and send it out.
 * @l3off: offset of the IP header (ETH_HLEN, or 0 on an L3 device)
 * Return: a TC verdict, or NP_NOT_MINE when the packet is no such reply.
 */
static __always_inline int np_reply(struct __sk_buff *skb, struct packet *pkt, __u32 l3off)
{
	struct ct_key to;
	struct np_nat *n;

	if (pkt->tuple.proto != IPPROTO_TCP && pkt->tuple.proto != IPPROTO_UDP)
		return NP_NOT_MINE;
	n = np_lookup(&pkt->tuple, bpf_ktime_get_ns());
	if (!n || !(n->flags & NP_F_REPLY))
		return NP_NOT_MINE;
	np_apply(&pkt->tuple, n, &to);
	if (np_rewrite(skb, l3off, &pkt->tuple, &to))
		return drop(skb, pkt, OBS_FROM_NETDEV, DROP_INVALID_PACKET, 0, 0, 0, 0);
	return np_send_out(skb, to.daddr, l3off == 0);
}

/* np_frontend() - the external frontend a packet is addressed to, or NULL. */
static __always_inline struct lb4_service *np_frontend(struct packet *pkt)
{
	struct lb4_key key = {
		.vip = pkt->tuple.daddr,
		.port = bpf_htons(pkt->tuple.dport),
		.proto = pkt->tuple.proto,
		.pad = LB_SCOPE_EXTERNAL,
	};
	struct lb4_service *svc;

	svc = bpf_map_lookup_elem(&veil_lb4_services, &key);
	if (svc || pkt->tuple.daddr != node_ip)
		return svc;
	key.vip = 0;
	return bpf_map_lookup_elem(&veil_lb4_services, &key);
}

/**
 * np_snat_port() - a source port of this node under which the backend's
 * replies to @t (already rewritten to the backend) are this flow's alone.
 * Return: the port, or 0 when none was found in a few tries.
 */
static __always_inline __u16 np_snat_port(struct ct_key *t)
{
	struct ct_key r;
	int i;

	for (i = 0; i < NP_PORT_TRIES; i++) {
		t->sport = NP_PORT_MIN + bpf_get_prandom_u32() % NP_PORT_RANGE;
		ct_reverse(t, &r);
		if (!bpf_map_lookup_elem(&veil_np_nat, &r))
			return t->sport;
	}
	return 0;
}

/* np_node_tunneled() - whether a node's own address rides the tunnel. */
static __always_inline int np_node_tunneled(__u32 node)
{
	struct lpm_v4_key k = { .prefixlen = 32, .addr = node };
	struct ipcache_info *info = bpf_map_lookup_elem(&veil_ipcache, &k);

	return info && (info->flags & IPCACHE_F_NODE) && (info->flags & IPCACHE_F_TUNNEL);
}

/**
 * np_deliver() - deliver a client's packet, already rewritten to @t, to
 * its backend: a local pod after its ingress policy (or its connection),
 * or the backend's node.
 * Return: a TC verdict.
 */
static __always_inline int np_deliver(struct __sk_buff *skb, struct packet *pkt, struct ct_key *t,
				      struct endpoint_info *dst, struct peer *sp, int remote)
{
	struct route rt;
	int reply;

	pkt->tuple = *t;
	if (!remote) {
		if (!dst)
			return drop(skb, pkt, OBS_FROM_NETDEV, DROP_UNKNOWN_ENDPOINT, sp->identity, 0, 0, 0);
		if (!ct_lookup(pkt, &reply) &&
		    ingress_decide(skb, pkt, dst, sp, OBS_FROM_NETDEV, 0) != TC_ACT_OK)
			return TC_ACT_SHOT;
		return deliver_local(skb, dst);
	}
	route_of(t->daddr, NULL, &rt);
	/* The packet's source is this node's own address: the backend's node
	 * admits it out of the tunnel only where peers' node addresses are in
	 * their allowed IPs (strict mode, node-to-node encryption), which the
	 * ipcache marks on that node's address. Elsewhere it goes in the clear,
	 * as the host's own traffic to that node does. */
	if (rt.kind == ROUTE_TUNNEL && !np_node_tunneled(rt.node_ip))
		rt.kind = ROUTE_PLAIN;
	if (rt.kind == ROUTE_NO_TUNNEL) {
		leak_record(pkt, 0, DROP_NO_TUNNEL);
		return drop(skb, pkt, OBS_FROM_NETDEV, DROP_NO_TUNNEL, ID_HOST, 0, 0, FLOW_F_LEAK);
	}
	if (rt.kind == ROUTE_STACK) {
		/* Not a pod of another node: nothing to send it to. */
		return drop(skb, pkt, OBS_FROM_NETDEV, DROP_NO_ROUTE, ID_HOST, 0, 0, 0);
	}
	return forward(skb, NULL, &rt);
}

/**
 * nodeport_netdev() - translate a packet from the underlay that is a flow
 * to an external frontend, or the reply of a flow sent to a remote backend.
 * @pkt: the packet, parsed; Ethernet frame
 * Return: a TC verdict, or NP_NOT_MINE when the packet is none of these.
 */
static __always_inline int nodeport_netdev(struct __sk_buff *skb, struct packet *pkt)
{
	struct lb4_backend_key bkey = {};
	struct np_nat fwd = {}, rev = {};
	struct endpoint_info *dst;
	struct lb4_service *svc;
	struct lb4_backend *be;
	struct peer sp = {};
	struct ct_key t, r;
	struct np_nat *n;
	__u64 now;
	int ret, remote;

	if (pkt->tuple.proto != IPPROTO_TCP && pkt->tuple.proto != IPPROTO_UDP)
		return NP_NOT_MINE;
	now = bpf_ktime_get_ns();
	n = np_lookup(&pkt->tuple, now);
	if (n && (n->flags & NP_F_REPLY)) {
		/* Replies of pods that are WireGuard peers' come out of the
		 * tunnel, never in plaintext. */
		if (wg_ifindex && strict_mode)
			return NP_NOT_MINE;
		return np_reply(skb, pkt, ETH_HLEN);
	}
	if (n && !ct_opens(pkt)) {
		remote = n->flags & NP_F_REMOTE;
		np_apply(&pkt->tuple, n, &t);
		dst = remote ? NULL : bpf_map_lookup_elem(&veil_endpoints, &t.daddr);
		if (!remote && remote_peer(pkt, 0, &sp))
			return NP_NOT_MINE;
		if (np_rewrite(skb, ETH_HLEN, &pkt->tuple, &t))
			return drop(skb, pkt, OBS_FROM_NETDEV, DROP_INVALID_PACKET, 0, 0, 0, 0);
		return np_deliver(skb, pkt, &t, dst, &sp, remote);
	}

	/* A new flow: only a SYN opens a TCP one, so the replies to the
	 * host's own connections are never taken for clients. */
	if (pkt->tuple.proto == IPPROTO_TCP && !ct_opens(pkt))
		return NP_NOT_MINE;
	svc = np_frontend(pkt);
	if (!svc || !svc->count)
		return NP_NOT_MINE;	/* the stack refuses: nothing listens there */
	if (remote_peer(pkt, 0, &sp))
		return NP_NOT_MINE;
	bkey.slot = svc->slot;
	bkey.index = bpf_get_prandom_u32() % svc->count;
	be = bpf_map_lookup_elem(&veil_lb4_backends, &bkey);
	if (!be)
		return NP_NOT_MINE;
	t = pkt->tuple;
	t.daddr = be->ip;
	t.dport = bpf_ntohs(be->port);
	dst = bpf_map_lookup_elem(&veil_endpoints, &t.daddr);
	remote = !dst;
	if (remote) {
		t.saddr = node_ip;
		if (!np_snat_port(&t))
			return drop(skb, pkt, OBS_FROM_NETDEV, DROP_NO_ROUTE, sp.identity, 0, 0, 0);
	} else {
		/* The backend's policy judges the client before anything
		 * is remembered of the flow. */
		struct packet tp = *pkt;

		tp.tuple = t;
		if (ingress_decide(skb, &tp, dst, &sp, OBS_FROM_NETDEV, 0) != TC_ACT_OK)
			return TC_ACT_SHOT;
	}
	fwd.last_ns = now;
	fwd.saddr = t.saddr;
	fwd.sport = t.sport;
	fwd.daddr = t.daddr;
	fwd.dport = t.dport;
	fwd.flags = remote ? NP_F_REMOTE : 0;
	rev.last_ns = now;
	rev.saddr = pkt->tuple.daddr;
	rev.sport = pkt->tuple.dport;
	rev.daddr = pkt->tuple.saddr;
	rev.dport = pkt->tuple.sport;
	rev.flags = NP_F_REPLY | fwd.flags;
	ct_reverse(&t, &r);
	if (bpf_map_update_elem(&veil_np_nat, &r, &rev, BPF_ANY) ||
	    bpf_map_update_elem(&veil_np_nat, &pkt->tuple, &fwd, BPF_ANY))
		return drop(skb, pkt, OBS_FROM_NETDEV, DROP_NO_ROUTE, sp.identity, 0, 0, 0);
	if (np_rewrite(skb, ETH_HLEN, &pkt->tuple, &t))
		return drop(skb, pkt, OBS_FROM_NETDEV, DROP_INVALID_PACKET, 0, 0, 0, 0);
	if (!remote) {
		/* Judged above: deliver. */
		pkt->tuple = t;
		return deliver_local(skb, dst);
	}
	ret = np_deliver(skb, pkt, &t, NULL, &sp, 1);
	return ret;
}

#endif /* __VEIL_NODEPORT_H */
