"""The engine's IPv6 path (lbnat.engine6), NAT64 and the ICMP turns of both families
(lbnat.engine_icmp), packet by packet: each test is a short exchange, read top to bottom as a
sequence diagram (client -> LB -> backend and back), with every checksum recomputed by scapy.

Topology of every test (addresses from the documentation/benchmark ranges):

    client6 2001:db8::11 ─┐                ┌─ backend6 2001:db8:1::21 :8080  (service web6)
    client4 198.18.0.11  ─┼─ LB 198.18.0.2 ┼─ backend4 198.18.0.21   :8080  (service web4,
    router  2001:db8::1  ─┘    2001:db8::2 └                                  dns4 :5353)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, IPOption_NOP, TCPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.packet import NoPayload, Packet, Raw

from lbnat import addresses
from lbnat.actions import DROP, FORWARD, REPLY, TRANSLATED
from lbnat.backends import Backend
from lbnat.drops import DropReason
from lbnat.engine import Engine
from lbnat.nat import Nat64Session
from lbnat.packet6 import parse6, parse_icmp6_error, rewrite6, translate_to_v4, translate_to_v6
from lbnat.service import Service

LB4, LB6 = "198.18.0.2", "2001:db8::2"
CLIENT4, CLIENT6, ROUTER6 = "198.18.0.11", "2001:db8::11", "2001:db8::1"
B4, B6 = "198.18.0.21", "2001:db8:1::21"
# What the data plane keeps before a packet: 20 bytes of headroom (an IPv4 packet may become
# IPv6), then its 10-byte virtio_net_hdr and the 14-byte Ethernet header.
HEADROOM = 44
VNET = b"VNETHEADER"


def engine(mtu: int = 1500) -> Engine:
    e = Engine(
        LB4,
        [
            Service("web6", "tcp", 80, backends=(Backend(B6, 8080),)),
            Service("web4", "tcp", 81, backends=(Backend(B4, 8080),)),
            Service("dns4", "udp", 53, backends=(Backend(B4, 5353),)),
            Service("dns6", "udp", 54, backends=(Backend(B6, 5353),)),
        ],
        ip6=LB6,
    )
    e.mtu = mtu
    return e


last_buffer: list[bytes] = []  # the whole buffer of the last `send`, headroom included


@dataclass
class Sent:
    """What the engine did with one packet: its action and the bytes it sent."""

    action: tuple[object, ...]
    packet: bytes


def send(e: Engine, packet: bytes | Packet, partial: bool = False) -> Sent:
    """Hand `packet` to the engine in a buffer with the data plane's headroom."""
    raw = bytes(packet)
    buf = bytearray(20) + VNET + bytearray(14) + bytearray(raw)
    action = e.handle(buf, HEADROOM, len(buf), partial, 0.0)
    last_buffer[:] = [bytes(buf)]
    kind = action[0]
    if kind == FORWARD:
        return Sent(action, bytes(buf[HEADROOM:]))
    if kind == TRANSLATED:
        return Sent(action, bytes(buf[action[2] :]))
    if kind == REPLY:
        return Sent(action, bytes(action[1]))
    return Sent(action, b"")


def a(text: str) -> int:
    return addresses.parse(text)


def checksums_ok(raw: bytes) -> bool:
    """Every checksum scapy knows in `raw` is what scapy computes afresh (each layer's field
    deleted, which also drops scapy's cache of the dissected bytes), down to an ICMP layer
    (a quoted packet is cut: its own checksums cover bytes that are not there)."""
    layer_type = IPv6 if raw[0] >> 4 == 6 else IP
    packet = layer_type(raw)
    layer: Packet | None = packet
    while layer is not None and not isinstance(layer, (Raw, NoPayload)):
        for name in ("chksum", "cksum"):
            if name in layer.fields:
                delattr(layer, name)
        if str(layer.name).startswith("ICMP"):
            break
        layer = layer.payload
    return bytes(packet) == raw


def syn6(sport: int = 40000, dport: int = 80, **extra: object) -> Packet:
    return IPv6(src=CLIENT6, dst=LB6) / TCP(sport=sport, dport=dport, flags="S", seq=1000)


