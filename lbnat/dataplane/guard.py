"""Keep the LB host's own TCP/UDP stack away from the packets lbnat owns.

lbnat reads copies of frames from a packet socket; the originals still climb the kernel's
stack, which has no socket for the VIP ports or the NAT ports and would answer with RSTs (TCP)
or ICMP port-unreachables (UDP), killing the flows lbnat is translating. So lbnat installs an
nftables table of its own that drops exactly those packets in prerouting (after the packet
socket got its copy) -- only to the LB address, only those ports: the rest of the host, its
other services and its own connections, are untouched. The C++ guideline dropped every RST the
host sent; that breaks every other TCP service of the host and is not done here.

IPv6 (--ip6): a second table of the same name in the `ip6` family drops lbnat's IPv6 packets
(to ip6, TCP and UDP, service ports and NAT ports) the same way; only TCP and UDP, so neighbour
discovery and every other ICMPv6 stay the kernel's. Beside the `ip` table rather than one `inet`
table for both: the IPv4 table stays exactly what it was (an older lbnat hands its `ip` table
over in a hitless restart, found by family and name, and replaced in the same transaction;
an `inet` table of that name would be another table, leaving the old one behind), and an
lbnat without --ip6 has no IPv6 rule at all. Every script deletes the `ip6` table too (a
predecessor's, when this lbnat has no ip6), and removal and `lbnat cleanup` delete both.

The NAT port range is also added to net.ipv4.ip_local_reserved_ports, so the host never picks
one of lbnat's NAT ports as the source port of its own connections (their replies would be
dropped by the guard). That one setting covers IPv6 too: the kernel's port allocator checks it
for sockets of both families (inet_is_local_reserved_port, in __inet_hash_connect and
inet_csk_find_open_port, which IPv6 sockets use), so there is no IPv6 reservation to make.
Both are undone at exit; a table left by a crash is replaced at start.
Where /proc/sys is read-only (a container: Docker mounts it so) the reservation can be made
for lbnat beforehand -- the setting is per network namespace, and `docker run --sysctl` or
compose's `sysctls:` set it for the container -- and lbnat accepts it when it covers the NAT
range, leaving it alone at exit.

The output chain only counts: a RST the kernel itself sends from lbnat's ports (lbnat's own
frames leave through the packet socket and never pass that hook). It should stay at zero, and
the integration tests check it does.
"""

from __future__ import annotations

import contextlib
import errno
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

RESERVED_PORTS = "/proc/sys/net/ipv4/ip_local_reserved_ports"


class GuardError(Exception):
    pass


def table_name(lb_ip: str) -> str:
    return "lbnat_" + lb_ip.replace(".", "_")


def _set(ports: Iterable[int], nat_ports: tuple[int, int]) -> str:
    items = [str(port) for port in sorted(set(ports))] + [f"{nat_ports[0]}-{nat_ports[1]}"]
    return "{ " + ", ".join(items) + " }"


def ruleset(
    lb_ip: str,
    tcp_ports: Iterable[int],
    udp_ports: Iterable[int],
    nat_ports: tuple[int, int],
    vip: str | None = None,
    ip6: str | None = None,
) -> str:
    """The nft script: replace any old table (a crash leftover) and create the new one, in one
    atomic transaction. With a VIP apart from lb_ip (--vip) both addresses are guarded: the
    VIP (on lo, shared by instances) would otherwise be answered by the kernel. With `ip6` the
    ip6 table too (and without, any old one goes)."""
    name = table_name(lb_ip)
    tcp = _set(tcp_ports, nat_ports)
    udp = _set(udp_ports, nat_ports)
    ours = lb_ip if vip is None or vip == lb_ip else f"{{ {lb_ip}, {vip} }}"
    return f"""
table ip {name}
delete table ip {name}
table ip {name} {{
    comment "lbnat reserved ports {nat_ports[0]}-{nat_ports[1]}"
    chain prerouting {{
        type filter hook prerouting priority raw - 10; policy accept;
        ip daddr {ours} tcp dport {tcp} counter drop comment "lbnat owns these"
        ip daddr {ours} udp dport {udp} counter drop comment "lbnat owns these"
    }}
    chain output {{
        type filter hook output priority raw - 10; policy accept;
        ip saddr {ours} tcp sport {tcp} tcp flags & rst == rst counter comment "kernel RSTs"
    }}
}}
table ip6 {name}
delete table ip6 {name}
{"" if ip6 is None else _ip6_table(name, ip6, tcp, udp)}"""


