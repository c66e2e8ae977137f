//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TC ingress of the WireGuard device: decrypted traffic from other nodes'
 * pods. The source identity comes from the ipcache by source address, which
 * is trustworthy here because WireGuard only accepts from a peer the
 * addresses its allowed-IPs bind to that peer's key. Then the destination's
 * ingress policy, and delivery into the pod. The device is L3: packets start
 * at the IP header.
 *
 * With kube-proxy replacement on, a backend's reply to a NodePort client
 * this node sent to it (SNATed to this node) is rewritten back toward the
 * client and sent out of the underlay (lib/nodeport.h).
 */
#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/forward.h"
#include "lib/ingress.h"
#include "lib/maps.h"
#include "lib/nodeport.h"
#include "lib/parse.h"
#include "lib/policy.h"

SEC("tc")
int veil_from_tunnel(struct __sk_buff *skb)
{
	struct endpoint_info *dst;
	struct packet pkt = {};
	struct peer sp = {};
	struct ct_entry *ct;
	int reply, reason;

	reason = parse_ipv4_l3(skb, &pkt);
	if (reason == DROP_UNSUPPORTED_L3)
		return TC_ACT_OK;
	if (nodeport_enabled && !reason && pkt.tuple.daddr == node_ip) {
		int ret = np_reply(skb, &pkt, 0);

		if (ret != NP_NOT_MINE)
			return ret;
	}

	dst = bpf_map_lookup_elem(&veil_endpoints, &pkt.tuple.daddr);
	if (!dst)
		return TC_ACT_OK;
	if (reason)
		return drop(skb, &pkt, OBS_FROM_TUNNEL, reason, 0, dst->identity, 0,
			    FLOW_F_INGRESS_DECIDED | FLOW_F_ENCRYPTED);
	reason = remote_peer(&pkt, 1, &sp);
	if (reason)
		return drop(skb, &pkt, OBS_FROM_TUNNEL, reason, 0, dst->identity, 0,
			    FLOW_F_INGRESS_DECIDED | FLOW_F_ENCRYPTED);

	ct = ct_lookup(&pkt, &reply);
	if (ct) {
		metric_add(FWD_REPLY, pkt.len);
		/* As from_netdev: a connection the stack carried out keeps it. */
		if (ct->flags & CT_F_VIA_STACK)
			return TC_ACT_OK;
		return deliver_local_l3(skb, dst);
	}

	/* The reply of a connection the pod opened through the stack, from
	 * where the stack translated it to (a ClusterIP's remote backend):
	 * netfilter turns it back, and to_pod judges it. */
	if (stack_client_reply(&pkt)) {
		metric_add(FWD_STACK, pkt.len);
		return TC_ACT_OK;
	}
	if (ingress_decide(skb, &pkt, dst, &sp, OBS_FROM_TUNNEL, FLOW_F_ENCRYPTED) != TC_ACT_OK)
		return TC_ACT_SHOT;
	return deliver_local_l3(skb, dst);
}

char __license[] SEC("license") = "Dual BSD/GPL";
