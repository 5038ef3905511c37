"""IPv4 + TCP/UDP headers: parse in place, rewrite addresses and ports, fix checksums.

Pure and allocation-light: everything works on a bytearray and offsets into it, because the
data plane hands us the receive buffer itself and sends the same buffer back out.

Checksums are never recomputed on the packet path. A NAT rewrite of a flow is the same for
every packet of that flow, so its checksum effect (RFC 1624's ~m + m') is folded once into a
16-bit `delta` when the session is created; each packet then costs two additions:

    HC' = ~(~HC + delta)                      (RFC 1624, eqn. 3)

A packet whose transport checksum is still *partial* (offloaded: the kernel will finish it on
the way out, see the PACKET_VNET_HDR notes in docs/architecture.md) holds in its checksum field
only the uncomplemented sum of the pseudo-header. The ports are covered later by the final
computation over the segment, so only the address part of the delta is added to the field:

    field' = field + delta_addresses

Fragments: lbnat does not reassemble. A non-first fragment carries no ports and a first
fragment's datagram cannot be delivered whole through a port-based NAT without reassembly, so
every fragment (MF set or offset non-zero) is dropped and counted as FRAGMENT.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from lbnat.drops import DropReason

TCP = 6
UDP = 17

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

# Offsets inside the IPv4 header.
IP_CHECKSUM = 10
IP_ADDRESSES = 12  # source then destination, 8 bytes
IP_DESTINATION = 16
# Offset of the checksum inside each transport header.
L4_CHECKSUM = {TCP: 16, UDP: 6}

# An IPv4 address and a pair of ports as headers carry them (the rewrites lbnat writes).
ADDRESS = struct.Struct("!I")
PORT_PAIR = struct.Struct("!HH")

_IPV4 = struct.Struct("!BxHxxHxBxxII")  # ver/ihl, total length, frag word, proto, src, dst
_TCP = struct.Struct("!HHIIBBH")  # ports, seq, ack, data offset, flags, window
_UDP = struct.Struct("!HHH")  # ports, length
_U16 = struct.Struct("!H")

Headers = tuple[int, int, int, int, int, int, int, int, int, int, int]
"""What `parse` returns for a packet it accepts, as a plain tuple because this runs per packet:

    (proto, l4_offset, src_ip, dst_ip, src_port, dst_port, tcp_flags, seq, ack, window,
     payload_length)

Addresses are 32-bit ints; `l4_offset` is absolute in the buffer. For UDP the TCP fields are 0.
"""


def parse(buf: bytearray | bytes | memoryview, start: int, end: int) -> Headers | DropReason:
    """Validate and read the headers of the IPv4 packet in buf[start:end]. Never raises."""
    if start < 0 or end > len(buf) or end - start < 20:
        return DropReason.TRUNCATED
    vihl, total, frag, proto, src, dst = _IPV4.unpack_from(buf, start)
    if vihl >> 4 != 4:
        return DropReason.NOT_IPV4
    ihl = (vihl & 0x0F) << 2
    if ihl < 20:
        return DropReason.BAD_IHL
    if total < ihl or start + total > end:
        return DropReason.BAD_TOTAL_LENGTH
    if frag & 0x3FFF:  # MF flag or a fragment offset
        return DropReason.FRAGMENT
    l4 = start + ihl
    l4_len = total - ihl
    if proto == TCP:
        if l4_len < 20:
            return DropReason.TRUNCATED
        sport, dport, seq, ack, offset, flags, window = _TCP.unpack_from(buf, l4)
        data_offset = (offset >> 4) << 2
        if data_offset < 20 or data_offset > l4_len:
            return DropReason.BAD_TCP_OFFSET
        syn_like = flags & (SYN | FIN | RST)
        if (
            not flags & 0x3F
            or syn_like == SYN | FIN
            or syn_like == SYN | RST
            or syn_like == SYN | FIN | RST
        ):
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


def tcp_check_flags(flags: int) -> bool:
    """Are these TCP flags a combination a segment may carry (`parse`'s rule, written inline
    there for speed): some flag set, and not SYN with FIN or RST."""
    syn_like = flags & (SYN | FIN | RST)
    return bool(flags & 0x3F) and syn_like not in (SYN | FIN, SYN | RST, SYN | FIN | RST)


# --- ones' complement arithmetic ------------------------------------------------------------


def fold(value: int) -> int:
    """Fold a ones' complement sum of any size into 16 bits (end-around carries)."""
    while value > 0xFFFF:
        value = (value & 0xFFFF) + (value >> 16)
    return value


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit ones' complement sum of `data` (odd length padded with a zero byte).

    int.from_bytes + modulo is the fastest pure-Python way (DESIGN.md): x mod 0xffff equals
    the end-around-carry sum, with 0xffff for a non-zero sum that is a multiple of 0xffff.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    if not data:
        return 0
    total = int.from_bytes(data, "big") % 0xFFFF
    if total == 0 and any(data):
        return 0xFFFF
    return total


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    return ~ones_sum(data) & 0xFFFF


