"""The tc program's IPv6 path (issue 21) in the kernel, through lbnat.dataplane.tcbpf.

As tests/unit/test_tcbpf.py for IPv4: the program is loaded for real and run with
BPF_PROG_TEST_RUN on scapy-built frames. Every rewritten IPv6 frame must equal, byte for byte,
the packet scapy builds from scratch with the new addresses and ports and a checksum computed
in full (there is no IPv6 rewrite in lbnat.packet to compare with yet), plus the entry's
Ethernet addresses, and come back as TC_ACT_REDIRECT; its checksum verifies in scapy. Each
such frame is run twice: as the CHECKSUM_NONE skb BPF_PROG_TEST_RUN makes by default, and as a
CHECKSUM_COMPLETE one (BPF_F_TEST_SKB_CHECKSUM_COMPLETE: the kernel checks afterwards that
skb->csum still matches the packet, which needs the BPF_F_IPV6 flag on the checksum helpers).
Frames the program must not touch come back as TC_ACT_UNSPEC, unchanged, counters unchanged.

The entries are packed here by hand with struct (the layouts in the program's source), except
in the tests at the end, which take them from lbnat.fastpath (`flow_entries`, `FastPath`) for
rows made as the contract says (tests/unit/rows6.py): the engine's side and the kernel's agree.

A partial checksum (CHECKSUM_PARTIAL) and a GSO super-packet cannot be made by
BPF_PROG_TEST_RUN: tests/integration/test_tcbpf6_netns.py sends them through a veth. Root and
`make bpf` needed (skipped otherwise; failed under CI=true).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Packet

from lbnat import addresses
from lbnat.dataplane import tcbpf
from lbnat.fastpath import KEY6, VALUE6, FastPath, flow_entries
from lbnat.nat import Session, State
from lbnat.packet import delta
from tests.unit import rows6 as r6
from tests.unit.test_tcbpf import clear, program  # noqa: F401 (the loaded program, a fixture)

KEY = struct.Struct("!16s16sHHB3x")  # struct flow_key6
VALUE = struct.Struct("<32s4sHH12sIQQQIHBx")  # struct flow_value6
ETH_IN = bytes.fromhex("020000000001020000000002")
ETH_OUT = bytes.fromhex("02000000aa0102000000bb02")
IFINDEX = 7
TCP_N, UDP_N = 6, 17

CLIENT, VIP, BACKEND = r6.CLIENT6, r6.VIP6, r6.BACKEND6
CPORT, VPORT, NAT_PORT, BPORT = 40000, 80, 61000, 8080


@pytest.fixture(scope="module")
def flows6(program: tcbpf.TcProgram) -> Iterator[tcbpf.FlowMap]:  # noqa: F811
    flow_map = tcbpf.FlowMap(program.map6_fd)
    try:
        yield flow_map
    finally:
        flow_map.close()


@pytest.fixture(scope="module")
def flows4(program: tcbpf.TcProgram) -> Iterator[tcbpf.FlowMap]:  # noqa: F811
    flow_map = tcbpf.FlowMap(program.map_fd)
    try:
        yield flow_map
    finally:
        flow_map.close()


@pytest.fixture(autouse=True)
def empty_maps(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that uses a map starts and ends with both empty."""
    if "flows6" not in request.fixturenames and "flows4" not in request.fixturenames:
        yield
        return
    maps = [request.getfixturevalue(name) for name in ("flows6", "flows4")]
    for flow_map in maps:
        clear(flow_map)
    yield
    for flow_map in maps:
        clear(flow_map)


def b16(text: str) -> bytes:
    return r6.packed(text)