# --- IPv6 client, IPv6 backend -----------------------------------------------------------------


def test_v6_flow_both_ways() -> None:
    e = engine()
    # client6 -> LB6:80 (SYN) => LB6:nat -> backend6:8080
    out = send(e, syn6())
    assert out.action == (FORWARD, a(B6))
    p = IPv6(out.packet)
    assert (p.src, p.dst, p[TCP].dport) == (LB6, B6, 8080)
    assert e.nat_first <= p[TCP].sport <= e.nat_last
    assert checksums_ok(out.packet)
    nat = p[TCP].sport
    # backend6 -> LB6:nat (SYN-ACK) => LB6:80 -> client6
    reply = IPv6(src=B6, dst=LB6) / TCP(sport=8080, dport=nat, flags="SA", seq=5000, ack=1001)
    back = send(e, reply)
    assert back.action == (FORWARD, a(CLIENT6))
    q = IPv6(back.packet)
    assert (q.src, q.dst, q[TCP].sport, q[TCP].dport) == (LB6, CLIENT6, 80, 40000)
    assert checksums_ok(back.packet)
    # client6 -> data => forwarded with its payload intact
    data = IPv6(src=CLIENT6, dst=LB6) / TCP(sport=40000, dport=80, flags="PA", seq=1001,
                                             ack=5001) / Raw(b"GET / HTTP/1.0\r\n\r\n")  # fmt: skip
    sent = send(e, data)
    assert sent.action == (FORWARD, a(B6))
    assert IPv6(sent.packet)[Raw].load == b"GET / HTTP/1.0\r\n\r\n"
    assert checksums_ok(sent.packet)
    (row,) = list(e.table)
    assert row.client == (CLIENT6, 40000)
    assert row.backend.key == (B6, 8080)


def test_v6_udp_and_extension_headers_are_walked() -> None:
    e = engine()
    query = (
        IPv6(src=CLIENT6, dst=LB6)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / UDP(sport=40001, dport=54)
        / Raw(b"query")
    )
    out = send(e, query)
    assert out.action == (FORWARD, a(B6))
    p = IPv6(out.packet)
    assert (p.src, p.dst, p[UDP].dport, p[Raw].load) == (LB6, B6, 5353, b"query")
    assert checksums_ok(out.packet)


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (
            IPv6(src=CLIENT6, dst=LB6)
            / IPv6ExtHdrFragment(m=1)
            / UDP(sport=1, dport=54)
            / Raw(b"x"),
            DropReason.FRAGMENT,
        ),
        (IPv6(src=CLIENT6, dst="2001:db8::99") / TCP(dport=80, flags="S"), DropReason.NOT_FOR_US),
        (IPv6(src=CLIENT6, dst=LB6) / TCP(dport=80, flags="A"), DropReason.NO_SESSION),
        (IPv6(src=CLIENT6, dst=LB6) / TCP(dport=9999, flags="S"), DropReason.NOT_FOR_US),
        (IPv6(src=B6, dst=LB6) / TCP(sport=8080, dport=61000, flags="A"), DropReason.NO_SESSION),
        (IP(src=CLIENT4, dst=LB4) / TCP(sport=3, dport=80, flags="S"), DropReason.NO_NAT46),
    ],
    ids=[
        "fragment",
        "other address",
        "ack without row",
        "no service",
        "reply without row",
        "IPv4 client to IPv6 backends",
    ],
)
def test_v6_drops(packet: Packet, reason: DropReason) -> None:
    e = engine()
    assert send(e, packet).action == (DROP, int(reason))
    assert e.drops[reason] == 1


def test_an_ipv4_only_lbnat_drops_ipv6_as_before() -> None:
    e = Engine(LB4, [Service("web4", "tcp", 81, backends=(Backend(B4, 8080),))])
    assert send(e, syn6(dport=81)).action == (DROP, int(DropReason.NOT_IPV4))


