"""IPv6 + TCP/UDP: parse in place, rewrite, translate to and from IPv4 (RFC 7915), ICMPv6.

The IPv6 sibling of lbnat.packet, on the same terms: pure, in place on a bytearray, checksums
only ever updated by RFC 1624 deltas on the packet path. What differs from IPv4:

- There is no header checksum: a rewrite touches the 32 address bytes and the transport
  checksum alone. The transport checksum's pseudo-header holds the 128-bit addresses, so a
  row's `ip_delta` is their change (lbnat.packet.delta takes any even lengths).
- Extension headers sit between the fixed header and the transport header: `transport` walks
  hop-by-hop, routing and destination options (at most MAX_EXTENSIONS of them). A fragment
  header is a fragment (dropped, counted FRAGMENT, as for IPv4); AH and ESP protect what a
  NAT must change, so they are not translated (NOT_TCP_UDP); a jumbogram (payload length 0)
  is BAD_IPV6.
- Translation (NAT64 in the full-NAT sense: an IPv6 client, an IPv4 backend that sees the LB's
  IPv4 address). The transport header does not move: the new IP header is written right
  before it, over the old one's tail (IPv6 -> IPv4: 20 bytes where 40 or more were), or into
  the 20 bytes of headroom the data plane keeps before every frame (IPv4 -> IPv6). The header
  fields follow RFC 7915 sections 4.1 and 5.1: traffic class <-> TOS, hop limit <-> TTL (not
  decremented: lbnat does not decrement IPv4 TTLs either, it is the flow's end point), DF set
  on a translated packet over 1260 bytes, identification 0, IPv6 options and extension
  headers dropped. The pseudo-headers of both families sum their length and protocol alike,
  so the transport checksum needs only the addresses' and ports' delta; a UDP datagram with no
  checksum (legal in IPv4 only) gets a computed one.
- ICMP errors about a translated flow are rebuilt, not patched (they are rare, and a type or
  family change rewrites every field anyway): `icmp6_error`, `icmp4_error` and the quote
  translations, with RFC 7915's type and code maps as tables.
"""

from __future__ import annotations

import struct

from lbnat.addresses import V4_MAX, V6
from lbnat.drops import DropReason
from lbnat.packet import (
    ICMP,
    ICMP_DEST_UNREACHABLE,
    ICMP_TIME_EXCEEDED,
    L4_CHECKSUM,
    TCP,
    UDP,
    Headers,
    apply_delta,
    checksum,
    fold,
    ones_sum,
    tcp_check_flags,
    tcp_segment,
)

IPV6_HEADER = 40
ADDRESSES = 8  # offset of the source and destination addresses, 32 bytes
ICMPV6 = 58
MAX_EXTENSIONS = 8  # more than this many extension headers: BAD_IPV6 (a bounded walk)
_SKIPPED = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options: walked over
_FRAGMENT = 44
MIN_MTU = 1280  # RFC 8200: every IPv6 link carries this; an ICMPv6 error never exceeds it
DF_ABOVE = 1260  # RFC 7915 5.1: an IPv4 packet translated from IPv6 over this size gets DF

# ICMPv6 error types (RFC 4443)
ICMP6_UNREACHABLE = 1
ICMP6_PACKET_TOO_BIG = 2
ICMP6_TIME_EXCEEDED = 3
ICMP6_ERRORS = (ICMP6_UNREACHABLE, ICMP6_PACKET_TOO_BIG, ICMP6_TIME_EXCEEDED)