@dataclass(frozen=True)
class Flow6(r6.Rewrite6):
    """One direction of a flow as the engine would offload it, its entry packed by hand."""

    eth: bytes = ETH_OUT
    ifindex: int = IFINDEX

    def key(self) -> bytes:
        return KEY.pack(b16(self.src), b16(self.dst), self.sport, self.dport, self.proto)

    def old_addresses(self) -> bytes:
        return b16(self.src) + b16(self.dst)

    def new_addresses(self) -> bytes:
        return b16(self.new_src) + b16(self.new_dst)

    def value(self) -> bytes:
        ip_delta = delta(self.old_addresses(), self.new_addresses())
        port_delta = delta(
            struct.pack("!HH", self.sport, self.dport),
            struct.pack("!HH", self.new_sport, self.new_dport),
        )
        return VALUE.pack(
            self.new_addresses(), struct.pack("!HH", self.new_sport, self.new_dport),
            ip_delta, port_delta, self.eth, self.ifindex, 0, 0, 0, 0, 0, 0,
        )  # fmt: skip


TO_BACKEND = Flow6(TCP_N, CLIENT, VIP, CPORT, VPORT, VIP, BACKEND, NAT_PORT, BPORT)
TO_CLIENT = Flow6(TCP_N, BACKEND, VIP, BPORT, NAT_PORT, VIP, CLIENT, VPORT, CPORT)
UDP_TO_BACKEND = Flow6(UDP_N, CLIENT, VIP, CPORT, 53, VIP, BACKEND, NAT_PORT, 5353)
UDP_TO_CLIENT = Flow6(UDP_N, BACKEND, VIP, 5353, NAT_PORT, VIP, CLIENT, 53, CPORT)
ALL_FLOWS = (TO_BACKEND, TO_CLIENT, UDP_TO_BACKEND, UDP_TO_CLIENT)


def frame(packet: Packet | bytes, trailer: bytes = b"", ethertype: bytes = b"\x86\xdd") -> bytes:
    return ETH_IN + ethertype + bytes(packet) + trailer


def counters(flow_map: tcbpf.FlowMap, key: bytes) -> tuple[int, ...]:
    """(packets, bytes, last_seen_ns, ack, window, acked)"""
    value = flow_map.get(key)
    assert value is not None, "the entry is gone"
    return tuple(VALUE.unpack(value)[6:])


def tcp_to_backend(**kw: Any) -> Packet:
    return r6.tcp6(CLIENT, VIP, CPORT, VPORT, **kw)


def tcp_to_client(**kw: Any) -> Packet:
    return r6.tcp6(BACKEND, VIP, BPORT, NAT_PORT, **kw)


def udp_to_backend(payload: bytes = b"", **kw: Any) -> Packet:
    return r6.udp6(CLIENT, VIP, CPORT, 53, payload, **kw)


# --- frames the program rewrites ------------------------------------------------------------


@dataclass(frozen=True)
class Rewritten:
    name: str
    flow: Flow6
    packet: Packet
    trailer: bytes = b""
    ack: int | None = None  # the segment's ack/window land in the entry (TCP with ACK)
    window: int = 0


def udp_computing_zero() -> Packet:
    """A datagram whose checksum after the rewrite sums to 0 (sent as 0xFFFF): its first
    payload word is the checksum the rewritten datagram has with that word 0 (adding the
    checksum's value to the sum it complements makes that sum 0xFFFF, a ones' complement 0)."""
    base = udp_to_backend(b"\0\0zero")
    word = r6.expected(bytes(base), UDP_TO_BACKEND)[46:48]
    packet = udp_to_backend(word + b"zero")
    assert r6.expected(bytes(packet), UDP_TO_BACKEND)[46:48] == b"\xff\xff"
    assert bytes(packet)[46:48] != b"\0\0"
    return packet