def test_no_backend_for_a_v6_client_is_answered_with_a_v6_reset() -> None:
    e = engine()
    e.set_backends("web6", [Backend(B6, 8080).with_draining()])
    out = send(e, syn6())
    assert out.action[0] == REPLY and out.action[2] == a(CLIENT6)
    rst = IPv6(out.packet)
    assert (rst.src, rst.dst, rst[TCP].flags, rst[TCP].ack) == (LB6, CLIENT6, "RA", 1001)
    assert checksums_ok(out.packet)


# --- NAT64: IPv6 client, IPv4 backend -----------------------------------------------------------


def test_nat64_flow_both_ways() -> None:
    e = engine()
    # client6 -> LB6:81 (SYN) => an IPv4 SYN LB4:nat -> backend4:8080
    out = send(e, IPv6(src=CLIENT6, dst=LB6, hlim=61, tc=0x28) / TCP(sport=40002, dport=81,
                                                                     flags="S", seq=7))  # fmt: skip
    assert out.action[:2] == (TRANSLATED, a(B4))
    p = IP(out.packet)
    assert (p.src, p.dst, p[TCP].dport, p.ttl, p.tos, p.flags) == (LB4, B4, 8080, 61, 0x28, 0)
    assert checksums_ok(out.packet)
    nat = p[TCP].sport
    (row,) = list(e.table)
    assert isinstance(row, Nat64Session)
    # backend4 -> LB4:nat (SYN-ACK) => an IPv6 packet LB6:81 -> client6
    back = send(e, IP(src=B4, dst=LB4, ttl=63) / TCP(sport=8080, dport=nat, flags="SA",
                                                     seq=99, ack=8))  # fmt: skip
    assert back.action[:2] == (TRANSLATED, a(CLIENT6))
    assert back.action[2] == HEADROOM - 20  # 20 bytes before the IPv4 packet's start
    assert last_buffer[0][back.action[2] - 24 : back.action[2] - 14] == VNET  # moved with it
    q = IPv6(back.packet)
    assert (q.src, q.dst, q[TCP].sport, q[TCP].dport, q.hlim) == (LB6, CLIENT6, 81, 40002, 63)
    assert checksums_ok(back.packet)
    # A big segment from the client gets DF (RFC 7915: over 1260 bytes)
    big = IPv6(src=CLIENT6, dst=LB6) / TCP(sport=40002, dport=81, flags="A", seq=8,
                                           ack=100) / Raw(bytes(1300))  # fmt: skip
    out = send(e, big)
    assert IP(out.packet).flags == "DF"
    assert checksums_ok(out.packet)


def test_nat64_udp_without_checksum_gets_one() -> None:
    e = engine()
    out = send(e, IPv6(src=CLIENT6, dst=LB6) / UDP(sport=40003, dport=53) / Raw(b"q"))
    nat = IP(out.packet)[UDP].sport
    reply = bytearray(bytes(IP(src=B4, dst=LB4) / UDP(sport=5353, dport=nat) / Raw(b"answer")))
    reply[26:28] = b"\0\0"  # IPv4 UDP may carry no checksum; IPv6 UDP must
    back = send(e, bytes(reply))
    assert back.action[:2] == (TRANSLATED, a(CLIENT6))
    q = IPv6(back.packet)
    assert q[UDP].chksum != 0 and q[Raw].load == b"answer"
    assert checksums_ok(back.packet)


def test_partial_checksums_keep_the_pseudo_header_sum() -> None:
    """An offloaded packet's checksum field holds the pseudo-header's sum alone; after the
    rewrite or translation it must hold the new pseudo-header's."""
    from lbnat.packet import pseudo_header_sum
    from lbnat.packet6 import pseudo_sum6

    e = engine()
    for dport, expect_v4 in ((80, False), (81, True)):
        segment = bytes(TCP(sport=40004 + dport, dport=dport, flags="S", seq=1))
        header = bytes(IPv6(src=CLIENT6, dst=LB6, nh=6, plen=len(segment)))
        pseudo = pseudo_sum6(header[8:40], 6, len(segment))
        raw = bytearray(header + segment)
        raw[40 + 16 : 40 + 18] = pseudo.to_bytes(2, "big")
        out = send(e, bytes(raw), partial=True)
        if expect_v4:
            p = IP(out.packet)
            want = pseudo_header_sum(a(p.src), a(p.dst), 6, len(segment))
            assert int.from_bytes(out.packet[20 + 16 : 20 + 18], "big") == want
        else:
            want = pseudo_sum6(out.packet[8:40], 6, len(segment))
            assert int.from_bytes(out.packet[40 + 16 : 40 + 18], "big") == want


