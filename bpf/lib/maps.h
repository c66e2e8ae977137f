/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_MAPS_H
#define __VEIL_MAPS_H

#include "common.h"

/*
 * Every map is pinned by name under the node's bpffs root, so all programs
 * (loaded from separate objects, one per attach point) share one state and the
 * state outlives the agent process. Key and value layouts are the ABI between
 * C and Go: Go uses the types bpf2go generates from these structs.
 */

/* struct endpoint_info - a pod on this node, keyed by its IPv4 address. */
struct endpoint_info {
	__u32 ifindex;		/* host-side veth */
	__u32 id;		/* endpoint id, stable for the pod's life */
	__u32 identity;		/* security identity of the pod's label set */
	__u32 policy_slot;	/* active slice of veil_policy: id << 1 | generation */
	__u8 mac[6];		/* the pod's eth0 */
	__u8 host_mac[6];	/* the host-side veth: the pod's gateway */
	__u8 ingress_enforce;	/* default verdicts when no policy entry matches */
	__u8 ingress_audit;
	__u8 egress_enforce;
	__u8 egress_audit;
	__u32 flags;		/* EP_F_* */
};

/* Flags of struct endpoint_info. */
enum endpoint_flags {
	EP_F_NO_ACCEL = 1 << 0,	/* never join this pod's sockets socket to socket */
};

/* struct lpm_v4_key - an IPv4 prefix for LPM tries. */
struct lpm_v4_key {
	__u32 prefixlen;
	__u32 addr;		/* network byte order */
};

/* Flags of struct ipcache_info. */
enum ipcache_flags {
	IPCACHE_F_REMOTE_POD = 1 << 0,	/* a pod on another node */
	IPCACHE_F_NODE = 1 << 1,	/* a node's own address */
	IPCACHE_F_POD_CIDR = 1 << 2,	/* another node's pod CIDR */
	IPCACHE_F_TUNNEL = 1 << 3,	/* the node is a WireGuard peer: encrypt */
};

/* struct ipcache_info - what the datapath knows about an address. */
struct ipcache_info {
	__u32 identity;
	__u32 node_ip;		/* the node that hosts it, network byte order */
	__u32 flags;
};

/*
 * struct policy_key - one endpoint's policy entry. LPM prefix covers, in
 * order: slot (32), identity (32), direction (8), protocol (8), port (16).
 * A prefix of 72 bits matches any protocol, 80 any port of a protocol,
 * 80+n the first n bits of the port. For ICMP, port is type << 8 | code.
 */
struct policy_key {
	__u32 prefixlen;
	__u32 slot;
	__u32 identity;		/* 0 matches any peer */
	__u8 direction;		/* 0 ingress, 1 egress */
	__u8 proto;
	__be16 port;
};

/* Prefix lengths of struct policy_key that the compiler writes. */
enum policy_prefix {
	POLICY_PREFIX_ANY_PROTO = 72,	/* slot, identity, direction: any protocol */
	POLICY_PREFIX_PROTO = 80,	/* ... and protocol: any port */
	POLICY_PREFIX_FULL = 96,	/* ... and one port */
};

/* struct policy_value - verdicts of an entry and how often it decided a flow. */
struct policy_value {
	__u8 enforce;
	__u8 audit;
	__u16 pad;
	__u32 rule_id;
	__u64 hits;
	__u64 bytes;
};

/* struct ct_key - an IPv4 5-tuple, in the direction of the first packet. */
struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;		/* host byte order; ICMP echo reply: the echo id */
	__u16 dport;		/* ICMP echo request: the echo id */
	__u8 proto;
	__u8 pad[3];
};

/*
 * struct stack_client_key - a local pod's end of a connection that the host
 * stack carried out (CT_F_VIA_STACK): its address, its port, the protocol.
 */
struct stack_client_key {
	__u32 addr;		/* network byte order */
	__u16 port;		/* host byte order, as in struct ct_key */
	__u8 proto;
	__u8 pad;
};

/* struct frag_key - the fragments of one IPv4 datagram (RFC 791). */
struct frag_key {
	__u32 saddr;
	__u32 daddr;
	__u16 id;		/* the IP identification, as on the wire */
	__u8 proto;
	__u8 pad;
};

/*
 * struct frag_l4 - what a datagram's first fragment says about L4, which
 * its later fragments lack: the fields of struct packet parse_ip_at() reads
 * from the L4 header.
 */
struct frag_l4 {
	__u16 sport;
	__u16 dport;
	__u16 policy_port;
	__u8 tcp_flags;
	__u8 icmp_kind;
};

