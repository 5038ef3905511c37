"""Faults to inject into the netns lab, for the fault suite (tests/faults) and the soak
(lbnat_lab.soak).

This kernel has no netem (and no nft `queue` statement), so packet loss is made with nftables:
one table per namespace whose input and output chains drop `numgen random mod 100 < N` of
the TCP/UDP packets, counting what they drop. lbnat's packet socket sees frames before
netfilter, so loss rules in the LB's namespace would not touch what lbnat receives: put them in
the clients' and the backends' namespaces, on both sides of the LB.

Reordering without netem: an HTB qdisc on the host's eth0 with a fast default class and a
slow one (`SLOW_RATE`), and an nft rule that puts `numgen random mod 100 < N` of the outgoing
TCP packets into the slow class (`meta priority set 1:2`); the packets queued there are
overtaken by the ones sent after them. (prio, tbf, netem and the nft `queue` statement are
not in this kernel; HTB is.)

`packet_loss` and `reordering` are context managers: what they add goes away when the block
ends, failed or not.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator

from lbnat_lab.netns import Lab

LOSS_TABLE = "lbnat_loss"
"""The nft table (family inet) holding the loss rules of one namespace."""
REORDER_TABLE = "lbnat_reorder"
"""The nft table (family inet) that picks the packets to hold back."""
SLOW_RATE = "200mbit"
"""Rate of the slow class: a 64 KB GSO packet waits about 2.6 ms there."""


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


def reorder_ruleset(percent: int) -> str:
    """An nft script: `percent` % of outgoing TCP packets into HTB class 1:2, counted."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ValueError(f"reordering {percent!r} is not a whole percentage 0-100")
    return (
        f"table inet {REORDER_TABLE}\ndelete table inet {REORDER_TABLE}\n"
        f"table inet {REORDER_TABLE} {{\n"
        f"  chain output {{ type filter hook output priority 0; policy accept;\n"
        f"    meta l4proto tcp numgen random mod 100 < {percent} meta priority set 1:2 counter\n"
        f"  }}\n"
        f"}}\n"
    )


def add_reordering(lab: Lab, host: str, percent: int, device: str = "eth0") -> None:
    """Hold back `percent` % of the TCP packets `host` sends, so later ones overtake them."""
    tc = ("tc", "class", "add", "dev", device, "parent", "1:")
    root = ("tc", "qdisc", "add", "dev", device, "root", "handle", "1:")
    lab.run(host, *root, "htb", "default", "1")
    try:
        lab.run(host, *tc, "classid", "1:1", "htb", "rate", "40gbit", "quantum", "200000")
        lab.run(host, *tc, "classid", "1:2", "htb", "rate", SLOW_RATE, "ceil", SLOW_RATE)
        lab.run(host, "nft", "-f", "-", input=reorder_ruleset(percent))
    except BaseException:
        remove_reordering(lab, host, device)
        raise


def remove_reordering(lab: Lab, host: str, device: str = "eth0") -> None:
    """Remove `host`'s reordering qdisc and table; no error if they are already gone."""
    lab.run(host, "nft", "delete", "table", "inet", REORDER_TABLE, check=False)
    lab.run(host, "tc", "qdisc", "del", "dev", device, "root", check=False)


def held_back(lab: Lab, host: str, device: str = "eth0") -> int:
    """Packets `host` sent through the slow class so far."""
    # `tc -j` prints classes as text here: "class htb 1:2 ..." then " Sent B bytes P pkt ..."
    result = lab.run(host, "tc", "-s", "class", "show", "dev", device, check=False)
    lines = result.stdout.splitlines()
    for index, line in enumerate(lines[:-1]):
        if line.startswith("class htb 1:2 "):
            words = lines[index + 1].split()
            if len(words) >= 5 and words[0] == "Sent" and words[4] == "pkt":
                return int(words[3])
    return 0


def out_of_order(lab: Lab, host: str) -> int:
    """Segments `host`'s TCP stack has queued out of order so far (TcpExtTCPOFOQueue)."""
    result = lab.run(host, "nstat", "-az", "TcpExtTCPOFOQueue")
    for line in result.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == "TcpExtTCPOFOQueue":
            return int(fields[1])
    return 0


@contextlib.contextmanager
def reordering(lab: Lab, hosts: tuple[str, ...], percent: int) -> Iterator[dict[str, int]]:
    """Reordering on every host of `hosts` for the block; yields a dict that, once the block
    ends, holds the packets each host held back. Removed even when the block fails."""
    counts: dict[str, int] = {}
    added: list[str] = []
    try:
        for host in hosts:
            add_reordering(lab, host, percent)
            added.append(host)
        yield counts
    finally:
        for host in added:
            with contextlib.suppress(subprocess.SubprocessError, OSError, ValueError):
                counts[host] = held_back(lab, host)
            remove_reordering(lab, host)
