"""The frame around a packet the engine translated into the other family (NAT64,
lbnat.actions.TRANSLATED), and the Ethernet type of a packet by its version. Pure: bytes in,
bytes out, no socket.

A frame as the loops hold it: virtio_net_hdr (10 bytes), Ethernet header (14), IP packet. When
the engine answers (TRANSLATED, next_hop, new_start), the IP header moved from `start` to
`new_start` (20 bytes earlier for IPv4 -> IPv6, 20 or more later for IPv6 -> IPv4) and the
transport header stayed where it was. `translated()` writes a vnet header and an Ethernet
header right before `new_start`; the frame to send is then buf[new_start - 24:end].

Where the received vnet header is read from: a header that grew (IPv4 -> IPv6) overwrites the
last 6 bytes of the received vnet header (gso_size, csum_start, csum_offset: the new header
starts 20 bytes before the old one, the vnet header 24 bytes before it), and only the engine
sees it whole before it writes. So the engine moves it first: when new_start < start, it
copies buf[start - 24:start - 14] to buf[new_start - 24:new_start - 14] (inside the headroom,
clear of the new header) before it writes the new IP header; this module reads it there.
When the header shrank, the received vnet header is untouched at start - 24. In both cases:
at min(start, new_start) - 24. (Saving it in the data plane instead would cost every IPv4
packet a read; only the engine knows, before it writes, that a packet is being translated.)

The vnet header's offsets count from the Ethernet header: csum_start and hdr_len grow by
start - new_start (the bytes put in front of the transport header, negative when the header
shrank), and a TCP super-packet's gso_type follows the new family (TCPV4 <-> TCPV6; UDP_L4
and NONE are the same in both, the ECN bit stays). A zero csum_start (no partial checksum)
or hdr_len (not given) stays zero.
"""

from __future__ import annotations

import mmap

from lbnat.dataplane.kernel import (
    ETH_HLEN,
    IP_OFFSET,
    VNET_F_NEEDS_CSUM,
    VNET_GSO_ECN,
    VNET_GSO_TCPV4,
    VNET_GSO_TCPV6,
    VNET_HDR,
)

ETHERTYPE_IPV4 = b"\x08\x00"
ETHERTYPE_IPV6 = b"\x86\xdd"


def ethertype(version_byte: int) -> bytes:
    """The Ethernet type of a packet whose first byte is `version_byte`."""
    return ETHERTYPE_IPV6 if version_byte >> 4 == 6 else ETHERTYPE_IPV4


def with_ethertype(header: bytes, version_byte: int) -> bytes:
    """`header` (14 bytes) carrying the Ethernet type of the packet that follows it."""
    kind = ethertype(version_byte)
    return header if header[12:ETH_HLEN] == kind else header[:12] + kind


def translated_vnet(vnet: bytes | bytearray | memoryview, grown: int, to_v6: bool) -> bytes:
    """The virtio_net_hdr of a frame whose IP header grew by `grown` bytes (negative: shrank)
    in front of an unmoved transport header, now of the family `to_v6` says."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(vnet)
    if flags & VNET_F_NEEDS_CSUM and csum_start:
        csum_start += grown
    if hdr_len:
        hdr_len += grown
    kind = gso_type & ~VNET_GSO_ECN
    if kind in (VNET_GSO_TCPV4, VNET_GSO_TCPV6):
        gso_type = (gso_type & VNET_GSO_ECN) | (VNET_GSO_TCPV6 if to_v6 else VNET_GSO_TCPV4)
    return VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def translated(buf: bytearray | mmap.mmap, start: int, new_start: int, header: bytes) -> int:
    """Write the vnet header and the Ethernet header (`header`, its type set by the new
    packet's version) before `new_start`, for a packet that began at `start` when it was
    received, its vnet header now at min(start, new_start) - 24 (see the module docstring).
    Returns where the frame now begins (new_start - 24). The caller guarantees the room
    (lbnat.dataplane.kernel.HEADROOM)."""
    old, new = min(start, new_start) - IP_OFFSET, new_start - IP_OFFSET
    if new < 0:
        raise ValueError(f"no room for the headers: the packet starts at {new_start}")
    vnet = translated_vnet(bytes(buf[old : old + VNET_HDR.size]), start - new_start,
                           buf[new_start] >> 4 == 6)  # fmt: skip
    buf[new : new + VNET_HDR.size] = vnet
    buf[new + VNET_HDR.size : new_start] = with_ethertype(header, buf[new_start])
    return new
