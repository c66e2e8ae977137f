/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_LB_H
#define __VEIL_LB_H

/*
 * Socket-level load balancing of Services (ClusterIP). The cgroup socket
 * hooks translate a Service address (VIP, port, protocol) into one of its
 * backends before the kernel routes anything, so every packet on the wire is
 * ordinary pod-to-pod traffic and policy judges the backend's identity.
 *
 * Atomic updates: a service's backends live in one of two generations,
 * slot = id << 1 | generation. The agent writes the new generation's
 * backends first and then switches the service entry to it with one map
 * update, so a program sees either the old set or the new one, never a mix.
 * The old generation stays until the next update overwrites it.
 */

#include "common.h"

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif

/* struct lb4_key - a Service address: VIP, port and protocol. */
struct lb4_key {
	__be32 vip;
	__be16 port;
	__u8 proto;		/* IPPROTO_TCP, IPPROTO_UDP or IPPROTO_SCTP */
	__u8 pad;
};

/* struct lb4_service - where a Service's backends are and how many. */
struct lb4_service {
	__u32 slot;		/* backends' generation: id << 1 | generation */
	__u32 count;		/* backends at indices [0, count) of slot; 0: refuse */
};

/* struct lb4_backend_key - one backend of a generation. */
struct lb4_backend_key {
	__u32 slot;
	__u32 index;
};

/* Flags of struct lb4_backend. */
enum lb_backend_flags {
	LB_BACKEND_F_TERMINATING = 1 << 0,	/* used only because no ready backend is left */
};

/* struct lb4_backend - a backend's address. */
struct lb4_backend {
	__be32 ip;
	__be16 port;
	__u16 flags;		/* LB_BACKEND_F_* */
};

/*
 * struct lb4_revnat_key - a socket that was sent to a backend in place of a
 * Service: what replies from that backend to that socket are restored from.
 */
struct lb4_revnat_key {
	__u64 cookie;		/* socket cookie */
	__be32 ip;		/* backend */
	__be16 port;
	__u16 pad;
};

/* struct lb4_revnat - the Service address a backend stands in for. */
struct lb4_revnat {
	__be32 vip;
	__be16 port;
	__u16 pad;
};

/* Services by address. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_lb4_services SEC(".maps");

/* Backends of each service generation. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lb4_backend_key);
	__type(value, struct lb4_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_lb4_backends SEC(".maps");

/* Translated sockets: (socket, backend) -> Service address, for replies and getpeername. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct lb4_revnat_key);
	__type(value, struct lb4_revnat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_lb4_revnat SEC(".maps");

/* Results of lb4_translate(). */
enum lb_result {
	LB_PASS = 0,		/* not a Service: leave the address alone */
	LB_TRANSLATED = 1,	/* *ip and *port now name a backend */
	LB_NO_BACKEND = 2,	/* a Service without backends: refuse */
};

/**
 * lb4_translate() - choose a backend for a Service address.
 * @cookie: the socket's cookie, under which the translation is remembered
 * @ip: destination address (network byte order), replaced by the backend's
 * @port: destination port (network byte order), replaced by the backend's
 * @proto: the socket's protocol
 *
 * A backend is chosen at random among the service's current generation.
 * The translation is recorded in veil_lb4_revnat so that replies (recvmsg)
 * and getpeername show the Service address.
 *
 * Return: an enum lb_result.
 */
static __always_inline int lb4_translate(__u64 cookie, __be32 *ip, __be16 *port, __u8 proto)
{
	struct lb4_key key = { .vip = *ip, .port = *port, .proto = proto };
	struct lb4_backend_key bkey = {};
	struct lb4_revnat_key rkey = {};
	struct lb4_revnat rev = {};
	struct lb4_service *svc;
	struct lb4_backend *be;
	__u32 count;

	svc = bpf_map_lookup_elem(&veil_lb4_services, &key);
	if (!svc)
		return LB_PASS;
	/*
	 * The agent replaces the entry rather than writing into it (a hash
	 * map update swaps in a new element; without preallocation the old
	 * one is freed after RCU), so slot and count belong together.
	 */
	count = svc->count;
	if (count == 0)
		return LB_NO_BACKEND;
	bkey.slot = svc->slot;
	bkey.index = bpf_get_prandom_u32() % count;
	be = bpf_map_lookup_elem(&veil_lb4_backends, &bkey);
	if (!be)
		return LB_NO_BACKEND;

	rkey.cookie = cookie;
	rkey.ip = be->ip;
	rkey.port = be->port;
	rev.vip = key.vip;
	rev.port = key.port;
	bpf_map_update_elem(&veil_lb4_revnat, &rkey, &rev, BPF_ANY);
	*ip = be->ip;
	*port = be->port;
	return LB_TRANSLATED;
}

/**
 * lb4_reverse() - the Service address a socket's peer stands in for.
 * @cookie: the socket's cookie
 * @ip: the peer's address (network byte order), replaced by the VIP
 * @port: the peer's port (network byte order), replaced by the Service's
 *
 * Return: 1 when the peer is a backend this socket was translated to.
 */
static __always_inline int lb4_reverse(__u64 cookie, __be32 *ip, __be16 *port)
{
	struct lb4_revnat_key rkey = { .cookie = cookie, .ip = *ip, .port = *port };
	struct lb4_revnat *rev;

	rev = bpf_map_lookup_elem(&veil_lb4_revnat, &rkey);
	if (!rev)
		return 0;
	*ip = rev->vip;
	*port = rev->port;
	return 1;
}

#endif /* __VEIL_LB_H */