/* Flags of struct ct_entry. */
enum ct_flags {
	CT_F_REPLY_SEEN = 1 << 0,
	CT_F_AUDIT = 1 << 1,	/* an audit-mode policy would have denied it */
	CT_F_FIN_ORIG = 1 << 2,	/* TCP: the originator sent FIN */
	CT_F_FIN_REPLY = 1 << 3,	/* TCP: the responder sent FIN */
	CT_F_RST = 1 << 4,	/* TCP: either side sent RST */
	CT_F_REVOKED = 1 << 5,	/* policy no longer allows it: nothing rides it (agent/datapath EvictFlows) */
	CT_F_VIA_STACK = 1 << 6,	/* its first packet crossed the host stack: so do its replies (netfilter's NAT and conntrack) */
};

/* struct ct_entry - a connection that policy allowed. */
struct ct_entry {
	__u64 created_ns;
	__u64 last_seen_ns;
	__u64 packets;
	__u64 bytes;
	__u32 src_identity;
	__u32 dst_identity;
	__u16 flags;		/* CT_F_* */
	__u16 policy_port;	/* the port policy judged: ICMP type << 8 | code */
	__u32 lifetime_s;	/* idle time after which the entry is dead: by protocol and TCP state */
};

/* struct sock_key - an established local TCP socket, by its IPv4 4-tuple. */
struct sock_key {
	__u32 sip;
	__u32 dip;
	__u32 sport;		/* host byte order */
	__u32 dport;		/* host byte order */
};

/* struct flow_event - one record on the flow ring buffer. */
struct flow_event {
	__u64 ts_ns;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 verdict;		/* enum verdict */
	__u8 reason;		/* enum drop_reason */
	__u8 point;		/* enum obs_point */
	__u32 flags;		/* FLOW_F_* */
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex;
	__u32 len;
	__u32 rule_id;
	__u32 pad;
};

/* Flags of struct flow_event. */
enum flow_flags {
	FLOW_F_REPLY = 1 << 0,
	FLOW_F_AUDIT = 1 << 1,
	FLOW_F_ENCRYPTED = 1 << 2,
	FLOW_F_INGRESS_DECIDED = 1 << 3,	/* the verdict came from the destination's ingress policy */
	FLOW_F_LEAK = 1 << 4,	/* strict mode stopped plaintext toward another node */
};

/* struct leak - pod traffic that strict mode kept off the underlay. */
struct leak {
	__u64 first_ns;
	__u64 last_ns;
	__u64 packets;
	__u32 endpoint_id;	/* the sending endpoint, 0 when unknown */
	__u32 reason;		/* DROP_NO_TUNNEL or DROP_LEAK */
};

/* struct metric - a packet and byte counter. */
struct metric {
	__u64 packets;
	__u64 bytes;
};

/* Local endpoints by IPv4 address (network byte order). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct endpoint_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_endpoints SEC(".maps");

/* Addresses of the cluster that are not local endpoints: prefix -> identity, node. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, struct ipcache_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_ipcache SEC(".maps");

/* CIDR regions named by policies: prefix -> CIDR identity. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_cidrs SEC(".maps");

/* Per-endpoint policy, two slots per endpoint so a replace is atomic. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_policy SEC(".maps");

/* Connections allowed by policy; replies and later packets ride on them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_ct SEC(".maps");

/*
 * L4 of the datagrams whose first fragment was seen, so that the later
 * ones get the same verdict. The fragments of a datagram travel together,
 * so a small LRU holds every datagram in flight.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct frag_key);
	__type(value, struct frag_l4);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_frags SEC(".maps");

/*
 * The client ends of pods' connections that the host stack carried out.
 * The stack may have translated their destination (kube-proxy's DNAT of a
 * ClusterIP to a backend on another node): the replies then come from an
 * address veil_ct never saw, and only by the client's end can from_netdev
 * and from_tunnel tell them and pass them up the stack, where netfilter
 * undoes the translation. An entry is refreshed by every such reply and by
 * the client's own packets; a stale one only sends an unrelated packet
 * through the stack, which judges it too (to_pod).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct stack_client_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_stack_clients SEC(".maps");

/* Established TCP sockets between two local endpoints. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_sockhash SEC(".maps");

/* Flow events for the agent (verdicts, drops). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_events SEC(".maps");

/* Strict-mode leak records, by 5-tuple. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ct_key);
	__type(value, struct leak);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_leaks SEC(".maps");

/* Drop and forwarding counters, indexed by enum drop_reason / forward_kind. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, METRICS_MAX);
	__type(key, __u32);
	__type(value, struct metric);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_metrics SEC(".maps");

/* Slots of veil_sockstats. */
enum sockstat {
	SOCKSTAT_REDIRECTED = 0,	/* messages redirected socket to socket */
	SOCKSTAT_PASSED = 1,	/* messages left to the TCP stack (no peer) */
	SOCKSTAT_MAX = 2,
};

/* Socket-redirect counters (sk_msg), indexed by enum sockstat. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SOCKSTAT_MAX);
	__type(key, __u32);
	__type(value, struct metric);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_sockstats SEC(".maps");


#endif /* __VEIL_MAPS_H */
