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
#include "config.h"
#include "maps.h"

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif

/* struct lb4_key - a Service address: VIP, port and protocol. */
struct lb4_key {
	__be32 vip;
	__be16 port;
	__u8 proto;		/* IPPROTO_TCP, IPPROTO_UDP or IPPROTO_SCTP */
	__u8 pad;		/* enum lb_scope */
};

/* Scopes of a Service key (struct lb4_key's pad byte). */
enum lb_scope {
	LB_SCOPE_CLUSTER = 0,	/* a ClusterIP */
	LB_SCOPE_EXTERNAL = 1,	/* a NodePort (address 0: any node's), LoadBalancer or external IP (lib/nodeport.h) */
};

/* struct lb4_service - where a Service's backends are and how many. */
struct lb4_service {
	__u32 slot;		/* backends' generation: id << 1 | generation */
	__u32 count;		/* backends at indices [0, count) of slot; 0: refuse */
	__u32 affinity_s;	/* sessionAffinity ClientIP timeout in seconds; 0: none */
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
 * struct lb4_member_key - a backend of a generation by address, written only
 * for Services with session affinity: whether a remembered backend is still
 * one of the Service's is one lookup, in the same generation as the backends.
 */
struct lb4_member_key {
	__u32 slot;
	__be32 ip;
	__be16 port;
	__u16 pad;
};

/*
 * struct lb4_affinity_key - a client of a Service with session affinity.
 * Sockets have no source address yet when they connect; a client is its
 * network namespace (a pod, or the host), which is what ClientIP means
 * for a pod with one address.
 */
struct lb4_affinity_key {
	__u64 netns;		/* network namespace cookie */
	__be32 vip;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* struct lb4_affinity - the backend a client was last sent to, and when. */
struct lb4_affinity {
	__u64 last_used_ns;	/* bpf_ktime_get_ns() */
	__be32 ip;
	__be16 port;
	__u16 pad;
};

/*
 * struct lb4_flow_key - a client (network namespace) and a backend it was
 * sent to in place of a Service: what the agent names a flow's Service by.
 */
struct lb4_flow_key {
	__u64 netns;		/* network namespace cookie */
	__be32 ip;		/* backend */
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* struct lb4_flow - the Service address the client asked for, and when. */
struct lb4_flow {
	__u64 time_ns;		/* bpf_ktime_get_ns() of the last translation */
	__be32 vip;
	__be16 port;
	__u16 pad;
};

/* Counters of veil_lb4_stats. */
enum lb_stat {
	LB_STAT_TRANSLATED = 0,	/* a connect or send sent to a backend */
	LB_STAT_REFUSED = 1,	/* refused: the Service has no backends */
	LB_STAT_MAX = 2,
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

/* Backends by address, per generation, of Services with session affinity. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lb4_member_key);
	__type(value, __u32);	/* index in the generation */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_lb4_members SEC(".maps");

/* Session affinity: (client, Service) -> backend last chosen. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct lb4_affinity_key);
	__type(value, struct lb4_affinity);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_lb4_affinity SEC(".maps");

/* Translations by client and backend, for naming flows' Services. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct lb4_flow_key);
	__type(value, struct lb4_flow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_lb4_flows SEC(".maps");

/* Translation counters, by enum lb_stat. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_lb4_stats SEC(".maps");

static __always_inline void lb4_count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&veil_lb4_stats, &stat);

	if (n)
		*n += 1;
}

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
 * lb4_affine() - the backend a client's affinity names, if still valid.
 * @akey: the client and Service
 * @svc: the Service's entry
 * @now: bpf_ktime_get_ns()
 * @be: filled with the backend
 *
 * Valid means used within the Service's timeout and still a backend of
 * the generation clients are sent to now: an entry whose backend left is
 * never used, and is replaced by the next choice.
 *
 * Return: 1 when @be names the remembered backend.
 */
static __always_inline int lb4_affine(struct lb4_affinity_key *akey, struct lb4_service *svc,
				      __u64 now, struct lb4_backend *be)
{
	struct lb4_member_key mkey = {};
	struct lb4_affinity *aff;

	aff = bpf_map_lookup_elem(&veil_lb4_affinity, akey);
	if (!aff)
		return 0;
	if (now - aff->last_used_ns > (__u64)svc->affinity_s * 1000000000ULL)
		return 0;
	mkey.slot = svc->slot;
	mkey.ip = aff->ip;
	mkey.port = aff->port;
	if (!bpf_map_lookup_elem(&veil_lb4_members, &mkey))
		return 0;
	be->ip = aff->ip;
	be->port = aff->port;
	return 1;
}

/* lb4_node_addr() - whether @addr is this node's or another node's own address. */
static __always_inline int lb4_node_addr(__be32 addr)
{
	struct lpm_v4_key k = { .prefixlen = 32, .addr = addr };
	struct ipcache_info *info;

	if (addr == node_ip)
		return 1;
	info = bpf_map_lookup_elem(&veil_ipcache, &k);
	return info && (info->flags & IPCACHE_F_NODE);
}

/**
 * lb4_lookup() - the Service a socket's destination names: a ClusterIP, or
 * an external frontend with backends (a LoadBalancer or external IP, or a
 * NodePort at any node's address), which a pod's or the host's own
 * connection reaches straight as well, with kube-proxy replacement on
 * (elsewhere kube-proxy's rules translate those). An external frontend without
 * backends (externalTrafficPolicy Local on a node without one) is left to
 * the node addressed. @key is left as the entry found was keyed.
 * Return: the Service, or NULL.
 */
static __always_inline struct lb4_service *lb4_lookup(struct lb4_key *key)
{
	struct lb4_service *svc = bpf_map_lookup_elem(&veil_lb4_services, key);

	if (svc || !nodeport_enabled)
		return svc;
	key->pad = LB_SCOPE_EXTERNAL;
	svc = bpf_map_lookup_elem(&veil_lb4_services, key);
	if (!svc && lb4_node_addr(key->vip)) {
		key->vip = 0;
		svc = bpf_map_lookup_elem(&veil_lb4_services, key);
	}
	if (svc && !svc->count)
		return NULL;
	return svc;
}

/**
 * lb4_translate() - choose a backend for a Service address.
 * @ctx: the socket hook's context (for the socket and netns cookies)
 * @ip: destination address (network byte order), replaced by the backend's
 * @port: destination port (network byte order), replaced by the backend's
 * @proto: the socket's protocol
 *
 * A backend is chosen at random among the service's current generation,
 * unless the Service has session affinity and this client's network
 * namespace was sent to a backend that is still there within the timeout;
 * every use renews the affinity. The translation is recorded in
 * veil_lb4_revnat so that replies (recvmsg) and getpeername show the
 * Service address, and in veil_lb4_flows so that the agent shows the
 * Service on the connection's flows.
 *
 * Return: an enum lb_result.
 */
static __always_inline int lb4_translate(struct bpf_sock_addr *ctx, __be32 *ip, __be16 *port, __u8 proto)
{
	struct lb4_key key = { .vip = *ip, .port = *port, .proto = proto };
	struct lb4_affinity_key akey = {};
	struct lb4_backend_key bkey = {};
	struct lb4_revnat_key rkey = {};
	struct lb4_revnat rev = {};
	struct lb4_affinity aff = {};
	struct lb4_flow_key fkey = {};
	struct lb4_flow flow = {};
	struct lb4_flow *f;
	struct lb4_backend chosen = {};
	struct lb4_service *svc;
	struct lb4_backend *be;
	__u32 count, affinity_s;
	__u64 netns, now;

	svc = lb4_lookup(&key);
	if (!svc)
		return LB_PASS;
	/*
	 * The agent replaces the entry rather than writing into it (a hash
	 * map update swaps in a new element; without preallocation the old
	 * one is freed after RCU), so slot, count and timeout belong together.
	 */
	count = svc->count;
	affinity_s = svc->affinity_s;
	if (count == 0) {
		lb4_count(LB_STAT_REFUSED);
		return LB_NO_BACKEND;
	}
	netns = bpf_get_netns_cookie(ctx);
	now = bpf_ktime_get_ns();
	if (affinity_s) {
		akey.netns = netns;
		akey.vip = *ip;
		akey.port = key.port;
		akey.proto = proto;
	}
	if (!affinity_s || !lb4_affine(&akey, svc, now, &chosen)) {
		bkey.slot = svc->slot;
		bkey.index = bpf_get_prandom_u32() % count;
		be = bpf_map_lookup_elem(&veil_lb4_backends, &bkey);
		if (!be) {
			lb4_count(LB_STAT_REFUSED);
			return LB_NO_BACKEND;
		}
		chosen.ip = be->ip;
		chosen.port = be->port;
	}
	if (affinity_s) {
		aff.last_used_ns = now;
		aff.ip = chosen.ip;
		aff.port = chosen.port;
		bpf_map_update_elem(&veil_lb4_affinity, &akey, &aff, BPF_ANY);
	}

	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.ip = chosen.ip;
	rkey.port = chosen.port;
	rev.vip = *ip;
	rev.port = key.port;
	bpf_map_update_elem(&veil_lb4_revnat, &rkey, &rev, BPF_ANY);
	fkey.netns = netns;
	fkey.ip = chosen.ip;
	fkey.port = chosen.port;
	fkey.proto = proto;
	/*
	 * Unconnected UDP translates every datagram: refresh an existing
	 * record in place rather than allocate a new LRU element each time.
	 */
	f = bpf_map_lookup_elem(&veil_lb4_flows, &fkey);
	if (f) {
		f->time_ns = now;
		f->vip = *ip;
		f->port = key.port;
	} else {
		flow.time_ns = now;
		flow.vip = *ip;
		flow.port = key.port;
		bpf_map_update_elem(&veil_lb4_flows, &fkey, &flow, BPF_ANY);
	}
	lb4_count(LB_STAT_TRANSLATED);
	*ip = chosen.ip;
	*port = chosen.port;
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
