"""The IPv6 packet socket's filter (lbnat.dataplane.packet_socket.build_filter6), run on the
tests' classic-BPF interpreter over frames built with scapy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_Redirect,
    ICMPv6ND_RS,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from lbnat import addresses
from lbnat.dataplane.packet_socket import build_filter, build_filter6
from tests.unit.cbpf import run_bpf

LB6 = "fd00::2"
CLIENT6 = "fd00::11"
BACKEND6 = "fd00::21"
NAT = (61000, 65535)
FILTER6 = build_filter6(addresses.parse(LB6), [20000, 80], [5353], NAT)


def frame(packet: Packet) -> bytes:
    return bytes(Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01") / packet)


QUOTE = bytes(IPv6(src=LB6, dst=BACKEND6) / TCP(sport=61000, dport=9000))


@pytest.mark.parametrize(
    ("description", "packet", "accepted"),
    [
        ("TCP SYN to the service port", IPv6(src=CLIENT6, dst=LB6) / TCP(dport=20000), True),
        ("TCP to a second service port", IPv6(src=CLIENT6, dst=LB6) / TCP(dport=80), True),
        ("TCP reply to the first NAT port", IPv6(src=BACKEND6, dst=LB6) / TCP(dport=61000), True),
        ("TCP reply to the last NAT port", IPv6(src=BACKEND6, dst=LB6) / TCP(dport=65535), True),
        ("UDP to the UDP service port", IPv6(dst=LB6) / UDP(dport=5353), True),
        ("UDP reply to a NAT port", IPv6(dst=LB6) / UDP(dport=62000), True),
        ("TCP below the NAT range", IPv6(dst=LB6) / TCP(dport=60999), False),
        ("TCP to the UDP service's port", IPv6(dst=LB6) / TCP(dport=5353), False),
        ("UDP to the TCP service's port", IPv6(dst=LB6) / UDP(dport=20000), False),
        ("TCP to another address", IPv6(dst="fd00::3") / TCP(dport=20000), False),
        ("an address differing in its last bit", IPv6(dst="fd00::3") / TCP(dport=80), False),
        ("an address differing in its first word", IPv6(dst="fd01::2") / TCP(dport=80), False),
        ("SSH to the LB host", IPv6(dst=LB6) / TCP(dport=22), False),
        ("unreachable", IPv6(dst=LB6) / ICMPv6DestUnreach() / QUOTE, True),
        ("packet too big", IPv6(dst=LB6) / ICMPv6PacketTooBig(mtu=1280) / QUOTE, True),
        ("time exceeded", IPv6(dst=LB6) / ICMPv6TimeExceeded() / QUOTE, True),
        ("an error to another address", IPv6(dst="fd00::3") / ICMPv6DestUnreach() / QUOTE, False),
        ("echo request", IPv6(dst=LB6) / ICMPv6EchoRequest(), False),
        ("router solicitation (133)", IPv6(dst=LB6) / ICMPv6ND_RS(), False),
        ("router advertisement (134)", IPv6(dst=LB6) / ICMPv6ND_RA(), False),
        ("neighbour solicitation (135)", IPv6(dst=LB6) / ICMPv6ND_NS(tgt=LB6), False),
        ("neighbour advertisement (136)", IPv6(dst=LB6) / ICMPv6ND_NA(tgt=LB6), False),
        ("redirect (137)", IPv6(dst=LB6) / ICMPv6ND_Redirect(), False),
        ("a fragment (the engine counts it)", IPv6(dst=LB6) / IPv6ExtHdrFragment() / UDP(), True),
        ("hop-by-hop (the engine walks it)", IPv6(dst=LB6) / IPv6ExtHdrHopByHop() / TCP(), True),
        ("a fragment elsewhere", IPv6(dst="fd00::3") / IPv6ExtHdrFragment() / UDP(), False),
        ("GRE to the LB", IPv6(dst=LB6, nh=47) / b"gre", False),
        ("IPv4 TCP to the service port", IP(dst="198.18.0.2") / TCP(dport=20000), False),
    ],
)
def test_filter6_passes_only_lbnat_packets(
    description: str, packet: Packet, accepted: bool
) -> None:
    assert (run_bpf(FILTER6, frame(packet)) > 0) is accepted, description


def test_the_ipv4_filter_rejects_ipv6_frames() -> None:
    program = build_filter(0xC6120002, [20000], [5353], NAT)
    assert run_bpf(program, frame(IPv6(dst=LB6) / TCP(dport=20000))) == 0


def test_filter6_rejects_short_frames() -> None:
    whole = frame(IPv6(dst=LB6) / TCP(dport=20000))
    assert run_bpf(FILTER6, whole) > 0
    assert run_bpf(FILTER6, whole[:50]) == 0  # the ports are cut off


def test_filter6_with_many_ports_assembles() -> None:
    program = build_filter6(addresses.parse(LB6), range(1000, 1100), [], NAT)
    assert run_bpf(program, frame(IPv6(dst=LB6) / TCP(dport=1099))) > 0
    assert run_bpf(program, frame(IPv6(dst=LB6) / TCP(dport=1100))) == 0


@given(st.binary(max_size=120))
def test_filter6_returns_for_any_bytes(data: bytes) -> None:
    assert run_bpf(FILTER6, data) >= 0
