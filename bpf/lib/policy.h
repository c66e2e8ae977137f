/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_POLICY_H
#define __VEIL_POLICY_H

#include "common.h"
#include "maps.h"
#include "parse.h"

/* struct peer - the other end of a flow, as policy sees it. */
struct peer {
	__u32 identity;		/* label identity: pod, host, world, remote-node… */
	__u32 cidr_identity;	/* CIDR identity, 0 when no policy names its range */
};

/* struct decision - the merged verdict of one direction. */
struct decision {
	__u8 enforce;
	__u8 audit;
	__u32 rule_id;
};

/**
 * peer_of() - the identities of an address that is not a local endpoint's.
 * Addresses the ipcache does not know are the world.
 */
static __always_inline void peer_of(__u32 addr, struct peer *p)
{
	struct lpm_v4_key k = { .prefixlen = 32, .addr = addr };
	struct ipcache_info *info;
	__u32 *cid;

	info = bpf_map_lookup_elem(&veil_ipcache, &k);
	p->identity = info ? info->identity : ID_WORLD;
	cid = bpf_map_lookup_elem(&veil_cidrs, &k);
	p->cidr_identity = cid ? *cid : 0;
}

static __always_inline void peer_cidr(__u32 addr, struct peer *p)
{
	struct lpm_v4_key k = { .prefixlen = 32, .addr = addr };
	__u32 *cid = bpf_map_lookup_elem(&veil_cidrs, &k);

	p->cidr_identity = cid ? *cid : 0;
}

/* merge_hit() - fold one policy entry into a decision: deny wins. */
static __always_inline void merge_hit(struct decision *d, struct policy_value *v,
				      struct policy_value **decider)
{
	if (!v)
		return;
	if (v->enforce == VERDICT_DENY) {
		if (d->enforce != VERDICT_DENY) {
			d->rule_id = v->rule_id;
			*decider = v;
		}
		d->enforce = VERDICT_DENY;
	} else if (v->enforce == VERDICT_ALLOW && d->enforce == VERDICT_NONE) {
		d->enforce = VERDICT_ALLOW;
		d->rule_id = v->rule_id;
		*decider = v;
	}
	if (v->audit == VERDICT_DENY)
		d->audit = VERDICT_DENY;
	else if (v->audit == VERDICT_ALLOW && d->audit == VERDICT_NONE)
		d->audit = VERDICT_ALLOW;
}

/**
 * policy_decide() - decide one direction of a new flow for endpoint @ep.
 * Looks up the peer's label identity, its CIDR identity and the wildcard
 * identity (each a longest-prefix match over protocol and port), merges them
 * with deny winning, then falls back on the endpoint's defaults.
 */
static __always_inline void policy_decide(struct endpoint_info *ep, __u8 dir, struct peer *p,
					  struct packet *pkt, struct decision *d)
{
	struct policy_key k = {
		.prefixlen = POLICY_PREFIX_FULL,
		.slot = ep->policy_slot,
		.direction = dir,
		.proto = pkt->tuple.proto,
		.port = bpf_htons(pkt->policy_port),
	};
	struct policy_value *decider = NULL;

	d->enforce = VERDICT_NONE;
	d->audit = VERDICT_NONE;
	d->rule_id = 0;

	k.identity = p->identity;
	merge_hit(d, bpf_map_lookup_elem(&veil_policy, &k), &decider);
	if (p->cidr_identity) {
		k.identity = p->cidr_identity;
		merge_hit(d, bpf_map_lookup_elem(&veil_policy, &k), &decider);
	}
	k.identity = 0;
	merge_hit(d, bpf_map_lookup_elem(&veil_policy, &k), &decider);

	if (d->enforce == VERDICT_NONE)
		d->enforce = dir == DIR_INGRESS ? ep->ingress_enforce : ep->egress_enforce;
	if (d->audit == VERDICT_NONE)
		d->audit = dir == DIR_INGRESS ? ep->ingress_audit : ep->egress_audit;
	/* A missing default means the endpoint is not selected: allow. */
	if (d->enforce == VERDICT_NONE)
		d->enforce = VERDICT_ALLOW;
	if (d->audit == VERDICT_NONE)
		d->audit = VERDICT_ALLOW;

	if (decider) {
		__sync_fetch_and_add(&decider->hits, 1);
		__sync_fetch_and_add(&decider->bytes, pkt->len);
	}
}

#endif /* __VEIL_POLICY_H */
