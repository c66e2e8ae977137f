package datapath

import (
	"encoding/binary"
	"net/netip"
)

// Addresses and ports are stored in the maps in network byte order; the
// generated Go types hold them as native integers, so the bytes are
// reinterpreted rather than converted.

func ip4ToU32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func u32ToIP4(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// be16 turns a host-order port into the native value whose in-memory bytes
// are big-endian.
func be16(port uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], port)
	return binary.NativeEndian.Uint16(b[:])
}

func fromBE16(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}