REWRITTEN = [
    Rewritten("tcp ack with data, client to the VIP", TO_BACKEND,
              tcp_to_backend(flags="PA", seq=1000, ack=5000, window=501, payload=b"hi" * 50),
              ack=5000, window=501),
    Rewritten("tcp pure ack, the backend's reply", TO_CLIENT,
              tcp_to_client(flags="A", seq=9, ack=0xFFFFFFF0, window=65535),
              ack=0xFFFFFFF0, window=65535),
    Rewritten("tcp data to the client", TO_CLIENT,
              tcp_to_client(flags="PA", seq=9, ack=77, window=3, payload=b"\xff" * 1201),
              ack=77, window=3),
    Rewritten("tcp with TCP options (timestamps)", TO_BACKEND,
              tcp_to_backend(flags="A", ack=1, window=1024, payload=b"y" * 7,
                             options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]),
              ack=1, window=1024),
    Rewritten("tcp without ACK (PSH alone): rewritten, ack/window not taken", TO_BACKEND,
              tcp_to_backend(flags="P", seq=1, ack=99, window=5, payload=b"data")),
    Rewritten("traffic class, flow label and hop limit 1 are left alone", TO_BACKEND,
              tcp_to_backend(flags="A", ack=3, window=9, tc=0xB8, fl=0xABCDE, hlim=1),
              ack=3, window=9),
    Rewritten("tcp with bytes after the packet (Ethernet trailer)", TO_BACKEND,
              tcp_to_backend(flags="A", ack=12, window=7), trailer=b"\0" * 6, ack=12, window=7),
    Rewritten("udp datagram", UDP_TO_BACKEND, udp_to_backend(b"\x12\x34query" * 9)),
    Rewritten("udp reply", UDP_TO_CLIENT,
              r6.udp6(BACKEND, VIP, 5353, NAT_PORT, b"answer" * 40)),
    Rewritten("udp empty datagram", UDP_TO_BACKEND, udp_to_backend()),
    Rewritten("udp odd length", UDP_TO_BACKEND, udp_to_backend(b"odd")),
    Rewritten("udp checksum computing to 0 is sent as 0xFFFF", UDP_TO_BACKEND,
              udp_computing_zero()),
]  # fmt: skip


@pytest.mark.parametrize("complete", [False, True], ids=["checksum none", "checksum complete"])
@pytest.mark.parametrize("case", REWRITTEN, ids=[c.name for c in REWRITTEN])
def test_the_program_rewrites_ipv6_as_a_full_recompute_does(
    program: tcbpf.TcProgram,  # noqa: F811
    flows6: tcbpf.FlowMap,
    flows4: tcbpf.FlowMap,
    case: Rewritten,
    complete: bool,
) -> None:
    assert flows6.put(case.flow.key(), case.flow.value())
    raw = frame(case.packet, case.trailer)
    before = time.monotonic_ns()
    retval, out = program.test_run(raw, checksum_complete=complete)
    after = time.monotonic_ns()

    assert retval == tcbpf.TC_ACT_REDIRECT
    ip_part = out[14 : len(out) - len(case.trailer)]
    assert out[:12] == case.flow.eth and out[12:14] == b"\x86\xdd"
    assert ip_part.hex() == r6.expected(bytes(case.packet), case.flow).hex()
    assert out[len(out) - len(case.trailer) :] == case.trailer
    assert r6.checksum_ok(ip_part)
    if "0xFFFF" in case.name:
        assert ip_part[46:48] == b"\xff\xff"

    packets, octets, seen_ns, ack, window, acked = counters(flows6, case.flow.key())
    assert (packets, octets) == (1, len(raw) - 14)
    assert before <= seen_ns <= after
    if case.ack is None:
        assert (ack, window, acked) == (0, 0, 0)
    else:
        assert (ack, window, acked) == (case.ack, case.window, 1)
    assert flows4.keys() == []

    retval, again = program.test_run(raw, checksum_complete=complete)
    assert retval == tcbpf.TC_ACT_REDIRECT and again == out
    assert counters(flows6, case.flow.key())[:2] == (2, 2 * (len(raw) - 14))


# --- frames the program passes up, untouched ------------------------------------------------


def patched(packet: Packet, changes: dict[int, int]) -> bytes:
    """The IPv6 packet's bytes with some changed after scapy built it."""
    buf = bytearray(bytes(packet))
    for at, value in changes.items():
        buf[at] = value
    return bytes(buf)


ACK6 = tcp_to_backend(flags="A", ack=1, payload=b"abc")
TCP_HEADER = TCP(sport=CPORT, dport=VPORT, flags="A", ack=1)
ACK4 = IP(src="198.18.0.11", dst="198.18.0.2") / TCP(sport=CPORT, dport=VPORT, flags="A")


