"""IPv6 next hops (lbnat.dataplane.link): the rtnetlink neighbour dump's parser, the headers
of both families from one cache, on-link and gateway next hops, table-driven."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import netifaces
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnat import addresses
from lbnat.dataplane.link import (
    NDMSG,
    NLMSG_HEADER,
    RTATTR,
    Link,
    LinkError,
    Neighbours,
    _prefix_length,
    parse_neighbour_dump,
    with_ip6,
)

OUR_MAC = bytes.fromhex("020000000002")
LINK6 = Link(
    "eth0",
    "198.18.0.2",
    ipaddress.IPv4Network("198.18.0.0/24"),
    OUR_MAC,
    "fd00::2",
    ipaddress.IPv6Network("fd00::/64"),
)
B6 = addresses.parse("fd00::21")
GW6 = addresses.parse("fe80::1")
B4 = addresses.parse("198.18.0.21")
ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
198.18.0.21      0x1         0x2         02:00:00:00:00:21     *        eth0
"""


def attr(kind: int, value: bytes) -> bytes:
    data = RTATTR.pack(RTATTR.size + len(value), kind) + value
    return data + bytes(-len(data) % 4)


def neighbour(
    address: str, mac: bytes | None, state: int = 0x02, ifindex: int = 4, family: int = 10
) -> bytes:
    body = NDMSG.pack(family, 0, 0, ifindex, state, 0, 0)
    body += attr(1, ipaddress.ip_address(address).packed)
    if mac is not None:
        body += attr(2, mac)
    return NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), 28, 2, 1, 0) + body


DONE = NLMSG_HEADER.pack(NLMSG_HEADER.size + 4, 3, 2, 1, 0) + bytes(4)


@pytest.mark.parametrize(
    ("description", "entry", "kept"),
    [
        ("reachable", neighbour("fd00::21", bytes.fromhex("020000000021")), True),
        ("stale", neighbour("fd00::21", bytes.fromhex("020000000021"), state=0x04), True),
        ("delay", neighbour("fd00::21", bytes.fromhex("020000000021"), state=0x08), True),
        ("probe", neighbour("fd00::21", bytes.fromhex("020000000021"), state=0x10), True),
        ("permanent", neighbour("fd00::21", bytes.fromhex("020000000021"), state=0x80), True),
        ("incomplete", neighbour("fd00::21", None, state=0x01), False),
        ("failed", neighbour("fd00::21", bytes.fromhex("020000000021"), state=0x20), False),
        (
            "another interface",
            neighbour("fd00::21", bytes.fromhex("020000000021"), ifindex=5),
            False,
        ),
        ("an IPv4 entry", neighbour("198.18.0.21", bytes.fromhex("020000000021"), family=2), False),
        ("a zero MAC", neighbour("fd00::21", bytes(6)), False),
    ],
)
def test_parse_neighbour_dump(description: str, entry: bytes, kept: bool) -> None:
    table, done = parse_neighbour_dump(entry + DONE, 4)
    assert done
    expected = {B6: bytes.fromhex("020000000021")} if kept else {}
    assert table == expected, description


def test_parse_neighbour_dump_reads_several_and_waits_for_done() -> None:
    two = neighbour("fd00::21", b"\x02" * 6) + neighbour("fe80::1", b"\x03" * 6)
    assert parse_neighbour_dump(two, 4) == ({B6: b"\x02" * 6, GW6: b"\x03" * 6}, False)


@given(st.binary(max_size=200))
def test_parse_neighbour_dump_never_raises(data: bytes) -> None:
    parse_neighbour_dump(data, 4)
    parse_neighbour_dump(neighbour("fd00::21", b"\x02" * 6) + data, 4)


@pytest.mark.parametrize(
    ("netmask", "length"),
    [("ffff:ffff:ffff:ffff::/64", 64), ("ffff:ffff:ffff:ffff::", 64), ("", 128), ("x/48", 48)],
)
def test_prefix_length(netmask: str, length: int) -> None:
    assert _prefix_length(netmask) == length


def neighbours(tmp_path: Path, ndp: dict[int, bytes], link: Link = LINK6) -> Neighbours:
    path = tmp_path / "arp"
    path.write_text(ARP)
    return Neighbours(link, str(path), gateway=None, gateway6=GW6, ndp=lambda _: dict(ndp))