def _ip6_table(name: str, ip6: str, tcp: str, udp: str) -> str:
    """The ip6 family's table: the same drops and count for lbnat's IPv6 address. `tcp
    dport` and `udp dport` find the transport header behind extension headers (nft walks
    them); ICMPv6, neighbour discovery included, is never matched."""
    return f"""table ip6 {name} {{
    chain prerouting {{
        type filter hook prerouting priority raw - 10; policy accept;
        ip6 daddr {ip6} tcp dport {tcp} counter drop comment "lbnat owns these"
        ip6 daddr {ip6} udp dport {udp} counter drop comment "lbnat owns these"
    }}
    chain output {{
        type filter hook output priority raw - 10; policy accept;
        ip6 saddr {ip6} tcp sport {tcp} tcp flags & rst == rst counter comment "kernel RSTs"
    }}
}}
"""


def delete_tables(lb_ip: str) -> str:
    """The nft script that removes lbnat's tables of both families (absent ones too)."""
    name = table_name(lb_ip)
    return "".join(f"table {f} {name}\ndelete table {f} {name}\n" for f in ("ip", "ip6"))


def nft(script: str) -> None:
    try:
        result = subprocess.run(
            ["nft", "-f", "-"], input=script, text=True, capture_output=True, timeout=10
        )
    except FileNotFoundError:
        raise GuardError("the nft command is not installed (apt-get install nftables)") from None
    if result.returncode != 0:
        raise GuardError(f"nft failed: {result.stderr.strip()}")