def delta(old: bytes, new: bytes) -> int:
    """The folded sum of ~m over the 16-bit words of `old` and of m' over those of `new`.

    The two may differ in length: a translation between IPv6 and IPv4 (lbnat.packet6) swaps
    32 bytes of pseudo-header addresses for 8, and the sum of what leaves and what comes is
    still the change of the checksum (the lengths and the protocol in both pseudo-headers are
    the same number)."""
    if len(old) % 2 or len(new) % 2:
        raise ValueError("delta needs byte strings of even length")
    # ~m is 0xFFFF - m for a 16-bit word: the exact sums of the words, by struct (an IPv6
    # row has 32 address bytes a side; a loop over them was most of a new flow's cost).
    words_old, words_new = len(old) // 2, len(new) // 2
    old_sum = sum(struct.unpack(f"!{words_old}H", old))
    new_sum = sum(struct.unpack(f"!{words_new}H", new))
    return fold(words_old * 0xFFFF - old_sum + new_sum)


def swapped(pair: bytes) -> bytes:
    """Source and destination exchanged: 8 or 32 address bytes, or 4 port bytes."""
    half = len(pair) // 2
    return pair[half:] + pair[:half]


def add(a: int, b: int) -> int:
    """Ones' complement addition of two 16-bit values."""
    return fold(a + b)


def apply_delta(check: int, change: int) -> int:
    """RFC 1624 eqn. 3 on a complete checksum: HC' = ~(~HC + delta)."""
    total = (~check & 0xFFFF) + change
    total = (total & 0xFFFF) + (total >> 16)
    return ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF


