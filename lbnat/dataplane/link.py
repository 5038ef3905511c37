"""The interface lbnat works on, and next-hop MAC addresses from the kernel's neighbour table.

lbnat sends whole Ethernet frames, so for every packet it needs the MAC of the next hop: the
destination itself when it is on the interface's subnet, else the default gateway. The kernel
already keeps that table (ARP); lbnat reads it (/proc/net/arp, about 50 us) into a dict and
looks frames up there. A miss never stalls the loop: the frame waits in a short per-hop queue,
one ICMP echo makes the kernel resolve the address, and the loop re-reads the table every few
milliseconds while anything waits. A periodic re-read picks up a neighbour whose MAC changed.

IPv6 (--ip6) the same way: the kernel's IPv6 neighbour table (NDP) has no /proc file, so it is
read with one rtnetlink dump (RTM_GETNEIGH, AF_INET6; `parse_neighbour_dump`); an ICMPv6 echo
makes the kernel send a neighbour solicitation for an unknown next hop; the next hop is the
destination when it is on ip6's prefix (or link-local), else the IPv6 default gateway (often
link-local itself). Addresses are ints of both families (lbnat.addresses: an IPv6 one has bit
128 set), so one dict of headers serves both; an IPv6 destination's header carries 0x86DD.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import netifaces

from lbnat import addresses
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
    ip6: str | None = None  # --ip6, on the same interface, and its prefix
    network6: ipaddress.IPv6Network | None = None

    @property
    def ip_int(self) -> int:
        return int(ipaddress.IPv4Address(self.ip))


def _mac_bytes(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def find_link(
    ip: str, interface: str | None = None, absent_ok: bool = False, ip6: str | None = None
) -> Link:
    """The interface that holds `ip` (or check that `interface` holds it). `absent_ok` (a
    pair's VIP, which keepalived adds on the master only): `interface`, which must be given,
    may hold another address of the same subnet instead. `ip6` (--ip6) must be an address of
    that same interface: lbnat's frames of both families go through its packet sockets there,
    and the kernel answers neighbour solicitations for it there."""
    link = _find_link4(ip, interface, absent_ok)
    return link if ip6 is None else with_ip6(link, ip6, absent_ok)


def with_ip6(link: Link, ip6: str, absent_ok: bool = False) -> Link:
    """`link` with its IPv6 address, which must be on the same interface (LinkError if not).
    `absent_ok` (a pair, as for its VIP): the interface may hold another address of ip6's
    prefix instead."""
    try:
        wanted = ipaddress.IPv6Address(ip6)
    except ValueError:
        raise LinkError(f"{ip6!r} (ip6) is not an IPv6 address") from None
    subnet: ipaddress.IPv6Network | None = None
    for entry in netifaces.ifaddresses(link.interface).get(netifaces.AF_INET6, []):
        text = str(entry.get("addr", "")).partition("%")[0]  # fe80::1%eth0: the scope goes
        try:
            address = ipaddress.IPv6Address(text)
        except ValueError:
            continue
        length = _prefix_length(str(entry.get("netmask", "")))
        network = ipaddress.IPv6Network(f"{address}/{length}", strict=False)
        if address == wanted:
            return dataclasses.replace(link, ip6=str(wanted), network6=network)
        if wanted in network and not address.is_link_local and subnet is None:
            subnet = network
    if absent_ok and subnet is not None:
        return dataclasses.replace(link, ip6=str(wanted), network6=subnet)
    raise LinkError(
        f"{wanted} (ip6) is not an address of {link.interface}, the interface of {link.ip}: "
        f"lbnat serves both families on one interface (ip -6 addr add {wanted}/64 dev "
        f"{link.interface})"
    )


def _prefix_length(netmask: str) -> int:
    """netifaces gives an IPv6 netmask as "ffff:ffff:ffff:ffff::/64" (or without the
    length): the prefix length, 128 when it cannot tell."""
    mask, _, length = netmask.partition("/")
    if length.isdigit():
        return int(length)
    try:
        return bin(int(ipaddress.IPv6Address(mask))).count("1")
    except ValueError:
        return 128


def _find_link4(ip: str, interface: str | None, absent_ok: bool) -> Link:
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


def default_gateway(interface: str, family: int = netifaces.AF_INET) -> int | None:
    """The default route's gateway on `interface` (an int, lbnat.addresses), of `family`
    (AF_INET or AF_INET6), or None."""
    gateways = netifaces.gateways().get("default", {})
    entry = gateways.get(family)
    if entry and entry[1] == interface:
        try:
            return addresses.parse(str(entry[0]).partition("%")[0])
        except ValueError:
            return None
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


# --- the IPv6 neighbour table, by rtnetlink (linux/netlink.h, linux/rtnetlink.h,
# linux/neighbour.h) ----------------------------------------------------------------------------

NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, ifindex, state, flags, type
RTATTR = struct.Struct("=HH")  # len, type
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NDA_DST, NDA_LLADDR = 1, 2
# NUD_VALID: PERMANENT | NOARP | REACHABLE | PROBE | STALE | DELAY, the states /proc/net/arp
# shows as complete (ATF_COM); not INCOMPLETE (0x01), FAILED (0x20) or NONE.
NUD_VALID = 0x80 | 0x40 | 0x02 | 0x10 | 0x04 | 0x08


def parse_neighbour_dump(data: bytes, ifindex: int) -> tuple[dict[int, bytes], bool]:
    """Complete IPv6 entries on `ifindex` in a chunk of an RTM_GETNEIGH dump's answer
    (address int -> MAC), and whether the chunk ended the dump (NLMSG_DONE or an error).
    Never raises on short or odd bytes: what cannot be read is skipped."""
    table: dict[int, bytes] = {}
    at = 0
    while at + NLMSG_HEADER.size <= len(data):
        length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, at)
        if length < NLMSG_HEADER.size or at + length > len(data):
            return table, True
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            return table, True
        body = at + NLMSG_HEADER.size
        if kind == RTM_NEWNEIGH and body + NDMSG.size <= at + length:
            family, _, _, index, state, _, _ = NDMSG.unpack_from(data, body)
            if family == socket.AF_INET6 and index == ifindex and state & NUD_VALID:
                dst = mac = None
                attr = body + NDMSG.size
                while attr + RTATTR.size <= at + length:
                    attr_len, attr_type = RTATTR.unpack_from(data, attr)
                    if attr_len < RTATTR.size or attr + attr_len > at + length:
                        break
                    value = data[attr + RTATTR.size : attr + attr_len]
                    if attr_type == NDA_DST and len(value) == 16:
                        dst = addresses.from_packed(value)
                    elif attr_type == NDA_LLADDR and len(value) == 6:
                        mac = bytes(value)
                    attr += (attr_len + 3) & ~3
                if dst is not None and mac is not None and any(mac):
                    table[dst] = mac
        at += (length + 3) & ~3
    return table, False


def read_ndp_table(interface: str) -> dict[int, bytes]:
    """Complete entries of the kernel's IPv6 neighbour table on `interface`: address -> MAC
    (one rtnetlink dump; {} when it cannot be read)."""
    try:
        ifindex = socket.if_nametoindex(interface)
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
            nl.settimeout(1.0)
            request = NDMSG.pack(socket.AF_INET6, 0, 0, 0, 0, 0, 0)
            header = NLMSG_HEADER.pack(
                NLMSG_HEADER.size + len(request), RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
            )
            nl.send(header + request)
            table: dict[int, bytes] = {}
            while True:
                chunk, done = parse_neighbour_dump(nl.recv(1 << 16), ifindex)
                table.update(chunk)
                if done:
                    return table
    except OSError:
        return {}


LINK_LOCAL = ipaddress.IPv6Network("fe80::/10")


class Neighbours:
    """Ethernet headers (destination MAC + our MAC + ethertype) per destination address, of
    either family (IPv6 only when the link has an ip6)."""

    QUEUE_LIMIT = 64  # frames kept per unresolved next hop
    GIVE_UP_AFTER = 3.0  # seconds
    HEADERS_LIMIT = 65536  # destinations whose header is cached (rebuilt lazily after a clear)

    def __init__(
        self,
        link: Link,
        arp_path: str = "/proc/net/arp",
        gateway: int | Literal["auto"] | None = "auto",
        gateway6: int | Literal["auto"] | None = "auto",
        ndp: Callable[[str], dict[int, bytes]] = read_ndp_table,
    ) -> None:
        self.link = link
        self.arp_path = arp_path
        self._network = int(link.network.network_address)
        self._netmask = int(link.network.netmask)
        self._gateway = default_gateway(link.interface) if gateway == "auto" else gateway
        self._ndp = ndp if link.ip6 is not None else None  # no IPv6: its table is never read
        net6 = link.network6
        self._network6 = -1 if net6 is None else addresses.V6 | int(net6.network_address)
        self._netmask6 = 0 if net6 is None else addresses.V6 | int(net6.netmask)
        self._gateway6: int | None = None
        if link.ip6 is not None:
            self._gateway6 = (
                default_gateway(link.interface, netifaces.AF_INET6)
                if gateway6 == "auto"
                else gateway6
            )
        self._icmp6: socket.socket | None = None
        self.headers: dict[int, bytes] = {}  # destination ip -> 14-byte Ethernet header
        self.pending: dict[int, tuple[float, deque[bytes]]] = {}  # next hop -> (since, frames)
        self.gave_up = 0
        self._macs: dict[int, bytes] = {}
        self._asked: dict[int, float] = {}
        self._icmp: socket.socket | None = None
        self.refresh()

    def next_hop(self, destination: int) -> int | None:
        if destination > addresses.V4_MAX:
            if self._ndp is None:
                return None  # no ip6: lbnat sends no IPv6
            if destination & self._netmask6 == self._network6 or _link_local(destination):
                return destination
            return self._gateway6
        if destination & self._netmask == self._network:
            return destination
        return self._gateway

    def refresh(self) -> list[int]:
        """Re-read the kernel's tables. Returns the next hops that just became known."""
        macs = read_arp_table(self.link.interface, self.arp_path)
        if self._ndp is not None:
            macs.update(self._ndp(self.link.interface))
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
        kind = b"\x86\xdd" if destination > addresses.V4_MAX else b"\x08\x00"
        header = self.headers[destination] = mac + self.link.mac + kind
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
        """One ICMP echo from the kernel's stack: it makes the kernel ARP for the next hop
        (an ICMPv6 echo: a neighbour solicitation, for an IPv6 one)."""
        hop = self.next_hop(destination)
        if hop is None or now - self._asked.get(hop, -10.0) < 1.0:
            return
        self._asked[hop] = now
        if hop > addresses.V4_MAX:
            self._solicit6(hop)
            return
        try:
            if self._icmp is None:
                self._icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
                self._icmp.setblocking(False)
            echo = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x4C42, 1) + b"lbnat neighbour")
            struct.pack_into("!H", echo, 2, checksum(echo))
            self._icmp.sendto(bytes(echo), (str(ipaddress.IPv4Address(hop)), 0))
        except OSError:
            pass  # resolution is retried on the next held frame

    def _solicit6(self, hop: int) -> None:
        try:
            if self._icmp6 is None:
                # the kernel fills in an ICMPv6 raw socket's checksum (RFC 3542)
                self._icmp6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
                self._icmp6.setblocking(False)
            echo = struct.pack("!BBHHH", 128, 0, 0, 0x4C42, 1) + b"lbnat neighbour"
            scope = socket.if_nametoindex(self.link.interface) if _link_local(hop) else 0
            self._icmp6.sendto(echo, (addresses.text(hop), 0, 0, scope))
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
        for sock in (self._icmp, self._icmp6):
            if sock is not None:
                sock.close()


def _link_local(address: int) -> bool:
    """An IPv6 address (flagged int) in fe80::/10: always on the link."""
    return address >> 118 == (addresses.V6 | 0xFE80 << 112) >> 118