_FIXED = struct.Struct("!IHBB")  # version/class/flow, payload length, next header, hop limit
_TCP = struct.Struct("!HHIIBBH")
_UDP = struct.Struct("!HHH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_IPV4 = struct.Struct("!BBHHHBBHII")


def transport(
    buf: bytearray | bytes | memoryview, at: int, end: int, next_header: int
) -> tuple[int, int] | DropReason:
    """(transport protocol, its offset) after the extension headers from `at` on, the first
    one's type being `next_header`; `end` is the packet's end. Never raises."""
    for _ in range(MAX_EXTENSIONS + 1):
        if next_header in _SKIPPED:
            if at + 8 > end:
                return DropReason.TRUNCATED
            next_header, at = buf[at], at + ((buf[at + 1] + 1) << 3)
            if at > end:
                return DropReason.TRUNCATED
            continue
        if next_header == _FRAGMENT:
            return DropReason.FRAGMENT
        return next_header, at
    return DropReason.BAD_IPV6


def parse6(buf: bytearray | bytes | memoryview, start: int, end: int) -> Headers | DropReason:
    """Validate and read the headers of the IPv6 packet in buf[start:end], as lbnat.packet's
    `parse` does for IPv4 (the same tuple; addresses as lbnat.addresses ints). Never raises."""
    if start < 0 or end > len(buf) or end - start < IPV6_HEADER:
        return DropReason.TRUNCATED
    first, payload, next_header, _ = _FIXED.unpack_from(buf, start)
    if first >> 28 != 6:
        return DropReason.BAD_IPV6
    if payload == 0:
        return DropReason.BAD_IPV6  # a jumbogram or nothing at all
    packet_end = start + IPV6_HEADER + payload
    if packet_end > end:
        return DropReason.BAD_TOTAL_LENGTH
    found = transport(buf, start + IPV6_HEADER, packet_end, next_header)
    if found.__class__ is not tuple:
        return found  # type: ignore[return-value]
    proto, l4 = found
    src = V6 | int.from_bytes(buf[start + 8 : start + 24], "big")
    dst = V6 | int.from_bytes(buf[start + 24 : start + 40], "big")
    l4_len = packet_end - l4
    # The transport checks are lbnat.packet.parse's, written again rather than shared: parse
    # keeps them inline because a call per IPv4 packet costs (speed).
    if proto == TCP:
        if l4_len < 20:
            return DropReason.TRUNCATED
        sport, dport, seq, ack, offset, flags, window = _TCP.unpack_from(buf, l4)
        data_offset = (offset >> 4) << 2
        if data_offset < 20 or data_offset > l4_len:
            return DropReason.BAD_TCP_OFFSET
        if not tcp_check_flags(flags):
            return DropReason.BAD_TCP_FLAGS
        return (proto, l4, src, dst, sport, dport, flags, seq, ack, window, l4_len - data_offset)
    if proto == UDP:
        if l4_len < 8:
            return DropReason.TRUNCATED
        sport, dport, length = _UDP.unpack_from(buf, l4)
        if length < 8 or length > l4_len:
            return DropReason.BAD_UDP_LENGTH
        return (proto, l4, src, dst, sport, dport, 0, 0, 0, 0, length - 8)
    return DropReason.NOT_TCP_UDP


def packet_end(buf: bytearray | bytes | memoryview, start: int) -> int:
    """Where the IPv6 packet at `start` ends by its payload length (not the frame's end)."""
    return start + IPV6_HEADER + ((buf[start + 4] << 8) | buf[start + 5])


def _fix_l4(
    buf: bytearray, l4: int, proto: int, ip_delta: int, l4_delta: int, partial: bool
) -> None:
    """The transport checksum after a rewrite: complete (RFC 1624) or partial (the address
    part only: the kernel sums the segment, ports included, on the way out)."""
    at = l4 + (16 if proto == TCP else 6)
    field = (buf[at] << 8) | buf[at + 1]
    if partial:
        total = field + ip_delta
        total = (total & 0xFFFF) + (total >> 16)
        field = (total & 0xFFFF) + (total >> 16)
    else:
        total = (~field & 0xFFFF) + l4_delta
        total = (total & 0xFFFF) + (total >> 16)
        field = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
        if field == 0 and proto == UDP:
            field = 0xFFFF
    buf[at] = field >> 8
    buf[at + 1] = field & 0xFF


def rewrite6(
    buf: bytearray,
    start: int,
    l4: int,
    proto: int,
    addresses: bytes,
    ports: bytes,
    ip_delta: int,
    l4_delta: int,
    partial: bool,
) -> None:
    """lbnat.packet.rewrite for IPv6: 32 address bytes (src, dst) and 4 port bytes written,
    the transport checksum updated; there is no header checksum."""
    buf[start + ADDRESSES : start + ADDRESSES + 32] = addresses
    buf[l4 : l4 + 4] = ports
    _fix_l4(buf, l4, proto, ip_delta, l4_delta, partial)


def translate_to_v4(
    buf: bytearray,
    start: int,
    l4: int,
    proto: int,
    addresses: bytes,
    ports: bytes,
    ip_delta: int,
    l4_delta: int,
    partial: bool,
) -> int:
    """The IPv6 packet at `start` (transport header at `l4`) made an IPv4 one with these 8
    address bytes and ports; returns where its IPv4 header now starts (l4 - 20)."""
    traffic_class = ((buf[start] & 0x0F) << 4) | (buf[start + 1] >> 4)
    hop_limit = buf[start + 7]
    total = packet_end(buf, start) - l4 + 20
    new_start = l4 - 20
    flags = 0x4000 if total > DF_ABOVE else 0
    header = bytearray(_IPV4.pack(0x45, traffic_class, total, 0, flags, hop_limit, proto, 0, 0, 0))
    header[12:20] = addresses
    _U16.pack_into(header, 10, checksum(header))
    buf[new_start:l4] = header
    buf[l4 : l4 + 4] = ports
    _fix_l4(buf, l4, proto, ip_delta, l4_delta, partial)
    return new_start


def translate_to_v6(
    buf: bytearray,
    start: int,
    l4: int,
    proto: int,
    addresses: bytes,
    ports: bytes,
    ip_delta: int,
    l4_delta: int,
    partial: bool,
) -> int:
    """The IPv4 packet at `start` made an IPv6 one with these 32 address bytes and ports;
    returns where its IPv6 header now starts (l4 - 40: up to 20 bytes before `start`)."""
    tos, ttl = buf[start + 1], buf[start + 8]
    payload = ((buf[start + 2] << 8) | buf[start + 3]) - (l4 - start)
    new_start = l4 - IPV6_HEADER
    _FIXED.pack_into(buf, new_start, (6 << 28) | (tos << 20), payload, proto, ttl)
    buf[new_start + ADDRESSES : new_start + ADDRESSES + 32] = addresses
    buf[l4 : l4 + 4] = ports
    if proto == UDP and not partial and buf[l4 + 6] == 0 and buf[l4 + 7] == 0:
        # No checksum: fine in IPv4, not in IPv6 (RFC 8200 8.1). Computed over the datagram.
        _U16.pack_into(buf, l4 + 6, transport_checksum6(addresses, UDP, buf[l4 : l4 + payload]))
        return new_start
    _fix_l4(buf, l4, proto, ip_delta, l4_delta, partial)
    return new_start


# --- packets lbnat builds itself (not on the per-packet path) --------------------------------


def pseudo_sum6(addresses: bytes, proto: int, length: int) -> int:
    return fold(ones_sum(addresses) + (length >> 16) + (length & 0xFFFF) + proto)


def transport_checksum6(addresses: bytes, proto: int, segment: bytes | bytearray) -> int:
    """The full TCP/UDP/ICMPv6 checksum of `segment` (its checksum field holding zero, or
    any value for UDP's: see below) between these 32 address bytes."""
    data = bytearray(segment)
    at = L4_CHECKSUM.get(proto, 2)
    data[at : at + 2] = b"\0\0"
    check = ~fold(pseudo_sum6(addresses, proto, len(data)) + ones_sum(data)) & 0xFFFF
    if proto == UDP and check == 0:
        check = 0xFFFF
    return check


def ipv6_header(addresses: bytes, proto: int, payload_length: int, hop_limit: int = 64) -> bytes:
    return _FIXED.pack(6 << 28, payload_length, proto, hop_limit) + addresses


def tcp_segment6(
    src: int, dst: int, sport: int, dport: int, seq: int, ack: int, flags: int, window: int = 0
) -> bytes:
    """A complete IPv6 + TCP packet (lbnat.packet.tcp_segment's for IPv6 addresses)."""
    addresses = (src & (V6 - 1)).to_bytes(16, "big") + (dst & (V6 - 1)).to_bytes(16, "big")
    segment = bytearray(
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0)
    )
    _U16.pack_into(segment, 16, transport_checksum6(addresses, TCP, segment))
    return ipv6_header(addresses, TCP, len(segment)) + bytes(segment)


