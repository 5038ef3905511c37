"""lbnat_lab.netns's addresses of the lab's hosts, both families (scripts/lab.sh draws the same:
tests/integration/test_ipv6_netns.py checks them on the interfaces)."""

from __future__ import annotations

import ipaddress

import pytest

from lbnat_lab import netns
from lbnat_lab.netns import host_ip, host_ip6


@pytest.mark.parametrize(
    ("host", "v4", "v6"),
    [
        ("lb", "198.18.0.2", "fd18::2"),
        ("lb1", "198.18.0.3", "fd18::3"),
        ("c1", "198.18.0.11", "fd18::11"),
        ("c12", "198.18.0.22", "fd18::22"),
        ("b3", "198.18.0.23", "fd18::23"),
        ("r1", "198.18.0.254", "fd18::254"),
        ("rc1", "198.18.1.11", "fd18:1::11"),
    ],
)
def test_host_addresses(host: str, v4: str, v6: str) -> None:
    assert (host_ip(host), host_ip6(host)) == (v4, v6)
    address = ipaddress.IPv6Address(host_ip6(host))
    assert address in ipaddress.IPv6Network("fd00::/8")  # ULA: never leaves the lab
    assert str(address) == host_ip6(host)  # already in RFC 5952 form


def test_constants_agree() -> None:
    assert host_ip6("lb") == netns.LB_IP6
    assert {h: host_ip6(h) for h in netns.CLIENTS} == netns.CLIENTS6
    assert {h: host_ip6(h) for h in netns.BACKENDS} == netns.BACKENDS6
    assert (host_ip("r1"), host_ip6("r1")) == (netns.ROUTER_IP, netns.ROUTER_IP6)
    assert host_ip6(netns.ROUTED_CLIENT) == netns.ROUTED_CLIENT_IP6


@pytest.mark.parametrize("host", ["sw", "r2", "b0", "lb3", "x1"])
def test_not_a_host(host: str) -> None:
    with pytest.raises(ValueError, match="not a lab host"):
        host_ip6(host)
