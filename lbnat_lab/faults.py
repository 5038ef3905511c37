"""Faults to inject into the netns lab, for the fault suite (tests/faults) and the soak
(lbnat_lab.soak).

This kernel has no netem (and no nft `queue` statement), so packet loss is made with nftables:
one table per namespace whose input and output chains drop `numgen random mod 100 < N` of
the TCP/UDP packets, counting what they drop. lbnat's packet socket sees frames before
netfilter, so loss rules in the LB's namespace would not touch what lbnat receives: put them in
the clients' and the backends' namespaces, on both sides of the LB.

`packet_loss` is a context manager: the table goes away when the block ends, failed or not.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator

from lbnat_lab.netns import Lab

LOSS_TABLE = "lbnat_loss"
"""The nft table (family inet) holding the loss rules of one namespace."""


def loss_ruleset(percent: int) -> str:
    """An nft script: drop `percent` % of TCP and UDP packets in and out, at random, counted.
    The table is deleted first (in the same transaction), so a leftover never doubles it."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ValueError(f"loss {percent!r} is not a whole percentage 0-100")
    rule = f"meta l4proto {{ tcp, udp }} numgen random mod 100 < {percent} counter drop"
    return (
        f"table inet {LOSS_TABLE}\ndelete table inet {LOSS_TABLE}\n"
        f"table inet {LOSS_TABLE} {{\n"
        f"  chain input {{ type filter hook input priority -300; policy accept;\n"
        f'    {rule} comment "input"\n  }}\n'
        f"  chain output {{ type filter hook output priority -300; policy accept;\n"
        f'    {rule} comment "output"\n  }}\n'
        f"}}\n"
    )


def add_loss(lab: Lab, host: str, percent: int) -> None:
    """Drop `percent` % of the TCP/UDP packets `host` receives and sends."""
    lab.run(host, "nft", "-f", "-", input=loss_ruleset(percent))


def remove_loss(lab: Lab, host: str) -> None:
    """Remove `host`'s loss table; no error if it is already gone."""
    lab.run(host, "nft", "delete", "table", "inet", LOSS_TABLE, check=False)


def dropped(lab: Lab, host: str) -> int:
    """Packets `host`'s loss rules dropped so far (input and output); 0 without the table."""
    result = lab.run(host, "nft", "-j", "list", "table", "inet", LOSS_TABLE, check=False)
    if result.returncode != 0:
        return 0
    total = 0
    for item in json.loads(result.stdout)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                total += int(expr["counter"]["packets"])
    return total


@contextlib.contextmanager
def packet_loss(lab: Lab, hosts: tuple[str, ...], percent: int) -> Iterator[dict[str, int]]:
    """Loss on every host of `hosts` for the block; yields a dict that, once the block ends,
    holds the packets each host dropped. The tables are removed even when the block fails."""
    counts: dict[str, int] = {}
    added: list[str] = []
    try:
        for host in hosts:
            add_loss(lab, host, percent)
            added.append(host)
        yield counts
    finally:
        for host in added:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                counts[host] = dropped(lab, host)
            remove_loss(lab, host)