def with_ext(*headers: Packet) -> bytes:
    """The flow's ACK segment behind extension headers (the entry for it is in the map)."""
    packet: Packet = IPv6(src=CLIENT, dst=VIP)
    for header in headers:
        packet = packet / header
    return bytes(packet / TCP_HEADER / b"abc")


@dataclass(frozen=True)
class PassedUp:
    name: str
    raw: bytes  # the whole frame


PASSED_UP = [
    PassedUp("no entry for the key (another client port)",
             frame(r6.tcp6(CLIENT, VIP, CPORT + 1, VPORT, flags="A"))),
    PassedUp("no entry: the proto differs (UDP to a TCP flow's ports)",
             frame(r6.udp6(CLIENT, VIP, CPORT, VPORT, b"u"))),
    PassedUp("SYN", frame(tcp_to_backend(flags="S", seq=1))),
    PassedUp("SYN-ACK", frame(tcp_to_client(flags="SA", seq=1, ack=2))),
    PassedUp("FIN-ACK", frame(tcp_to_backend(flags="FA", ack=1))),
    PassedUp("RST", frame(tcp_to_backend(flags="R"))),
    PassedUp("RST-ACK", frame(tcp_to_client(flags="RA", ack=1))),
    PassedUp("no TCP flags at all", frame(tcp_to_backend(flags=""))),
    PassedUp("hop-by-hop options header", frame(with_ext(IPv6ExtHdrHopByHop()))),
    PassedUp("destination options header", frame(with_ext(IPv6ExtHdrDestOpt()))),
    PassedUp("routing header", frame(with_ext(IPv6ExtHdrRouting(addresses=[BACKEND])))),
    PassedUp("first fragment", frame(with_ext(IPv6ExtHdrFragment(m=1, id=7)))),
    PassedUp("atomic fragment (offset 0, no M)", frame(with_ext(IPv6ExtHdrFragment(id=8)))),
    PassedUp("later fragment",
             frame(bytes(IPv6(src=CLIENT, dst=VIP) / IPv6ExtHdrFragment(nh=6, offset=3, id=9)
                         / (b"\0" * 24)))),
    PassedUp("ICMPv6 echo to the VIP",
             frame(IPv6(src=CLIENT, dst=VIP) / ICMPv6EchoRequest(id=CPORT, seq=VPORT))),
    PassedUp("NDP neighbour solicitation",
             frame(IPv6(src=CLIENT, dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(tgt=VIP))),
    PassedUp("TCP data offset below 5", frame(tcp_to_backend(flags="A", ack=1, dataofs=4))),
    PassedUp("TCP data offset past the segment",
             frame(tcp_to_backend(flags="A", ack=1, dataofs=15))),
    PassedUp("UDP length below 8", frame(udp_to_backend(b"abcd", len=7))),
    PassedUp("UDP length past the datagram", frame(udp_to_backend(b"abcd", len=40))),
    PassedUp("UDP checksum 0 (not allowed in IPv6: the engine's to judge)",
             frame(udp_to_backend(b"no checksum", chksum=0))),
    PassedUp("payload length past the frame", frame(patched(ACK6, {4: 0x01, 5: 0x00}))),
    PassedUp("payload length 0 (a jumbogram's)", frame(patched(ACK6, {4: 0, 5: 0}))),
    PassedUp("payload length below the TCP header", frame(patched(ACK6, {4: 0, 5: 12}))),
    PassedUp("TCP header cut short", frame(patched(ACK6, {5: 10})[:50])),
    PassedUp("version 4 in an IPv6 frame", frame(patched(ACK6, {0: 0x40}))),
    PassedUp("an IPv4 packet in an IPv6 frame", frame(ACK4)),
    PassedUp("an IPv6 packet in an IPv4 frame", frame(ACK6, ethertype=b"\x08\x00")),
    PassedUp("VLAN-tagged", ETH_IN + b"\x81\x00\x00\x05\x86\xdd" + bytes(ACK6)),
    PassedUp("IPv6 header cut short, padded to the 60-byte minimum frame",
             frame(bytes(ACK6)[:30], trailer=b"\0" * 16)),
]  # fmt: skip


@pytest.mark.parametrize("case", PASSED_UP, ids=[c.name for c in PASSED_UP])
def test_the_program_passes_up_what_is_not_an_offloaded_ipv6_flow(
    program: tcbpf.TcProgram,  # noqa: F811
    flows6: tcbpf.FlowMap,
    case: PassedUp,
) -> None:
    for flow in ALL_FLOWS:
        assert flows6.put(flow.key(), flow.value())
    retval, out = program.test_run(case.raw)
    assert retval == tcbpf.TC_ACT_UNSPEC
    assert out.hex() == case.raw.hex()
    for flow in ALL_FLOWS:
        assert counters(flows6, flow.key())[0] == 0


def test_an_ipv4_entry_does_not_match_an_ipv6_packet_nor_the_reverse(
    program: tcbpf.TcProgram,  # noqa: F811
    flows6: tcbpf.FlowMap,
    flows4: tcbpf.FlowMap,
) -> None:
    """Each family has its own map: an IPv6 packet never looks in the IPv4 one."""
    ipv4_key = struct.pack("!IIHHB3x", 0x0B, 0x02, CPORT, VPORT, TCP_N)
    v4_value = b"\0" * 64
    assert flows4.put(ipv4_key, v4_value)
    zero_v6 = IPv6(src="::11", dst="::2") / TCP(sport=CPORT, dport=VPORT, flags="A")
    raw = frame(zero_v6)
    assert program.test_run(raw) == (tcbpf.TC_ACT_UNSPEC, raw)
    assert flows6.put(TO_BACKEND.key(), TO_BACKEND.value())
    raw4 = ETH_IN + b"\x08\x00" + bytes(ACK4)
    assert program.test_run(raw4) == (tcbpf.TC_ACT_UNSPEC, raw4)


# --- the property ---------------------------------------------------------------------------

v6_addresses = st.integers(min_value=1, max_value=(1 << 128) - 1).map(
    lambda value: addresses.text(addresses.V6 | value)
)
ports = st.integers(min_value=1, max_value=65535)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    proto=st.sampled_from([TCP_N, UDP_N]),
    old=st.tuples(v6_addresses, v6_addresses, ports, ports),
    new=st.tuples(v6_addresses, v6_addresses, ports, ports),
    payload=st.binary(max_size=1400),
    ack=st.integers(min_value=0, max_value=0xFFFFFFFF),
    window=st.integers(min_value=0, max_value=0xFFFF),
    eth=st.binary(min_size=12, max_size=12),
    complete=st.booleans(),
)
def test_kernel_and_a_full_recompute_agree_on_random_ipv6_flows(
    program: tcbpf.TcProgram,  # noqa: F811
    flows6: tcbpf.FlowMap,
    proto: int,
    old: tuple[str, str, int, int],
    new: tuple[str, str, int, int],
    payload: bytes,
    ack: int,
    window: int,
    eth: bytes,
    complete: bool,
) -> None:
    flow = Flow6(proto, *old, *new, eth=eth)
    if proto == TCP_N:
        packet = r6.tcp6(*old, flags="PA", ack=ack, window=window, payload=payload)
    else:
        packet = r6.udp6(*old, payload)
        if bytes(packet)[46:48] == b"\0\0":  # scapy sends a computed 0 as 0xFFFF: never
            return
    raw = frame(packet)
    assert flows6.put(flow.key(), flow.value())
    try:
        retval, out = program.test_run(raw, checksum_complete=complete)
        assert retval == tcbpf.TC_ACT_REDIRECT
        assert out[:12] == eth
        assert out[14:].hex() == r6.expected(bytes(packet), flow).hex()
        assert r6.checksum_ok(out[14:])
        if proto == TCP_N:
            assert counters(flows6, flow.key())[3:] == (ack, window, 1)
    finally:
        flows6.delete(flow.key())


