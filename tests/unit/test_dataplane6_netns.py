"""Smoke test of lbnat's IPv6 packet sockets on a real veth pair (root): the socket bound to
ETH_P_IPV6 with build_filter6 receives a datagram to ip6 into its ring with the headroom a
translated packet needs, and no neighbour discovery; two sockets in a fanout group steer by the
NAT port's slice; the kernel's IPv6 neighbour table reads back by rtnetlink; the guard's ip6
table comes and goes. Everything in namespaces the test makes (private_netns and a peer),
deleted afterwards."""

from __future__ import annotations

import ipaddress
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, cast

import pytest

from lbnat import addresses
from lbnat.actions import FORWARD, TRANSLATED, Action
from lbnat.dataplane.fanout import nat_slices
from lbnat.dataplane.guard import KernelGuard
from lbnat.dataplane.kernel import (
    HEADROOM,
    TP_STATUS_USER,
    TX_DATA_OFFSET,
    V2_HEADER,
    VNET_HDR_LEN,
)
from lbnat.dataplane.link import Neighbours, find_link, read_ndp_table
from lbnat.dataplane.loop import PacketLoop, RingLoop
from lbnat.dataplane.packet_socket import build_filter, build_filter6
from lbnat.dataplane.rings import RingSpec, RxFrames
from lbnat.dataplane.workers import open_worker_sockets
from lbnat.engine import Engine

LB4, PEER4 = "198.18.254.1", "198.18.254.2"
LB6, PEER6 = "fd00:dd::1", "fd00:dd::2"
NAT = (61000, 65535)
SOCKADDR_LL = 20  # what the kernel writes between a slot's tpacket2_hdr and the frame


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, timeout=10)


@pytest.fixture
def veth(private_netns: str) -> Iterator[str]:
    """v6a here (LB4, LB6), v6b in a peer namespace (PEER4, PEER6); yields the peer's name."""
    peer = private_netns + "p"
    sh("ip", "netns", "add", peer)
    try:
        sh("ip", "link", "add", "v6a", "type", "veth", "peer", "name", "v6b")
        sh("ip", "link", "set", "v6b", "netns", peer)
        sh("ip", "addr", "add", f"{LB4}/24", "dev", "v6a")
        sh("ip", "addr", "add", f"{LB6}/64", "dev", "v6a", "nodad")
        sh("ip", "link", "set", "v6a", "up")
        for command in (
            f"ip addr add {PEER4}/24 dev v6b",
            f"ip addr add {PEER6}/64 dev v6b nodad",
            "ip link set v6b up",
            "ip link set lo up",
        ):
            sh("ip", "netns", "exec", peer, *command.split())
        yield peer
    finally:
        subprocess.run(["ip", "netns", "del", peer], check=False, timeout=10)


def send_from(peer: str, ports: list[int]) -> None:
    code = (
        "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
        f"[s.sendto(b'lbnat-v6', ('{LB6}', p)) for p in {ports!r}]"
    )
    sh("ip", "netns", "exec", peer, sys.executable, "-c", code)


def test_the_ipv6_socket_receives_lbnats_frames_with_headroom(veth: str) -> None:
    link = find_link(LB4, "v6a", ip6=LB6)
    assert link.network6 == ipaddress.IPv6Network("fd00:dd::/64")
    spec = RingSpec(frames=64, tx_frames=64)
    program = build_filter6(addresses.parse(LB6), [], [20000], NAT)
    (sock,) = open_worker_sockets(link, program, NAT, 1, "rings", spec, ipv6=True)
    rx = RxFrames(sock, spec)
    try:
        send_from(veth, [20000, 20001])  # a service port, and one that is not
        assert select.select([sock], [], [], 2.0)[0], "nothing reached the IPv6 socket"
        slot = rx.index * rx.frame_size
        assert rx.map[slot] & TP_STATUS_USER
        _, length, snap, mac = V2_HEADER.unpack_from(rx.map, slot)
        assert snap == length
        frame = bytes(rx.map[slot + mac : slot + mac + snap])
        assert frame[12:14] == b"\x86\xdd"
        assert frame[14 + 6] == socket.IPPROTO_UDP
        assert int.from_bytes(frame[14 + 40 + 2 : 14 + 44], "big") == 20000
        assert frame.endswith(b"lbnat-v6")
        # room for a translated packet before the vnet header, clear of the kernel's bytes
        assert mac - VNET_HDR_LEN - (TX_DATA_OFFSET + SOCKADDR_LL) >= HEADROOM
        # the next slot is empty: neither 20001 nor the neighbour discovery came up
        after = ((rx.index + 1) % rx.count) * rx.frame_size
        assert not rx.map[after] & TP_STATUS_USER
        # the peer solicited us: the kernel knows its MAC, and rtnetlink reads it back
        assert addresses.parse(PEER6) in read_ndp_table("v6a")
    finally:
        rx.close()
        sock.close()


