/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_COMMON_H
#define __VEIL_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

#define IPPROTO_SCTP_ 132

#include "identity.h"

/* Verdicts of policy entries and defaults (policy/policytypes). */
enum verdict {
	VERDICT_NONE = 0,
	VERDICT_ALLOW = 1,
	VERDICT_DENY = 2,
};

/*
 * Drop reasons. Each drop is counted in veil_metrics under its reason and
 * reported on the flow ring buffer. Values are stable: agent/datapath maps
 * them to names.
 */
enum drop_reason {
	REASON_NONE = 0,
	DROP_SPOOFED_SOURCE = 1,
	DROP_POLICY_EGRESS = 2,
	DROP_POLICY_INGRESS = 3,
	DROP_UNSUPPORTED_L3 = 4,
	DROP_INVALID_PACKET = 5,
	DROP_FRAGMENT = 6,
	DROP_NO_ROUTE = 7,
	DROP_REDIRECT_FAILED = 8,
	DROP_UNKNOWN_ENDPOINT = 9,
	DROP_NO_TUNNEL = 10,	/* encryption on, no tunnel to the destination node */
	DROP_LEAK = 11,		/* strict mode: pod traffic on the underlay unencrypted */
	DROP_UNENCRYPTED_PEER = 12, /* plaintext from an address only a tunnel may bring */
	/* Last drop reason; forwarding counters start after it. */
	DROP_MAX = 31,
};

/* Forwarding counters, stored in veil_metrics after the drop reasons. */
enum forward_kind {
	FWD_LOCAL = 32,     /* redirected to a local pod */
	FWD_REMOTE = 33,    /* sent toward another node */
	FWD_STACK = 34,     /* passed to the host network stack */
	FWD_REPLY = 35,     /* matched an existing connection */
	FWD_AUDIT = 36,     /* would have been denied by an audit-mode policy */
	EVENT_LOST = 37,    /* flow event not written: ring buffer full */
	FWD_TUNNEL = 38,    /* sent into the WireGuard device */
	METRICS_MAX = 64,
};

/* Where a program observed a packet. */
enum obs_point {
	OBS_FROM_POD = 1,     /* host-side veth ingress: pod sends */
	OBS_TO_POD = 2,       /* host-side veth egress: host stack sends to pod */
	OBS_FROM_NETDEV = 3,  /* underlay ingress: another node sends */
	OBS_FROM_TUNNEL = 4,  /* WireGuard device ingress: decrypted traffic */
	OBS_TO_NETDEV = 5,    /* underlay egress: the strict-mode guard */
};

/*
 * Bits of skb->mark that Veil owns. from_pod marks every packet a pod sends,
 * so the strict-mode guard on the way out recognises pod traffic after the
 * host stack rewrote its source (masquerade). The mark survives forwarding
 * within the host; crossing a namespace (the veth) clears it.
 */
enum mark {
	MARK_FROM_POD = 0x00000200,
	MARK_MASK = 0x00000f00,
};

/* Policy directions (the direction byte of struct policy_key). */
enum direction {
	DIR_INGRESS = 0,
	DIR_EGRESS = 1,
};

#endif /* __VEIL_COMMON_H */
