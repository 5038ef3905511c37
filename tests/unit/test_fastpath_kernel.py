"""The two paths agree: for one flow, the compiled tc program (run with BPF_PROG_TEST_RUN on the
entries lbnat.fastpath made from the engine's own row) and Engine.handle turn the same frame
into the same bytes: TCP and UDP, both directions, IP options, TCP options, UDP without a
checksum, a hypothesis property over random flows, flags and payloads.

Here the engine is the reference and the kernel's map is the real one: the harness's Engine
gets a FastPath over a FlowMap of the loaded program. Each frame is given to both: the kernel's
output (after the program's Ethernet rewrite) against the engine's rewrite plus the Ethernet
header the data plane would write for the engine's next hop.

Partial checksums and GSO super-packets cannot be made by BPF_PROG_TEST_RUN (CHECKSUM_NONE
skbs of at most about a page): tests/integration/test_offload_netns.py checks them on the
frames a backend receives. Root and `make bpf` needed (skipped otherwise; failed under CI).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IPOption_NOP, IPOption_RR
from scapy.packet import Packet

from lbnat.dataplane import tcbpf
from lbnat.engine import FORWARD, ip_int
from lbnat.fastpath import OFFLOAD_AFTER, FastPath
from lbnat.packet import ADDRESS
from tests.unit import fixtures as fx
from tests.unit.test_tcbpf import clear, program  # noqa: F401 (the loaded program, a fixture)

OUR_MAC = bytes.fromhex("02aa00000002")
IFINDEX = 9


def header_for(ip: int) -> bytes:
    """The data plane's Ethernet header for a frame to `ip` (a MAC made of the address)."""
    return bytes.fromhex("02bb") + ADDRESS.pack(ip) + OUR_MAC + b"\x08\x00"


ARRIVING = bytes.fromhex("02aa0000000202cc00000001") + b"\x08\x00"  # to us, from the bridge


@pytest.fixture
def kernel(program: tcbpf.TcProgram) -> Iterator[tcbpf.FlowMap]:  # noqa: F811
    flow_map = tcbpf.FlowMap(program.map_fd)
    clear(flow_map)
    try:
        yield flow_map
    finally:
        clear(flow_map)
        flow_map.close()


def lab_on(flow_map: tcbpf.FlowMap) -> fx.EngineHarness:
    lab = fx.EngineHarness()
    lab.table.kernel = FastPath(flow_map, header_for, IFINDEX)
    return lab


def both_paths(
    lab: fx.EngineHarness, program: tcbpf.TcProgram, packet: Packet  # noqa: F811
) -> tuple[bytes, bytes]:
    """(what the kernel made of the frame, what the engine made of it + its Ethernet header)."""
    raw = bytes(fx.wire(packet))
    retval, out = program.test_run(ARRIVING + raw)
    assert retval == tcbpf.TC_ACT_REDIRECT, "the kernel did not take the packet"
    buf = bytearray(raw)
    action = lab.engine.handle(buf, 0, len(buf), False, lab.now)
    assert action[0] == FORWARD, action
    return out, header_for(action[-1])[:12] + ARRIVING[12:] + bytes(buf)


def established(lab: fx.EngineHarness, port: int = 40000) -> fx.Flow:
    flow = lab.flow(fx.CLIENT1, port)
    flow.syn()
    flow.synack()
    flow.ack()
    lab.advance(OFFLOAD_AFTER)
    return flow


def to_backend(flow: fx.Flow, **kw: object) -> Packet:
    return fx.tcp(flow.client, fx.LB, flow.port, fx.WEB_PORT, "PA", flow.c_next, flow.s_next,
                  **kw)  # type: ignore[arg-type]  # fmt: skip


def to_client(flow: fx.Flow, **kw: object) -> Packet:
    assert flow.backend is not None and flow.nat_port is not None
    return fx.tcp(flow.backend, fx.LB, fx.WEB_BACKEND_PORT, flow.nat_port, "PA", flow.s_next,
                  flow.c_next, **kw)  # type: ignore[arg-type]  # fmt: skip


