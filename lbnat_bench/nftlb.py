"""The benchmark's kernel-only peer: a NAT load balancer made of nftables rules (pure text).

The same job as lbnat's in the kernel's own NAT: for a new connection to one of the services
on the path's LB address, a hash of the client's address and port (``jhash``), or a counter
(``numgen inc``), picks a backend from a map; the connection is DNATed to it and SNATed to the
LB address, so the backend's replies come back through this host (no route change on the
backends, as with lbnat). conntrack does the rest of the flow in the kernel. It shows what a
NAT load balancer costs on this machine when no user-space process touches the packets.

Everything is in one table of its own, named after the address, and matches only that address
(lbnat's guard drops packets to lbnat's addresses; these never overlap). One more thing it
does, on by default: a NAT chain turns conntrack on for every packet of the namespace, so the
HAProxy and nginx paths on the same host would pay for tracking only because this table is
there; ``untrack_others`` exempts every packet not to or from this address (``notrack``), as
it was before the table came.

Forwarding must be on in the namespace (net.ipv4.ip_forward=1); the runner sets it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

PROTOCOLS = ("tcp", "udp")
SCHEDULERS = ("jhash", "numgen")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,30}$")


@dataclass(frozen=True)
class Service:
    """One service of the nft path: protocol and port on the LB address, and its backends."""

    name: str
    protocol: str
    port: int
    backends: tuple[tuple[str, int], ...]


def table_name(lb_ip: str) -> str:
    return "lbnat_bench_nft_" + lb_ip.replace(".", "_")


def _check(lb_ip: str, services: Sequence[Service], scheduler: str) -> None:
    ipaddress.IPv4Address(lb_ip)  # ValueError if not one
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r}: not one of {', '.join(SCHEDULERS)}")
    if not services:
        raise ValueError("no service")
    seen: set[tuple[str, int]] = set()
    names: set[str] = set()
    for s in services:
        if not _NAME_RE.match(s.name) or s.name in names:
            raise ValueError(f"service name {s.name!r}: not a unique nft identifier")
        if s.protocol not in PROTOCOLS:
            raise ValueError(f"service {s.name}: protocol {s.protocol!r} is not tcp or udp")
        if (s.protocol, s.port) in seen:
            raise ValueError(f"service {s.name}: {s.protocol} port {s.port} twice")
        if not s.backends:
            raise ValueError(f"service {s.name}: no backend")
        for ip, port in (("", s.port), *s.backends):
            if ip:
                ipaddress.IPv4Address(ip)
            if not 1 <= port <= 65535:
                raise ValueError(f"service {s.name}: port {port} out of range")
        names.add(s.name)
        seen.add((s.protocol, s.port))


def ruleset(
    lb_ip: str,
    services: Sequence[Service],
    scheduler: str = "jhash",
    untrack_others: bool = True,
) -> str:
    """The nft script: replace any table of the same name (a crash leftover) and create the
    new one, in one atomic transaction (``nft -f``). ValueError for an invalid input."""
    _check(lb_ip, services, scheduler)
    name = table_name(lb_ip)
    maps, rules = [], []
    for s in services:
        elements = ", ".join(f"{i} : {ip} . {port}" for i, (ip, port) in enumerate(s.backends))
        maps.append(
            f"    map {s.name} {{\n"
            f"        type mark : ipv4_addr . inet_service\n"
            f"        elements = {{ {elements} }}\n"
            f"    }}"
        )
        n = len(s.backends)
        pick = (f"jhash ip saddr . {s.protocol} sport mod {n}" if scheduler == "jhash"
                else f"numgen inc mod {n}")
        rules.append(
            f"        ip daddr {lb_ip} {s.protocol} dport {s.port} meta mark set {pick} "
            f"dnat ip to meta mark map @{s.name}"
        )
    untrack = ""
    if untrack_others:
        untrack = f"""
    chain untrack_in {{
        type filter hook prerouting priority raw; policy accept;
        ip daddr != {lb_ip} notrack
    }}
    chain untrack_out {{
        type filter hook output priority raw; policy accept;
        ip saddr != {lb_ip} notrack
    }}"""
    return f"""table ip {name}
delete table ip {name}
table ip {name} {{
    comment "lbnat bench: the nftables path on {lb_ip}"
{chr(10).join(maps)}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
{chr(10).join(rules)}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ct status dnat ct original ip daddr {lb_ip} snat ip to {lb_ip}
    }}{untrack}
}}
"""


def delete_script(lb_ip: str) -> str:
    """Remove the table if it is there (declaring it first makes the delete never fail)."""
    name = table_name(lb_ip)
    return f"table ip {name}\ndelete table ip {name}\n"
