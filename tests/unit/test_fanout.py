"""The fanout steering programs (IPv4 and IPv6), run on the tests' classic-BPF interpreter over
packets built with scapy: both directions of every flow must reach the worker that owns its NAT
port."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)

from lbnat import addresses
from lbnat.dataplane.fanout import client_worker, nat_slices, steering_program, steering_program6
from tests.unit.cbpf import run_bpf

LB = "198.18.0.2"
BACKEND = "198.18.0.21"
NAT = (32768, 65535)


def steer(program: bytes, packet: Any, workers: int) -> int:
    return run_bpf(program, bytes(packet)) % workers  # the kernel takes it modulo the group


@pytest.mark.parametrize("workers", [2, 3, 4, 7])
def test_replies_go_to_the_worker_owning_the_nat_port(workers: int) -> None:
    program = steering_program(NAT, workers)
    for index, (first, last) in enumerate(nat_slices(NAT, workers)):
        for port in (first, (first + last) // 2, last):
            reply = IP(src=BACKEND, dst=LB) / TCP(sport=80, dport=port, flags="SA")
            assert steer(program, reply, workers) == index
            datagram = IP(src=BACKEND, dst=LB) / UDP(sport=53, dport=port)
            assert steer(program, datagram, workers) == index


@given(
    workers=st.integers(2, 8),
    client=st.integers(0, 2**32 - 1),
    port=st.integers(1, 65535),
    proto=st.sampled_from(["tcp", "udp"]),
)
def test_client_packets_hash_on_address_and_port(
    workers: int, client: int, port: int, proto: str
) -> None:
    program = steering_program(NAT, workers)
    src = ".".join(str(b) for b in client.to_bytes(4, "big"))
    l4 = TCP(sport=port, dport=80, flags="S") if proto == "tcp" else UDP(sport=port, dport=80)
    packet = IP(src=src, dst=LB) / l4
    assert steer(program, packet, workers) == client_worker(client, port, workers)


def test_client_hash_spreads_over_workers() -> None:
    counts = [0, 0]
    for port in range(10000, 12000):
        counts[client_worker(0xC612000B, port, 2)] += 1  # 198.18.0.11, consecutive ports
    assert min(counts) > 800, counts


def test_icmp_error_follows_the_quoted_nat_port() -> None:
    workers = 4
    program = steering_program(NAT, workers)
    for index, (first, _) in enumerate(nat_slices(NAT, workers)):
        quoted = IP(src=LB, dst=BACKEND) / UDP(sport=first + 5, dport=53)
        error = IP(src=BACKEND, dst=LB) / ICMP(type=3, code=3) / bytes(quoted)[:28]
        assert steer(program, error, workers) == index


def test_fragments_and_other_protocols_go_to_worker_zero() -> None:
    program = steering_program(NAT, 4)
    later_fragment = IP(src=BACKEND, dst=LB, frag=100, proto=17) / (b"x" * 40)
    assert steer(program, later_fragment, 4) == 0
    assert steer(program, IP(src=BACKEND, dst=LB, proto=47) / b"gre", 4) == 0


@given(st.binary(max_size=80))
def test_the_program_returns_for_any_bytes(data: bytes) -> None:
    assert 0 <= run_bpf(steering_program(NAT, 3), data) < 2**32


def test_slices_are_equal_contiguous_and_inside_the_range() -> None:
    slices = nat_slices((61000, 65535), 3)
    assert slices == [(61000, 62511), (62512, 64023), (64024, 65535)]
    assert nat_slices((1000, 1000), 1) == [(1000, 1000)]
    with pytest.raises(ValueError, match="too small"):
        nat_slices((1000, 1001), 3)


def test_icmp_error_about_a_packet_sent_to_a_client_follows_the_client() -> None:
    """A router's fragmentation-needed about lbnat's packet VIP:port -> client:port reaches the
    worker that the client's own packets reach."""
    workers = 4
    program = steering_program(NAT, workers)
    for client_port in (1024, 40000, 40001, 55555):
        quoted = IP(src=LB, dst="198.18.0.11") / TCP(sport=80, dport=client_port)
        error = IP(src="198.18.0.1", dst=LB) / ICMP(type=3, code=4) / bytes(quoted)[:28]
        client = IP(src="198.18.0.11", dst=LB) / TCP(sport=client_port, dport=80)
        assert steer(program, error, workers) == steer(program, client, workers)
        assert steer(program, error, workers) == client_worker(0xC612000B, client_port, workers)


