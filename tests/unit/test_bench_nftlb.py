"""Tests for lbnat_bench.nftlb, the benchmark's nftables NAT load balancer (ruleset text).

Table-driven: services in, the rules that must be there out. Where nft is installed and this
runs as root, nft itself checks each script (`nft -c`, in a network namespace of its own, so
nothing is loaded anywhere)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from lbnat_bench import nftlb, run
from lbnat_bench.nftlb import Service

B1, B2, B3 = ("198.18.0.21", 80), ("198.18.0.22", 8080), ("198.18.0.23", 80)
TABLE = "lbnat_bench_nft_198_18_0_5"

CASES = {
    "one-backend-tcp": (
        [Service("http", "tcp", 80, (B1,))],
        "jhash",
        [
            "map http {\n        type mark : ipv4_addr . inet_service\n"
            "        elements = { 0 : 198.18.0.21 . 80 }\n    }",
            "ip daddr 198.18.0.5 tcp dport 80 meta mark set jhash ip saddr . tcp sport mod 1 "
            "dnat ip to meta mark map @http",
        ],
    ),
    "three-backends-other-port": (
        [Service("web", "tcp", 80, (B1, B2, B3))],
        "jhash",
        [
            "elements = { 0 : 198.18.0.21 . 80, 1 : 198.18.0.22 . 8080, 2 : 198.18.0.23 . 80 }",
            "tcp dport 80 meta mark set jhash ip saddr . tcp sport mod 3 dnat",
        ],
    ),
    "udp-hashes-the-udp-port": (
        [Service("dns", "udp", 53, (B1, B2))],
        "jhash",
        ["ip daddr 198.18.0.5 udp dport 53 meta mark set jhash ip saddr . udp sport mod 2 "
         "dnat ip to meta mark map @dns"],
    ),
    "numgen": (
        [Service("web", "tcp", 80, (B1, B2))],
        "numgen",
        ["tcp dport 80 meta mark set numgen inc mod 2 dnat ip to meta mark map @web"],
    ),
    "the-bench-services": (
        run.nft_services(),
        "jhash",
        ["tcp dport 5201 meta mark set jhash ip saddr . tcp sport mod 1 "
         "dnat ip to meta mark map @iperf_tcp",
         "udp dport 5201 meta mark set jhash ip saddr . udp sport mod 1 "
         "dnat ip to meta mark map @iperf_udp",
         "tcp dport 80 meta mark set jhash ip saddr . tcp sport mod 1 "
         "dnat ip to meta mark map @http"],
    ),
}


@pytest.mark.parametrize(("services", "scheduler", "expected"), CASES.values(), ids=CASES.keys())
def test_ruleset(services: list[Service], scheduler: str, expected: list[str]) -> None:
    text = nftlb.ruleset("198.18.0.5", services, scheduler)
    # the old table (a leftover) is replaced in the same transaction
    assert text.startswith(f"table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n")
    for piece in expected:
        assert piece in text
    assert text.count("dnat ip to meta mark map") == len(services)
    # replies: SNAT to the path's address, only for connections DNATed from it
    assert "ct status dnat ct original ip daddr 198.18.0.5 snat ip to 198.18.0.5" in text
    # every rule that could act on a packet names this address: nothing of another path's
    rules = [line.strip() for line in text.splitlines()
             if line.strip().startswith(("ip ", "ct "))]
    assert rules and all("198.18.0.5" in rule for rule in rules)
    assert "ip daddr != 198.18.0.5 notrack" in text and "ip saddr != 198.18.0.5 notrack" in text


def test_ruleset_without_untracking_others() -> None:
    text = nftlb.ruleset("198.18.0.5", [Service("http", "tcp", 80, (B1,))], untrack_others=False)
    assert "notrack" not in text and "hook output" not in text


def test_table_name_and_delete_script() -> None:
    assert nftlb.table_name("198.18.0.5") == TABLE
    assert nftlb.delete_script("198.18.0.5") == f"table ip {TABLE}\ndelete table ip {TABLE}\n"
    # never lbnat's own guard table (lbnat_<address>)
    assert not nftlb.table_name(run.NFT_IP).startswith("lbnat_198")


@pytest.mark.parametrize(
    ("lb_ip", "services", "scheduler", "message"),
    [
        ("198.18.0.300", [Service("a", "tcp", 80, (B1,))], "jhash", "198.18.0.300"),
        ("198.18.0.5", [], "jhash", "no service"),
        ("198.18.0.5", [Service("a", "tcp", 80, (B1,))], "random", "scheduler"),
        ("198.18.0.5", [Service("a", "sctp", 80, (B1,))], "jhash", "not tcp or udp"),
        ("198.18.0.5", [Service("a", "tcp", 80, ())], "jhash", "no backend"),
        ("198.18.0.5", [Service("a", "tcp", 0, (B1,))], "jhash", "port 0"),
        ("198.18.0.5", [Service("a", "tcp", 80, (("198.18.0.21", 70000),))], "jhash",
         "port 70000"),
        ("198.18.0.5", [Service("a", "tcp", 80, (("b1", 80),))], "jhash", "b1"),
        ("198.18.0.5", [Service("a b", "tcp", 80, (B1,))], "jhash", "identifier"),
        ("198.18.0.5", [Service("a", "tcp", 80, (B1,)), Service("a", "udp", 80, (B1,))],
         "jhash", "identifier"),
        ("198.18.0.5", [Service("a", "tcp", 80, (B1,)), Service("b", "tcp", 80, (B2,))],
         "jhash", "tcp port 80 twice"),
    ],
)
def test_ruleset_refuses(
    lb_ip: str, services: list[Service], scheduler: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        nftlb.ruleset(lb_ip, services, scheduler)


def _nft_check(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["unshare", "--net", "nft", "-c", "-f", "-"], input=script, text=True,
                          capture_output=True, timeout=30, check=False)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None
                    or shutil.which("unshare") is None,
                    reason="nft -c needs root, nft and unshare")
@pytest.mark.parametrize(
    "script",
    [nftlb.ruleset("198.18.0.5", services, scheduler)
     for services, scheduler, _ in CASES.values()]
    + [nftlb.ruleset("198.18.0.5", run.nft_services(), untrack_others=False),
       nftlb.delete_script("198.18.0.5")],
    ids=[*CASES.keys(), "tracking-all", "delete"],
)
def test_nft_accepts_the_scripts(script: str) -> None:
    done = _nft_check(script)
    assert done.returncode == 0, done.stderr
