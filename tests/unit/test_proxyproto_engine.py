"""A `proxy_protocol: "v2"` service through the Engine (lbnat.engine_pp): the row's class,
the header segment, the shift both ways, checksums (complete and partial), config and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP

from lbnat import proxyproto
from lbnat.checkpoint import RowCheckpoint, checkpoint_bytes
from lbnat.config import ConfigError, Overrides, build_config
from lbnat.engine import FORWARD, REPLY, SEND_FIRST, Action, Engine
from lbnat.fastpath import OFFLOAD_AFTER, SHIFT_AT, FastPath, SimulatedMap
from lbnat.packet import ACK, PSH
from lbnat.proxyproto import ProxyProtoSession
from lbnat.service import Service
from lbnat.standby import synced
from lbnat.syncookie import SynProxySettings
from lbnat.views import session_rows
from tests.unit.fixtures import (
    CLIENT1,
    LB,
    WEB_BACKEND_PORT,
    WEB_PORT,
    complete_partial,
    make_partial,
    tcp,
    tcp_backends,
    verify_checksums,
    wire,
)

M = 0xFFFFFFFF


class Lab:
    def __init__(self, partial: bool = False) -> None:
        backends = tuple(tcp_backends(1))
        self.engine = Engine(
            LB, [Service("web", "tcp", WEB_PORT, "rr", 0.0, backends, "nat", "v2")]
        )
        self.backend = backends[0].ip
        self.partial = partial
        self.now = 0.0

    def send(self, packet: object) -> tuple[Action, bytearray]:
        buf = wire(packet)  # type: ignore[arg-type]
        if self.partial:
            buf = make_partial(buf)
        action = self.engine.handle(buf, 0, len(buf), self.partial, self.now)
        if self.partial and action[0] in (FORWARD, SEND_FIRST):
            buf = complete_partial(buf)
        return action, buf


def handshake(lab: Lab, isn: int) -> tuple[int, ProxyProtoSession]:
    action, out = lab.send(tcp(CLIENT1, LB, 40000, WEB_PORT, "S", isn))
    assert action[0] == FORWARD
    nat_port = IP(bytes(out))[TCP].sport
    (row,) = list(lab.engine.table)
    assert isinstance(row, ProxyProtoSession)
    action, out = lab.send(
        tcp(lab.backend, LB, WEB_BACKEND_PORT, nat_port, "SA", 5000, (isn + 1) & M)
    )
    assert action[0] == FORWARD and IP(bytes(out))[TCP].ack == (isn + 1) & M
    return nat_port, row


@pytest.mark.parametrize("partial", [False, True])
def test_a_flow_gets_the_header_and_its_numbers_shifted(partial: bool) -> None:
    lab = Lab(partial)
    isn = M - 5
    base = (isn + 1) & M
    nat_port, row = handshake(lab, isn)
    action, _ = lab.send(tcp(CLIENT1, LB, 40000, WEB_PORT, "A", base, 5001))
    assert action[0] == REPLY  # the handshake's ACK becomes the header segment
    header = action[1]
    verify_checksums(header)
    parsed = IP(header)
    assert (parsed.src, parsed.dst, parsed[TCP].sport) == (LB, lab.backend, nat_port)
    assert parsed[TCP].seq == base and int(parsed[TCP].flags) == ACK | PSH
    assert proxyproto.parse_v2(bytes(parsed[TCP].payload)) == (
        28, CLIENT1, 40000, LB, WEB_PORT
    )  # fmt: skip
    action, out = lab.send(tcp(CLIENT1, LB, 40000, WEB_PORT, "PA", base, 5001, payload=b"hi"))
    assert action[0] == FORWARD
    verify_checksums(out)
    assert IP(bytes(out))[TCP].seq == (base + 28) & M
    action, out = lab.send(
        tcp(lab.backend, LB, WEB_BACKEND_PORT, nat_port, "PA", 5001, (base + 30) & M, payload=b"ok")
    )
    verify_checksums(out)
    assert IP(bytes(out))[TCP].ack == (base + 2) & M and IP(bytes(out)).dst == CLIENT1
    assert row.pp_state == 2
    assert session_rows(lab.engine, 1.0)[0]["proxy_header"] == "acknowledged"


def test_data_before_the_handshake_ack_is_sent_after_the_header() -> None:
    lab = Lab()
    _, _ = handshake(lab, 1000)
    action, out = lab.send(tcp(CLIENT1, LB, 40000, WEB_PORT, "PA", 1001, 5001, payload=b"GET"))
    assert action[0] == SEND_FIRST
    ((header, _),) = action[2]
    assert IP(header)[TCP].seq == 1001 and IP(bytes(out))[TCP].seq == 1029


def test_such_rows_are_neither_checkpointed_nor_synced_nor_syn_proxied() -> None:
    lab = Lab()
    _, row = handshake(lab, 1000)
    lab.send(tcp(CLIENT1, LB, 40000, WEB_PORT, "A", 1001, 5001))
    assert not synced(row)
    checkpoint = RowCheckpoint(memoryview(bytearray(checkpoint_bytes(8))))
    checkpoint.write(row)
    assert row.slot == -1
    proxied = Engine(
        LB,
        [Service("web", "tcp", WEB_PORT, "rr", 0.0, tuple(tcp_backends(1)), "nat", "v2")],
        syn_proxy=SynProxySettings(mode="on", secret=b"proxyproto-tests"),
    )
    buf = wire(tcp(CLIENT1, LB, 40001, WEB_PORT, "S", 7))
    assert proxied.handle(buf, 0, len(buf), False, 0.0)[0] == FORWARD  # not a cookie SYN-ACK


def overrides(**options: object) -> Overrides:
    return Overrides(words=("198.18.0.2", "198.18.0.21", "8080"), **options)  # type: ignore[arg-type]


def test_the_command_line_and_the_file_take_proxy_protocol(tmp_path: Path) -> None:
    config = build_config(overrides(proxy_protocol="v2", given=frozenset({"proxy_protocol"})))
    assert config.services[0].service.proxy_protocol == "v2"
    with pytest.raises(ConfigError, match="proxy-protocol"):
        build_config(overrides(proxy_protocol="v2", mode="dr", vip_port="8080"))
    path = tmp_path / "lbnat.json"
    service = {"port": 80, "backends": [{"ip": "198.18.0.21", "port": 8080}]}
    path.write_text(json.dumps({"lb_ip": "198.18.0.2", "services": [service]}))
    assert build_config(Overrides(config_file=str(path))).services[0].service.proxy_protocol is None
    path.write_text(
        json.dumps({"lb_ip": "198.18.0.2", "services": [{**service, "proxy_protocol": "v2"}]})
    )
    assert build_config(Overrides(config_file=str(path))).services[0].service.proxy_protocol == "v2"
    path.write_text(
        json.dumps({"lb_ip": "198.18.0.2", "services": [{**service, "proxy_protocol": "v1"}]})
    )
    with pytest.raises(ConfigError, match="proxy_protocol"):
        build_config(Overrides(config_file=str(path)))


def test_a_udp_service_cannot_have_it() -> None:
    with pytest.raises(ValueError, match="TCP"):
        Service("dns", "udp", 53, proxy_protocol="v2")
    with pytest.raises(ValueError, match="v2"):
        Service("web", "tcp", 80, proxy_protocol="v1")


def test_on_dead_reset_sends_the_backend_the_sequence_it_expects() -> None:
    lab = Lab()
    nat_port, row = handshake(lab, 1000)
    lab.send(tcp(CLIENT1, LB, 40000, WEB_PORT, "A", 1001, 5001))
    lab.send(tcp(CLIENT1, LB, 40000, WEB_PORT, "PA", 1001, 5001, payload=b"hello"))
    lab.send(tcp(lab.backend, LB, WEB_BACKEND_PORT, nat_port, "A", 5001, 1001 + 28 + 5))
    assert row.pp_state == 2
    packets = lab.engine.reset_flows("web", (lab.backend, WEB_BACKEND_PORT), 1.0)
    seqs = {IP(p).dst: IP(p)[TCP].seq for p, _ in packets}
    assert seqs == {CLIENT1: 5001, lab.backend: 1001 + 28 + 5}


def test_the_kernel_fast_path_takes_a_proxy_row_once_its_header_is_acknowledged() -> None:
    lab = Lab()
    kernel = SimulatedMap(1 << 10)
    lab.engine.table.kernel = FastPath(kernel, lambda ip: b"\x02" * 12 + b"\x08\x00", 7)
    nat_port, row = handshake(lab, 1000)
    lab.send(tcp(CLIENT1, LB, 40000, WEB_PORT, "A", 1001, 5001))
    lab.send(tcp(lab.backend, LB, WEB_BACKEND_PORT, nat_port, "A", 5001, 1029))
    lab.now = OFFLOAD_AFTER * 2
    lab.engine.tick(lab.now)
    assert row.pp_state == 2 and len(kernel.entries) == 2
    shifts = sorted(value[SHIFT_AT] for value in kernel.entries.values())
    assert shifts == [28, 0x80 | 28]  # client -> backend: seq + 28; the reverse: ACK - 28
    assert session_rows(lab.engine, lab.now)[0]["path"] == "kernel"


def test_a_proxy_row_whose_header_is_unacknowledged_stays_in_python() -> None:
    lab = Lab()
    kernel = SimulatedMap(1 << 10)
    lab.engine.table.kernel = FastPath(kernel, lambda ip: b"\x02" * 12 + b"\x08\x00", 7)
    _, row = handshake(lab, 1000)
    lab.send(tcp(CLIENT1, LB, 40000, WEB_PORT, "A", 1001, 5001))  # the header: lost, say
    for second in range(1, 4):
        lab.now = OFFLOAD_AFTER * second
        lab.engine.tick(lab.now)
    assert row.pp_state == 1 and kernel.entries == {}
