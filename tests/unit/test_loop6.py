"""The packet loop with two sockets (lbnat.dataplane.loop.PacketLoop): frames read HEADROOM
bytes into the buffer, each family sent on its own socket, a translated packet (NAT64) framed
before its new start, IPv6 packets lbnat makes with 0x86DD. Fake sockets and a scripted engine:
no root, no kernel."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from lbnat import addresses
from lbnat.actions import DROP, FORWARD, REPLY, TRANSLATED, Action
from lbnat.dataplane.kernel import HEADROOM, IP_OFFSET, VNET_HDR
from lbnat.dataplane.link import Link, Neighbours
from lbnat.dataplane.loop import PacketLoop
from lbnat.engine import Engine

OUR_MAC = bytes.fromhex("020000000002")
MAC4 = bytes.fromhex("020000000021")
MAC6 = bytes.fromhex("020000000621")
B4 = addresses.parse("198.18.0.21")
B6 = addresses.parse("fd00::21")
LINK = Link(
    "eth0",
    "198.18.0.2",
    ipaddress.IPv4Network("198.18.0.0/24"),
    OUR_MAC,
    "fd00::2",
    ipaddress.IPv6Network("fd00::/64"),
)
ARP = (
    "IP address       HW type     Flags       HW address            Mask     Device\n"
    "198.18.0.21      0x1         0x2         02:00:00:00:00:21     *        eth0\n"
)


class FakeSocket:
    def __init__(self, frames: list[bytes], fd: int) -> None:
        self.frames = frames
        self.sent: list[bytes] = []
        self.fd = fd

    def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        if not self.frames:
            raise BlockingIOError
        frame = self.frames.pop(0)
        buffer[: len(frame)] = frame
        return len(frame)

    def send(self, data: bytes | memoryview, flags: int = 0) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def fileno(self) -> int:
        return self.fd


class ScriptedEngine:
    """handle() calls `script(buf, start, end)` and returns its action; records the starts."""

    def __init__(self, script: Callable[[bytearray, int, int], Action]) -> None:
        self.script = script
        self.starts: list[int] = []
        self.drops: list[Any] = []
        self.events: list[Any] = []
        self.standby = None

    def handle(self, buf: bytearray, start: int, end: int, partial: bool, now: float) -> Action:
        self.starts.append(start)
        return self.script(buf, start, end)

    def count_drop(self, reason: Any) -> None:
        self.drops.append(reason)


def loop_with(
    tmp_path: Path, engine: ScriptedEngine, v4: list[bytes], v6: list[bytes]
) -> tuple[PacketLoop, FakeSocket, FakeSocket]:
    arp = tmp_path / "arp"
    arp.write_text(ARP)
    neighbours = Neighbours(LINK, str(arp), gateway=None, gateway6=None, ndp=lambda _: {B6: MAC6})
    sock, sock6 = FakeSocket(v4, 3), FakeSocket(v6, 4)
    loop = PacketLoop(
        cast(Engine, engine), cast(Any, sock), neighbours, lambda _: None, sock6=cast(Any, sock6)
    )
    return loop, sock, sock6


def frame(vnet: bytes, ethertype: bytes, packet: bytes) -> bytes:
    return vnet + bytes(12) + ethertype + packet


IPV4 = bytes([0x45]) + bytes(19) + b"L4HEADER-PAYLOAD"
IPV6 = bytes([0x60]) + bytes(39) + b"L4HEADER-PAYLOAD"
PLAIN = VNET_HDR.pack(0, 0, 0, 0, 0, 0)


def test_frames_are_read_headroom_bytes_in_and_forwarded_on_their_own_socket(
    tmp_path: Path,
) -> None:
    hops = {4: (FORWARD, B4), 6: (FORWARD, B6)}
    engine = ScriptedEngine(lambda buf, start, end: hops[buf[start] >> 4])
    loop, sock, sock6 = loop_with(
        tmp_path, engine, [frame(PLAIN, b"\x08\x00", IPV4)], [frame(PLAIN, b"\x86\xdd", IPV6)]
    )
    loop._receive(0.0, cast(Any, sock))
    loop._receive(0.0, cast(Any, sock6))
    assert engine.starts == [HEADROOM + IP_OFFSET] * 2
    assert sock.sent == [PLAIN + MAC4 + OUR_MAC + b"\x08\x00" + IPV4]
    assert sock6.sent == [PLAIN + MAC6 + OUR_MAC + b"\x86\xdd" + IPV6]


def test_a_translated_packet_is_framed_before_its_new_start(tmp_path: Path) -> None:
    """IPv4 -> IPv6: the engine moves the vnet header clear of the grown IP header, writes
    the IPv6 header 20 bytes earlier; the loop writes vnet and Ethernet before it and sends
    it on the IPv6 socket, offsets grown by 20, TCPV4 -> TCPV6."""
    received = VNET_HDR.pack(1, 1, 66, 1448, 34, 16)

    def translate(buf: bytearray, start: int, end: int) -> Action:
        new_start = start - 20
        buf[new_start - IP_OFFSET : new_start - IP_OFFSET + 10] = buf[start - IP_OFFSET :][:10]
        buf[new_start : start + 20] = IPV6[:40]
        return (TRANSLATED, B6, new_start)

    engine = ScriptedEngine(translate)
    loop, sock, sock6 = loop_with(tmp_path, engine, [frame(received, b"\x08\x00", IPV4)], [])
    loop._receive(0.0, cast(Any, sock))
    assert sock.sent == []
    sent = VNET_HDR.pack(1, 4, 86, 1448, 54, 16) + MAC6 + OUR_MAC + b"\x86\xdd" + IPV6
    assert sock6.sent == [sent]


def test_a_translated_packet_that_shrank(tmp_path: Path) -> None:
    received = VNET_HDR.pack(1, 4, 86, 1448, 54, 16)

    def translate(buf: bytearray, start: int, end: int) -> Action:
        buf[start + 20 : start + 40] = IPV4[:20]
        return (TRANSLATED, B4, start + 20)

    engine = ScriptedEngine(translate)
    loop, sock, sock6 = loop_with(tmp_path, engine, [], [frame(received, b"\x86\xdd", IPV6)])
    loop._receive(0.0, cast(Any, sock6))
    assert sock6.sent == []
    sent = VNET_HDR.pack(1, 1, 66, 1448, 34, 16) + MAC4 + OUR_MAC + b"\x08\x00" + IPV4
    assert sock.sent == [sent]


def test_an_ipv6_packet_lbnat_makes_goes_out_as_ipv6(tmp_path: Path) -> None:
    rst6 = bytes([0x60]) + bytes(39) + b"RST"
    engine = ScriptedEngine(lambda buf, start, end: (REPLY, rst6, B6))
    loop, sock, sock6 = loop_with(tmp_path, engine, [], [frame(PLAIN, b"\x86\xdd", IPV6)])
    loop._receive(0.0, cast(Any, sock6))
    assert sock6.sent == [bytes(10) + MAC6 + OUR_MAC + b"\x86\xdd" + rst6]
    assert sock.sent == []


def test_a_translated_packet_to_an_unresolved_hop_waits(tmp_path: Path) -> None:
    far = addresses.parse("198.18.0.99")  # on the link, not in the ARP table

    def translate(buf: bytearray, start: int, end: int) -> Action:
        buf[start + 20 : start + 40] = IPV4[:20]
        return (TRANSLATED, far, start + 20)

    engine = ScriptedEngine(translate)
    loop, sock, sock6 = loop_with(tmp_path, engine, [], [frame(PLAIN, b"\x86\xdd", IPV6)])
    loop.neighbours._asked[far] = 0.0  # no ICMP from a unit test
    loop._receive(0.0, cast(Any, sock6))
    assert sock.sent == sock6.sent == []
    _since, held = loop.neighbours.pending[far]
    assert list(held) == [PLAIN + bytes(12) + b"\x08\x00" + IPV4]  # its MACs: on release


def test_drops_send_nothing(tmp_path: Path) -> None:
    engine = ScriptedEngine(lambda buf, start, end: (DROP, 1))
    loop, sock, sock6 = loop_with(tmp_path, engine, [], [frame(PLAIN, b"\x86\xdd", IPV6)])
    loop._receive(0.0, cast(Any, sock6))
    assert sock.sent == sock6.sent == []
