"""PROXY protocol v2 under full NAT: the backend learns the real client (HAProxy's
proxy-protocol.txt, section 2.2), though lbnat works on packets, not streams.

    client                      lbnat                               backend
      SYN (isn)          ->     forwarded as any NAT row          ->
      <-  SYN-ACK                                                  <-  SYN-ACK (ack = isn + 1)
      ACK (seq = isn + 1) ->    replaced by the header segment:
                                seq = isn + 1, ACK|PSH, the client's options, L bytes  ->
      data (seq = s)     ->     seq = s + L                        ->
      <-  ack = a - L, SACK edges - L                              <-  ack = a, SACK blocks

The header is its own segment, made by lbnat from the first client segment after the handshake
(in place of a pure ACK at isn + 1, or sent just before that segment otherwise). From then on
every client -> backend sequence number is shifted by +L and every backend -> client
acknowledgement and SACK edge by -L, for the life of the flow. An acknowledgement (or SACK
edge) inside the header, [isn + 1, isn + 1 + L), becomes isn + 1 for the client: none of the
client's bytes is acknowledged by it, and a SACK block wholly in the header becomes empty
(ignored by the receiver).

Why a segment of its own, and not the header prepended to the client's first data segment: a
segment grows then (MSS, the frame's room, TSO), and every retransmission of that first
segment would have to be recognised and rebuilt; with a segment of its own, the client's
segments keep their lengths, the header is sent once however often the client retransmits,
and a lost header is a retransmission of lbnat's own segment.

A lost header: lbnat keeps it until the backend's acknowledgement covers it (`pp_state` 1).
It is sent again, built from the client segment at hand (so its timestamp option is the
newest: PAWS), with a client segment that arrives `RESEND_AFTER` seconds or more after the
last send, or at once after the backend has acknowledged only up to isn + 1 since then (a
duplicate ACK: it has the client's data but not the header), and in place of any pure ACK at
isn + 1 (shifted, that ACK could complete a backend's handshake without the header). That
always converges: while the header is missing the backend acknowledges none of the client's
data, so the client retransmits; and if the header replaced the handshake's ACK, the backend,
still in SYN_RECV, repeats its SYN-ACK and the client answers it with an ACK. (No timer in
`tick`: the engine's tick sends nothing; see docs/proxy-protocol.md.)

The engine's tracker keeps such a row in the client's sequence space (as the SYN proxy's rows).
"""

from __future__ import annotations

import struct

from lbnat.addresses import V4_MAX, packed
from lbnat.nat import Session
from lbnat.packet import (
    ACK,
    ADDRESS,
    FIN,
    IP_ADDRESSES,
    IP_CHECKSUM,
    PSH,
    RST,
    SYN,
    TCP,
    checksum,
    fold,
    tcp_options,
    transport_checksum,
)

MASK32 = 0xFFFFFFFF
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_PROXY = 0x21  # version 2, command PROXY
TCP4 = 0x11  # AF_INET, STREAM
TCP6 = 0x21  # AF_INET6, STREAM
RESEND_AFTER = 0.2  # seconds: Linux's minimum RTO (a client's retransmission comes no sooner)
VERSIONS = ("v2",)

_WORD = struct.Struct("!I")
_U16 = struct.Struct("!H")


def header_v2(client_ip: int, client_port: int, vip: int, vip_port: int) -> bytes:
    """The v2 header of a TCP flow from client to VIP (lbnat.addresses ints; both of one
    family): 28 bytes for IPv4, 52 for IPv6."""
    if (client_ip > V4_MAX) != (vip > V4_MAX):
        raise ValueError("the client and the VIP must be of one family")
    family = TCP6 if client_ip > V4_MAX else TCP4
    body = packed(client_ip) + packed(vip) + struct.pack("!HH", client_port, vip_port)
    return SIGNATURE + bytes((VERSION_PROXY, family)) + _U16.pack(len(body)) + body


def parse_v2(data: bytes) -> tuple[int, str, int, str, int]:
    """(header length, source address, source port, destination address, destination port) of
    a PROXY v2 TCP header at the start of `data` (for tests and tools). ValueError if none."""
    import ipaddress

    if len(data) < 16 or data[:12] != SIGNATURE or data[12] != VERSION_PROXY:
        raise ValueError("not a PROXY protocol v2 header")
    family = data[13]
    (length,) = _U16.unpack_from(data, 14)
    if len(data) < 16 + length:
        raise ValueError("truncated PROXY protocol v2 header")
    size = {TCP4: 4, TCP6: 16}.get(family)
    if size is None or length < 2 * size + 4:
        raise ValueError(f"not TCP over IPv4 or IPv6: family byte {family:#04x}")
    src = str(ipaddress.ip_address(data[16 : 16 + size]))
    dst = str(ipaddress.ip_address(data[16 + size : 16 + 2 * size]))
    sport, dport = struct.unpack_from("!HH", data, 16 + 2 * size)
    return 16 + length, src, sport, dst, dport


class ProxyProtoSession(Session):
    """A row of a `proxy_protocol: "v2"` service: the header and where it starts."""

    __slots__ = ("pp_base", "pp_header", "pp_sent_at", "pp_state")

    def __init__(self) -> None:
        super().__init__()
        self.pp_header = b""  # the PROXY header (its length is the shift)
        self.pp_base = 0  # the client's ISN + 1: where the header starts in the backend's view
        self.pp_state = 0  # 0 not sent (no shift yet), 1 sent, not acknowledged, 2 acknowledged
        self.pp_sent_at = 0.0  # when it was last sent; -1.0: the backend asked for it again

    @property
    def pp_shift(self) -> int:
        """The sequence shift in force: the header's length once it has been sent."""
        return len(self.pp_header) if self.pp_state else 0