CASES = {
    "tcp to the backend": lambda f: to_backend(f, payload=b"GET / HTTP/1.1\r\n\r\n"),
    "tcp to the client": lambda f: to_client(f, payload=b"HTTP/1.1 200 OK\r\n" * 40),
    "tcp ip options": lambda f: to_backend(
        f, payload=b"x" * 99, ip_options=[IPOption_NOP(), IPOption_RR(routers=["1.2.3.4"])]
    ),
    "tcp options": lambda f: to_client(
        f, payload=b"y" * 1400, options=[("NOP", None), ("NOP", None), ("Timestamp", (7, 9))]
    ),
    "a bare ack": lambda f: fx.tcp(f.client, fx.LB, f.port, fx.WEB_PORT, "A", f.c_next, 1),
    "urgent data": lambda f: to_backend(f, payload=b"!", window=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tcp_frames_come_out_of_both_paths_the_same(
    case: str, kernel: tcbpf.FlowMap, program: tcbpf.TcProgram  # noqa: F811
) -> None:
    lab = lab_on(kernel)
    flow = established(lab)
    assert flow.session in lab.table.kernel  # type: ignore[operator]
    made_by_kernel, made_by_engine = both_paths(lab, program, CASES[case](flow))
    assert made_by_kernel == made_by_engine
    fx.verify_checksums(made_by_kernel[14:])


@pytest.mark.parametrize("chksum", [None, 0], ids=["udp checksum", "udp without checksum"])
def test_udp_both_ways_come_out_of_both_paths_the_same(
    chksum: int | None, kernel: tcbpf.FlowMap, program: tcbpf.TcProgram  # noqa: F811
) -> None:
    lab = lab_on(kernel)
    flow = lab.udp_flow(fx.CLIENT1, 5353)
    flow.request()
    flow.reply()
    lab.advance(OFFLOAD_AFTER)
    assert len(kernel.keys()) == 2
    assert flow.backend is not None and flow.nat_port is not None
    request = fx.udp(fx.CLIENT1, fx.LB, 5353, fx.DNS_PORT, b"q" * 33, chksum)
    reply = fx.udp(flow.backend, fx.LB, fx.DNS_BACKEND_PORT, flow.nat_port, b"a" * 301, chksum)
    for packet in (request, reply):
        made_by_kernel, made_by_engine = both_paths(lab, program, packet)
        assert made_by_kernel == made_by_engine


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    client=st.integers(ip_int("198.18.1.0"), ip_int("198.19.254.254")),
    port=st.integers(1024, 65535),
    flags=st.sampled_from(["A", "PA", "UA", "EA", "CA", "PAU"]),
    payload=st.binary(max_size=1400),
    towards_client=st.booleans(),
)
def test_any_flow_any_segment_comes_out_of_both_paths_the_same(
    kernel: tcbpf.FlowMap,
    program: tcbpf.TcProgram,  # noqa: F811
    client: int,
    port: int,
    flags: str,
    payload: bytes,
    towards_client: bool,
) -> None:
    clear(kernel)
    lab = lab_on(kernel)
    address = fx.ip_text(client)
    flow = lab.flow(address, port)
    flow.syn()
    flow.synack()
    flow.ack()
    lab.advance(OFFLOAD_AFTER)
    if towards_client:
        assert flow.backend is not None and flow.nat_port is not None
        packet = fx.tcp(flow.backend, fx.LB, fx.WEB_BACKEND_PORT, flow.nat_port, flags,
                        flow.s_next, flow.c_next, payload=payload)  # fmt: skip
    else:
        packet = fx.tcp(address, fx.LB, port, fx.WEB_PORT, flags, flow.c_next, flow.s_next,
                        payload=payload)  # fmt: skip
    made_by_kernel, made_by_engine = both_paths(lab, program, packet)
    assert made_by_kernel == made_by_engine