def test_two_ipv6_sockets_share_the_nat_ports_by_slice(veth: str) -> None:
    link = find_link(LB4, "v6a", ip6=LB6)
    program = build_filter6(addresses.parse(LB6), [], [], NAT)
    socks = open_worker_sockets(link, program, NAT, 2, "socket", RingSpec(), ipv6=True)
    try:
        ports = [first + 7 for first, _ in nat_slices(NAT, 2)]
        send_from(veth, ports)
        for index, sock in enumerate(socks):
            assert select.select([sock], [], [], 2.0)[0], f"socket {index} got nothing"
            frame = sock.recv(4096)
            at = VNET_HDR_LEN + 14 + 40 + 2
            assert int.from_bytes(frame[at : at + 2], "big") == ports[index]
    finally:
        for sock in socks:
            sock.close()


def test_the_guards_ip6_table_comes_and_goes(veth: str) -> None:
    guard = KernelGuard(LB4, [20000], [20000], NAT, reserved_path="/dev/null", ip6=LB6)
    guard.update()  # the table alone: the reserved ports are not this test's business
    guard.installed = True
    name = "lbnat_198_18_254_1"
    try:
        listed = subprocess.run(
            ["nft", "list", "table", "ip6", name], capture_output=True, text=True, timeout=10
        )
        assert listed.returncode == 0 and f"ip6 daddr {LB6} tcp dport" in listed.stdout
    finally:
        guard.remove()
    for family in ("ip", "ip6"):
        gone = subprocess.run(
            ["nft", "list", "table", family, name], capture_output=True, timeout=10
        )
        assert gone.returncode != 0


class Mirror:
    """An engine that sends every IPv6 datagram back where it came from: addresses and ports
    swapped (the UDP checksum, partial or whole, stays right), forwarded to the peer."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.standby = None
        self.handled = 0

    def handle(self, buf: bytearray, start: int, end: int, partial: bool, now: float) -> Action:
        self.handled += 1
        src, dst = bytes(buf[start + 8 : start + 24]), bytes(buf[start + 24 : start + 40])
        buf[start + 8 : start + 24], buf[start + 24 : start + 40] = dst, src
        l4 = start + 40
        sport, dport = bytes(buf[l4 : l4 + 2]), bytes(buf[l4 + 2 : l4 + 4])
        buf[l4 : l4 + 2], buf[l4 + 2 : l4 + 4] = dport, sport
        return (FORWARD, addresses.parse(PEER6))

    def count_drop(self, reason: Any) -> None:
        raise AssertionError(f"dropped: {reason}")

    def tick(self, now: float) -> None:
        pass


def test_a_ring_loop_forwards_ipv6_through_the_transmit_ring(veth: str) -> None:
    """Both sockets in one RingLoop: an IPv6 datagram read from the IPv6 ring goes back out
    through the transmit ring, its Ethernet header from the IPv6 neighbour table."""
    link = find_link(LB4, "v6a", ip6=LB6)
    spec = RingSpec(frames=64, tx_frames=64)
    program = build_filter(link.ip_int, [], [20000], NAT)
    program6 = build_filter6(addresses.parse(LB6), [], [20000], NAT)
    (sock,) = open_worker_sockets(link, program, NAT, 1, "rings", spec)
    (sock6,) = open_worker_sockets(link, program6, NAT, 1, "rings", spec, ipv6=True)
    engine = Mirror()
    neighbours = Neighbours(link, gateway=None, gateway6=None)
    loop = RingLoop(cast(Engine, engine), sock, neighbours, lambda _: None, spec, sock6=sock6)
    echo = (
        "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
        "s.bind(('::', 20000)); s.settimeout(3); "
        f"s.sendto(b'lbnat-v6', ('{LB6}', 20000)); print(s.recvfrom(100)[0].decode())"
    )
    peer = subprocess.Popen(
        ["ip", "netns", "exec", veth, sys.executable, "-c", echo],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert select.select([sock6], [], [], 3.0)[0], "nothing reached the IPv6 socket"
        neighbours.refresh()  # the peer's solicitation taught the kernel its MAC
        loop._receive(0.0, sock6)
        out, _ = peer.communicate(timeout=5)
        assert engine.handled == 1
        assert out.strip() == "lbnat-v6"
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        loop.close()
        neighbours.close()
        sock.close()
        sock6.close()


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


class Nat64:
    """A stand-in for the engine's NAT64, for one IPv4 UDP datagram: the vnet header moved
    clear first (the contract's rule when the header grows), then an IPv6 header written 20
    bytes before the IPv4 one, from ip6 to the peer; the UDP checksum for the new
    pseudo-header (partial when the vnet header says so, else whole)."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.standby = None
        self.partial: bool | None = None

    def handle(self, buf: Any, start: int, end: int, partial: bool, now: float) -> Action:
        self.partial = partial
        l4 = start + (buf[start] & 0xF) * 4
        length = int.from_bytes(buf[l4 + 4 : l4 + 6], "big")
        new_start = l4 - 40
        buf[new_start - 24 : new_start - 14] = bytes(buf[start - 24 : start - 14])
        src, dst = addresses.packed(addresses.parse(LB6)), addresses.packed(addresses.parse(PEER6))
        buf[new_start : new_start + 40] = (
            bytes([0x60, 0, 0, 0]) + length.to_bytes(2, "big") + bytes([17, 64]) + src + dst
        )
        pseudo = src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, 17])
        if partial:
            value = _sum16(pseudo)
        else:
            buf[l4 + 6 : l4 + 8] = b"\0\0"
            value = 0xFFFF - _sum16(pseudo + bytes(buf[l4 : l4 + length])) or 0xFFFF
        buf[l4 + 6 : l4 + 8] = value.to_bytes(2, "big")
        return (TRANSLATED, addresses.parse(PEER6), new_start)

    def count_drop(self, reason: Any) -> None:
        raise AssertionError(f"dropped: {reason}")


