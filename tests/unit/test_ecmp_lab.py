"""lbnat_lab.ecmp's pure helpers: the lab's addresses and the router's next hops as
`ip -j route show VIP` prints them (one route with `nexthops` for ECMP, a `gateway` of its own
for one instance, nothing at all without a route)."""

from __future__ import annotations

import json

import pytest

from lbnat_lab.ecmp import host_ip, next_hops

MULTIPATH = [
    {
        "dst": "198.18.100.1", "protocol": "bird", "metric": 32, "flags": [],
        "nexthops": [
            {"gateway": "198.18.1.11", "dev": "eth0", "weight": 1, "flags": []},
            {"gateway": "198.18.1.13", "dev": "eth0", "weight": 1, "flags": []},
        ],
    }
]  # fmt: skip
SINGLE = [
    {"dst": "198.18.100.1", "gateway": "198.18.1.12", "dev": "eth0", "protocol": "bird",
     "metric": 32, "flags": []},
]  # fmt: skip


@pytest.mark.parametrize(
    ("shown", "hops"),
    [
        (json.dumps(MULTIPATH), {"198.18.1.11", "198.18.1.13"}),
        (json.dumps(SINGLE), {"198.18.1.12"}),
        ("[]", set()),
        ("", set()),
    ],
)
def test_next_hops(shown: str, hops: set[str]) -> None:
    assert next_hops(shown) == hops


def test_host_addresses() -> None:
    assert [host_ip(h) for h in ("rt", "c1", "c2", "lb1", "lb3", "lb9", "b1", "b3")] == [
        "198.18.1.1", "198.18.2.11", "198.18.2.12", "198.18.1.11", "198.18.1.13",
        "198.18.1.19", "198.18.1.21", "198.18.1.23",
    ]  # fmt: skip
    for bad in ("lb", "lb10", "b0", "c", "router"):
        with pytest.raises(ValueError):
            host_ip(bad)