def leftover_reservation(lb_ip: str) -> tuple[int, int] | None:
    """The NAT range a crashed lbnat reserved, read from the comment of the table it left."""
    try:
        result = subprocess.run(
            ["nft", "list", "table", "ip", table_name(lb_ip)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"lbnat reserved ports (\d+)-(\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def remove_leftover(lb_ip: str, reserved_path: str = RESERVED_PORTS) -> tuple[int, int] | None:
    """Remove the table and the NAT ports' reservation an lbnat left for a successor that never
    came (`lbnat cleanup`); the range it had reserved, or None when there was no table."""
    left = leftover_reservation(lb_ip)
    if left is None:
        return None
    try:
        with open(reserved_path) as f:
            ranges = _parse_ranges(f.read())
        if left in ranges:
            ranges.remove(left)
            with open(reserved_path, "w") as f:
                f.write(_format_ranges(ranges) + "\n")
    except OSError as error:
        raise GuardError(f"cannot give back the NAT ports in {reserved_path}: {error}") from None
    nft(delete_tables(lb_ip))
    return left


def _parse_ranges(text: str) -> list[tuple[int, int]]:
    ranges = []
    for part in text.replace("\n", "").split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        ranges.append((int(low), int(high or low)))
    return ranges


def _format_ranges(ranges: list[tuple[int, int]]) -> str:
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


def reservation_covers(reserved: str, wanted: tuple[int, int]) -> bool:
    """Whether the ports of `reserved` (the text of ip_local_reserved_ports: "", "8080",
    "1000-2000,3000", ...) include every port of the range `wanted`, pieces that touch
    ("61000-62999,63000-65535") joining up."""
    low, high = wanted
    next_needed = low
    for first, last in sorted(_parse_ranges(reserved)):
        if first > next_needed:
            break
        next_needed = max(next_needed, last + 1)
        if next_needed > high:
            return True
    return next_needed > high


@dataclass
class KernelGuard:
    lb_ip: str
    tcp_ports: list[int]
    udp_ports: list[int]
    nat_ports: tuple[int, int]
    reserved_path: str = RESERVED_PORTS
    vip: str | None = None  # guarded too, when --vip sets it apart from lb_ip
    ip6: str | None = None  # --ip6: guarded in the ip6 table
    _saved_reserved: str | None = field(default=None, init=False)
    installed: bool = field(default=False, init=False)
    notice: str | None = field(default=None, init=False)
    """One line for the log when install() found the NAT ports reserved already and could not
    write the setting (read-only /proc/sys); None otherwise."""

    def install(self) -> None:
        # A table left by a crash means its NAT range is still reserved: that reservation is
        # lbnat's, not the host's, and must not be restored as "what was there before".
        crashed = leftover_reservation(self.lb_ip)
        self.update()
        self.installed = True
        current = ""
        try:
            with open(self.reserved_path) as f:
                current = f.read()
            ranges = _parse_ranges(current)
            if crashed in ranges:
                ranges.remove(crashed)
            saved = _format_ranges(ranges)
            if self.nat_ports not in ranges:
                ranges.append(self.nat_ports)
            with open(self.reserved_path, "w") as f:
                f.write(_format_ranges(ranges) + "\n")
            self._saved_reserved = saved
        except OSError as error:
            low, high = self.nat_ports
            # read-only /proc/sys (EROFS) or a security profile (EACCES): fine if whoever set
            # up this network namespace reserved the range already; it is theirs to undo
            if error.errno in (errno.EROFS, errno.EACCES) and reservation_covers(
                current, self.nat_ports
            ):
                self.notice = (
                    f"reserved ports : {low}-{high} already in {self.reserved_path} "
                    f"(read-only here: {error.strerror}); using it as it is"
                )
                return
            self.remove()
            raise GuardError(
                f"cannot reserve the NAT ports in {self.reserved_path}: {error}; reserve "
                f"them beforehand (sysctl net.ipv4.ip_local_reserved_ports={low}-{high}, "
                f"per network namespace: docker run --sysctl or compose's sysctls:)"
            ) from None

    def update(self) -> None:
        """Create the table, or replace it with one for the current ports (a crash's leftover,
        a service added on reload), in one transaction: no moment without a guard. The reserved
        ports are install()'s business."""
        nft(ruleset(self.lb_ip, self.tcp_ports, self.udp_ports, self.nat_ports, self.vip, self.ip6))

    def remove(self) -> None:
        """Undo install(). Safe to call twice and after a partial install."""
        if self._saved_reserved is not None:
            try:
                with open(self.reserved_path, "w") as f:
                    f.write(self._saved_reserved + "\n")  # a bare "" would write nothing
            except OSError:
                pass
            self._saved_reserved = None
        if self.installed:
            with contextlib.suppress(GuardError):
                nft(delete_tables(self.lb_ip))
            self.installed = False

    def release(self) -> None:
        """Leave the table and the reserved ports in place for the next lbnat (a hitless
        restart, lbnat.dataplane.handover): it takes both over in install() (the table's
        comment tells it the range is lbnat's, not the host's), or `lbnat cleanup` removes
        them. This object forgets them, so a later remove() does nothing."""
        self._saved_reserved = None
        self.installed = False

    def kernel_rsts(self) -> int:
        """Packets counted by the output chains: RSTs the kernel sent from lbnat's ports (of
        both families with --ip6)."""
        total = 0
        for family in ("ip",) if self.ip6 is None else ("ip", "ip6"):
            result = subprocess.run(
                ["nft", "list", "chain", family, table_name(self.lb_ip), "output"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            for line in result.stdout.splitlines():
                if "kernel RSTs" in line and "packets" in line:
                    words = line.split()
                    total += int(words[words.index("packets") + 1])
        return total
