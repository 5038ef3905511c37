"""The nftables guard with --ip6 (lbnat.dataplane.guard): an ip6 table beside the ip one, its
drops scoped to ip6 and lbnat's TCP/UDP ports, never ICMPv6; removal and cleanup of both."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbnat.dataplane.guard import KernelGuard, delete_tables, remove_leftover, ruleset

LB = "198.18.0.2"
LB6 = "fd00::2"
NAT = (61000, 65535)
NAME = "lbnat_198_18_0_2"


def test_the_ip6_table_drops_only_lbnats_ipv6_packets() -> None:
    text = ruleset(LB, [20000], [5353], NAT, ip6=LB6)
    assert f"table ip6 {NAME} {{" in text
    assert f"ip6 daddr {LB6} tcp dport {{ 20000, 61000-65535 }} counter drop" in text
    assert f"ip6 daddr {LB6} udp dport {{ 5353, 61000-65535 }} counter drop" in text
    drops = [line for line in text.splitlines() if "drop" in line]
    assert len(drops) == 4
    assert all(f"ip daddr {LB} " in line or f"ip6 daddr {LB6} " in line for line in drops)
    assert "icmp" not in text  # neighbour discovery (and every ICMPv6) stays the kernel's
    assert f"ip6 saddr {LB6} tcp sport" in text  # the kernel's RSTs counted


@pytest.mark.parametrize("ip6", [None, LB6])
def test_the_ip_table_is_the_same_with_or_without_ip6(ip6: str | None) -> None:
    without = ruleset(LB, [20000], [5353], NAT)
    text = ruleset(LB, [20000], [5353], NAT, ip6=ip6)
    ip_part = text[: text.index(f"table ip6 {NAME}\n")]
    assert ip_part == without[: without.index(f"table ip6 {NAME}\n")]


def test_without_ip6_a_predecessors_ip6_table_goes_and_none_is_made() -> None:
    text = ruleset(LB, [20000], [5353], NAT)
    assert f"table ip6 {NAME}\ndelete table ip6 {NAME}\n" in text
    assert "ip6 daddr" not in text and f"table ip6 {NAME} {{" not in text


def test_delete_tables_removes_both_families() -> None:
    assert delete_tables(LB) == (
        f"table ip {NAME}\ndelete table ip {NAME}\ntable ip6 {NAME}\ndelete table ip6 {NAME}\n"
    )


def test_guard_installs_and_removes_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripts: list[str] = []
    monkeypatch.setattr("lbnat.dataplane.guard.nft", scripts.append)
    sysctl = tmp_path / "reserved"
    sysctl.write_text("\n")
    guard = KernelGuard(LB, [20000], [], NAT, reserved_path=str(sysctl), ip6=LB6)
    guard.install()
    assert f"ip6 daddr {LB6} tcp dport" in scripts[0]
    assert sysctl.read_text() == "61000-65535\n"  # one reservation covers both families
    guard.remove()
    assert scripts[1] == delete_tables(LB)


def test_cleanup_removes_both(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    scripts: list[str] = []
    monkeypatch.setattr("lbnat.dataplane.guard.nft", scripts.append)
    monkeypatch.setattr("lbnat.dataplane.guard.leftover_reservation", lambda lb_ip: NAT)
    sysctl = tmp_path / "reserved"
    sysctl.write_text("61000-65535\n")
    assert remove_leftover(LB, str(sysctl)) == NAT
    assert scripts == [delete_tables(LB)]
