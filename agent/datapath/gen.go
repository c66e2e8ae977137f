package datapath

// The BPF objects, one per attach surface, are compiled by bpf2go and
// committed, so `go build` needs no clang. Key and value types, and every
// enum whose values Go shares (drop reasons, flags, reserved identities), are
// generated from bpf/lib once, from the pod object, which references them
// all, except the socket programs' own state and the Services' maps, which
// only the sock object has: no constant is copied between C and Go by hand.

//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type endpoint_info -type lpm_v4_key -type ipcache_info -type policy_key -type policy_value -type ct_key -type ct_entry -type sock_key -type flow_event -type metric -type leak -type verdict -type drop_reason -type forward_kind -type obs_point -type direction -type reserved_identity -type endpoint_flags -type ipcache_flags -type policy_prefix -type ct_flags -type flow_flags -type sockstat -type mark -type lb_scope -type np_flags -type np_nat pod ../../bpf/bpf_pod.c
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" netdev ../../bpf/bpf_netdev.c
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" tunnel ../../bpf/bpf_tunnel.c
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type sock_state -type sock_flags -type lb4_key -type lb4_service -type lb4_backend_key -type lb4_backend -type lb_backend_flags -type lb4_member_key -type lb4_affinity_key -type lb4_affinity -type lb4_flow_key -type lb4_flow -type lb_stat sock ../../bpf/bpf_sock.c
