/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_SOCK_H
#define __VEIL_SOCK_H

#include "common.h"
#include "maps.h"

/*
 * enum sock_flags - what veil_sockconn knows about one accelerated socket.
 * @SOCK_F_ACTIVE: the socket opened the connection (connect), so the
 *	connection's policy direction is its local -> remote; otherwise it
 *	was accepted and the direction is remote -> local.
 * @SOCK_F_REVOKED: policy no longer allows the connection (set by the
 *	agent); its payload takes the TCP path, where policy drops it.
 */
enum sock_flags {
	SOCK_F_ACTIVE = 1 << 0,
	SOCK_F_REVOKED = 1 << 1,
};

/*
 * struct sock_state - the veil_sockconn value of one socket.
 * @flags: enum sock_flags, written by sockops and the agent.
 * @tcp_path: nonzero once a message of this socket took the TCP path (its
 *	peer was not in the sockhash); every later one must too, because the
 *	receiver reads its redirected queue before its TCP queue and a
 *	redirected message would overtake the earlier one. Set by sk_msg
 *	with a plain store (the program may not read-modify-write @flags
 *	while the agent replaces the value), and by the agent when it turns
 *	acceleration off.
 * @client_seq: the connection's identity, with @server_seq: the first
 *	sequence number past the client's SYN (its ISN + 1) ...
 * @server_seq: ... and past the server's SYN. Both ends of one connection
 *	hold the same pair; a socket of an earlier connection of the same
 *	four-tuple (reset, but not yet closed by its process, so still in
 *	the sockhash) holds another, so sk_msg never mistakes it for the
 *	peer.
 * @cookie: the socket's cookie, so that only the socket that wrote the
 *	state removes it when it closes.
 */
struct sock_state {
	__u32 flags;
	__u32 tcp_path;
	__u32 client_seq;
	__u32 server_seq;
	__u64 cookie;
};

/*
 * Per-socket state of veil_sockhash members, by the same key. A socket
 * writes its state only after it joined the sockhash, so the state under a
 * key is that of the socket the sockhash holds there, or of one that left
 * it. sk_msg redirects only when both the sender's and the peer's state are
 * there, of the same connection, with no flag that forbids it, so a missing
 * entry (map full, removed) fails closed to the TCP path. sockops deletes
 * the entry when its socket closes; the agent collects what a socket that
 * closed without (under an earlier program) left. Not an LRU: pressure
 * would silently move live connections to the TCP path.
 *
 * Named veil_sockconn since the state names its connection (the earlier
 * veil_sockstate, without it, is removed from the pin directory).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	/* A value the agent replaces is freed after readers are done with it. */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sock_key);
	__type(value, struct sock_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_sockconn SEC(".maps");

/* v4_mapped() - whether the first 96 bits of an IPv6 address are ::ffff:0:0/96. */
static __always_inline int v4_mapped(__u32 w0, __u32 w1, __u32 w2)
{
	return w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff);
}

#endif /* __VEIL_SOCK_H */
