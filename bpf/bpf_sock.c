//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket programs.
 *
 * veil_sockops (cgroup sockops on the pods' cgroup): when a TCP connection
 * between two local endpoints is established (so TC policy allowed its
 * handshake both ways), both sockets join veil_sockhash, each with its state
 * (which end opened the connection, which connection it is) in
 * veil_sockconn, which it forgets when the socket closes.
 *
 * veil_sk_msg (sk_msg on veil_sockhash): payload sent on an accelerated
 * socket goes straight into the peer socket's receive queue. When the
 * connection is revoked, or the peer is not in the map (closed, or not yet
 * joined), the message takes the normal TCP path, where TC policy sees it,
 * and so does every later message of that socket.
 *
 * Revocation never removes a socket from veil_sockhash: the kernel would
 * free the data already redirected into it and not yet read. The socket
 * leaves the map when its process closes it, not when TCP closes it: a
 * socket reset by its peer stays in the map, under its four-tuple, until
 * then. A client can meanwhile open a new connection of the same four-tuple
 * (a reset leaves no TIME_WAIT); the new server socket cannot join the map,
 * and the client's payload must not go to the dead socket, which is why
 * sk_msg checks that the peer's state is of its own connection.
 *
 * veil_connect4/6, veil_sendmsg4/6, veil_recvmsg4/6, veil_getpeername4/6
 * (cgroup sock_addr hooks): Services. A connect (TCP, connected UDP, SCTP)
 * or an unconnected UDP send to a Service address goes to one of its
 * backends instead; a datagram received from that backend, and getpeername,
 * show the Service address again. IPv6 sockets are translated when they talk
 * IPv4 through v4-mapped addresses (::ffff:a.b.c.d). A Service without
 * backends refuses at once: connect and sendmsg fail with ECONNREFUSED.
 * A Service with sessionAffinity ClientIP sends a client (its network
 * namespace) to the backend it last used, within the affinity timeout.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/sock.h"
#include "lib/lb.h"

/* Referenced so that bpf2go generates the Go type of the socket flags. */
const enum sock_flags *unused_sock_flags __attribute__((unused));

SEC("sockops")
int veil_sockops(struct bpf_sock_ops *skops)
{
	struct sock_key key = {};
	struct sock_state st = {};
	struct endpoint_info *src, *dst;
	__u32 family, l4, r4, l6[4], r6[4], snd_una, rcv_nxt;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_STATE_CB)
		return 1;

	/*
	 * Read every field once, unconditionally: clang otherwise merges the
	 * IPv4 and IPv6 loads into one through a computed context pointer,
	 * which the verifier refuses.
	 */
	family = skops->family;
	l4 = skops->local_ip4;
	r4 = skops->remote_ip4;
	l6[0] = skops->local_ip6[0];
	l6[1] = skops->local_ip6[1];
	l6[2] = skops->local_ip6[2];
	l6[3] = skops->local_ip6[3];
	r6[0] = skops->remote_ip6[0];
	r6[1] = skops->remote_ip6[1];
	r6[2] = skops->remote_ip6[2];
	r6[3] = skops->remote_ip6[3];
	snd_una = skops->snd_una;
	rcv_nxt = skops->rcv_nxt;
	key.sport = skops->local_port;
	key.dport = bpf_ntohl(skops->remote_port);

	if (family == AF_INET) {
		key.sip = l4;
		key.dip = r4;
	} else if (family == AF_INET6) {
		/* Dual-stack sockets talking IPv4 carry IPv4-mapped addresses. */
		if (!v4_mapped(l6[0], l6[1], l6[2]) || !v4_mapped(r6[0], r6[1], r6[2]))
			return 1;
		key.sip = l6[3];
		key.dip = r6[3];
	} else {
		return 1;
	}

	if (skops->op == BPF_SOCK_OPS_STATE_CB) {
		/*
		 * Connections close at a high rate; their state must not pile
		 * up. Only the socket's own: a later connection of the four-tuple
		 * may have written its state already.
		 */
		if (skops->args[1] == BPF_TCP_CLOSE) {
			struct sock_state *old = bpf_map_lookup_elem(&veil_sockconn, &key);

			if (old && old->cookie == bpf_get_socket_cookie(skops))
				bpf_map_delete_elem(&veil_sockconn, &key);
		}
		return 1;
	}

	src = bpf_map_lookup_elem(&veil_endpoints, &key.sip);
	dst = bpf_map_lookup_elem(&veil_endpoints, &key.dip);
	if (!src || !dst)
		return 1;
	/* Either end may opt out (e.g. an application that splices). */
	if ((src->flags | dst->flags) & EP_F_NO_ACCEL)
		return 1;
	/*
	 * Which connection this is: once established, the active end has
	 * sent up to snd_una and received up to rcv_nxt, the passive end the
	 * other way round (its socket was created with both at ISN + 1).
	 */
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		st.flags = SOCK_F_ACTIVE;
		st.client_seq = snd_una;
		st.server_seq = rcv_nxt;
	} else {
		st.client_seq = rcv_nxt;
		st.server_seq = snd_una;
	}
	st.cookie = bpf_get_socket_cookie(skops);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	/*
	 * Join the sockhash first, and write the state only once in: a socket
	 * whose four-tuple a dead one still holds stays out (it takes the
	 * TCP path), and the state under the key stays the dead socket's, or
	 * none, which the peer's sk_msg does not take for its connection's.
	 */
	if (bpf_sock_hash_update(skops, &veil_sockhash, &key, BPF_NOEXIST))
		return 1;
	bpf_map_update_elem(&veil_sockconn, &key, &st, BPF_ANY);
	return 1;
}

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
	struct sock_key self = {}, peer = {};
	struct sock_state *st, *pst;
	__u32 len = msg->size;
	__u32 family, l4, r4, l6[4], r6[4];

	/* Read every field once, unconditionally (see veil_sockops). */
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
	self.sport = msg->local_port;
	self.dport = bpf_ntohl(msg->remote_port);

	if (family == AF_INET) {
		self.sip = l4;
		self.dip = r4;
	} else if (family == AF_INET6) {
		if (!v4_mapped(r6[0], r6[1], r6[2]) || !v4_mapped(l6[0], l6[1], l6[2]))
			return SK_PASS;
		self.sip = l6[3];
		self.dip = r6[3];
	} else {
		return SK_PASS;
	}
	peer.sip = self.dip;
	peer.dip = self.sip;
	peer.sport = self.dport;
	peer.dport = self.sport;

	st = bpf_map_lookup_elem(&veil_sockconn, &self);
	if (st && !(st->flags & SOCK_F_REVOKED) && !st->tcp_path) {
		/* The peer in the sockhash must be this connection's other end. */
		pst = bpf_map_lookup_elem(&veil_sockconn, &peer);
		if (pst && pst->client_seq == st->client_seq && pst->server_seq == st->server_seq &&
		    (pst->flags & SOCK_F_ACTIVE) != (st->flags & SOCK_F_ACTIVE) &&
		    bpf_msg_redirect_hash(msg, &veil_sockhash, &peer, BPF_F_INGRESS) == SK_PASS) {
			sockstat_add(SOCKSTAT_REDIRECTED, len);
			return SK_PASS;
		}
		st->tcp_path = 1;
	}
	sockstat_add(SOCKSTAT_PASSED, len);
	return SK_PASS;
}

