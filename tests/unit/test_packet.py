"""Tests for lbnat.packet: parsing in place, rewriting with incremental checksum updates
(complete and partial checksums), and robustness against malformed input.

Table-driven in the katran style: each case is a description, a scapy-built input packet and
the expected result (parsed fields, a drop reason, or the exact expected output packet, itself
built by scapy with freshly computed checksums). Hypothesis then checks the same properties on
random packets and random bytes.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, IPOption_NOP, IPOption_RR
from scapy.layers.inet import TCP as ScapyTCP
from scapy.layers.inet import UDP as ScapyUDP
from scapy.packet import Packet
from scapy.utils import checksum as scapy_checksum

from lbnat.drops import DropReason
from lbnat.packet import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TCP,
    UDP,
    apply_delta,
    checksum,
    delta,
    ones_sum,
    parse,
    rewrite,
    rewrite_deltas,
    seq_after,
    tcp_segment,
    tcp_window_scale,
)
from tests.unit import fixtures as fx
from tests.unit.fixtures import (
    BACKEND_IPS,
    CLIENT1,
    CLIENT2,
    DNS_BACKEND_PORT,
    DNS_PORT,
    LB,
    WEB_BACKEND_PORT,
    WEB_PORT,
    addr,
    complete_partial,
    make_partial,
    tcp,
    udp,
    verify_checksums,
    wire,
)

B1 = BACKEND_IPS[0]
B2 = BACKEND_IPS[1]
NAT = 61000
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Parsed(NamedTuple):
    """The tuple `parse` returns, with names."""

    proto: int
    l4: int
    src: int
    dst: int
    sport: int
    dport: int
    flags: int
    seq: int
    ack: int
    window: int
    payload_length: int


def patched(packet: Packet | bytes, **changes: int) -> bytearray:
    """The packet's bytes with some raw header bytes overwritten: at=value pairs are given as
    keyword names b<offset> (one byte) or h<offset> (a 16-bit word)."""
    buf = wire(packet)
    for name, value in changes.items():
        at = int(name[1:])
        if name[0] == "b":
            buf[at] = value
        else:
            struct.pack_into("!H", buf, at, value)
    return buf


# --- parse: table ------------------------------------------------------------------------------

SYN_PKT = tcp(CLIENT1, LB, 40000, WEB_PORT, "S", seq=1000, window=29200)
DATA_PKT = tcp(CLIENT1, LB, 40000, WEB_PORT, "PA", 1001, 5001, payload=b"GET / HTTP/1.0\r\n")
UDP_PKT = udp(CLIENT2, LB, 5000, DNS_PORT, b"query")


@dataclass(frozen=True)
class ParseCase:
    description: str
    packet: bytes | bytearray
    expect: Parsed | DropReason
    start: int = 0
    end: int | None = None  # default: the end of the buffer


D = DropReason

PARSE_CASES = [
    ParseCase(
        "plain TCP SYN",
        bytes(SYN_PKT),
        Parsed(TCP, 20, addr(CLIENT1), addr(LB), 40000, 80, SYN, 1000, 0, 29200, 0),
    ),
    ParseCase(
        "TCP data with ACK",
        bytes(DATA_PKT),
        Parsed(TCP, 20, addr(CLIENT1), addr(LB), 40000, 80, PSH | ACK, 1001, 5001, 65535, 16),
    ),
    ParseCase(
        "TCP with options (MSS, SACK, timestamps, window scale): payload after data offset",
        bytes(
            tcp(
                CLIENT1, LB, 40000, 80, "S", seq=7,
                options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None),
                         ("WScale", 7)],
                payload=b"abc",
            )
        ),
        Parsed(TCP, 20, addr(CLIENT1), addr(LB), 40000, 80, SYN, 7, 0, 65535, 3),
    ),
    ParseCase(
        "IP options: four NOPs (IHL 6)",
        bytes(tcp(CLIENT1, LB, 1, 80, "A", seq=5, ack=6, ip_options=[IPOption_NOP()] * 4)),
        Parsed(TCP, 24, addr(CLIENT1), addr(LB), 1, 80, ACK, 5, 6, 65535, 0),
    ),
    ParseCase(
        "IP options: record route, 1 slot (IHL 7)",
        bytes(tcp(CLIENT1, LB, 1, 80, "A", ip_options=[IPOption_RR(routers=["10.0.0.1"])])),
        Parsed(TCP, 28, addr(CLIENT1), addr(LB), 1, 80, ACK, 0, 0, 65535, 0),
    ),
    ParseCase(
        "IP options: NOP + record route, 2 slots (IHL 8), UDP",
        bytes(
            udp(CLIENT1, LB, 9, 53, b"x",
                ip_options=[IPOption_NOP(), IPOption_RR(routers=["10.0.0.1", "10.0.0.2"])])
        ),
        Parsed(UDP, 32, addr(CLIENT1), addr(LB), 9, 53, 0, 0, 0, 0, 1),
    ),
    ParseCase(
        "UDP",
        bytes(UDP_PKT),
        Parsed(UDP, 20, addr(CLIENT2), addr(LB), 5000, 53, 0, 0, 0, 0, 5),
    ),
    ParseCase(
        "UDP with checksum 0",
        bytes(udp(CLIENT2, LB, 5000, 53, b"q", chksum=0)),
        Parsed(UDP, 20, addr(CLIENT2), addr(LB), 5000, 53, 0, 0, 0, 0, 1),
    ),
    ParseCase(
        "inside a larger buffer (after a 14-byte Ethernet header), l4 is absolute",
        b"\xaa" * 14 + bytes(SYN_PKT) + b"\xbb" * 5,
        Parsed(TCP, 34, addr(CLIENT1), addr(LB), 40000, 80, SYN, 1000, 0, 29200, 0),
        start=14,
        end=14 + 40,
    ),
    ParseCase(
        "Ethernet padding after the IP total length is ignored",
        bytes(SYN_PKT) + b"\0" * 6,
        Parsed(TCP, 20, addr(CLIENT1), addr(LB), 40000, 80, SYN, 1000, 0, 29200, 0),
    ),
    ParseCase(
        "UDP length shorter than the IP payload (trailing bytes): the UDP length counts",
        patched(udp(CLIENT2, LB, 5000, 53, b"abcdef"), h24=10),
        Parsed(UDP, 20, addr(CLIENT2), addr(LB), 5000, 53, 0, 0, 0, 0, 2),
    ),
    ParseCase(
        "DF set and ECE+CWR with SYN are fine",
        bytes(tcp(CLIENT1, LB, 1, 80, "SEC", seq=3, ip_flags="DF")),
        Parsed(TCP, 20, addr(CLIENT1), addr(LB), 1, 80, SYN | 0x40 | 0x80, 3, 0, 65535, 0),
    ),
    # --- malformed ---
    ParseCase("empty buffer", b"", D.TRUNCATED),
    ParseCase("19 bytes", bytes(SYN_PKT)[:19], D.TRUNCATED),
    ParseCase("end beyond the buffer", bytes(SYN_PKT), D.TRUNCATED, end=41),
    ParseCase("negative start", bytes(SYN_PKT), D.TRUNCATED, start=-1),
    ParseCase("version 6", patched(SYN_PKT, b0=0x65), D.NOT_IPV4),
    ParseCase("version 0", patched(SYN_PKT, b0=0x05), D.NOT_IPV4),
    ParseCase("IHL 4", patched(SYN_PKT, b0=0x44), D.BAD_IHL),
    ParseCase("IHL 0", patched(SYN_PKT, b0=0x40), D.BAD_IHL),
    ParseCase("IHL 15 beyond the total length", patched(SYN_PKT, b0=0x4F), D.BAD_TOTAL_LENGTH),
    ParseCase("total length beyond the buffer", patched(SYN_PKT, h2=41), D.BAD_TOTAL_LENGTH),
    ParseCase("total length 65535", patched(SYN_PKT, h2=0xFFFF), D.BAD_TOTAL_LENGTH),
    ParseCase("total length shorter than IHL", patched(SYN_PKT, h2=19), D.BAD_TOTAL_LENGTH),
    ParseCase("total length 0", patched(SYN_PKT, h2=0), D.BAD_TOTAL_LENGTH),
    ParseCase(
        "total length shorter than IP + TCP headers", patched(SYN_PKT, h2=39), D.TRUNCATED
    ),
    ParseCase("TCP header cut off", bytes(SYN_PKT)[:30], D.BAD_TOTAL_LENGTH),
    ParseCase(
        "TCP header cut off, total length consistent",
        patched(bytes(SYN_PKT)[:30], h2=30),
        D.TRUNCATED,
    ),
    ParseCase("TCP data offset 4", patched(SYN_PKT, b32=0x40), D.BAD_TCP_OFFSET),
    ParseCase("TCP data offset 0", patched(SYN_PKT, b32=0x00), D.BAD_TCP_OFFSET),
    ParseCase(
        "TCP data offset beyond the packet", patched(SYN_PKT, b32=0x60), D.BAD_TCP_OFFSET
    ),
    ParseCase(
        "TCP data offset 15 with a short payload",
        bytes(tcp(CLIENT1, LB, 1, 80, "A", payload=b"x" * 39, dataofs=15)),
        D.BAD_TCP_OFFSET,
    ),
    ParseCase("TCP without any flag", patched(SYN_PKT, b33=0), D.BAD_TCP_FLAGS),
    ParseCase("TCP with only ECE+CWR", patched(SYN_PKT, b33=0xC0), D.BAD_TCP_FLAGS),
    ParseCase("TCP SYN+FIN", patched(SYN_PKT, b33=SYN | FIN), D.BAD_TCP_FLAGS),
    ParseCase("TCP SYN+RST", patched(SYN_PKT, b33=SYN | RST), D.BAD_TCP_FLAGS),
    ParseCase("TCP SYN+RST+ACK", patched(SYN_PKT, b33=SYN | RST | ACK), D.BAD_TCP_FLAGS),
    ParseCase("TCP SYN+FIN+RST", patched(SYN_PKT, b33=SYN | FIN | RST), D.BAD_TCP_FLAGS),
    ParseCase("UDP length 7", patched(UDP_PKT, h24=7), D.BAD_UDP_LENGTH),
    ParseCase("UDP length 0", patched(UDP_PKT, h24=0), D.BAD_UDP_LENGTH),
    ParseCase("UDP length beyond the IP payload", patched(UDP_PKT, h24=14), D.BAD_UDP_LENGTH),
    ParseCase(
        "UDP header cut off, total length consistent",
        patched(bytes(UDP_PKT)[:27], h2=27),
        D.TRUNCATED,
    ),
    ParseCase("ICMP", bytes(IP(src=CLIENT1, dst=LB, proto=1) / b"\x08\0\0\0\0\0\0\0"),
              D.NOT_TCP_UDP),
    ParseCase("first fragment (MF)", bytes(tcp(CLIENT1, LB, 1, 80, "S", ip_flags="MF")),
              D.FRAGMENT),
    ParseCase("non-first fragment (offset 1)",
              bytes(tcp(CLIENT1, LB, 1, 80, "S", ip_flags="", frag=1)), D.FRAGMENT),
    ParseCase("last fragment (offset 185, MF clear)",
              bytes(udp(CLIENT1, LB, 1, 53, b"x", ip_flags="", frag=185)), D.FRAGMENT),
    ParseCase("middle fragment (MF and offset)",
              bytes(udp(CLIENT1, LB, 1, 53, b"x", ip_flags="MF", frag=8191)), D.FRAGMENT),
    ParseCase("MF with DF", bytes(udp(CLIENT1, LB, 1, 53, b"x", ip_flags="DF+MF")), D.FRAGMENT),
]


@pytest.mark.parametrize("case", PARSE_CASES, ids=[c.description for c in PARSE_CASES])
def test_parse_table(case: ParseCase) -> None:
    end = len(case.packet) if case.end is None else case.end
    result = parse(case.packet, case.start, end)
    if isinstance(case.expect, DropReason):
        assert result == case.expect
    else:
        assert isinstance(result, tuple)
        assert Parsed(*result) == case.expect


def test_parse_accepts_bytes_bytearray_and_memoryview() -> None:
    raw = bytes(DATA_PKT)
    expected = parse(raw, 0, len(raw))
    assert parse(bytearray(raw), 0, len(raw)) == expected
    assert parse(memoryview(raw), 0, len(raw)) == expected


# --- rewrite: table ----------------------------------------------------------------------------


class Rewrite(NamedTuple):
    src: str
    dst: str
    sport: int
    dport: int


TO_B1 = Rewrite(LB, B1, NAT, WEB_BACKEND_PORT)  # client -> backend (src NAT)
TO_C1 = Rewrite(LB, CLIENT1, WEB_PORT, 40000)  # backend -> client


def with_endpoints(packet: Packet, new: Rewrite, chksum: int | None = None) -> Packet:
    """A copy of `packet` with new addresses and ports and every checksum recomputed by scapy
    (or the transport checksum forced to `chksum`)."""
    copy = IP(bytes(packet))
    copy.src, copy.dst = new.src, new.dst
    del copy.chksum
    layer = ScapyTCP if ScapyTCP in copy else ScapyUDP
    copy[layer].sport, copy[layer].dport = new.sport, new.dport
    if chksum is None:
        del copy[layer].chksum
    else:
        copy[layer].chksum = chksum
    return IP(bytes(copy))


def zero_checksum_udp() -> tuple[Packet, Packet]:
    """A UDP request and its rewrite towards B1 whose correct checksum computes to exactly 0,
    so it must be sent as 0xFFFF: the first payload word is solved for that."""
    rest = b"-lbnat-"
    template = with_endpoints(udp(CLIENT1, LB, 40000, DNS_PORT, b"\0\0" + rest),
                              Rewrite(LB, B1, NAT, DNS_BACKEND_PORT), chksum=0)
    raw = bytes(template)
    total = fx.ones_sum(struct.pack("!H", fx.pseudo_header_sum(raw)) + raw[20:])
    word = 0xFFFF - total  # total + word == 0xFFFF: the sum is negative zero, the checksum 0
    payload = struct.pack("!H", word) + rest
    request = udp(CLIENT1, LB, 40000, DNS_PORT, payload)
    rewritten = with_endpoints(request, Rewrite(LB, B1, NAT, DNS_BACKEND_PORT))
    out_raw = bytes(rewritten)
    # Proof that the case is what it claims: the computed checksum is 0, scapy sends 0xFFFF.
    zeroed = bytearray(out_raw)
    zeroed[26:28] = b"\0\0"
    pseudo = struct.pack("!4s4sBBH", out_raw[12:16], out_raw[16:20], 0, UDP, len(out_raw) - 20)
    assert scapy_checksum(pseudo + bytes(zeroed[20:])) == 0
    assert rewritten[ScapyUDP].chksum == 0xFFFF
    assert IP(bytes(request))[ScapyUDP].chksum not in (0, 0xFFFF)
    return request, rewritten


def ffff_checksum_udp() -> Packet:
    """A UDP packet whose checksum is 0xFFFF (a computed 0) before the rewrite."""
    rest = b"-lbnat-"
    raw = bytes(udp(CLIENT1, LB, 40000, DNS_PORT, b"\0\0" + rest, chksum=0))
    total = fx.ones_sum(struct.pack("!H", fx.pseudo_header_sum(raw)) + raw[20:])
    packet = IP(bytes(udp(CLIENT1, LB, 40000, DNS_PORT, struct.pack("!H", 0xFFFF - total) + rest)))
    assert packet[ScapyUDP].chksum == 0xFFFF
    return packet


@dataclass(frozen=True)
class RewriteCase:
    description: str
    packet: Packet
    new: Rewrite
    partial: bool = False
    udp_none: bool = False  # the input has UDP checksum 0, the output must keep 0


def _zero_case() -> RewriteCase:
    request, _ = zero_checksum_udp()
    return RewriteCase("UDP rewrite whose checksum computes to 0 is sent as 0xFFFF", request,
                       Rewrite(LB, B1, NAT, DNS_BACKEND_PORT))


REWRITE_CASES = [
    RewriteCase("TCP SYN client -> backend", SYN_PKT, TO_B1),
    RewriteCase(
        "TCP reply backend -> client",
        tcp(B1, LB, WEB_BACKEND_PORT, NAT, "SA", seq=5000, ack=1001), TO_C1,
    ),
    RewriteCase("TCP data, payload of odd length 1",
                tcp(CLIENT1, LB, 40000, 80, "PA", 9, 9, payload=b"\x81"), TO_B1),
    RewriteCase("TCP data, payload of odd length 1461",
                tcp(CLIENT1, LB, 40000, 80, "PA", 9, 9, payload=bytes(range(256)) * 5 + b"z" * 181),
                TO_B1),
    RewriteCase("TCP options", tcp(CLIENT1, LB, 40000, 80, "S", seq=77,
                                   options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (5, 0)),
                                            ("NOP", None), ("WScale", 9)]), TO_B1),
    RewriteCase("IP options: NOP padding (IHL 6)",
                tcp(CLIENT1, LB, 40000, 80, "A", ip_options=[IPOption_NOP()] * 4, payload=b"xyz"),
                TO_B1),
    RewriteCase("IP options: record route (IHL 7)",
                tcp(CLIENT1, LB, 40000, 80, "A", ip_options=[IPOption_RR(routers=["10.1.2.3"])]),
                TO_B1),
    RewriteCase("IP options: NOP + record route (IHL 8), UDP odd payload",
                udp(CLIENT1, LB, 40000, 53, b"odd",
                    ip_options=[IPOption_NOP(), IPOption_RR(routers=["10.1.2.3", "10.4.5.6"])]),
                Rewrite(LB, B2, NAT + 1, DNS_BACKEND_PORT)),
    RewriteCase("UDP with checksum", udp(CLIENT2, LB, 5000, 53, b"query"),
                Rewrite(LB, B2, NAT, DNS_BACKEND_PORT)),
    RewriteCase("UDP reply with checksum", udp(B2, LB, DNS_BACKEND_PORT, NAT, b"answer!"),
                Rewrite(LB, CLIENT2, DNS_PORT, 5000)),
    RewriteCase("UDP checksum 0 (none) stays 0", udp(CLIENT2, LB, 5000, 53, b"query", chksum=0),
                Rewrite(LB, B2, NAT, DNS_BACKEND_PORT), udp_none=True),
    RewriteCase("UDP reply checksum 0 (none) stays 0",
                udp(B2, LB, DNS_BACKEND_PORT, NAT, b"", chksum=0),
                Rewrite(LB, CLIENT2, DNS_PORT, 5000), udp_none=True),
    _zero_case(),
    RewriteCase("UDP input checksum 0xFFFF (a computed 0) is rewritten correctly",
                ffff_checksum_udp(), Rewrite(LB, B1, NAT, DNS_BACKEND_PORT)),
    RewriteCase("partial TCP checksum", SYN_PKT, TO_B1, partial=True),
    RewriteCase("partial TCP checksum, odd payload, IP options",
                tcp(CLIENT1, LB, 40000, 80, "PA", 3, 4, payload=b"hello",
                    ip_options=[IPOption_RR(routers=["10.1.2.3"])]), TO_B1, partial=True),
    RewriteCase("partial TCP checksum, reply direction",
                tcp(B1, LB, WEB_BACKEND_PORT, NAT, "PA", 5001, 1001, payload=b"x" * 1447), TO_C1,
                partial=True),
    RewriteCase("partial UDP checksum", udp(CLIENT2, LB, 5000, 53, b"query"),
                Rewrite(LB, B2, NAT, DNS_BACKEND_PORT), partial=True),
    RewriteCase("partial UDP checksum, odd payload, reply",
                udp(B2, LB, DNS_BACKEND_PORT, NAT, b"abc"), Rewrite(LB, CLIENT2, DNS_PORT, 5000),
                partial=True),
]


def apply_rewrite(buf: bytearray, start: int, new: Rewrite, partial: bool) -> None:
    """What the engine does per packet: parse, then rewrite with per-flow deltas."""
    headers = parse(buf, start, len(buf))
    assert isinstance(headers, tuple), headers
    proto, l4 = headers[0], headers[1]
    new_addresses = socket.inet_aton(new.src) + socket.inet_aton(new.dst)
    new_ports = struct.pack("!HH", new.sport, new.dport)
    old_addresses = bytes(buf[start + 12 : start + 20])
    old_ports = bytes(buf[l4 : l4 + 4])
    ip_delta, l4_delta = rewrite_deltas(old_addresses, new_addresses, old_ports, new_ports)
    rewrite(buf, start, l4, proto, new_addresses, new_ports, ip_delta, l4_delta, partial)


@pytest.mark.parametrize("start", [0, 14])
@pytest.mark.parametrize("case", REWRITE_CASES, ids=[c.description for c in REWRITE_CASES])
def test_rewrite_table(case: RewriteCase, start: int) -> None:
    raw = bytes(case.packet)
    if case.partial:
        raw = bytes(make_partial(raw))
    buf = bytearray(b"\xee" * start) + bytearray(raw) + b"\xdd" * 3
    apply_rewrite(buf, start, case.new, case.partial)
    assert buf[:start] == b"\xee" * start and buf[-3:] == b"\xdd" * 3, "wrote outside the packet"
    out = buf[start:-3]

    expected = with_endpoints(case.packet, case.new, chksum=0 if case.udp_none else None)
    if case.partial:
        # Before the kernel: exactly the new pseudo-header sum; after it: all correct.
        assert out == make_partial(bytes(expected))
        completed = complete_partial(out)
        verify_checksums(completed, kernel_completed=True)
        assert completed == complete_partial(make_partial(bytes(expected)))
    else:
        assert out == bytes(expected), (out.hex(), bytes(expected).hex())
        verify_checksums(out, udp_none=case.udp_none)


def test_zero_checksum_case_is_sent_as_ffff() -> None:
    request, rewritten = zero_checksum_udp()
    buf = wire(request)
    apply_rewrite(buf, 0, Rewrite(LB, B1, NAT, DNS_BACKEND_PORT), partial=False)
    assert buf[26:28] == b"\xff\xff"
    assert buf == bytes(rewritten)


# --- rewrite: properties -----------------------------------------------------------------------

ip_addresses = st.integers(0, 0xFFFFFFFF).map(fx.ip_text)
ports = st.integers(0, 0xFFFF)
IP_OPTION_SETS: list[list[Any]] = [
    [],
    [IPOption_NOP()] * 4,
    [IPOption_RR(routers=["10.0.0.1"])],
    [IPOption_NOP(), IPOption_RR(routers=["10.0.0.1", "192.0.2.200"])],
    [IPOption_RR(routers=["10.0.0.1"] * 9)],  # IHL 15, the maximum
]
TCP_OPTION_SETS: list[list[tuple[str, Any]]] = [
    [], [("MSS", 1460)], [("NOP", None), ("WScale", 14)], [("SAckOK", b""), ("NOP", None)],
]


@st.composite
def random_packets(draw: st.DrawFn) -> tuple[Packet, bool]:
    """(packet, udp_none): a random TCP or UDP packet, possibly with IP options."""
    proto = draw(st.sampled_from([TCP, UDP]))
    src, dst = draw(ip_addresses), draw(ip_addresses)
    sport, dport = draw(ports), draw(ports)
    payload = draw(st.binary(max_size=64))
    ip_options = draw(st.sampled_from(IP_OPTION_SETS))
    if proto == TCP:
        flags = draw(st.sampled_from(["S", "SA", "A", "PA", "FA", "R", "RA"]))
        seq, ack = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
        options = draw(st.sampled_from(TCP_OPTION_SETS))
        packet = tcp(src, dst, sport, dport, flags, seq, ack, draw(ports), payload, options,
                     ip_options)
        return packet, False
    udp_none = draw(st.booleans())
    return udp(src, dst, sport, dport, payload, 0 if udp_none else None, ip_options), udp_none


rewrites = st.builds(Rewrite, ip_addresses, ip_addresses, ports, ports)


@SETTINGS
@given(random_packets(), rewrites)
def test_incremental_update_equals_full_recompute(drawn: tuple[Packet, bool], new: Rewrite) -> None:
    packet, udp_none = drawn
    buf = wire(packet)
    apply_rewrite(buf, 0, new, partial=False)
    expected = with_endpoints(packet, new, chksum=0 if udp_none else None)
    assert buf == bytes(expected)
    verify_checksums(buf, udp_none=udp_none)


@SETTINGS
@given(random_packets(), rewrites)
def test_partial_update_equals_full_recompute_after_completion(
    drawn: tuple[Packet, bool], new: Rewrite
) -> None:
    packet, _ = drawn
    buf = make_partial(bytes(packet))
    apply_rewrite(buf, 0, new, partial=True)
    expected = with_endpoints(packet, new)
    assert buf == make_partial(bytes(expected))
    completed = complete_partial(buf)
    verify_checksums(completed, kernel_completed=True)


@SETTINGS
@given(st.integers(1, 20), st.integers(0, 10), st.data())
def test_delta_matches_full_checksums(words: int, prefix_words: int, data: st.DataObject) -> None:
    """RFC 1624 on a bare buffer: changing words updates the checksum as a recompute would."""
    old = data.draw(st.binary(min_size=2 * words, max_size=2 * words))
    new = data.draw(st.binary(min_size=2 * words, max_size=2 * words))
    prefix = data.draw(st.binary(min_size=2 * prefix_words, max_size=2 * prefix_words))
    before = checksum(prefix + old)
    after = apply_delta(before, delta(old, new))
    if any(prefix + new):  # an all-zero buffer is the one place where 0 and 0xFFFF differ
        assert after == checksum(prefix + new)


def test_ones_sum_and_checksum_match_scapy() -> None:
    samples = (b"", b"\x01", b"\xff\xff", b"\xff\xff\xff\xff", b"\x12\x34\x56", bytes(range(255)))
    for data in samples:
        assert checksum(data) == scapy_checksum(data)
        assert ones_sum(data) == fx.ones_sum(data)


def test_delta_rejects_odd_lengths() -> None:
    with pytest.raises(ValueError):
        delta(b"\0", b"\1")
    with pytest.raises(ValueError):
        delta(b"\0\0", b"\0\0\0")


def test_delta_of_unequal_lengths_is_the_change_of_the_sum() -> None:
    old, new = bytes(range(1, 33)), bytes(range(200, 208))
    prefix = b"\x12\x34\x00\x06"
    before, after = checksum(prefix + old), checksum(prefix + new)
    assert apply_delta(before, delta(old, new)) == after


def test_seq_after_wraps() -> None:
    assert seq_after(1, 0)
    assert not seq_after(0, 1)
    assert not seq_after(5, 5)
    assert seq_after(3, 0xFFFFFFF0)
    assert not seq_after(0x80000000, 0)  # exactly half the space is not "after"


def test_tcp_segment_is_correct() -> None:
    raw = tcp_segment(addr(LB), addr(CLIENT1), 80, 40000, 0, 1001, RST | ACK)
    verify_checksums(raw)
    packet = IP(raw)
    assert (packet.src, packet.dst) == (LB, CLIENT1)
    assert (packet[ScapyTCP].sport, packet[ScapyTCP].dport) == (80, 40000)
    assert packet[ScapyTCP].flags == "RA" and packet[ScapyTCP].ack == 1001


# --- robustness ----------------------------------------------------------------------------------


def assert_sane(result: Any, buf: bytes | bytearray, start: int, end: int) -> None:
    """A drop reason, or headers that lie inside buf[start:end]."""
    if isinstance(result, DropReason):
        return
    assert isinstance(result, tuple) and len(result) == 11
    proto, l4 = result[0], result[1]
    assert proto in (TCP, UDP)
    assert start + 20 <= l4 <= end - (20 if proto == TCP else 8)
    assert 0 <= result[10] <= end - l4
    assert all(isinstance(value, int) and value >= 0 for value in result)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=96), st.integers(-2, 100), st.integers(-2, 110))
def test_parse_never_raises_on_arbitrary_bytes(buf: bytes, start: int, end: int) -> None:
    assert_sane(parse(buf, start, end), buf, start, end)


@st.composite
def ipv4_like(draw: st.DrawFn) -> bytes:
    """Bytes that look like IPv4 + TCP/UDP headers so random junk reaches the deeper checks."""
    ihl = draw(st.integers(0, 15))
    proto = draw(st.sampled_from([TCP, UDP, 1]))
    body = draw(st.binary(min_size=0, max_size=80))
    total = draw(st.one_of(st.just(20 + len(body)), st.integers(0, 200)))
    frag = draw(st.sampled_from([0, 0x4000, 0x2000, 1]))
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0, frag, 64, proto, 0,
                         b"\1\2\3\4", b"\5\6\7\x08")
    return header + body


@settings(max_examples=300, deadline=None)
@given(ipv4_like())
def test_parse_never_raises_on_ipv4_like_junk(buf: bytes) -> None:
    assert_sane(parse(buf, 0, len(buf)), buf, 0, len(buf))


@settings(max_examples=60, deadline=None)
@given(random_packets())
def test_parse_every_truncation_of_a_valid_packet(drawn: tuple[Packet, bool]) -> None:
    raw = bytes(drawn[0])
    full = parse(raw, 0, len(raw))
    assert isinstance(full, tuple)
    for k in range(len(raw)):
        for buf in (raw[:k], raw):  # a short buffer, and a full one with a short end
            result = parse(buf, 0, k)
            assert_sane(result, buf, 0, k)
            assert isinstance(result, DropReason), f"a packet cut at {k} was accepted"


@settings(max_examples=150, deadline=None)
@given(random_packets(), st.data())
def test_parse_never_raises_on_corrupted_packets(
    drawn: tuple[Packet, bool], data: st.DataObject
) -> None:
    buf = bytearray(bytes(drawn[0]))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(buf) - 1))
        buf[at] = data.draw(st.integers(0, 255))
    assert_sane(parse(buf, 0, len(buf)), buf, 0, len(buf))


# --- tcp_window_scale ------------------------------------------------------------------------


@dataclass(frozen=True)
class WscaleCase:
    description: str
    options: list[tuple[str, Any]] | bytes
    expect: int | None


WSCALE_CASES = [
    WscaleCase("no options", [], None),
    WscaleCase("window scale 7", [("WScale", 7)], 7),
    WscaleCase("after MSS, SACK, timestamps", [("MSS", 1460), ("SAckOK", b""),
                                               ("Timestamp", (1, 2)), ("NOP", None),
                                               ("WScale", 3)], 3),
    WscaleCase("window scale 0", [("NOP", None), ("WScale", 0)], 0),
    WscaleCase("window scale 20 capped at 14", [("WScale", 20)], 14),
    WscaleCase("end of options before it", b"\x00\x03\x03\x07", None),
    WscaleCase("an option of length 0 stops the walk", b"\x08\x00\x03\x03\x07\x00\x00\x00", None),
    WscaleCase("an option of length 1 stops the walk", b"\x08\x01\x03\x03\x07\x00\x00\x00", None),
    WscaleCase("window scale with a bad length is skipped", b"\x03\x04\x07\x00\x03\x03\x05\x00", 5),
    WscaleCase("truncated window scale", b"\x01\x01\x01\x03", None),
    WscaleCase("an option longer than the header", b"\x08\x40\x03\x03\x07\x00\x00\x00", None),
]


def syn_with_raw_options(options: bytes) -> bytes:
    header = struct.pack("!HHIIBBHHH", 1, 2, 3, 0, (5 + len(options) // 4) << 4, SYN, 0, 0, 0)
    return header + options


@pytest.mark.parametrize("case", WSCALE_CASES, ids=[c.description for c in WSCALE_CASES])
def test_tcp_window_scale_table(case: WscaleCase) -> None:
    if isinstance(case.options, bytes):
        segment = syn_with_raw_options(case.options)
        raw = bytes(20) + segment
    else:
        raw = bytes(tcp(CLIENT1, LB, 1, 80, "S", options=case.options))
    assert tcp_window_scale(raw, 20, len(raw)) == case.expect


def test_tcp_window_scale_respects_end() -> None:
    raw = bytes(tcp(CLIENT1, LB, 1, 80, "S", options=[("NOP", None), ("WScale", 7)]))
    assert tcp_window_scale(raw, 20, len(raw)) == 7
    assert tcp_window_scale(raw, 20, len(raw) - 2) is None  # the option is past the end
    assert tcp_window_scale(raw, 20, 32) is None  # the header itself is cut


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.data())
def test_tcp_window_scale_never_raises(buf: bytes, data: st.DataObject) -> None:
    l4 = data.draw(st.integers(0, len(buf)))
    end = data.draw(st.integers(l4, len(buf)))
    result = tcp_window_scale(buf, l4, end)
    assert result is None or 0 <= result <= 14
