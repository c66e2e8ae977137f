// Package wireguard is Veil's WireGuard control plane: the node key, the
// device (kernel WireGuard, else the embedded userspace implementation), its
// peers derived from Node annotations, status and key rotation.
//
// Both implementations are configured only through wgctrl, so `wg show`
// reads either. A userspace device serves the UAPI socket under SocketDir,
// where wgctrl and wireguard-tools find it; such sockets are in the file
// system, not the network namespace, so `wg show` lists them from any
// namespace.
//
// # Key rotation
//
// A peer's public key is its identity, so a rotation briefly stalls traffic
// to each peer until that peer learns the new key; TCP retransmits across the
// gap and established connections survive. The sequence:
//
//  1. Device.RotateKey writes the new key to the key file (the old one is kept
//     as <file>.prev) and sets it on the device. Sessions with the old key
//     expire at once; packets to peers wait for a new handshake.
//  2. The caller republishes the Node annotations (Annotations with the new
//     public key) straight away: the stall lasts until peers see them.
//  3. Each peer's agent sees the new key in PeersFromNodes and calls
//     SetPeers: the peer with the old key is removed, the new key added with
//     the same endpoint and allowed IPs, and the next packet either way
//     triggers a handshake with the new key.
//  4. When the annotation is published (and, for the careful, peers report a
//     handshake with the new key), the caller calls Key.ConfirmRotation to
//     forget the old key. Until then RotateKey refuses to rotate again, and
//     Key.RollbackRotation can restore the old key.
//
// If the agent restarts between 1 and 4, LoadOrCreateKey returns the new key
// (Key.RotationPending reports the kept one) and step 2 happens on start.
package wireguard