/* Referenced so that bpf2go generates the enums for Go. */
const enum lb_backend_flags *unused_lb_backend_flags __attribute__((unused));
const enum lb_stat *unused_lb_stat __attribute__((unused));

/**
 * sock_forward() - translate a connect's or sendmsg's destination.
 * @ctx: the hook's context
 * @ip: the destination (IPv4, network byte order), replaced by a backend's
 * @port: the destination port (network byte order), replaced likewise
 *
 * A Service without backends refuses the call: returning 0 alone would fail
 * it with EPERM, so the return value is set to ECONNREFUSED, what a client
 * gets from an address where nothing listens.
 *
 * Return: an enum lb_result.
 */
static __always_inline int sock_forward(struct bpf_sock_addr *ctx, __be32 *ip, __be16 *port)
{
	int res = lb4_translate(ctx, ip, port, ctx->protocol);

	if (res == LB_NO_BACKEND)
		bpf_set_retval(-ECONNREFUSED);
	return res;
}

static __always_inline int sock4_forward(struct bpf_sock_addr *ctx)
{
	__be32 ip = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;

	switch (sock_forward(ctx, &ip, &port)) {
	case LB_NO_BACKEND:
		return 0;
	case LB_TRANSLATED:
		ctx->user_ip4 = ip;
		ctx->user_port = port;
	}
	return 1;
}

static __always_inline int sock6_forward(struct bpf_sock_addr *ctx)
{
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2];
	__be32 ip = ctx->user_ip6[3];
	__be16 port = (__be16)ctx->user_port;

	if (!v4_mapped(w0, w1, w2))
		return 1;
	switch (sock_forward(ctx, &ip, &port)) {
	case LB_NO_BACKEND:
		return 0;
	case LB_TRANSLATED:
		ctx->user_ip6[3] = ip;
		ctx->user_port = port;
	}
	return 1;
}

/* sock4_reverse() - show the Service address in place of a backend's. */
static __always_inline void sock4_reverse(struct bpf_sock_addr *ctx)
{
	__be32 ip = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;

	if (lb4_reverse(bpf_get_socket_cookie(ctx), &ip, &port)) {
		ctx->user_ip4 = ip;
		ctx->user_port = port;
	}
}

static __always_inline void sock6_reverse(struct bpf_sock_addr *ctx)
{
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2];
	__be32 ip = ctx->user_ip6[3];
	__be16 port = (__be16)ctx->user_port;

	if (!v4_mapped(w0, w1, w2))
		return;
	if (lb4_reverse(bpf_get_socket_cookie(ctx), &ip, &port)) {
		ctx->user_ip6[3] = ip;
		ctx->user_port = port;
	}
}

SEC("cgroup/connect4")
int veil_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx);
}

SEC("cgroup/sendmsg4")
int veil_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx);
}

SEC("cgroup/recvmsg4")
int veil_recvmsg4(struct bpf_sock_addr *ctx)
{
	sock4_reverse(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int veil_getpeername4(struct bpf_sock_addr *ctx)
{
	sock4_reverse(ctx);
	return 1;
}

SEC("cgroup/connect6")
int veil_connect6(struct bpf_sock_addr *ctx)
{
	return sock6_forward(ctx);
}

SEC("cgroup/sendmsg6")
int veil_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_forward(ctx);
}

SEC("cgroup/recvmsg6")
int veil_recvmsg6(struct bpf_sock_addr *ctx)
{
	sock6_reverse(ctx);
	return 1;
}

SEC("cgroup/getpeername6")
int veil_getpeername6(struct bpf_sock_addr *ctx)
{
	sock6_reverse(ctx);
	return 1;
}

char __license[] SEC("license") = "Dual BSD/GPL";