@pytest.mark.parametrize("io", ["frames", "blocks", "socket"])
def test_a_translated_datagram_leaves_as_ipv6(veth: str, io: str) -> None:
    """IPv4 in on the IPv4 socket, translated in place, out as IPv6 to the peer, whose IPv6
    socket gets the payload (so the kernel took the rewritten vnet header and checksum); in
    both ring layouts (tp_reserve gives the room) and the recv_into buffer."""
    link = find_link(LB4, "v6a", ip6=LB6)
    spec = RingSpec(rx="blocks" if io == "blocks" else "frames", frames=64, tx_frames=64)
    io = "socket" if io == "socket" else "rings"
    program = build_filter(link.ip_int, [], [20000], NAT)
    program6 = build_filter6(addresses.parse(LB6), [], [20000], NAT)
    (sock,) = open_worker_sockets(link, program, NAT, 1, io, spec)
    (sock6,) = open_worker_sockets(link, program6, NAT, 1, io, spec, ipv6=True)
    engine = Nat64()
    neighbours = Neighbours(link, gateway=None, gateway6=None)
    loop: PacketLoop
    if io == "rings":
        loop = RingLoop(cast(Engine, engine), sock, neighbours, lambda _: None, spec, sock6=sock6)
    else:
        loop = PacketLoop(cast(Engine, engine), sock, neighbours, lambda _: None, sock6=sock6)
    peer_code = (
        "import socket, time\n"
        "s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        "s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); s6.bind(('::', 20000))\n"
        "s6.settimeout(3)\n"
        f"s6.sendto(b'hello', ('{LB6}', 9))  # our kernel learns the peer's MAC (NDP)\n"
        "time.sleep(0.3)\n"
        "s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s4.bind(('0.0.0.0', 20000))\n"
        f"s4.sendto(b'translated-payload', ('{LB4}', 20000))\n"
        "data, sender = s6.recvfrom(100)\n"
        "print(data.decode(), sender[0])\n"
    )
    peer = subprocess.Popen(
        ["ip", "netns", "exec", veth, sys.executable, "-c", peer_code],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert select.select([sock], [], [], 3.0)[0], "nothing reached the IPv4 socket"
        neighbours.refresh()
        loop._receive(0.0, sock)
        if isinstance(loop, RingLoop):
            loop._flush()
        out, _ = peer.communicate(timeout=5)
        assert out.split() == ["translated-payload", LB6]
        assert engine.partial is not None
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        loop.close()
        neighbours.close()
        sock.close()
        sock6.close()