def tcp_segment_any(
    src: int, dst: int, sport: int, dport: int, seq: int, ack: int, flags: int, window: int = 0
) -> bytes:
    """lbnat.packet.tcp_segment or `tcp_segment6`, by the addresses' family."""
    if src > V4_MAX:
        return tcp_segment6(src, dst, sport, dport, seq, ack, flags, window)
    return tcp_segment(src, dst, sport, dport, seq, ack, flags, window)


# --- ICMP errors about a flow lbnat translated ----------------------------------------------

Quote = tuple[int, int, int, int, int, int, int, int]
"""What `parse_icmp6_error` returns: (icmp offset, type, code, the 4 bytes after the checksum
as an int (the MTU of a packet-too-big), quote offset, quoted proto, quoted transport offset,
message end)."""


def parse_icmp6_error(
    buf: bytearray | bytes | memoryview, start: int, end: int
) -> Quote | DropReason:
    """An ICMPv6 error (unreachable, packet too big, time exceeded) whose quoted packet is TCP
    or UDP with its ports there. Never raises."""
    if end - start < IPV6_HEADER or end > len(buf) or buf[start] >> 4 != 6:
        return DropReason.TRUNCATED
    message_end = packet_end(buf, start)
    if message_end > end or message_end == start + IPV6_HEADER:
        return DropReason.BAD_TOTAL_LENGTH
    found = transport(buf, start + IPV6_HEADER, message_end, buf[start + 6])
    if found.__class__ is not tuple:
        return found  # type: ignore[return-value]
    proto, icmp = found
    if proto != ICMPV6 or icmp + 8 + IPV6_HEADER + 8 > message_end:
        return DropReason.NOT_TCP_UDP
    kind = buf[icmp]
    if kind not in ICMP6_ERRORS or buf[icmp + 8] >> 4 != 6:
        return DropReason.NOT_TCP_UDP
    quote = icmp + 8
    found = transport(buf, quote + IPV6_HEADER, message_end, buf[quote + 6])
    if found.__class__ is not tuple:
        return DropReason.NOT_TCP_UDP
    inner_proto, inner_l4 = found
    if inner_proto not in (TCP, UDP) or inner_l4 + 8 > message_end:
        return DropReason.NOT_TCP_UDP
    rest = _U32.unpack_from(buf, icmp + 4)[0]
    return (icmp, kind, buf[icmp + 1], rest, quote, inner_proto, inner_l4, message_end)