def test_nat64_reply_too_big_for_the_mtu_gets_fragmentation_needed() -> None:
    e = engine(mtu=1500)
    out = send(e, IPv6(src=CLIENT6, dst=LB6) / UDP(sport=40005, dport=53) / Raw(b"q"))
    nat = IP(out.packet)[UDP].sport
    big = IP(src=B4, dst=LB4, flags="DF") / UDP(sport=5353, dport=nat) / Raw(bytes(1472))
    back = send(e, big)  # 1500 bytes of IPv4: 1520 as IPv6
    assert back.action[0] == REPLY and back.action[2] == a(B4)
    error = IP(back.packet)
    assert (error.src, error.dst, error[ICMP].type, error[ICMP].code) == (LB4, B4, 3, 4)
    assert error[ICMP].nexthopmtu == 1480
    assert checksums_ok(back.packet)
    assert e.drops[DropReason.PACKET_TOO_BIG] == 1


# --- ICMP errors, both directions ------------------------------------------------------------


def _established_v6(e: Engine, dport: int = 80, sport: int = 40010) -> bytes:
    """A flow opened by a SYN; returns the packet as forwarded to the backend."""
    return send(e, syn6(sport=sport, dport=dport)).packet


def test_icmpv6_from_the_backend_side_reaches_the_client() -> None:
    e = engine()
    original = bytes(IPv6(src=CLIENT6, dst=LB6) / UDP(sport=40011, dport=54) / Raw(b"query"))
    forwarded = send(e, original).packet
    error = IPv6(src=B6, dst=LB6) / ICMPv6DestUnreach(code=4) / Raw(forwarded)
    out = send(e, error)
    assert out.action[0] == REPLY and out.action[2] == a(CLIENT6)
    p = IPv6(out.packet)
    assert (p.src, p.dst, p[ICMPv6DestUnreach].code) == (LB6, CLIENT6, 4)
    assert bytes(p[ICMPv6DestUnreach].payload) == original  # the client's own datagram again
    assert checksums_ok(out.packet)
    assert e.icmp_translated == 1


def test_packet_too_big_from_the_client_side_reaches_a_v6_backend() -> None:
    e = engine()
    forwarded = _established_v6(e)
    nat = IPv6(forwarded)[TCP].sport
    # What the LB sent the client (a big segment from the backend, translated):
    down = send(e, IPv6(src=B6, dst=LB6) / TCP(sport=8080, dport=nat, flags="A", seq=1,
                                               ack=1001) / Raw(bytes(1400))).packet  # fmt: skip
    # A router on the client's side cannot carry it: packet too big, to the VIP.
    error = IPv6(src=ROUTER6, dst=LB6) / ICMPv6PacketTooBig(mtu=1280) / Raw(down[:1232])
    out = send(e, error)
    assert out.action[0] == REPLY and out.action[2] == a(B6)
    p = IPv6(out.packet)
    assert (p.src, p.dst, p[ICMPv6PacketTooBig].mtu) == (LB6, B6, 1280)
    quoted = p[IPerror6]
    assert (quoted.src, quoted.dst, quoted[TCPerror].sport, quoted[TCPerror].dport) == (
        B6, LB6, 8080, nat
    )  # fmt: skip
    assert checksums_ok(out.packet)


