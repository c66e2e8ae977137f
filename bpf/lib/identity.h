/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_IDENTITY_H
#define __VEIL_IDENTITY_H

/*
 * Reserved security identities. policy/identity numbers label sets from
 * ID_MIN_POD on; a test in agent/datapath checks that its reserved numbers
 * equal these (the Go names are generated from this enum).
 */
enum reserved_identity {
	ID_ANY = 0,		/* not an identity: in a policy key, any peer */
	ID_HOST = 1,		/* this node's own network stack */
	ID_WORLD = 2,		/* outside the cluster */
	ID_UNMANAGED = 3,	/* a local endpoint Veil has no labels for */
	ID_HEALTH = 4,
	ID_REMOTE_NODE = 6,	/* another node's own addresses */
	ID_MIN_POD = 256,
	ID_MIN_CIDR = 1 << 24,
};

#endif /* __VEIL_IDENTITY_H */
