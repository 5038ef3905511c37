"""The interface lbnat works on, and next-hop MAC addresses from the kernel's neighbour table.

lbnat sends whole Ethernet frames, so for every packet it needs the MAC of the next hop: the
destination itself when it is on the interface's subnet, else the default gateway. The kernel
already keeps that table (ARP); lbnat reads it (/proc/net/arp, about 50 us) into a dict and
looks frames up there. A miss never stalls the loop: the frame waits in a short per-hop queue,
one ICMP echo makes the kernel resolve the address, and the loop re-reads the table every few
milliseconds while anything waits. A periodic re-read picks up a neighbour whose MAC changed.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import Literal

import netifaces

from lbnat.linkwatch import LinkState
from lbnat.packet import checksum

SIOCGIFFLAGS = 0x8913  # linux/sockios.h: an interface's flags, by name
IFF_UP = 0x1  # linux/if.h: administratively up
IFF_RUNNING = 0x40  # linux/if.h: operationally up (carrier, not dormant)
IFREQ = struct.Struct("16sH22x")  # struct ifreq: the name, then ifr_flags in the union


class LinkError(Exception):
    """The address or interface asked for is not usable (a clear message, no traceback)."""


@dataclass(frozen=True, slots=True)
class Link:
    interface: str
    ip: str
    network: ipaddress.IPv4Network
    mac: bytes

    @property
    def ip_int(self) -> int:
        return int(ipaddress.IPv4Address(self.ip))


def _mac_bytes(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def find_link(ip: str, interface: str | None = None, absent_ok: bool = False) -> Link:
    """The interface that holds `ip` (or check that `interface` holds it). `absent_ok` (a
    pair's VIP, which keepalived adds on the master only): `interface`, which must be given,
    may hold another address of the same subnet instead."""
    try:
        ipaddress.IPv4Address(ip)
    except ValueError:
        raise LinkError(f"{ip!r} is not an IPv4 address") from None
    names = [interface] if interface else netifaces.interfaces()
    for name in names:
        try:
            addresses = netifaces.ifaddresses(name)
        except ValueError:
            raise LinkError(f"no interface named {name!r}") from None
        for entry in addresses.get(netifaces.AF_INET, []):
            if entry.get("addr") == ip:
                network = ipaddress.IPv4Network(
                    f"{ip}/{entry.get('netmask', '255.255.255.255')}", strict=False
                )
                links = addresses.get(netifaces.AF_LINK, [])
                mac = links[0].get("addr", "") if links else ""
                if not mac or name == "lo":
                    raise LinkError(f"{ip} is on {name}, which has no Ethernet address")
                return Link(name, ip, network, _mac_bytes(mac))
    if absent_ok and interface:
        link = _subnet_link(ip, interface)
        if link is not None:
            return link
    where = f"interface {interface}" if interface else "any interface"
    hint = ""
    if absent_ok:
        hint = (" (a pair's VIP may be absent until keepalived adds it: give --interface, "
                "one with an address in the VIP's subnet)")  # fmt: skip
    raise LinkError(f"{ip} is not an address of {where} in this network namespace{hint}")


def _subnet_link(ip: str, interface: str) -> Link | None:
    """`interface` as the link of `ip`, which it does not hold (yet) but whose subnet it is on."""
    addresses = netifaces.ifaddresses(interface)
    links = addresses.get(netifaces.AF_LINK, [])
    mac = links[0].get("addr", "") if links else ""
    for entry in addresses.get(netifaces.AF_INET, []):
        network = ipaddress.IPv4Network(
            f"{entry.get('addr')}/{entry.get('netmask', '255.255.255.255')}", strict=False
        )
        if ipaddress.IPv4Address(ip) in network and mac and interface != "lo":
            return Link(interface, ip, network, _mac_bytes(mac))
    return None


class LinkProbe:
    """Reads whether lbnat's interface is up, down or gone (lbnat.linkwatch), for the main
    process's upkeep. By index: lbnat's packet sockets are bound to the index, so a renamed
    interface is still theirs and one deleted and made again under the same name is not. Two
    calls on a datagram socket (16 us measured), in lbnat's own network namespace: /sys/class/net
    shows the namespace sysfs was mounted in, which need not be this one."""

    def __init__(self, interface: str) -> None:
        try:
            self.index = socket.if_nametoindex(interface)
        except OSError:
            raise LinkError(f"no interface named {interface!r}") from None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def state(self) -> LinkState:
        try:
            name = socket.if_indextoname(self.index)
            answer = fcntl.ioctl(self._sock, SIOCGIFFLAGS, IFREQ.pack(name.encode(), 0))
        except OSError:  # no such index (ENXIO), or it went between the two calls (ENODEV)
            return LinkState.GONE
        flags = IFREQ.unpack(answer)[1]
        if flags & IFF_UP and flags & IFF_RUNNING:
            return LinkState.UP
        return LinkState.DOWN

    def close(self) -> None:
        self._sock.close()


def default_gateway(interface: str) -> int | None:
    gateways = netifaces.gateways().get("default", {})
    entry = gateways.get(netifaces.AF_INET)
    if entry and entry[1] == interface:
        return int(ipaddress.IPv4Address(entry[0]))
    return None


def link_mtu(interface: str, sys_class_net: str = "/sys/class/net") -> int | None:
    """The interface's MTU, or None when it cannot be read."""
    try:
        with open(f"{sys_class_net}/{interface}/mtu") as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return None


def receive_buffer_max(proc_sys: str = "/proc/sys/net") -> int | None:
    """The largest TCP receive buffer of this namespace's stack (tcp_rmem's maximum or
    rmem_max, the larger), from which Linux picks its window scale; None if unreadable."""
    try:
        with open(f"{proc_sys}/ipv4/tcp_rmem") as file:
            tcp_rmem = int(file.read().split()[2])
        with open(f"{proc_sys}/core/rmem_max") as file:
            rmem_max = int(file.read().strip())
    except (OSError, ValueError, IndexError):
        return None
    return max(tcp_rmem, rmem_max)


def read_arp_table(interface: str, path: str = "/proc/net/arp") -> dict[int, bytes]:
    """Complete entries of the kernel's IPv4 neighbour table on `interface`: ip -> MAC."""
    table: dict[int, bytes] = {}
    try:
        with open(path) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) < 6 or fields[5] != interface:
                    continue
                if not int(fields[2], 16) & 0x2 or fields[3] == "00:00:00:00:00:00":
                    continue  # incomplete
                table[int(ipaddress.IPv4Address(fields[0]))] = _mac_bytes(fields[3])
    except OSError:
        pass
    return table