def test_nat64_fragmentation_needed_becomes_packet_too_big_for_the_client() -> None:
    e = engine()
    forwarded = send(e, IPv6(src=CLIENT6, dst=LB6) / TCP(sport=40012, dport=81, flags="S",
                                                         seq=7)).packet  # fmt: skip
    error = IP(src="198.18.0.1", dst=LB4) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(forwarded)
    out = send(e, error)
    assert out.action[0] == REPLY and out.action[2] == a(CLIENT6)
    p = IPv6(out.packet)
    assert (p.src, p.dst, p[ICMPv6PacketTooBig].mtu) == (LB6, CLIENT6, 1420)
    quoted = p[IPerror6]
    assert (quoted.src, quoted.dst, quoted[TCPerror].sport, quoted[TCPerror].dport) == (
        CLIENT6, LB6, 40012, 81
    )  # fmt: skip
    assert checksums_ok(out.packet)


def test_nat64_packet_too_big_from_the_client_side_becomes_fragmentation_needed() -> None:
    e = engine()
    forwarded = send(e, IPv6(src=CLIENT6, dst=LB6) / TCP(sport=40013, dport=81, flags="S",
                                                         seq=7)).packet  # fmt: skip
    nat = IP(forwarded)[TCP].sport
    down = send(e, IP(src=B4, dst=LB4) / TCP(sport=8080, dport=nat, flags="SA", seq=1,
                                             ack=8) / Raw(bytes(1300))).packet  # fmt: skip
    error = IPv6(src=ROUTER6, dst=LB6) / ICMPv6PacketTooBig(mtu=1280) / Raw(down)
    out = send(e, error)
    assert out.action[0] == REPLY and out.action[2] == a(B4)
    p = IP(out.packet)
    assert (p.src, p.dst, p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu) == (LB4, B4, 3, 4, 1260)
    quoted = p[IPerror]
    assert (quoted.src, quoted.dst, quoted[TCPerror].sport, quoted[TCPerror].dport) == (
        B4, LB4, 8080, nat
    )  # fmt: skip
    assert checksums_ok(out.packet)


def test_ipv4_fragmentation_needed_from_the_client_side_reaches_the_backend() -> None:
    e = engine()
    forwarded = send(e, IP(src=CLIENT4, dst=LB4) / TCP(sport=40014, dport=81, flags="S",
                                                       seq=7)).packet  # fmt: skip
    nat = IP(forwarded)[TCP].sport
    down = send(e, IP(src=B4, dst=LB4) / TCP(sport=8080, dport=nat, flags="SA", seq=1,
                                             ack=8) / Raw(bytes(1400))).packet  # fmt: skip
    error = IP(src="198.18.0.1", dst=LB4) / ICMP(type=3, code=4, nexthopmtu=1300) / Raw(down[:576])
    out = send(e, error)
    assert out.action == (FORWARD, a(B4))
    p = IP(out.packet)
    assert (p.src, p.dst, p[ICMP].nexthopmtu) == (LB4, B4, 1300)
    quoted = p[IPerror]
    assert (quoted.src, quoted.dst, quoted[TCPerror].sport, quoted[TCPerror].dport) == (
        B4, LB4, 8080, nat
    )  # fmt: skip
    assert checksums_ok(out.packet)


def test_icmpv6_about_nothing_of_ours_is_dropped() -> None:
    e = engine()
    stray = bytes(IPv6(src=LB6, dst=B6) / UDP(sport=33000, dport=5353) / Raw(b"x"))
    error = IPv6(src=B6, dst=LB6) / ICMPv6DestUnreach(code=4) / Raw(stray)
    assert send(e, error).action == (DROP, int(DropReason.NOT_FOR_US))
    echo = bytes(IPv6(src=CLIENT6, dst=LB6) / Raw(b"\x80\x00\x00\x00"))
    assert send(e, echo).action[0] == DROP


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 8))
def test_parse6_and_the_engine_never_raise(data: bytes, offset: int) -> None:
    raw = bytes([0x60]) + data
    parse6(raw, 0, len(raw))
    parse6(raw, offset, len(raw))
    parse_icmp6_error(raw, 0, len(raw))
    e = engine()
    buf = bytearray(HEADROOM) + bytearray(raw)
    e.handle(buf, HEADROOM, len(buf), False, 0.0)


_v6 = st.integers(1, (1 << 128) - 1).map(lambda n: addresses.text(addresses.V6 | n))
_v4 = st.integers(1, 0xFFFFFFFE).map(addresses.text)
_port = st.integers(1, 65535)


