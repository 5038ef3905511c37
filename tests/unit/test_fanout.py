"""The fanout steering program, run on the tests' classic-BPF interpreter over packets built
with scapy: both directions of every flow must reach the worker that owns its NAT port."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP

from lbnat.dataplane.fanout import client_worker, nat_slices, steering_program
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