# --- lbnat.fastpath's entries in the kernel ---------------------------------------------------

OUR_MAC = bytes.fromhex("02aa00000002")


def header_for(ip: int) -> bytes:
    """The data plane's Ethernet header for a frame to `ip` (a MAC made of the address)."""
    return bytes.fromhex("02bb") + addresses.packed(ip)[-4:] + OUR_MAC + b"\x86\xdd"


@pytest.mark.parametrize("proto", [TCP_N, UDP_N], ids=["tcp", "udp"])
def test_fastpath_s_ipv6_entries_rewrite_both_directions(
    program: tcbpf.TcProgram,  # noqa: F811
    flows6: tcbpf.FlowMap,
    flows4: tcbpf.FlowMap,
    proto: int,
) -> None:
    """A row made as the contract says, offloaded by FastPath into the real maps: the client's
    packet and the backend's reply come out as the engine's rewrite (the row's own bytes) with
    a full recompute's checksum, to the MACs of the row's next hops."""
    fastpath = FastPath(flows4, header_for, IFINDEX, flows6)
    row = r6.make_row(proto=proto, seen=1.0)
    fastpath.changed(row)
    fastpath.settle(2.0)
    assert row in fastpath and fastpath.offloaded == 1
    assert flows4.keys() == [] and len(flows6.keys()) == 2

    lb = r6.VIP6  # the LB's IPv6 address is the VIP and the source towards backends
    forward = r6.Rewrite6(proto, r6.CLIENT6, r6.VIP6, r6.CPORT, r6.SPORT, lb, r6.BACKEND6,
                          r6.NAT_PORT, r6.BPORT)  # fmt: skip
    reply = r6.Rewrite6(proto, r6.BACKEND6, lb, r6.BPORT, r6.NAT_PORT, r6.VIP6, r6.CLIENT6,
                        r6.SPORT, r6.CPORT)  # fmt: skip
    for flow, hop in ((forward, r6.BACKEND6), (reply, r6.CLIENT6)):
        if proto == TCP_N:
            packet = r6.tcp6(flow.src, flow.dst, flow.sport, flow.dport, "PA", 5, 6, b"x" * 99)
        else:
            packet = r6.udp6(flow.src, flow.dst, flow.sport, flow.dport, b"q" * 99)
        retval, out = program.test_run(frame(packet))
        assert retval == tcbpf.TC_ACT_REDIRECT
        assert out[:12] == header_for(addresses.parse(hop))[:12]
        assert out[14:].hex() == r6.expected(bytes(packet), flow).hex()

    # the kernel's counts come back into the row's pool and service
    fastpath.sync()
    assert fastpath.packets == 2 and row.pool.to_backend_packets == 1
    assert row.pool.to_client_packets == 1 and row.service.packets == 2
    fastpath.withdraw(row)
    assert flows6.keys() == [] and row not in fastpath


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    proto=st.sampled_from([TCP_N, UDP_N]),
    hosts=st.tuples(v6_addresses, v6_addresses, v6_addresses),
    ports=st.tuples(ports, ports, ports, ports),
    payload=st.binary(max_size=600),
    towards_client=st.booleans(),
)
def test_any_ipv6_row_s_entries_rewrite_as_a_full_recompute_does(
    program: tcbpf.TcProgram,  # noqa: F811
    flows6: tcbpf.FlowMap,
    flows4: tcbpf.FlowMap,
    proto: int,
    hosts: tuple[str, str, str],
    ports: tuple[int, int, int, int],
    payload: bytes,
    towards_client: bool,
) -> None:
    """The row's own bytes and deltas (lbnat.fastpath's entries, not the hand-packed ones)
    over random addresses and ports, either direction."""
    client, vip, backend = hosts
    client_port, service_port, backend_port, nat_port = ports
    # the two entries' keys differ (a backend is never the client on the same ports)
    assume((client, client_port, service_port) != (backend, backend_port, nat_port))
    row = r6.make_row(proto, client, client_port, vip, service_port, vip, backend,
                      backend_port, nat_port, seen=1.0)  # fmt: skip
    if towards_client:
        flow = r6.Rewrite6(proto, backend, vip, backend_port, nat_port, vip, client,
                           service_port, client_port)  # fmt: skip
    else:
        flow = r6.Rewrite6(proto, client, vip, client_port, service_port, vip, backend,
                           nat_port, backend_port)  # fmt: skip
    if proto == TCP_N:
        packet = r6.tcp6(flow.src, flow.dst, flow.sport, flow.dport, "A", 1, 2, payload)
    else:
        packet = r6.udp6(flow.src, flow.dst, flow.sport, flow.dport, payload)
    fastpath = FastPath(flows4, header_for, IFINDEX, flows6)
    fastpath.changed(row)
    fastpath.settle(2.0)
    try:
        assert row in fastpath
        retval, out = program.test_run(frame(packet))
        assert retval == tcbpf.TC_ACT_REDIRECT
        assert out[14:].hex() == r6.expected(bytes(packet), flow).hex()
    finally:
        fastpath.removed(row)
    assert flows6.keys() == []


