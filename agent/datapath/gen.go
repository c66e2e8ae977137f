package datapath

// The BPF objects are compiled by bpf2go and committed, so `go build` needs no
// clang. Key and value types are generated from the C structs (bpf/lib/maps.h)
// once, from the from_pod object, which references every map.

//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type endpoint_info -type lpm_v4_key -type ipcache_info -type policy_key -type policy_value -type ct_key -type ct_entry -type sock_key -type flow_event -type metric -type leak fromPod ../../bpf/from_pod.c
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" toPod ../../bpf/to_pod.c
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" fromNetdev ../../bpf/from_netdev.c
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" sockops ../../bpf/sockops.c
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" skMsg ../../bpf/sk_msg.c
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" fromTunnel ../../bpf/from_tunnel.c
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" toNetdev ../../bpf/to_netdev.c
