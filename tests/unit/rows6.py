"""IPv6 rows for the kernel fast path's tests (issue 21), made by hand to the contract of
/work/notes/ipv6-contract.md (the engine's IPv6 path makes them the same way): a `Session`
whose `rev_addresses` (VIP6 + client) and `pool.fwd_addresses` (LB6 + backend) are 32 bytes,
its ports and deltas as lbnat.nat._prepare_rewrites packs them; a NAT64 row (an IPv6 client,
an IPv4 backend: 32 and 8 bytes) of the class `Nat64Session` (a stand-in with the contract's
shape until lbnat.nat has it) or of the class Session itself.

And the packets: IPv6 TCP and UDP frames built with scapy, and what a rewrite must make of
them, rebuilt by scapy from scratch (addresses and ports set, checksum recomputed in full).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw

from lbnat import addresses
from lbnat.backends import Backend
from lbnat.nat import PortPool, Session, State, flow_key
from lbnat.packet import PORT_PAIR, add, delta, fold, rewrite_deltas
from lbnat.scheduler import RoundRobin
from lbnat.service import Service, ServiceState

CLIENT6 = "2001:db8:1::11"
VIP6 = "2001:db8::2"  # the LB's IPv6 address: the clients' VIP and the source to backends
BACKEND6 = "2001:db8:2::21"
CLIENT4, LB4, BACKEND4 = "198.18.0.11", "198.18.0.2", "198.18.0.21"
CPORT, SPORT, BPORT, NAT_PORT = 40000, 80, 8080, 61000
NAT_FIRST, NAT_LAST = 61000, 61999


def packed(text: str) -> bytes:
    return addresses.packed(addresses.parse(text))


class Nat64Session(Session):
    """The contract's NAT64 row class (lbnat.nat will have it): an IPv6 client, an IPv4
    backend. Only its class and its address blocks' lengths matter here."""

    __slots__ = ()


def service_state(proto: int = 6, port: int = SPORT) -> ServiceState:
    return ServiceState(Service("v6", "tcp" if proto == 6 else "udp", port), RoundRobin())


def make_row(
    proto: int = 6,
    client: str = CLIENT6,
    client_port: int = CPORT,
    vip: str = VIP6,
    service_port: int = SPORT,
    lb: str = VIP6,
    backend: str = BACKEND6,
    backend_port: int = BPORT,
    nat_port: int = NAT_PORT,
    state: State = State.ESTABLISHED,
    seen: float = 0.0,
    cls: type[Session] = Session,
    service: ServiceState | None = None,
) -> Session:
    """A row as the table holds it, for a client and backend of any families: both
    directions' rewrite bytes and deltas as lbnat.nat._prepare_rewrites computes them."""
    row = cls()
    row.key = flow_key(proto, addresses.parse(client), client_port, service_port)
    row.service = service or service_state(proto, service_port)
    # PortPool packs IPv4 addresses alone (for now): made for a placeholder, then given the
    # row's backend and address block
    pool = PortPool(Backend("192.0.2.1", backend_port), 0, NAT_FIRST, NAT_LAST)
    pool.backend = Backend(backend, backend_port)
    pool.fwd_addresses = packed(lb) + packed(backend)
    row.pool = pool
    row.nat_port = nat_port
    row.state = state
    row.seen = seen
    row.bucket = 0
    row.fwd_ports = PORT_PAIR.pack(nat_port, backend_port)
    fwd_ip, fwd_l4 = _deltas(
        packed(client) + packed(vip),
        pool.fwd_addresses,
        PORT_PAIR.pack(client_port, service_port),
        row.fwd_ports,
    )
    row.rev_addresses = packed(vip) + packed(client)
    row.rev_ports = PORT_PAIR.pack(service_port, client_port)
    rev_ip, rev_l4 = _deltas(
        packed(backend) + packed(lb),
        row.rev_addresses,
        PORT_PAIR.pack(backend_port, nat_port),
        row.rev_ports,
    )
    row.deltas = (fwd_ip << 48) | (fwd_l4 << 32) | (rev_ip << 16) | rev_l4
    return row


def _deltas(old: bytes, new: bytes, old_ports: bytes, new_ports: bytes) -> tuple[int, int]:
    """rewrite_deltas, or for address blocks of different lengths (NAT64) the pseudo-header
    sums' difference (what a translation's delta would be; the tests here only need a value)."""
    if len(old) == len(new):
        return rewrite_deltas(old, new, old_ports, new_ports)
    words = sum((~w & 0xFFFF) for (w,) in struct.iter_unpack("!H", old))
    words += sum(w for (w,) in struct.iter_unpack("!H", new))
    ip_delta = fold(words)
    return ip_delta, add(ip_delta, delta(old_ports, new_ports))


def nat64_row(cls: type[Session] = Nat64Session, **kw: Any) -> Session:
    """A NAT64-shaped row: the IPv6 client and VIP, the IPv4 LB address and backend."""
    return make_row(lb=LB4, backend=BACKEND4, cls=cls, **kw)


# --- packets --------------------------------------------------------------------------------


def tcp6(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: str = "A",
    seq: int = 1,
    ack: int = 1,
    payload: bytes = b"",
    **kw: Any,
) -> Packet:
    """An IPv6 TCP segment, checksum computed by scapy (`chksum=` to set it; IPv6 fields such
    as `hlim`, `tc`, `fl` go to the IPv6 header)."""
    ip_fields = {k: kw.pop(k) for k in ("hlim", "tc", "fl", "plen", "nh") if k in kw}
    ip_fields.setdefault("hlim", 61)
    packet = IPv6(src=src, dst=dst, **ip_fields) / TCP(
        sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, **kw
    )
    return packet / Raw(payload) if payload else packet


def udp6(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", **kw: Any) -> Packet:
    ip_fields = {k: kw.pop(k) for k in ("hlim", "tc", "fl", "plen", "nh") if k in kw}
    ip_fields.setdefault("hlim", 61)
    packet = IPv6(src=src, dst=dst, **ip_fields) / UDP(sport=sport, dport=dport, **kw)
    return packet / Raw(payload) if payload else packet


@dataclass(frozen=True)
class Rewrite6:
    """One direction of an IPv6 flow: what arrives, what it becomes."""

    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    new_src: str
    new_dst: str
    new_sport: int
    new_dport: int


def expected(raw: bytes, flow: Rewrite6) -> bytes:
    """The IPv6 packet `raw` as a rewrite to `flow` must leave it: scapy sets the addresses and
    ports and recomputes the transport checksum from scratch (0 from a UDP sum is sent as
    0xFFFF, as RFC 8200 asks and the incremental update does)."""
    packet = IPv6(raw)
    packet.src, packet.dst = flow.new_src, flow.new_dst
    l4 = packet[TCP] if flow.proto == 6 else packet[UDP]
    l4.sport, l4.dport = flow.new_sport, flow.new_dport
    del l4.chksum
    return bytes(packet)


def checksum_ok(raw: bytes) -> bool:
    """Does the IPv6 packet's transport checksum verify (scapy recomputes it)?"""
    packet = IPv6(raw)
    l4 = packet[TCP] if TCP in packet else packet[UDP]
    given = l4.chksum
    del l4.chksum
    rebuilt = IPv6(bytes(packet))
    again = rebuilt[TCP] if TCP in rebuilt else rebuilt[UDP]
    return bool(given == again.chksum)
