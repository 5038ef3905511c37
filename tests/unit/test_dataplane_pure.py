"""The pure parts of the data plane and health checker, tested without root or sockets:

- the classic BPF filter, run by a small cBPF interpreter over frames built with scapy;
- the neighbour table parser and next-hop choice (a fake /proc/net/arp);
- the nftables ruleset text and the reserved-ports bookkeeping (a fake sysctl file);
- the health state machine, table-driven with sequences of probe results.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet

from lbnat.backends import Health
from lbnat.dataplane.guard import KernelGuard, _format_ranges, _parse_ranges, ruleset
from lbnat.dataplane.link import (
    Link,
    Neighbours,
    link_mtu,
    read_arp_table,
    receive_buffer_max,
)
from lbnat.dataplane.packet_socket import build_filter
from lbnat.health import HealthPolicy, Verdict, judge
from tests.unit.cbpf import run_bpf

LB = "198.18.0.2"
LB_INT = int(ipaddress.IPv4Address(LB))
NAT = (61000, 65535)


FILTER = build_filter(LB_INT, tcp_ports=[20000, 80], udp_ports=[5353], nat_ports=NAT)


def frame(packet: Packet) -> bytes:
    return bytes(Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01") / packet)


@pytest.mark.parametrize(
    ("description", "packet", "accepted"),
    [
        ("TCP SYN to the VIP port", IP(src="198.18.0.11", dst=LB) / TCP(dport=20000), True),
        ("TCP to a second service port", IP(src="198.18.0.11", dst=LB) / TCP(dport=80), True),
        ("TCP reply to the first NAT port", IP(src="198.18.0.21", dst=LB) / TCP(dport=61000), True),
        ("TCP reply to the last NAT port", IP(src="198.18.0.21", dst=LB) / TCP(dport=65535), True),
        ("UDP to the UDP service port", IP(dst=LB) / UDP(dport=5353), True),
        ("UDP reply to a NAT port", IP(dst=LB) / UDP(dport=62000), True),
        ("TCP below the NAT range", IP(dst=LB) / TCP(dport=60999), False),
        ("TCP to the UDP service's port", IP(dst=LB) / TCP(dport=5353), False),
        ("UDP to the TCP service's port", IP(dst=LB) / UDP(dport=20000), False),
        ("TCP to the VIP port of another address", IP(dst="198.18.0.3") / TCP(dport=20000), False),
        ("SSH to the LB host", IP(dst=LB) / TCP(dport=22), False),
        ("ICMP to the LB", IP(dst=LB) / ICMP(), False),
        (
            "TCP with IP options to the VIP port",
            IP(dst=LB, options=b"\x01\x01\x01\x00") / TCP(dport=20000),
            True,
        ),
        ("IP fragment to the LB (counted as a drop)", IP(dst=LB, flags="MF") / UDP(dport=1), True),
        ("non-first fragment to the LB", IP(dst=LB, frag=10) / TCP(dport=1), True),
        ("a fragment to another address", IP(dst="198.18.0.3", flags="MF") / UDP(), False),
    ],
)
def test_bpf_filter_passes_only_lbnat_packets(
    description: str, packet: Packet, accepted: bool
) -> None:
    assert (run_bpf(FILTER, frame(packet)) > 0) is accepted, description


def test_bpf_filter_rejects_non_ip_and_short_frames() -> None:
    arp = bytes(Ether() / ARP(pdst=LB))
    assert run_bpf(FILTER, arp) == 0
    assert run_bpf(FILTER, frame(IP(dst=LB) / TCP(dport=20000))[:30]) == 0


def test_bpf_filter_with_many_ports_assembles() -> None:
    program = build_filter(LB_INT, tcp_ports=range(1000, 1100), udp_ports=[], nat_ports=NAT)
    assert run_bpf(program, frame(IP(dst=LB) / TCP(dport=1099))) > 0
    assert run_bpf(program, frame(IP(dst=LB) / TCP(dport=1100))) == 0


# --- neighbours ---------------------------------------------------------------------------------

ARP_TABLE = """\
IP address       HW type     Flags       HW address            Mask     Device
198.18.0.21      0x1         0x2         02:00:00:00:00:21     *        eth0
198.18.0.22      0x1         0x0         00:00:00:00:00:00     *        eth0
198.18.0.11      0x1         0x2         02:00:00:00:00:11     *        eth0
198.18.0.23      0x1         0x2         02:00:00:00:00:23     *        eth1
"""


def link() -> Link:
    return Link("eth0", LB, ipaddress.IPv4Network("198.18.0.0/24"), bytes.fromhex("020000000002"))


def test_read_arp_table_keeps_complete_entries_of_the_interface(tmp_path: Path) -> None:
    path = tmp_path / "arp"
    path.write_text(ARP_TABLE)
    table = read_arp_table("eth0", str(path))
    assert table == {
        int(ipaddress.IPv4Address("198.18.0.21")): bytes.fromhex("020000000021"),
        int(ipaddress.IPv4Address("198.18.0.11")): bytes.fromhex("020000000011"),
    }
    assert read_arp_table("eth0", str(tmp_path / "missing")) == {}


def test_neighbours_header_hold_and_release(tmp_path: Path) -> None:
    path = tmp_path / "arp"
    path.write_text(ARP_TABLE)
    neighbours = Neighbours(link(), str(path), gateway=None)
    b1 = int(ipaddress.IPv4Address("198.18.0.21"))
    b2 = int(ipaddress.IPv4Address("198.18.0.22"))
    header = neighbours.header_for(b1)
    assert header == bytes.fromhex("020000000021") + bytes.fromhex("020000000002") + b"\x08\x00"
    assert neighbours.header_for(b2) is None  # incomplete entry
    assert neighbours.next_hop(int(ipaddress.IPv4Address("192.0.2.1"))) is None  # no gateway
    neighbours._asked[b2] = 0.0  # pretend it was solicited: no ICMP is sent from a unit test
    assert neighbours.hold(b2, b"frame", now=0.5)
    assert neighbours.release(now=0.6) == ([], 0)  # still unknown
    resolved = ARP_TABLE.replace("0x0         00:00:00:00:00:00", "0x2         02:00:00:00:00:22")
    path.write_text(resolved)
    ready, dropped = neighbours.release(now=0.7)
    assert dropped == 0
    assert ready == [(bytes.fromhex("020000000022020000000002") + b"\x08\x00", b"frame")]
    assert not neighbours.pending


def test_neighbours_give_up_and_pick_up_a_changed_mac(tmp_path: Path) -> None:
    path = tmp_path / "arp"
    path.write_text(ARP_TABLE)
    neighbours = Neighbours(link(), str(path), gateway=None)
    b2 = int(ipaddress.IPv4Address("198.18.0.22"))
    neighbours._asked[b2] = 0.0
    assert neighbours.hold(b2, b"frame", now=0.1)
    assert neighbours.release(now=0.1 + Neighbours.GIVE_UP_AFTER + 0.1) == ([], 1)
    b1 = int(ipaddress.IPv4Address("198.18.0.21"))
    assert neighbours.header_for(b1) is not None
    path.write_text(ARP_TABLE.replace("02:00:00:00:00:21", "02:00:00:00:99:21"))
    assert neighbours.refresh() == [b1]
    header = neighbours.header_for(b1)
    assert header is not None and header[:6] == bytes.fromhex("020000009921")


def test_neighbours_keep_their_macs_when_a_link_flap_empties_the_kernels_table(
    tmp_path: Path,
) -> None:
    """On NETDEV_DOWN the kernel flushes the device's neighbour entries; nothing re-resolves
    them until the host's own stack talks to those hosts. lbnat keeps the MACs it knew (the
    best guess, right unless a neighbour changed its NIC meanwhile, which the next refresh
    after the kernel re-learns it picks up), so no flow waits for ARP after the link is back."""
    path = tmp_path / "arp"
    path.write_text(ARP_TABLE)
    neighbours = Neighbours(link(), str(path), gateway=None)
    b1 = int(ipaddress.IPv4Address("198.18.0.21"))
    before = neighbours.header_for(b1)
    assert before is not None
    path.write_text(ARP_TABLE.splitlines()[0] + "\n")  # flushed
    assert neighbours.refresh() == []
    neighbours.headers.clear()  # even rebuilt from scratch
    assert neighbours.header_for(b1) == before


# --- guard --------------------------------------------------------------------------------------


def test_ruleset_scopes_drops_to_the_lb_address_and_lbnat_ports() -> None:
    text = ruleset(LB, [20000], [5353], NAT)
    assert "table ip lbnat_198_18_0_2" in text
    assert "delete table ip lbnat_198_18_0_2" in text  # a crash leftover is replaced
    assert f"ip daddr {LB} tcp dport {{ 20000, 61000-65535 }} counter drop" in text
    assert f"ip daddr {LB} udp dport {{ 5353, 61000-65535 }} counter drop" in text
    # No rule without the LB address: other traffic of the host is never dropped.
    drops = [line for line in text.splitlines() if "drop" in line]
    assert drops and all(f"ip daddr {LB}" in line for line in drops)


def test_reserved_port_ranges_round_trip() -> None:
    assert _parse_ranges("") == []
    assert _parse_ranges("8080,61000-65535\n") == [(8080, 8080), (61000, 65535)]
    assert _format_ranges([(8080, 8080), (61000, 65535)]) == "8080,61000-65535"


def test_guard_reserves_and_restores_ports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripts: list[str] = []
    monkeypatch.setattr("lbnat.dataplane.guard.nft", scripts.append)
    sysctl = tmp_path / "reserved"
    sysctl.write_text("8080\n")
    guard = KernelGuard(LB, [20000], [], NAT, reserved_path=str(sysctl))
    guard.install()
    assert sysctl.read_text() == "8080,61000-65535\n"
    guard.remove()
    guard.remove()  # idempotent
    assert sysctl.read_text() == "8080\n"
    assert len(scripts) == 2 and "delete table ip lbnat_198_18_0_2" in scripts[1]


# --- health state machine -----------------------------------------------------------------------

A, B, D = Health.ALIVE, Health.BAD, Health.DEAD


@pytest.mark.parametrize(
    ("description", "policy", "results", "healths"),
    [
        ("all good", HealthPolicy(), [1, 1, 1], [A, A, A]),
        ("one failure is bad, then good again", HealthPolicy(), [0, 1], [B, A]),
        ("three failures in a row are dead", HealthPolicy(), [0, 0, 0], [B, B, D]),
        ("failures apart never kill", HealthPolicy(), [0, 0, 1, 0, 0, 1], [B, B, A, B, B, A]),
        (
            "a failure while reviving restarts rise",
            HealthPolicy(rise=2),
            [0, 0, 0, 1, 0],
            [B, B, D, D, D],
        ),
        ("dead stays dead while failing", HealthPolicy(), [0, 0, 0, 0, 0], [B, B, D, D, D]),
        ("one success revives (rise 1)", HealthPolicy(), [0, 0, 0, 1], [B, B, D, A]),
        (
            "rise 2 needs two successes in a row",
            HealthPolicy(rise=2),
            [0, 0, 0, 1, 0, 1, 1],
            [B, B, D, D, D, D, A],
        ),
        ("fall 1 kills at once", HealthPolicy(fall=1), [0, 1], [D, A]),
        ("fall 5", HealthPolicy(fall=5), [0, 0, 0, 0, 0], [B, B, B, B, D]),
    ],
)
def test_health_state_machine(
    description: str, policy: HealthPolicy, results: list[int], healths: list[Health]
) -> None:
    verdict = Verdict()
    seen = []
    for ok in results:
        verdict = judge(verdict, bool(ok), policy)
        seen.append(verdict.health)
    assert seen == healths, description


def test_health_policy_rejects_nonsense() -> None:
    for bad in ({"interval": 0}, {"timeout": -1}, {"fall": 0}, {"rise": 0}):
        with pytest.raises(ValueError):
            HealthPolicy(**bad)


def test_guard_does_not_restore_a_crashed_runs_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lbnat.dataplane.guard.nft", lambda script: None)
    monkeypatch.setattr("lbnat.dataplane.guard.leftover_reservation", lambda ip: (50000, 50999))
    sysctl = tmp_path / "reserved"
    sysctl.write_text("8080,50000-50999\n")  # 50000-50999: the crashed run's
    guard = KernelGuard(LB, [20000], [], NAT, reserved_path=str(sysctl))
    guard.install()
    assert sysctl.read_text() == "8080,61000-65535\n"
    guard.remove()
    assert sysctl.read_text() == "8080\n"


def test_ruleset_records_the_reserved_range() -> None:
    assert 'comment "lbnat reserved ports 61000-65535"' in ruleset(LB, [20000], [], NAT)


def test_link_mtu_reads_sysfs_and_says_none_when_it_cannot(tmp_path: Path) -> None:
    (tmp_path / "eth0").mkdir()
    (tmp_path / "eth0" / "mtu").write_text("1450\n")
    (tmp_path / "eth1").mkdir()
    (tmp_path / "eth1" / "mtu").write_text("garbage\n")
    assert link_mtu("eth0", str(tmp_path)) == 1450
    assert link_mtu("eth1", str(tmp_path)) is None
    assert link_mtu("eth2", str(tmp_path)) is None


def test_receive_buffer_max_is_the_larger_of_tcp_rmem_and_rmem_max(tmp_path: Path) -> None:
    (tmp_path / "ipv4").mkdir()
    (tmp_path / "core").mkdir()
    (tmp_path / "ipv4" / "tcp_rmem").write_text("4096\t131072\t33554432\n")
    (tmp_path / "core" / "rmem_max").write_text("212992\n")
    assert receive_buffer_max(str(tmp_path)) == 33554432
    (tmp_path / "core" / "rmem_max").write_text("67108864\n")
    assert receive_buffer_max(str(tmp_path)) == 67108864
    (tmp_path / "ipv4" / "tcp_rmem").write_text("4096\n")
    assert receive_buffer_max(str(tmp_path)) is None