@settings(max_examples=150, deadline=None)
@given(_v6, _v6, _v6, _v6, _port, _port, st.binary(max_size=64), st.booleans())
def test_rewrite6_checksum_equals_a_full_recompute(
    src: str, dst: str, new_src: str, new_dst: str, sport: int, dport: int, payload: bytes,
    udp: bool,
) -> None:  # fmt: skip
    from lbnat.packet import rewrite_deltas

    l4_layer = UDP(sport=1, dport=2) if udp else TCP(sport=1, dport=2, flags="A")
    raw = bytearray(bytes(IPv6(src=src, dst=dst) / l4_layer / Raw(payload)))
    new_addresses = addresses.packed(a(new_src)) + addresses.packed(a(new_dst))
    ports = sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    ip_delta, l4_delta = rewrite_deltas(bytes(raw[8:40]), new_addresses, bytes(raw[40:44]), ports)
    rewrite6(raw, 0, 40, 17 if udp else 6, new_addresses, ports, ip_delta, l4_delta, False)
    assert checksums_ok(bytes(raw))


@settings(max_examples=150, deadline=None)
@given(_v6, _v6, _v4, _v4, _port, _port, st.binary(max_size=64), st.booleans())
def test_translations_checksums_equal_a_full_recompute(
    src6: str, dst6: str, src4: str, dst4: str, sport: int, dport: int, payload: bytes,
    udp: bool,
) -> None:  # fmt: skip
    from lbnat.packet import rewrite_deltas

    proto = 17 if udp else 6
    l4_layer = UDP(sport=1, dport=2) if udp else TCP(sport=1, dport=2, flags="A")
    ports = sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    # IPv6 -> IPv4
    raw = bytearray(bytes(IPv6(src=src6, dst=dst6) / l4_layer / Raw(payload)))
    v4 = addresses.packed(a(src4)) + addresses.packed(a(dst4))
    ip_delta, l4_delta = rewrite_deltas(bytes(raw[8:40]), v4, bytes(raw[40:44]), ports)
    start = translate_to_v4(raw, 0, 40, proto, v4, ports, ip_delta, l4_delta, False)
    assert checksums_ok(bytes(raw[start:]))
    # IPv4 -> IPv6, with the headroom before it
    raw = bytearray(HEADROOM) + bytearray(bytes(IP(src=src4, dst=dst4) / l4_layer / Raw(payload)))
    v6 = addresses.packed(a(src6)) + addresses.packed(a(dst6))
    at = HEADROOM
    ip_delta, l4_delta = rewrite_deltas(bytes(raw[at + 12 : at + 20]), v6,
                                        bytes(raw[at + 20 : at + 24]), ports)  # fmt: skip
    start = translate_to_v6(raw, at, at + 20, proto, v6, ports, ip_delta, l4_delta, False)
    assert start == HEADROOM - 20
    assert checksums_ok(bytes(raw[start:]))


def test_ipv6_backends_fit_the_shared_round_robin_cursor() -> None:
    """Workers share round-robin turns through a 64-bit word (SharedCursor): an IPv6
    backend's code fits it and differs from its neighbours' and from IPv4 codes."""
    from lbnat.scheduler import backend_code

    codes = {backend_code(Backend(f"2001:db8::{n}", port)) for n in range(1, 50)
             for port in (80, 8080)}  # fmt: skip
    assert len(codes) == 98
    assert all(0 < code < 1 << 64 for code in codes)
    assert all(code >= 1 << 62 for code in codes)
    assert backend_code(Backend("255.255.255.255", 65535)) < 1 << 62


# --- found by review: inputs that must be drops or right bytes, never a dead worker ---------