def start_row(row: ProxyProtoSession, client_ip: int, client_port: int, client_seq: int, vip: int,
          vip_port: int) -> None:  # fmt: skip
    """A new row (the client's SYN, sequence `client_seq`): its header, nothing sent yet."""
    row.pp_header = header_v2(client_ip, client_port, vip, vip_port)
    row.pp_base = (client_seq + 1) & MASK32
    row.pp_state = 0
    row.pp_sent_at = 0.0


def _set_word(buf: bytearray, at: int, new: int) -> int:
    """Write the 32-bit `new` at `at`; return the one's complement checksum delta."""
    old = (buf[at] << 24) | (buf[at + 1] << 16) | (buf[at + 2] << 8) | buf[at + 3]
    _WORD.pack_into(buf, at, new)
    return (~old >> 16 & 0xFFFF) + (new >> 16) + (~old & 0xFFFF) + (new & 0xFFFF)


def from_client(row: ProxyProtoSession, buf: bytearray, l4: int, flags: int, seq: int,
                now: float, pure: bool = False) -> tuple[int, bool]:  # fmt: skip
    """Shift a client -> backend segment (before or after the NAT rewrite: the sequence field
    only; `pure`: it is a pure ACK at isn + 1, `replaces`). Returns (the checksum delta, send
    the header before this segment, or instead of it when `pure`)."""
    state = row.pp_state
    send = False
    if state == 0:
        if not flags & ACK or flags & (SYN | RST):
            return 0, False  # the handshake (or a RST) before the header: unshifted
        row.pp_state = 1
        send = True
    elif state == 1 and (
        pure or row.pp_sent_at < 0 or now - row.pp_sent_at >= RESEND_AFTER
    ):  # (a pure ACK at isn + 1, shifted, could complete a backend's handshake without it)
        send = True
    if send:
        row.pp_sent_at = now
    return fold(_set_word(buf, l4 + 4, (seq + len(row.pp_header)) & MASK32)), send


def to_client(row: ProxyProtoSession, value: int) -> int:
    """A backend-side sequence number of the client's stream, as the client numbers it."""
    offset = (value - row.pp_base) & MASK32
    if offset >= 0x80000000:  # before the header (cannot be acknowledged): as it is
        return value
    length = len(row.pp_header)
    if offset < length:  # inside the header: none of the client's bytes
        return row.pp_base
    return (value - length) & MASK32


def from_backend(row: ProxyProtoSession, buf: bytearray, l4: int, end: int, flags: int,
                 ack: int) -> tuple[int, int]:  # fmt: skip
    """Shift a backend -> client segment's acknowledgement and SACK blocks. Returns (the
    checksum delta, the acknowledgement in the client's numbering)."""
    if not row.pp_state or not flags & ACK:
        return 0, ack
    new = to_client(row, ack)
    if row.pp_state == 1:
        if len(row.pp_header) <= (ack - row.pp_base) & MASK32 < 0x80000000:
            row.pp_state = 2  # the header is acknowledged: never sent again
        elif ack == row.pp_base and not flags & SYN:
            row.pp_sent_at = -1.0  # a duplicate ACK without the header: send it with the next
    extra = _set_word(buf, l4 + 8, new) if new != ack else 0
    if buf[l4 + 12] > 0x5F:  # options: SACK blocks name the client's (shifted) stream
        for kind, at, length in tcp_options(buf, l4, end):
            if kind == 5:
                for edge in range(at + 2, at + length - 3, 4):
                    (value,) = _WORD.unpack_from(buf, edge)
                    extra += _set_word(buf, edge, to_client(row, value))
    return fold(extra), new


def header_packet(row: ProxyProtoSession, packet: bytearray | bytes, l4: int) -> bytes:
    """The header segment, made from the client's segment `packet` (IPv4, already rewritten
    towards the backend; `l4` its TCP offset in `packet`): its addresses, ports, ACK, window
    and options (timestamps), sequence number isn + 1, flags ACK|PSH, the header as payload,
    checksums complete."""
    data_offset = (packet[l4 + 12] >> 4) << 2
    tcp = bytearray(packet[l4 : l4 + data_offset])
    _WORD.pack_into(tcp, 4, row.pp_base)
    tcp[13] = (tcp[13] & ~(FIN | SYN | RST | 0x20) & 0xFF) | ACK | PSH  # (no URG)
    tcp[16:20] = b"\0\0\0\0"  # checksum and urgent pointer
    segment = tcp + row.pp_header
    ip = bytearray(packet[:l4])
    _U16.pack_into(ip, 2, len(ip) + len(segment))
    _U16.pack_into(ip, IP_CHECKSUM, 0)
    _U16.pack_into(ip, IP_CHECKSUM, checksum(ip))
    (src,) = ADDRESS.unpack_from(ip, IP_ADDRESSES)
    (dst,) = ADDRESS.unpack_from(ip, IP_ADDRESSES + 4)
    _U16.pack_into(segment, 16, transport_checksum(src, dst, TCP, segment))
    return bytes(ip + segment)


def replaces(row: ProxyProtoSession, packet: bytearray | bytes, start: int, l4: int,
             flags: int, seq: int) -> bool:  # fmt: skip
    """Does the header segment take this client segment's place: a pure ACK (no payload, no
    FIN) at isn + 1 (the handshake's, or the client's answer to a repeated SYN-ACK)? The header
    segment acknowledges the same. (Sent as well, its shifted copy would complete a backend's
    handshake without the header.)"""
    if seq != row.pp_base:
        return False
    total = (packet[start + 2] << 8) | packet[start + 3]
    payload = total - (l4 - start) - ((packet[l4 + 12] >> 4) << 2)
    return payload <= 0 and not flags & (FIN | SYN | RST)