@pytest.mark.parametrize(
    ("destination", "hop"),
    [
        ("fd00::21", "fd00::21"),  # on ip6's prefix
        ("fd00::ffff:1", "fd00::ffff:1"),
        ("fe80::99", "fe80::99"),  # link-local: always on the link
        ("2001:db8::1", "fe80::1"),  # elsewhere: the IPv6 default gateway
        ("fd01::21", "fe80::1"),
        ("198.18.0.21", "198.18.0.21"),  # IPv4 as before
    ],
)
def test_next_hop_of_either_family(tmp_path: Path, destination: str, hop: str) -> None:
    assert neighbours(tmp_path, {}).next_hop(addresses.parse(destination)) == addresses.parse(hop)


def test_headers_of_both_families_from_one_cache(tmp_path: Path) -> None:
    n = neighbours(
        tmp_path, {B6: bytes.fromhex("020000000621"), GW6: bytes.fromhex("0200000006ff")}
    )
    assert n.header_for(B4) == bytes.fromhex("020000000021") + OUR_MAC + b"\x08\x00"
    assert n.header_for(B6) == bytes.fromhex("020000000621") + OUR_MAC + b"\x86\xdd"
    far = addresses.parse("2001:db8::1")
    assert n.header_for(far) == bytes.fromhex("0200000006ff") + OUR_MAC + b"\x86\xdd"
    assert n.headers[B6][12:] == b"\x86\xdd" and n.headers[B4][12:] == b"\x08\x00"


def test_an_ipv6_neighbour_is_held_until_ndp_resolves_it(tmp_path: Path) -> None:
    table: dict[int, bytes] = {}
    path = tmp_path / "arp"
    path.write_text(ARP)
    n = Neighbours(LINK6, str(path), gateway=None, gateway6=GW6, ndp=lambda _: dict(table))
    assert n.header_for(B6) is None
    n._asked[B6] = 0.0  # pretend it was solicited: no ICMPv6 is sent from a unit test
    assert n.hold(B6, b"frame", now=0.5)
    assert n.release(now=0.6) == ([], 0)
    table[B6] = bytes.fromhex("020000000621")
    ready, dropped = n.release(now=0.7)
    assert (ready, dropped) == (
        [(bytes.fromhex("020000000621") + OUR_MAC + b"\x86\xdd", b"frame")],
        0,
    )


def test_without_ip6_no_ipv6_next_hop_and_no_ndp_read(tmp_path: Path) -> None:
    reads: list[str] = []
    path = tmp_path / "arp"
    path.write_text(ARP)
    link4 = Link("eth0", "198.18.0.2", ipaddress.IPv4Network("198.18.0.0/24"), OUR_MAC)

    def ndp(name: str) -> dict[int, bytes]:
        reads.append(name)
        return {}

    n = Neighbours(link4, str(path), gateway=None, ndp=ndp)
    assert n.next_hop(B6) is None and n.header_for(B6) is None
    assert not n.hold(B6, b"frame", 0.0)
    n.refresh()
    assert reads == []


FD00 = [
    {"addr": "fe80::1%eth0", "netmask": "ffff:ffff:ffff:ffff::/64"},
    {"addr": "fd00::2", "netmask": "ffff:ffff:ffff:ffff::/64"},
]


@pytest.mark.parametrize(
    ("ip6", "absent_ok", "network"),
    [
        ("fd00::2", False, "fd00::/64"),  # held by the interface
        ("fd00:0::2", False, "fd00::/64"),  # any spelling
        ("fd00::99", True, "fd00::/64"),  # a pair's, absent until keepalived adds it
        ("fd00::99", False, None),
        ("fd01::2", True, None),  # not even the interface's prefix
        ("fe80::99", True, None),  # a link-local prefix does not count
        ("198.18.0.9", False, None),
    ],
)
def test_ip6_must_be_on_srcips_interface(
    monkeypatch: pytest.MonkeyPatch, ip6: str, absent_ok: bool, network: str | None
) -> None:
    monkeypatch.setattr(
        "lbnat.dataplane.link.netifaces.ifaddresses", lambda name: {netifaces.AF_INET6: FD00}
    )
    link4 = Link("eth0", "198.18.0.2", ipaddress.IPv4Network("198.18.0.0/24"), OUR_MAC)
    if network is None:
        with pytest.raises(LinkError, match="ip6"):
            with_ip6(link4, ip6, absent_ok)
        return
    link = with_ip6(link4, ip6, absent_ok)
    assert link.network6 == ipaddress.IPv6Network(network)
    assert link.ip6 == str(ipaddress.IPv6Address(ip6))