def rewrite(
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
    """Write new addresses (8 bytes: src, dst) and ports (4 bytes) and fix both checksums.

    `ip_delta` is the checksum delta of the address change alone (it is also the pseudo-header
    part of the transport checksum); `l4_delta` is that plus the port change.
    """
    buf[start + IP_ADDRESSES : start + IP_ADDRESSES + 8] = addresses
    buf[l4 : l4 + 4] = ports
    # The IP header checksum is always complete: the stack fills it even when offloading.
    at = start + IP_CHECKSUM
    total = (~((buf[at] << 8) | buf[at + 1]) & 0xFFFF) + ip_delta
    total = (total & 0xFFFF) + (total >> 16)
    check = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
    buf[at] = check >> 8
    buf[at + 1] = check & 0xFF

    at = l4 + (16 if proto == TCP else 6)
    field = (buf[at] << 8) | buf[at + 1]
    if partial:
        # Uncomplemented pseudo-header sum: add the address change only.
        total = field + ip_delta
        total = (total & 0xFFFF) + (total >> 16)
        field = (total & 0xFFFF) + (total >> 16)
    elif field == 0 and proto == UDP:
        return  # UDP "no checksum" stays so
    else:
        total = (~field & 0xFFFF) + l4_delta
        total = (total & 0xFFFF) + (total >> 16)
        field = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
        if field == 0 and proto == UDP:
            field = 0xFFFF  # a computed 0 is sent as all ones (RFC 768)
    buf[at] = field >> 8
    buf[at + 1] = field & 0xFF


def rewrite_deltas(
    old_addresses: bytes, new_addresses: bytes, old_ports: bytes, new_ports: bytes
) -> tuple[int, int]:
    """(ip_delta, l4_delta) for a rewrite, computed once per session and direction."""
    ip_delta = delta(old_addresses, new_addresses)
    return ip_delta, add(ip_delta, delta(old_ports, new_ports))


# --- building packets (not on the per-packet path) ------------------------------------------


def pseudo_header_sum(src: int, dst: int, proto: int, length: int) -> int:
    return fold((src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + proto + length)


def transport_checksum(src: int, dst: int, proto: int, segment: bytes | bytearray) -> int:
    """Full TCP/UDP checksum of `segment` (its checksum field must hold zero)."""
    total = add(pseudo_header_sum(src, dst, proto, len(segment)), ones_sum(segment))
    check = ~total & 0xFFFF
    if proto == UDP and check == 0:
        check = 0xFFFF
    return check


def ipv4_header(src: int, dst: int, proto: int, payload_length: int, ttl: int = 64) -> bytes:
    header = bytearray(
        struct.pack("!BBHHHBBHII", 0x45, 0, 20 + payload_length, 0, 0x4000, ttl, proto, 0, src, dst)
    )
    _U16.pack_into(header, IP_CHECKSUM, checksum(header))
    return bytes(header)


def tcp_segment(
    src: int,
    dst: int,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int = 0,
    payload: bytes = b"",
) -> bytes:
    """A complete IPv4 + TCP packet with correct checksums (used for RSTs lbnat sends itself;
    lbnat.packet6.tcp_segment_any for addresses of either family)."""
    segment = bytearray(
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0) + payload
    )
    _U16.pack_into(segment, 16, transport_checksum(src, dst, TCP, segment))
    return ipv4_header(src, dst, TCP, len(segment)) + bytes(segment)


def finish_checksum4(packet: bytearray, partial: bool) -> bytes:
    """An IPv4 TCP/UDP packet whose transport checksum may be partial (the kernel was to finish
    it: PACKET_VNET_HDR) with it computed whole, for a packet sent as one lbnat made itself."""
    if partial:
        ihl = (packet[0] & 0x0F) << 2
        proto = packet[9]
        src, dst = struct.unpack_from("!II", packet, IP_ADDRESSES)
        at = ihl + L4_CHECKSUM[proto]
        packet[at : at + 2] = b"\0\0"
        total = (packet[2] << 8) | packet[3]
        _U16.pack_into(packet, at, transport_checksum(src, dst, proto, packet[ihl:total]))
    return bytes(packet)


def seq_after(a: int, b: int) -> bool:
    """Is sequence number a after b (modulo 2**32)?"""
    return 0 < ((a - b) & 0xFFFFFFFF) < 0x80000000


def tcp_options(buf: bytearray | bytes, l4: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(kind, offset, length) of each option of the TCP header at `l4` but NOP and EOL, in
    order; the walk stops at the end of the options, at EOL or at garbage (a length under 2
    or past the options' end)."""
    if l4 + 13 > end:
        return
    options_end = min(l4 + ((buf[l4 + 12] >> 4) << 2), end)
    at = l4 + 20
    while at < options_end:
        kind = buf[at]
        if kind == 0:
            return
        if kind == 1:
            at += 1
            continue
        if at + 1 >= options_end:
            return
        length = buf[at + 1]
        if length < 2 or at + length > options_end:
            return
        yield kind, at, length
        at += length


def tcp_window_scale(buf: bytearray | bytes, l4: int, end: int) -> int | None:
    """The window scale option of a SYN at `l4`, or None. Tolerates any option garbage."""
    for kind, at, length in tcp_options(buf, l4, end):
        if kind == 3 and length == 3:
            return min(buf[at + 2], 14)  # RFC 7323 caps the shift at 14
    return None


# --- ICMP errors about a translated flow (not on the per-packet path) ------------------------

ICMP = 1
ICMP_DEST_UNREACHABLE = 3  # port unreachable (code 3), fragmentation needed (code 4), ...
ICMP_TIME_EXCEEDED = 11

IcmpError = tuple[int, int, int, int, int, int, int]
"""What `parse_icmp_error` returns: (icmp_offset, inner_start, inner_proto, inner_src,
inner_dst, inner_sport, inner_dport), offsets absolute in the buffer."""


def parse_icmp_error(buf: bytearray | bytes, start: int, end: int) -> IcmpError | DropReason:
    """An ICMP destination-unreachable or time-exceeded message whose quoted packet is TCP or
    UDP (its IP header and at least its ports). Never raises."""
    if end > len(buf) or end - start < 20 or buf[start] >> 4 != 4:
        return DropReason.TRUNCATED
    ihl = (buf[start] & 0x0F) << 2
    total = (buf[start + 2] << 8) | buf[start + 3]
    if ihl < 20 or total < ihl or start + total > end or buf[start + 9] != ICMP:
        return DropReason.NOT_TCP_UDP
    if (buf[start + 6] << 8 | buf[start + 7]) & 0x3FFF:
        return DropReason.FRAGMENT
    icmp = start + ihl
    packet_end = start + total
    if icmp + 8 + 20 > packet_end or buf[icmp] not in (ICMP_DEST_UNREACHABLE, ICMP_TIME_EXCEEDED):
        return DropReason.NOT_TCP_UDP
    inner = icmp + 8
    if buf[inner] >> 4 != 4:
        return DropReason.NOT_TCP_UDP
    inner_ihl = (buf[inner] & 0x0F) << 2
    inner_proto = buf[inner + 9]
    if inner_ihl < 20 or inner + inner_ihl + 8 > packet_end or inner_proto not in (TCP, UDP):
        return DropReason.NOT_TCP_UDP
    _, _, _, _, src, dst = _IPV4.unpack_from(buf, inner)
    sport, dport = PORT_PAIR.unpack_from(buf, inner + inner_ihl)
    return (icmp, inner, inner_proto, src, dst, sport, dport)


def rewrite_icmp_error(
    buf: bytearray,
    start: int,
    error: IcmpError,
    outer_addresses: bytes,
    inner_addresses: bytes,
    inner_ports: bytes,
    inner_ip_delta: int,
    inner_l4_delta: int,
) -> None:
    """Translate an ICMP error and the packet it quotes: new outer addresses (src, dst), new
    inner addresses and ports, the inner checksums updated incrementally (the quoted packet is
    cut, so its transport checksum cannot be recomputed; a UDP checksum of 0 stays 0; a TCP
    checksum is updated only if the quote reaches it), the ICMP and outer IP checksums
    recomputed over what is there."""
    icmp, inner, proto = error[0], error[1], error[2]
    total = (buf[start + 2] << 8) | buf[start + 3]
    packet_end = start + total
    inner_l4 = inner + ((buf[inner] & 0x0F) << 2)
    buf[inner + IP_ADDRESSES : inner + IP_ADDRESSES + 8] = inner_addresses
    buf[inner_l4 : inner_l4 + 4] = inner_ports
    at = inner + IP_CHECKSUM
    _U16.pack_into(buf, at, apply_delta(_U16.unpack_from(buf, at)[0], inner_ip_delta))
    at = inner_l4 + L4_CHECKSUM[proto]
    if at + 2 <= packet_end:
        check = _U16.unpack_from(buf, at)[0]
        if not (proto == UDP and check == 0):
            check = apply_delta(check, inner_l4_delta)
            if proto == UDP and check == 0:
                check = 0xFFFF
            _U16.pack_into(buf, at, check)
    _U16.pack_into(buf, icmp + 2, 0)
    _U16.pack_into(buf, icmp + 2, checksum(buf[icmp:packet_end]))
    buf[start + IP_ADDRESSES : start + IP_ADDRESSES + 8] = outer_addresses
    header_end = start + ((buf[start] & 0x0F) << 2)
    _U16.pack_into(buf, start + IP_CHECKSUM, 0)
    _U16.pack_into(buf, start + IP_CHECKSUM, checksum(buf[start:header_end]))