@pytest.mark.parametrize("cls", [r6.Nat64Session, Session], ids=["Nat64Session", "Session"])
def test_a_nat64_row_never_enters_either_map(
    flows6: tcbpf.FlowMap,
    flows4: tcbpf.FlowMap,
    cls: type[Session],
) -> None:
    """An IPv6 client with an IPv4 backend: neither map can express it (the program does not
    translate headers). Kept out by its class, and by its address blocks' lengths (32, 8)
    even as a plain Session."""
    fastpath = FastPath(flows4, header_for, IFINDEX, flows6)
    row = r6.nat64_row(cls=cls, seen=1.0)
    assert (len(row.rev_addresses), len(row.pool.fwd_addresses)) == (32, 8)
    fastpath.changed(row)
    fastpath.settle(2.0)
    assert row not in fastpath and fastpath.offloaded == 0 and fastpath.refused == 0
    assert flows4.keys() == [] and flows6.keys() == []
    with pytest.raises(ValueError, match="NAT64"):
        flow_entries(row, header_for, IFINDEX)


def test_the_maps_have_the_contract_s_sizes(flows6: tcbpf.FlowMap, flows4: tcbpf.FlowMap) -> None:
    assert (flows6.key_size, flows6.value_size) == (KEY6.size, VALUE6.size) == (40, 88)
    assert (flows4.key_size, flows4.value_size) == (16, 64)
    assert flows6.max_entries == flows4.max_entries == 1024
    with pytest.raises(ValueError):
        flows6.put(TO_BACKEND.key()[:16], TO_BACKEND.value())
    with pytest.raises(ValueError):
        flows6.put(TO_BACKEND.key(), TO_BACKEND.value()[:64])
    with pytest.raises(ValueError):
        flows6.get(b"\0" * 16)
    assert flows6.put(TO_BACKEND.key(), TO_BACKEND.value())
    assert flows6.get(TO_BACKEND.key()) == TO_BACKEND.value()
    assert flows6.keys() == [TO_BACKEND.key()]
    flows6.delete(TO_BACKEND.key())
    assert flows6.get(TO_BACKEND.key()) is None


def test_a_row_in_the_kernel_follows_the_engine_s_state(
    flows6: tcbpf.FlowMap, flows4: tcbpf.FlowMap
) -> None:
    """A FIN (its row leaves ESTABLISHED) takes it out; a row not yet settled never went in."""
    fastpath = FastPath(flows4, header_for, IFINDEX, flows6)
    row = r6.make_row(seen=1.0)
    fastpath.changed(row)
    fastpath.settle(1.01)
    assert flows6.keys() == []
    fastpath.settle(2.0)
    assert len(flows6.keys()) == 2
    row.state = State.FIN_WAIT
    fastpath.changed(row)
    assert flows6.keys() == [] and fastpath.withdrawn == 1
