"""Shared test helpers: scapy packet builders for the lab addresses, checksum checkers, the
kernel's completion of a partial checksum, and a small harness that drives an Engine with
scapy packets and checks every translation it forwards.

Checksums are checked two independent ways: with scapy (rebuild with the checksum deleted and
compare) and with a plain ones' complement sum written here, never with lbnat.packet's own
arithmetic, so a bug there cannot hide itself.
"""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Packet, Raw

from lbnat.backends import Backend, Health
from lbnat.engine import (
    DROP,
    FORWARD,
    REPLIES,
    REPLY,
    SEND_FIRST,
    Action,
    Engine,
    Event,
    FlowEnded,
    FlowOpened,
    ip_int,
)
from lbnat.nat import (
    ENDED,
    HALF_OPEN,
    Session,
    SessionTable,
    State,
    Timeouts,
    backend_pool_key,
    forward_key,
)
from lbnat.service import Service
from lbnat.syncookie import SynProxySettings

# --- the lab ---------------------------------------------------------------------------------

LB = "198.18.0.2"  # the LB address, which is also the VIP
CLIENT1 = "198.18.0.11"
CLIENT2 = "198.18.0.12"
BACKEND_IPS = ("198.18.0.21", "198.18.0.22", "198.18.0.23")
WEB_PORT = 80  # the TCP service on the VIP
WEB_BACKEND_PORT = 8080
DNS_PORT = 53  # the UDP service on the VIP
DNS_BACKEND_PORT = 5353
NAT_PORTS = (61000, 65535)

PROTO_TCP = 6
PROTO_UDP = 17
L4_CHECKSUM_AT = {PROTO_TCP: 16, PROTO_UDP: 6}


# --- builders ----------------------------------------------------------------------------------


def tcp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: str = "S",
    seq: int = 0,
    ack: int = 0,
    window: int = 65535,
    payload: bytes = b"",
    options: Sequence[tuple[str, Any]] = (),
    ip_options: Sequence[Any] = (),
    chksum: int | None = None,
    ip_flags: str = "DF",
    frag: int = 0,
    dataofs: int | None = None,
) -> Packet:
    """An IPv4 + TCP packet; checksums are computed by scapy unless given."""
    segment = TCP(
        sport=sport,
        dport=dport,
        flags=flags,
        seq=seq,
        ack=ack,
        window=window,
        options=list(options),
        chksum=chksum,
        dataofs=dataofs,
    )
    packet: Packet = IP(src=src, dst=dst, flags=ip_flags, frag=frag, options=list(ip_options))
    packet = packet / segment
    if payload:
        packet = packet / Raw(payload)
    return packet


def udp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    payload: bytes = b"",
    chksum: int | None = None,
    ip_options: Sequence[Any] = (),
    length: int | None = None,
    ip_flags: str = "DF",
    frag: int = 0,
) -> Packet:
    packet: Packet = IP(src=src, dst=dst, flags=ip_flags, frag=frag, options=list(ip_options))
    packet = packet / UDP(sport=sport, dport=dport, chksum=chksum, len=length)
    if payload:
        packet = packet / Raw(payload)
    return packet


def wire(packet: Packet | bytes | bytearray) -> bytearray:
    """The packet's bytes, as the data plane hands them to the engine."""
    if isinstance(packet, bytes | bytearray):
        return bytearray(packet)
    return bytearray(bytes(packet))


def dissect(raw: bytes | bytearray) -> Packet:
    return IP(bytes(raw))


# --- independent ones' complement arithmetic ---------------------------------------------------