class Neighbours:
    """Ethernet headers (destination MAC + our MAC + IPv4 ethertype) per destination address."""

    QUEUE_LIMIT = 64  # frames kept per unresolved next hop
    GIVE_UP_AFTER = 3.0  # seconds
    HEADERS_LIMIT = 65536  # destinations whose header is cached (rebuilt lazily after a clear)

    def __init__(
        self,
        link: Link,
        arp_path: str = "/proc/net/arp",
        gateway: int | Literal["auto"] | None = "auto",
    ) -> None:
        self.link = link
        self.arp_path = arp_path
        self._network = int(link.network.network_address)
        self._netmask = int(link.network.netmask)
        self._gateway = default_gateway(link.interface) if gateway == "auto" else gateway
        self.headers: dict[int, bytes] = {}  # destination ip -> 14-byte Ethernet header
        self.pending: dict[int, tuple[float, deque[bytes]]] = {}  # next hop -> (since, frames)
        self.gave_up = 0
        self._macs: dict[int, bytes] = {}
        self._asked: dict[int, float] = {}
        self._icmp: socket.socket | None = None
        self.refresh()

    def next_hop(self, destination: int) -> int | None:
        if destination & self._netmask == self._network:
            return destination
        return self._gateway

    def refresh(self) -> list[int]:
        """Re-read the kernel's table. Returns the next hops that just became known."""
        macs = read_arp_table(self.link.interface, self.arp_path)
        learned = [ip for ip in macs if self._macs.get(ip) != macs[ip]]
        self._macs.update(macs)  # keep a MAC the kernel aged out: it is still the best guess
        if learned:
            self.headers.clear()  # rebuilt lazily from _macs
        return learned

    def header_for(self, destination: int) -> bytes | None:
        """The Ethernet header for a frame to `destination`, or None while unresolved."""
        header = self.headers.get(destination)
        if header is not None:
            return header
        hop = self.next_hop(destination)
        if hop is None:
            return None
        mac = self._macs.get(hop)
        if mac is None:
            return None
        if len(self.headers) >= self.HEADERS_LIMIT:
            # One entry per destination: a flood of spoofed sources routed via the gateway
            # (lbnat's cookie SYN-ACKs to them) would grow this without bound.
            self.headers.clear()
        header = self.headers[destination] = mac + self.link.mac + b"\x08\x00"
        return header

    def hold(self, destination: int, frame: bytes, now: float) -> bool:
        """Queue a frame for an unresolved destination and ask the kernel to resolve it.
        False when the destination has no route or the queue is full (the frame is dropped)."""
        if self.next_hop(destination) is None:
            return False
        _since, queue = self.pending.setdefault(destination, (now, deque()))
        if len(queue) >= self.QUEUE_LIMIT:
            return False
        queue.append(frame)
        self.solicit(destination, now)
        return True

    def solicit(self, destination: int, now: float) -> None:
        """One ICMP echo from the kernel's stack: it makes the kernel ARP for the next hop."""
        hop = self.next_hop(destination)
        if hop is None or now - self._asked.get(hop, -10.0) < 1.0:
            return
        self._asked[hop] = now
        try:
            if self._icmp is None:
                self._icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
                self._icmp.setblocking(False)
            echo = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x4C42, 1) + b"lbnat neighbour")
            struct.pack_into("!H", echo, 2, checksum(echo))
            self._icmp.sendto(bytes(echo), (str(ipaddress.IPv4Address(hop)), 0))
        except OSError:
            pass  # resolution is retried on the next held frame

    def release(self, now: float) -> tuple[list[tuple[bytes, bytes]], int]:
        """Frames whose next hop is now known, with their Ethernet header; and how many frames
        were given up on (unresolved for GIVE_UP_AFTER seconds)."""
        if not self.pending:
            return [], 0
        self.refresh()
        ready: list[tuple[bytes, bytes]] = []
        dropped = 0
        for destination in list(self.pending):
            since, queue = self.pending[destination]
            header = self.header_for(destination)
            if header is not None:
                ready.extend((header, frame) for frame in queue)
                del self.pending[destination]
            elif now - since > self.GIVE_UP_AFTER:
                dropped += len(queue)
                del self.pending[destination]
        self.gave_up += dropped
        return ready, dropped

    def close(self) -> None:
        if self._icmp is not None:
            self._icmp.close()