def icmp6_error(addresses: bytes, kind: int, code: int, rest: int, quote: bytes) -> bytes:
    """A whole ICMPv6 error packet between these 32 address bytes, the quote cut so that the
    packet fits the IPv6 minimum MTU (RFC 4443 2.4 (c))."""
    quote = quote[: MIN_MTU - IPV6_HEADER - 8]
    message = bytearray(struct.pack("!BBHI", kind, code, 0, rest) + quote)
    _U16.pack_into(message, 2, transport_checksum6(addresses, ICMPV6, message))
    return ipv6_header(addresses, ICMPV6, len(message)) + bytes(message)


def icmp4_error(addresses: bytes, kind: int, code: int, rest: int, quote: bytes) -> bytes:
    """A whole ICMPv4 error packet between these 8 address bytes (RFC 792; the quote cut at
    548 bytes so that it fits 576, the least every IPv4 host takes)."""
    quote = quote[:548]
    message = bytearray(struct.pack("!BBHI", kind, code, 0, rest) + quote)
    _U16.pack_into(message, 2, checksum(message))
    header = bytearray(_IPV4.pack(0x45, 0, 20 + len(message), 0, 0, 64, ICMP, 0, 0, 0))
    header[12:20] = addresses
    _U16.pack_into(header, 10, checksum(header))
    return bytes(header) + bytes(message)


def _quoted_l4(quoted: bytes | bytearray, proto: int, ports: bytes, l4_delta: int) -> bytearray:
    """A quoted transport header with new ports, its checksum updated if the quote holds it
    (a UDP checksum of 0, none, stays 0)."""
    out = bytearray(quoted)
    out[0:4] = ports
    at = L4_CHECKSUM[proto]
    if at + 2 <= len(out):
        check = (out[at] << 8) | out[at + 1]
        if not (proto == UDP and check == 0):
            check = apply_delta(check, l4_delta)
            if proto == UDP and check == 0:
                check = 0xFFFF
            _U16.pack_into(out, at, check)
    return out


def quote6_as(
    buf: bytearray | bytes, quote: int, inner_l4: int, end: int, proto: int,
    addresses: bytes, ports: bytes, l4_delta: int,
) -> bytes:  # fmt: skip
    """A quoted IPv6 packet as another IPv6 one (same family: addresses, ports, checksum;
    extension headers dropped, the payload length kept true to what follows)."""
    fixed = bytearray(buf[quote : quote + IPV6_HEADER])
    original_payload = (fixed[4] << 8) | fixed[5]
    _U16.pack_into(fixed, 4, max(0, original_payload - (inner_l4 - quote - IPV6_HEADER)))
    fixed[6] = proto
    fixed[ADDRESSES : ADDRESSES + 32] = addresses
    return bytes(fixed) + bytes(_quoted_l4(buf[inner_l4:end], proto, ports, l4_delta))


