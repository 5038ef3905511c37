"""A VIP apart from SRCIP (`--vip`, docs/scale-out.md): clients connect to the VIP, the backends
see the instance's own address and answer to it, the client sees the VIP answer. Packets to
the wrong one of the two addresses are not lbnat's. The packet filter and the nftables guard
cover both addresses.

    client 198.18.2.11 --> VIP 198.18.100.1:80 ==[lbnat 198.18.1.11]==> 198.18.1.21:8080
    client <-- VIP:80                          <== 198.18.1.21:8080 -> 198.18.1.11:NAT port
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import struct
from pathlib import Path

import pytest
from scapy.layers.inet import IP
from scapy.layers.inet import TCP as ScapyTCP
from scapy.layers.inet import UDP as ScapyUDP
from scapy.packet import Packet

from lbnat.backends import Backend
from lbnat.config import ConfigError, Overrides, build_config, load_config
from lbnat.daemon_scaleout import mesh_misfit
from lbnat.dataplane.guard import ruleset
from lbnat.dataplane.link import Link
from lbnat.dataplane.packet_socket import build_filter
from lbnat.drops import DropReason
from lbnat.engine import DROP, FORWARD, REPLY, Engine, ip_int, ip_text
from lbnat.service import Service
from tests.unit.cbpf import run_bpf
from tests.unit.fixtures import tcp, udp, verify_checksums, wire

OWN = "198.18.1.11"  # SRCIP: this instance
VIP = "198.18.100.1"  # shared by the instances
CLIENT = "198.18.2.11"
BACKEND = "198.18.1.21"
NAT = (61000, 65535)


def engine() -> Engine:
    return Engine(
        OWN,
        [
            Service("web", "tcp", 80, "rr", 0.0, (Backend(BACKEND, 8080),)),
            Service("dns", "udp", 53, "rr", 0.0, (Backend(BACKEND, 5353),)),
        ],
        nat_ports=NAT,
        vip=VIP,
    )


def handle(e: Engine, packet: Packet, now: float = 0.0) -> tuple[tuple[object, ...], bytearray]:
    buf = wire(packet)
    action = e.handle(buf, 0, len(buf), False, now)
    return action, buf


def test_a_tcp_flow_through_a_vip_apart_from_srcip() -> None:
    e = engine()
    action, out = handle(e, tcp(CLIENT, VIP, 40000, 80, "S", 1000))
    assert action[0] == FORWARD and ip_text(action[1]) == BACKEND  # type: ignore[arg-type]
    sent = IP(bytes(out))
    assert (sent.src, sent.dst, sent[ScapyTCP].dport) == (OWN, BACKEND, 8080)
    nat_port = sent[ScapyTCP].sport
    assert NAT[0] <= nat_port <= NAT[1]
    verify_checksums(out)

    action, out = handle(e, tcp(BACKEND, OWN, 8080, nat_port, "SA", 5000, 1001))
    assert action[0] == FORWARD and ip_text(action[1]) == CLIENT  # type: ignore[arg-type]
    back = IP(bytes(out))
    assert (back.src, back.dst, back[ScapyTCP].sport, back[ScapyTCP].dport) == (
        VIP, CLIENT, 80, 40000,
    )  # fmt: skip
    verify_checksums(out)

    action, out = handle(e, tcp(CLIENT, VIP, 40000, 80, "A", 1001, 5001))
    assert action[0] == FORWARD
    assert IP(bytes(out)).src == OWN


def test_a_udp_flow_through_a_vip_apart_from_srcip() -> None:
    e = engine()
    action, out = handle(e, udp(CLIENT, VIP, 5000, 53, b"q"))
    assert action[0] == FORWARD
    sent = IP(bytes(out))
    assert (sent.src, sent.dst) == (OWN, BACKEND)
    action, out = handle(e, udp(BACKEND, OWN, 5353, sent[ScapyUDP].sport, b"a"))
    assert action[0] == FORWARD
    back = IP(bytes(out))
    assert (back.src, back.dst, back[ScapyUDP].sport) == (VIP, CLIENT, 53)
    verify_checksums(out)


@pytest.mark.parametrize(
    ("packet", "why"),
    [
        (tcp(CLIENT, OWN, 40000, 80, "S", 1), "a service port on SRCIP: clients use the VIP"),
        (
            tcp(BACKEND, VIP, 8080, 61000, "SA", 1, 2),
            "a NAT port on the VIP",
        ),
        (tcp(CLIENT, "198.18.100.2", 40000, 80, "S", 1), "another address"),
    ],
    ids=["service-on-srcip", "nat-port-on-vip", "elsewhere"],
)
def test_packets_to_the_wrong_address_are_not_for_us(packet: Packet, why: str) -> None:
    e = engine()
    action, _ = handle(e, packet)
    assert action[0] == DROP, why
    assert e.drops == {DropReason.NOT_FOR_US: 1}


def test_no_backend_rst_comes_from_the_vip() -> None:
    e = engine()
    e.set_backends("web", [])
    action, _ = handle(e, tcp(CLIENT, VIP, 40000, 80, "S", 1000))
    assert action[0] == REPLY
    packet = action[1]
    assert isinstance(packet, bytes)
    rst = IP(packet)
    assert (rst.src, rst.dst, rst[ScapyTCP].sport) == (VIP, CLIENT, 80)


def frame(packet: Packet) -> bytes:
    return b"\x00" * 12 + struct.pack("!H", 0x0800) + bytes(packet)


@pytest.mark.parametrize(
    ("packet", "accepted"),
    [
        (tcp(CLIENT, VIP, 40000, 80), True),
        (tcp(BACKEND, OWN, 8080, 61000, "SA"), True),
        (udp(CLIENT, VIP, 5000, 53), True),
        (tcp(CLIENT, VIP, 40000, 81), False),
        (tcp(CLIENT, "198.18.1.12", 40000, 80), False),
    ],
)
def test_the_packet_filter_takes_both_addresses(packet: Packet, accepted: bool) -> None:
    program = build_filter(ip_int(OWN), [80], [53], NAT, ip_int(VIP))
    assert (run_bpf(program, frame(packet)) > 0) is accepted


def test_the_guard_drops_for_both_addresses() -> None:
    text = ruleset(OWN, [80], [53], NAT, VIP)
    assert f"ip daddr {{ {OWN}, {VIP} }} tcp dport" in text
    assert f"ip saddr {{ {OWN}, {VIP} }} tcp sport" in text
    assert "ip daddr 198.18.0.2 tcp" in ruleset("198.18.0.2", [80], [], NAT, "198.18.0.2")


@pytest.mark.parametrize(
    ("vip", "expected"),
    [(VIP, VIP), (OWN, None), (None, None)],
    ids=["apart", "same-as-srcip", "absent"],
)
def test_the_command_line_vip(vip: str | None, expected: str | None) -> None:
    config = build_config(Overrides(words=(OWN, BACKEND, "8080"), vip=vip))
    assert config.vip == expected


def test_a_bad_vip_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="--vip"):
        build_config(Overrides(words=(OWN, BACKEND, "8080"), vip="198.18.300.1"))


def test_the_config_file_vip(tmp_path: Path) -> None:
    path = tmp_path / "lbnat.json"
    path.write_text(json.dumps({
        "lb_ip": OWN, "vip": VIP,
        "services": [{"name": "web", "port": 80, "backends": [{"ip": BACKEND, "port": 8080}]}],
    }))  # fmt: skip
    assert load_config(str(path)).vip == VIP


def test_the_mesh_mode_needs_a_sync_and_a_vip(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--sync-mode mesh needs the session sync"):
        build_config(Overrides(words=(OWN, BACKEND, "8080"), vip=VIP, sync_mode="mesh"))
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    mesh = Overrides(words=(OWN, BACKEND, "8080"), sync_mode="mesh", sync_listen=OWN,
                     sync_peers=("198.18.1.12",), sync_secret_file=str(secret))  # fmt: skip
    with pytest.raises(ConfigError, match="give --vip"):
        build_config(mesh)
    config = build_config(dataclasses.replace(mesh, vip=VIP))
    assert config.sync is not None and config.sync.mode == "mesh"


def test_the_command_line_s_mesh_mode_applies_to_the_file_s_sync(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret")
    path = tmp_path / "lbnat.json"
    path.write_text(json.dumps({
        "lb_ip": OWN, "vip": VIP,
        "sync": {"listen": OWN, "peers": ["198.18.1.12"], "secret_file": "secret"},
        "services": [{"name": "web", "port": 80, "backends": [{"ip": BACKEND, "port": 8080}]}],
    }))  # fmt: skip
    config = build_config(Overrides(config_file=str(path), sync_mode="mesh"))
    assert config.sync is not None and config.sync.mode == "mesh"


def test_the_mesh_s_addresses_must_be_on_the_instances_segment(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret")
    link = Link("eth0", OWN, ipaddress.IPv4Network("198.18.1.0/24"), bytes(6))
    for peer, misfit in (("198.18.1.12", None), ("198.18.9.12", "198.18.9.12 is not on eth0")):
        config = build_config(Overrides(
            words=(OWN, BACKEND, "8080"), vip=VIP, sync_mode="mesh", sync_listen=OWN,
            sync_peers=(peer,), sync_secret_file=str(tmp_path / "secret"),
        ))  # fmt: skip
        found = mesh_misfit(config, link)
        assert found is None if misfit is None else misfit in str(found)
