/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __VEIL_SOCK_H
#define __VEIL_SOCK_H

#include "common.h"

/* v4_mapped() - whether the first 96 bits of an IPv6 address are ::ffff:0:0/96. */
static __always_inline int v4_mapped(__u32 w0, __u32 w1, __u32 w2)
{
	return w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff);
}

#endif /* __VEIL_SOCK_H */