def quote6_as_v4(
    buf: bytearray | bytes, quote: int, inner_l4: int, end: int, proto: int,
    addresses: bytes, ports: bytes, l4_delta: int,
) -> bytes:  # fmt: skip
    """A quoted IPv6 packet as the IPv4 packet it was before translation (RFC 7915 5.2)."""
    payload = ((buf[quote + 4] << 8) | buf[quote + 5]) - (inner_l4 - quote - IPV6_HEADER)
    payload = min(max(0, payload), 0xFFFF - 20)  # a quote's length is the sender's word
    header = bytearray(_IPV4.pack(0x45, 0, 20 + max(0, payload), 0, 0, buf[quote + 7], proto,
                                  0, 0, 0))  # fmt: skip
    header[12:20] = addresses
    _U16.pack_into(header, 10, checksum(header))
    return bytes(header) + bytes(_quoted_l4(buf[inner_l4:end], proto, ports, l4_delta))


def quote4_as_v6(
    buf: bytearray | bytes, quote: int, end: int, proto: int,
    addresses: bytes, ports: bytes, l4_delta: int,
) -> bytes:  # fmt: skip
    """A quoted IPv4 packet as the IPv6 packet it was before translation (RFC 7915 4.2)."""
    ihl = (buf[quote] & 0x0F) << 2
    total = (buf[quote + 2] << 8) | buf[quote + 3]
    fixed = ipv6_header(addresses, proto, max(0, total - ihl), buf[quote + 8])
    return fixed + bytes(_quoted_l4(buf[quote + ihl : end], proto, ports, l4_delta))


# RFC 7915's maps as tables: (type, code) -> (type, code) or None (not translated: dropped).
# Packet too big / fragmentation needed also carry an MTU, adjusted by the header sizes'
# difference (20) in `v4_mtu_as_v6` and `v6_mtu_as_v4`.
V4_TO_V6: dict[tuple[int, int], tuple[int, int]] = {
    **{
        (ICMP_DEST_UNREACHABLE, code): (ICMP6_UNREACHABLE, 0) for code in (0, 1, 5, 6, 7, 8, 11, 12)
    },
    (ICMP_DEST_UNREACHABLE, 3): (ICMP6_UNREACHABLE, 4),  # port unreachable
    (ICMP_DEST_UNREACHABLE, 4): (ICMP6_PACKET_TOO_BIG, 0),  # fragmentation needed
    **{(ICMP_DEST_UNREACHABLE, code): (ICMP6_UNREACHABLE, 1) for code in (9, 10, 13, 15)},
    (ICMP_TIME_EXCEEDED, 0): (ICMP6_TIME_EXCEEDED, 0),
    (ICMP_TIME_EXCEEDED, 1): (ICMP6_TIME_EXCEEDED, 1),
}
V6_TO_V4: dict[tuple[int, int], tuple[int, int]] = {
    (ICMP6_UNREACHABLE, 0): (ICMP_DEST_UNREACHABLE, 1),  # no route
    (ICMP6_UNREACHABLE, 1): (ICMP_DEST_UNREACHABLE, 10),  # administratively prohibited
    (ICMP6_UNREACHABLE, 2): (ICMP_DEST_UNREACHABLE, 1),  # beyond scope
    (ICMP6_UNREACHABLE, 3): (ICMP_DEST_UNREACHABLE, 1),  # address unreachable
    (ICMP6_UNREACHABLE, 4): (ICMP_DEST_UNREACHABLE, 3),  # port unreachable
    (ICMP6_PACKET_TOO_BIG, 0): (ICMP_DEST_UNREACHABLE, 4),
    (ICMP6_TIME_EXCEEDED, 0): (ICMP_TIME_EXCEEDED, 0),
    (ICMP6_TIME_EXCEEDED, 1): (ICMP_TIME_EXCEEDED, 1),
}


def v4_mtu_as_v6(rest: int) -> int:
    """The 4 bytes after an ICMPv6 packet-too-big's checksum, from a fragmentation-needed's:
    the IPv4 next-hop MTU plus 20 (RFC 7915 4.2), at least the IPv6 minimum."""
    return max(MIN_MTU, (rest & 0xFFFF) + 20)


def v6_mtu_as_v4(rest: int) -> int:
    """The 4 bytes after a fragmentation-needed's checksum (unused 16 bits, then the MTU),
    from a packet-too-big's MTU minus 20 (RFC 7915 5.2)."""
    return min(max(rest - 20, 68), 0xFFFF)