def ones_sum(data: bytes | bytearray) -> int:
    """16-bit ones' complement sum with end-around carries (word by word, the slow clear way)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header_sum(raw: bytes | bytearray) -> int:
    """The uncomplemented, folded sum of the TCP/UDP pseudo-header of IPv4 packet `raw`."""
    ihl = (raw[0] & 0x0F) * 4
    total_length = (raw[2] << 8) | raw[3]
    proto = raw[9]
    udp_length = (raw[ihl + 4] << 8) | raw[ihl + 5]
    length = udp_length if proto == PROTO_UDP else total_length - ihl
    return ones_sum(bytes(raw[12:20]) + struct.pack("!BBH", 0, proto, length))


def make_partial(raw: bytes | bytearray) -> bytearray:
    """Turn a packet into what an offloading sender hands over: the transport checksum field
    holds only the uncomplemented folded pseudo-header sum (Linux's ~tcp_v4_check(len, s, d, 0))."""
    buf = bytearray(raw)
    ihl = (buf[0] & 0x0F) * 4
    at = ihl + L4_CHECKSUM_AT[buf[9]]
    struct.pack_into("!H", buf, at, pseudo_header_sum(buf))
    return buf


def complete_partial(raw: bytes | bytearray) -> bytearray:
    """Finish a partial checksum as the kernel does (skb_checksum_help): sum the segment from
    csum_start to the end, the checksum field included, fold, complement, 0 sent as 0xFFFF."""
    buf = bytearray(raw)
    ihl = (buf[0] & 0x0F) * 4
    total_length = (buf[2] << 8) | buf[3]
    at = ihl + L4_CHECKSUM_AT[buf[9]]
    check = ~ones_sum(bytes(buf[ihl:total_length])) & 0xFFFF
    struct.pack_into("!H", buf, at, check or 0xFFFF)
    return buf


def checksums_ok(raw: bytes | bytearray) -> bool:
    """Fast verification without scapy: the IP header and the transport segment both sum to
    0xFFFF (negative zero). A UDP checksum of 0 ("none") is accepted."""
    ihl = (raw[0] & 0x0F) * 4
    total_length = (raw[2] << 8) | raw[3]
    if ones_sum(bytes(raw[:ihl])) != 0xFFFF:
        return False
    proto = raw[9]
    at = ihl + L4_CHECKSUM_AT[proto]
    if proto == PROTO_UDP and raw[at] == raw[at + 1] == 0:
        return True
    segment = bytes(raw[ihl:total_length])
    return ones_sum(struct.pack("!H", pseudo_header_sum(raw)) + segment) == 0xFFFF


def verify_checksums(
    raw: bytes | bytearray, *, udp_none: bool = False, kernel_completed: bool = False
) -> None:
    """Assert every checksum of IPv4 packet `raw` with scapy: dissect, delete the checksums,
    rebuild, compare field by field.

    udp_none: the UDP checksum must be 0 ("no checksum"), not computed.
    kernel_completed: the transport checksum was finished by the kernel, which sends a
    computed 0 as 0xFFFF for TCP too (the same value in ones' complement).
    """
    raw = bytes(raw)
    packet = IP(raw)
    clone = packet.copy()
    del clone.chksum
    proto = packet.proto
    layer = TCP if proto == PROTO_TCP else UDP if proto == PROTO_UDP else None
    if layer is not None and layer in clone:
        del clone[layer].chksum
    rebuilt_raw = bytes(clone)
    assert len(rebuilt_raw) == len(raw), "scapy re-serialised the packet differently"
    rebuilt = IP(rebuilt_raw)
    assert packet.chksum == rebuilt.chksum, (
        f"IP header checksum {packet.chksum:#06x}, correct {rebuilt.chksum:#06x}"
    )
    assert checksums_ok(raw) or (udp_none and layer is UDP), "ones' complement check failed"
    if layer is None:
        return
    got = packet[layer].chksum
    want = rebuilt[layer].chksum  # scapy already sends a computed UDP 0 as 0xFFFF
    if layer is UDP and udp_none:
        assert got == 0, f"UDP checksum {got:#06x}, expected 0 (none)"
        return
    if kernel_completed and want == 0:
        want = 0xFFFF
    assert got == want, f"{layer.__name__} checksum {got:#06x}, correct {want:#06x}"


def addr(text: str) -> int:
    return ip_int(text)


def ip_text(value: int) -> str:
    return socket.inet_ntoa(struct.pack("!I", value))


# --- the engine harness ------------------------------------------------------------------------


def tcp_backends(count: int = 3) -> list[Backend]:
    return [Backend(BACKEND_IPS[i], WEB_BACKEND_PORT, name=f"b{i + 1}") for i in range(count)]


def udp_backends(count: int = 3) -> list[Backend]:
    return [Backend(BACKEND_IPS[i], DNS_BACKEND_PORT, name=f"u{i + 1}") for i in range(count)]


def backend_name(key: tuple[str, int]) -> str:
    """b1..b3 for the lab's backends (by address; the port tells TCP from UDP)."""
    prefix = "b" if key[1] == WEB_BACKEND_PORT else "u"
    return f"{prefix}{BACKEND_IPS.index(key[0]) + 1}"


@dataclass
class Result:
    """What the engine did with one packet."""

    action: Action
    out: bytearray  # the buffer after handle() (completed, for a partial checksum)

    @property
    def kind(self) -> int:
        kind: int = self.action[0]
        return kind

    @property
    def forwarded(self) -> bool:
        """The packet went on (after any packets the engine sent first)."""
        return self.kind in (FORWARD, SEND_FIRST)

    @property
    def sent_first(self) -> list[tuple[bytes, str]]:
        """The packets the engine sent before forwarding this one (SEND_FIRST), or instead of
        it (REPLIES), with their next hops."""
        if self.kind not in (SEND_FIRST, REPLIES):
            return []
        return [(packet, ip_text(hop)) for packet, hop in self.action[2]]

    @property
    def drop_reason(self) -> int | None:
        reason: int = self.action[1]
        return reason if self.kind == DROP else None

    @property
    def reply(self) -> bytes:
        assert self.action[0] == REPLY, self.action
        packet = self.action[1]
        assert isinstance(packet, bytes)
        return packet

    @property
    def next_hop(self) -> str:
        hop = self.action[1] if self.kind == SEND_FIRST else self.action[-1]
        assert isinstance(hop, int)
        return ip_text(hop)


class EngineHarness:
    """An Engine with a TCP service "web" (VIP port 80 -> backends :8080) and a UDP service "dns"
    (53 -> :5353) over the lab backends, a fake clock, and packet helpers."""

    def __init__(
        self,
        backends: int = 3,
        *,
        nat_ports: tuple[int, int] = NAT_PORTS,
        cap: int = 1_000_000,
        timeouts: Timeouts | None = None,
        affinity: float = 0.0,
        scheduler: str = "rr",
        partial: bool = False,
        syn_proxy: SynProxySettings | None = None,
    ) -> None:
        self.tcp_backends = tcp_backends(backends)
        self.udp_backends = udp_backends(backends)
        self.engine = Engine(
            LB,
            [
                Service("web", "tcp", WEB_PORT, scheduler, affinity, tuple(self.tcp_backends)),
                Service("dns", "udp", DNS_PORT, scheduler, affinity, tuple(self.udp_backends)),
            ],
            nat_ports=nat_ports,
            timeouts=timeouts,
            table_cap=cap,
            syn_proxy=syn_proxy,
        )
        self.now = 0.0
        self.partial = partial

    @property
    def table(self) -> SessionTable:
        return self.engine.table

    def send(self, packet: Packet | bytes | bytearray, partial: bool | None = None) -> Result:
        """Hand one packet to the engine (as a partial-checksum packet if asked)."""
        partial = self.partial if partial is None else partial
        buf = wire(packet)
        if partial:
            buf = make_partial(buf)
        action = self.engine.handle(buf, 0, len(buf), partial, self.now)
        if partial and action[0] == FORWARD:
            buf = complete_partial(buf)
        return Result(action, buf)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.engine.tick(self.now)

    def events(self) -> list[Event]:
        return self.engine.take_events()

    def set_health(self, index: int, health: Health, draining: bool = False) -> None:
        """Publish a snapshot where backend `index` (0-based) of both services changed."""
        for name, backends in (("web", self.tcp_backends), ("dns", self.udp_backends)):
            backends[index] = backends[index].with_health(health).with_draining(draining)
            self.engine.set_backends(name, backends)

    def add_backend(self) -> None:
        index = len(self.tcp_backends)
        self.tcp_backends.append(tcp_backends(index + 1)[index])
        self.udp_backends.append(udp_backends(index + 1)[index])
        self.engine.set_backends("web", self.tcp_backends)
        self.engine.set_backends("dns", self.udp_backends)

    def flow(self, client: str = CLIENT1, port: int = 40000, isn: int = 1000) -> Flow:
        return Flow(self, client, port, isn)

    def udp_flow(self, client: str = CLIENT1, port: int = 40000) -> UdpFlow:
        return UdpFlow(self, client, port)


def describe_events(events: Sequence[Event]) -> list[str]:
    """Events as short strings for table-driven expectations: "open b1", "end fin 0"."""
    text = []
    for event in events:
        if isinstance(event, FlowOpened):
            text.append(f"open {backend_name(event.backend)}")
        elif isinstance(event, FlowEnded):
            text.append(f"end {event.reason.value} {event.open_flows}")
        else:
            text.append("no-backend")
    return text


@dataclass
class Flow:
    """One TCP connection seen from both of its ends; every packet the engine forwards is
    checked: addresses and ports translated, everything else untouched, checksums right."""

    lab: EngineHarness
    client: str
    port: int
    c_isn: int
    s_isn: int = 700_000
    c_next: int = 0
    s_next: int = 0
    backend: str | None = None  # learnt from the first forwarded SYN
    nat_port: int | None = None
    server_acked: int | None = None  # the last ACK the backend sent (what it expects next)
    client_acked: int | None = None
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.c_next = (self.c_isn + 1) & 0xFFFFFFFF
        self.s_next = (self.s_isn + 1) & 0xFFFFFFFF

    @property
    def session(self) -> Session | None:
        table = self.lab.engine.table
        return table.forward.get(forward_key(PROTO_TCP, addr(self.client), self.port, WEB_PORT))

    @property
    def state(self) -> State | None:
        session = self.session
        return None if session is None else session.state

    # -- client side --

    def from_client(
        self, flags: str, seq: int, ack: int = 0, payload: bytes = b"", window: int = 65535
    ) -> Result:
        packet = tcp(self.client, LB, self.port, WEB_PORT, flags, seq, ack, window, payload)
        result = self.lab.send(packet)
        if result.forwarded:
            self._check_forward(packet, result)
        self.results.append(result)
        return result

    def syn(self, new_isn: int | None = None, options: Sequence[tuple[str, Any]] = ()) -> Result:
        if new_isn is not None:
            self.c_isn = new_isn
            self.c_next = (new_isn + 1) & 0xFFFFFFFF
            self.server_acked = self.client_acked = None
        packet = tcp(self.client, LB, self.port, WEB_PORT, "S", self.c_isn, options=options)
        result = self.lab.send(packet)
        if result.forwarded:
            session = self.session
            assert session is not None, "a forwarded SYN left no row"
            self.backend = session.backend.ip  # the row decides; the output must agree
            self.nat_port = session.nat_port
            self._check_forward(packet, result)
        self.results.append(result)
        return result

    def ack(self) -> Result:
        self.client_acked = self.s_next
        return self.from_client("A", self.c_next, self.s_next)

    def data_c(self, length: int = 7) -> Result:
        payload = bytes((i * 7 + 3) & 0xFF for i in range(length))
        result = self.from_client("PA", self.c_next, self.s_next, payload)
        self.client_acked = self.s_next
        self.c_next = (self.c_next + length) & 0xFFFFFFFF
        return result

    def fin_c(self) -> Result:
        result = self.from_client("FA", self.c_next, self.s_next)
        self.client_acked = self.s_next
        self.c_next = (self.c_next + 1) & 0xFFFFFFFF
        return result

    def rst_c(self, in_window: bool = True) -> Result:
        """A client RST at what the backend expects next (in window), or half the sequence
        space away from it (out of window)."""
        expected = self.server_acked if self.server_acked is not None else self.c_isn + 1
        seq = expected if in_window else expected + 0x80000000
        return self.from_client("R", seq & 0xFFFFFFFF)

    # -- backend side --

    def from_server(
        self,
        flags: str,
        seq: int,
        ack: int = 0,
        payload: bytes = b"",
        window: int = 65535,
        options: Sequence[tuple[str, Any]] = (),
    ) -> Result:
        assert self.backend is not None and self.nat_port is not None, "no SYN was forwarded"
        packet = tcp(
            self.backend,
            LB,
            WEB_BACKEND_PORT,
            self.nat_port,
            flags,
            seq,
            ack,
            window,
            payload,
            options,
        )
        result = self.lab.send(packet)
        if result.forwarded:
            self._check_reply(packet, result)
        self.results.append(result)
        return result

    def synack(self, options: Sequence[tuple[str, Any]] = ()) -> Result:
        self.server_acked = (self.c_isn + 1) & 0xFFFFFFFF
        return self.from_server("SA", self.s_isn, self.server_acked, options=options)

    def ack_s(self) -> Result:
        self.server_acked = self.c_next
        return self.from_server("A", self.s_next, self.c_next)

    def data_s(self, length: int = 1460) -> Result:
        payload = bytes((i * 13 + 1) & 0xFF for i in range(length))
        result = self.from_server("PA", self.s_next, self.c_next, payload)
        self.server_acked = self.c_next
        self.s_next = (self.s_next + length) & 0xFFFFFFFF
        return result

    def fin_s(self) -> Result:
        result = self.from_server("FA", self.s_next, self.c_next)
        self.server_acked = self.c_next
        self.s_next = (self.s_next + 1) & 0xFFFFFFFF
        return result

    def rst_s(self, in_window: bool = True) -> Result:
        expected = self.client_acked if self.client_acked is not None else self.s_isn + 1
        seq = expected if in_window else expected + 0x80000000
        return self.from_server("R", seq & 0xFFFFFFFF)

    def refuse(self, ack_ok: bool = True) -> Result:
        """The backend refuses the SYN: RST+ACK acknowledging ISN + 1 (or something else)."""
        ack = self.c_isn + 1 if ack_ok else self.c_isn + 7
        return self.from_server("RA", 0, ack & 0xFFFFFFFF)

    # -- checks --

    def _check_forward(self, sent: Packet, result: Result) -> None:
        out = dissect(result.out)
        assert out.src == LB
        assert out.dst == self.backend == result.next_hop
        assert out[TCP].sport == self.nat_port
        assert out[TCP].dport == WEB_BACKEND_PORT
        self._check_unchanged(sent, out)
        verify_checksums(result.out, kernel_completed=self.lab.partial)

    def _check_reply(self, sent: Packet, result: Result) -> None:
        out = dissect(result.out)
        assert out.src == LB  # the VIP
        assert out.dst == self.client == result.next_hop
        assert out[TCP].sport == WEB_PORT
        assert out[TCP].dport == self.port
        self._check_unchanged(sent, out)
        verify_checksums(result.out, kernel_completed=self.lab.partial)

    @staticmethod
    def _check_unchanged(sent: Packet, out: Packet) -> None:
        sent = dissect(bytes(sent))
        for name in ("seq", "ack", "flags", "window", "dataofs"):
            assert getattr(out[TCP], name) == getattr(sent[TCP], name), name
        assert bytes(out[TCP].payload) == bytes(sent[TCP].payload)
        assert out.ttl == sent.ttl and out.len == sent.len and out.id == sent.id


@dataclass
class UdpFlow:
    lab: EngineHarness
    client: str
    port: int
    backend: str | None = None
    nat_port: int | None = None

    @property
    def session(self) -> Session | None:
        table = self.lab.engine.table
        return table.forward.get(forward_key(PROTO_UDP, addr(self.client), self.port, DNS_PORT))

    @property
    def state(self) -> State | None:
        session = self.session
        return None if session is None else session.state

    def request(self, payload: bytes = b"query", chksum: int | None = None) -> Result:
        packet = udp(self.client, LB, self.port, DNS_PORT, payload, chksum)
        result = self.lab.send(packet)
        if result.forwarded:
            out = dissect(result.out)
            if self.backend is None:
                self.backend, self.nat_port = out.dst, out[UDP].sport
            assert (out.src, out.dst) == (LB, self.backend)
            assert (out[UDP].sport, out[UDP].dport) == (self.nat_port, DNS_BACKEND_PORT)
            assert bytes(out[UDP].payload) == payload
            verify_checksums(result.out, udp_none=chksum == 0, kernel_completed=self.lab.partial)
        return result

    def reply(self, payload: bytes = b"answer", chksum: int | None = None) -> Result:
        assert self.backend is not None and self.nat_port is not None
        packet = udp(self.backend, LB, DNS_BACKEND_PORT, self.nat_port, payload, chksum)
        result = self.lab.send(packet)
        if result.forwarded:
            out = dissect(result.out)
            assert (out.src, out.dst) == (LB, self.client) and result.next_hop == self.client
            assert (out[UDP].sport, out[UDP].dport) == (DNS_PORT, self.port)
            assert bytes(out[UDP].payload) == payload
            verify_checksums(result.out, udp_none=chksum == 0, kernel_completed=self.lab.partial)
        return result


def check_table(table: SessionTable, grace: float = 0.0) -> None:
    """Every structural invariant of the session table: the forward map and the per-backend
    port arrays mirror each other, (backend, NAT port) is unique, every port of a pool is
    exactly one of in use / free / never used, the open-flow counters and the eviction queues
    match the rows, and every row sits in an expiry bucket that comes due no later than it."""
    rows = list(table.forward.values())
    assert len(table) == len(rows) <= table.cap
    for key, s in table.forward.items():
        assert s.key == key and s.bucket >= 0
        pool = s.pool
        backend = pool.backend
        assert table.pools[backend_pool_key(s.proto, backend.ip_int, backend.port)] is pool
        if s.nat_port:  # (a direct-routed row holds no NAT port: lbnat.direct)
            assert pool.rows[s.nat_port - pool.first] is s
        # (`grace`: a standby row of the session sync outlives its deadline by that much)
        assert s.bucket <= math.ceil(s.expires + grace), "the row's bucket comes due too late"
        assert table.expiry.holds(s)
    held = 0
    for pool in table.pools.values():
        assert (pool.first, pool.last) == table.port_range
        in_use = set()
        for index, row in enumerate(pool.rows):
            if row is None:
                continue
            held += 1
            assert table.forward.get(row.key) is row, "a pool holds a row the forward map lost"
            assert row.pool is pool and row.nat_port == pool.first + index
            in_use.add(row.nat_port)
        assert pool.active == sum(1 for s in rows if s.pool is pool and not s.ended)
        assert list(pool.closed) == [s for s in table.closed if s.pool is pool]
        assert list(pool.half_open) == [s for s in table.half_open if s.pool is pool]
        free = list(pool.free)
        never_used = set(range(pool.next_unused, pool.last + 1))
        assert len(free) == len(set(free)), "a port is free twice"
        assert not (set(free) & in_use) and not (set(free) & never_used)
        assert not (in_use & never_used)
        assert set(free) | in_use | never_used == set(range(pool.first, pool.last + 1))
    assert held == sum(1 for s in rows if s.nat_port)
    assert table.open_flows == sum(1 for s in rows if s.state not in ENDED)
    assert set(table.closed) == {s for s in rows if s.state in ENDED}
    assert set(table.half_open) == {s for s in rows if s.state in HALF_OPEN}