@pytest.mark.parametrize("options", [4, 24, 28, 40])
def test_nat64_reply_with_ipv4_options_keeps_the_vnet_header(options: int) -> None:
    """An IPv4 header longer than 20 bytes grows less (or not at all) into IPv6: the 10 bytes
    the data plane keeps 24 bytes before the packet move only when it grows, and its fields
    are read before the new header is written."""
    e = engine()
    forwarded = send(e, IPv6(src=CLIENT6, dst=LB6) / TCP(sport=40020, dport=81, flags="S",
                                                         seq=7)).packet  # fmt: skip
    nat = IP(forwarded)[TCP].sport
    reply = IP(src=B4, dst=LB4, tos=0x28, options=[IPOption_NOP()] * options) / TCP(
        sport=8080, dport=nat, flags="SA", seq=99, ack=8
    )
    back = send(e, reply)
    assert back.action[:2] == (TRANSLATED, a(CLIENT6))
    new_start = cast(int, back.action[2])
    vnet_at = min(HEADROOM, new_start) - 24
    assert last_buffer[0][vnet_at : vnet_at + 10] == VNET
    q = IPv6(back.packet)
    assert (q.src, q.dst, q.tc, q.plen, q[TCP].dport) == (LB6, CLIENT6, 0x28, 20, 40020)
    assert checksums_ok(back.packet)


def test_an_icmpv6_quote_claiming_a_huge_length_is_turned_or_dropped() -> None:
    e = engine()
    send(e, IPv6(src=CLIENT6, dst=LB6) / TCP(sport=40021, dport=81, flags="S", seq=7))
    quote = IPv6(src=LB6, dst=CLIENT6, plen=0xFFFF) / TCP(sport=81, dport=40021)
    for kind in (ICMPv6PacketTooBig(mtu=1280), ICMPv6DestUnreach(code=4)):
        out = send(e, IPv6(src=ROUTER6, dst=LB6) / kind / Raw(bytes(quote)))
        assert out.action[0] in (REPLY, DROP)
        if out.action[0] == REPLY:
            assert checksums_ok(out.packet)


def test_a_synced_ipv6_row_on_a_node_without_ip6_is_dropped_not_a_crash() -> None:
    from lbnat.checkpoint import Dropped, RowRecord, place_of
    from lbnat.nat import State

    e = Engine(LB4, [Service("web4", "tcp", 81, backends=(Backend(B4, 8080),))])
    record = RowRecord(6, State.ESTABLISHED, 0, 81, a(CLIENT6), 40000, a(B4), 8080, 61000, 0, 0)
    assert place_of(e, record) is Dropped.NO_IPV6
    service = e.services["web4"]
    backend = service.by_key[(B4, 8080)]
    assert (
        e.table.adopt(0.0, service, 6, a(CLIENT6), 40000, -1, backend, 61000, State.ESTABLISHED)
        is None
    )
    assert e.table.pools == {} or all(p.ports_in_use == 0 for p in e.table.pools.values())


def test_time_exceeded_reaches_the_client_in_its_own_family() -> None:
    """A router between the LB and a backend sends time exceeded: the IPv6 client gets ICMPv6
    time exceeded, for an IPv6 backend as for an IPv4 one (NAT64: ICMPv4 type 11)."""
    from scapy.layers.inet6 import ICMPv6TimeExceeded

    e = engine()
    for dport, error_of in (
        (80, lambda q: IPv6(src=ROUTER6, dst=LB6) / ICMPv6TimeExceeded(code=0) / Raw(q)),
        (81, lambda q: IP(src="198.18.0.1", dst=LB4) / ICMP(type=11, code=0) / Raw(q)),
    ):
        original = bytes(IPv6(src=CLIENT6, dst=LB6) / TCP(sport=40030 + dport, dport=dport,
                                                          flags="S", seq=5))  # fmt: skip
        forwarded = send(e, original).packet
        out = send(e, error_of(forwarded))
        assert out.action[0] == REPLY and out.action[2] == a(CLIENT6)
        p = IPv6(out.packet)
        assert (p.src, p.dst, p[ICMPv6TimeExceeded].code) == (LB6, CLIENT6, 0)
        quoted = p[IPerror6]
        assert (quoted.src, quoted.dst, quoted[TCPerror].sport, quoted[TCPerror].dport) == (
            CLIENT6, LB6, 40030 + dport, dport
        )  # fmt: skip
        assert checksums_ok(out.packet)