# --- IPv6 ---------------------------------------------------------------------------------------

LB6 = "fd00::2"
BACKEND6 = "fd00::21"


@pytest.mark.parametrize("workers", [2, 3, 4, 7])
def test_ipv6_replies_go_to_the_worker_owning_the_nat_port(workers: int) -> None:
    program = steering_program6(NAT, workers)
    for index, (first, last) in enumerate(nat_slices(NAT, workers)):
        for port in (first, (first + last) // 2, last):
            reply = IPv6(src=BACKEND6, dst=LB6) / TCP(sport=80, dport=port, flags="SA")
            assert steer(program, reply, workers) == index
            datagram = IPv6(src=BACKEND6, dst=LB6) / UDP(sport=53, dport=port)
            assert steer(program, datagram, workers) == index


@given(
    workers=st.integers(2, 8),
    client=st.integers(0, 2**128 - 1),
    port=st.integers(1, 65535),
    proto=st.sampled_from(["tcp", "udp"]),
)
def test_ipv6_client_packets_hash_on_address_and_port(
    workers: int, client: int, port: int, proto: str
) -> None:
    program = steering_program6(NAT, workers)
    src = str(ipaddress.IPv6Address(client))
    l4 = TCP(sport=port, dport=80, flags="S") if proto == "tcp" else UDP(sport=port, dport=80)
    packet = IPv6(src=src, dst=LB6) / l4
    assert steer(program, packet, workers) == client_worker(addresses.V6 | client, port, workers)


def test_ipv6_client_hash_spreads_over_workers() -> None:
    counts = [0, 0]
    client = addresses.parse("fd00::11")
    for port in range(10000, 12000):
        counts[client_worker(client, port, 2)] += 1
    assert min(counts) > 800, counts


QUOTED_ERRORS = [ICMPv6DestUnreach(code=4), ICMPv6PacketTooBig(mtu=1280), ICMPv6TimeExceeded()]


@pytest.mark.parametrize("error", QUOTED_ERRORS)
def test_icmpv6_error_follows_the_quoted_nat_port(error: Any) -> None:
    workers = 4
    program = steering_program6(NAT, workers)
    for index, (first, _) in enumerate(nat_slices(NAT, workers)):
        quoted = IPv6(src=LB6, dst=BACKEND6) / UDP(sport=first + 5, dport=53)
        packet = IPv6(src=BACKEND6, dst=LB6) / error / bytes(quoted)
        assert steer(program, packet, workers) == index


@pytest.mark.parametrize("error", QUOTED_ERRORS)
def test_icmpv6_error_about_a_packet_sent_to_a_client_follows_the_client(error: Any) -> None:
    workers = 4
    program = steering_program6(NAT, workers)
    for client_port in (1024, 40000, 40001, 55555):
        quoted = IPv6(src=LB6, dst="fd00::11") / TCP(sport=80, dport=client_port)
        packet = IPv6(src="fd00::1", dst=LB6) / error / bytes(quoted)
        client = IPv6(src="fd00::11", dst=LB6) / TCP(sport=client_port, dport=80)
        assert steer(program, packet, workers) == steer(program, client, workers)
        expected = client_worker(addresses.parse("fd00::11"), client_port, workers)
        assert steer(program, packet, workers) == expected


def test_ipv6_other_packets_go_to_worker_zero() -> None:
    program = steering_program6(NAT, 4)
    cases = [
        IPv6(src=BACKEND6, dst=LB6) / IPv6ExtHdrFragment(offset=100) / (b"x" * 40),
        IPv6(src=BACKEND6, dst=LB6) / IPv6ExtHdrHopByHop() / TCP(sport=1, dport=61001),
        IPv6(src=BACKEND6, dst=LB6, nh=47) / b"gre",
        IPv6(src=BACKEND6, dst=LB6) / ICMPv6EchoRequest(),
        IPv6(src=BACKEND6, dst=LB6) / ICMPv6ND_NS(tgt=LB6),
    ]
    for packet in cases:
        assert steer(program, packet, 4) == 0, packet.summary()


@given(st.binary(max_size=120))
def test_the_ipv6_program_returns_for_any_bytes(data: bytes) -> None:
    assert 0 <= run_bpf(steering_program6(NAT, 3), data) < 2**32
