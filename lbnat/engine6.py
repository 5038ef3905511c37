"""The engine's IPv6 path and its translations (NAT64): a part of lbnat.engine.Engine.

Pure, as the engine is. What this module may know: the engine's table and services (the same
rows for both families), lbnat.packet6's parse, rewrite and translations. What it may not:
sockets, frames, virtio headers (the data plane moves a translated packet's frame headers;
lbnat.actions' TRANSLATED tells it where the packet now starts).

The three kinds of flow and where their packets go:

    client          service's backends  row class       client -> backend  backend -> client
    IPv4            IPv4                Session         rewrite (packet)   rewrite (packet)
    IPv6            IPv6                Session         rewrite6           rewrite6
    IPv6            IPv4 (NAT64)        Nat64Session    translate_to_v4    translate_to_v6
    IPv4            IPv6                -               dropped, counted NO_NAT46

Why no NAT46: an IPv4 client reaching IPv6 backends needs an IPv4 VIP that maps to IPv6
sources the backends route back, i.e. an IPv4 pool embedded in IPv6 (RFC 6052) on the backend
side; nobody has asked for it, and IPv6-only backends behind an IPv4 VIP are served as well by
giving them an IPv4 address on the LB's segment.

ICMP errors about a flow are turned around both ways, and between families for NAT64 rows:
from the backend's side (the quote is LB:NAT port -> backend) towards the client, and, for
path-MTU discovery to work when the small link is on the client's side (katran #82, cilium
#34380), from the client's side (the quote is VIP:service port -> client: a router's
packet-too-big) towards the backend, whose segments were too big.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from lbnat.actions import FORWARD, REPLIES, REPLY, SEND_FIRST, TRANSLATED, Action
from lbnat.addresses import V6
from lbnat.drops import DropReason
from lbnat.nat import (
    ENDED,
    Nat64Session,
    PortPool,
    Session,
    SessionTable,
    State,
    backend_pool_key,
    flow_key,
    key_client,
)
from lbnat.packet import (
    ACK,
    ICMP_DEST_UNREACHABLE,
    RST,
    SYN,
    TCP,
    finish_checksum4,
    tcp_window_scale,
)
from lbnat.packet6 import (
    ICMPV6,
    icmp4_error,
    parse6,
    rewrite6,
    translate_to_v4,
    translate_to_v6,
)

if TYPE_CHECKING:
    from lbnat.engine import PendingResets
    from lbnat.nat import ConnectionTracker, Ended
    from lbnat.service import ServiceState

_SAR = SYN | ACK | RST
# What the data plane keeps before a packet: 10 bytes (its virtio_net_hdr, opaque here) and the
# 14 of the Ethernet header. A packet that grows moves the 10 with it (lbnat.actions).
FRAME_PRELUDE = 24
_FRAGMENTATION_NEEDED = 4  # ICMPv4 destination unreachable's code


class IPv6Path:
    """`Engine._handle6` and the NAT64 and ICMP turns; the engine's attributes it uses are
    declared here for the type checker."""

    lb_ip: int
    vip: int
    lb_ip6: int
    mtu: int
    nat_first: int
    nat_last: int
    icmp_translated: int
    table: SessionTable
    _forward: dict[int, Session]
    _pools: dict[int, PortPool]
    _tracker: ConnectionTracker
    _by_port: dict[int, ServiceState]
    _send_first: PendingResets

    if TYPE_CHECKING:

        def _drop(self, reason: DropReason) -> Action: ...

        def count_drop(self, reason: DropReason) -> None: ...

        def _flow_ended(self, ended: Ended, now: float) -> None: ...

        def _icmp6_error(self, buf: bytearray, start: int, end: int) -> Action: ...

        def _open(
            self, service: ServiceState, proto: int, client_ip: int, client_port: int,
            flags: int, seq: int, length: int, buf: bytearray, l4: int, end: int, now: float,
            reopen: Session | None = None, row_class: type[Session] = Session,
        ) -> Session | Action: ...  # fmt: skip

    def vip_of(self, client_ip: int) -> int:
        """The address a client of this family connects to (-1: lbnat has none)."""
        return self.lb_ip6 if client_ip >= V6 else self.vip

    def _handle6(self, buf: bytearray, start: int, end: int, partial: bool, now: float) -> Action:
        headers = parse6(buf, start, end)
        if headers.__class__ is not tuple:
            if headers is DropReason.NOT_TCP_UDP:
                return self._icmp6_error(buf, start, end)
            return self._drop(cast(DropReason, headers))
        proto, l4, src, dst, sport, dport, flags, seq, ack, win, length = headers
        if dst != self.lb_ip6:
            return self._drop(DropReason.NOT_FOR_US)
        if self.nat_first <= dport <= self.nat_last:  # an IPv6 backend -> its client
            pool = self._pools.get(backend_pool_key(proto, src, sport))
            s = None if pool is None else pool.rows[dport - pool.first]
            if s is None or pool is None:
                return self._drop(DropReason.NO_SESSION)
            ended = self._track_reply(s, buf, l4, end, proto, flags, seq, ack, win, now)
            deltas = s.deltas
            rewrite6(
                buf, start, l4, proto, s.rev_addresses, s.rev_ports,
                (deltas >> 16) & 0xFFFF, deltas & 0xFFFF, partial,
            )  # fmt: skip
            _count(s, to_client=end - start)
            if ended is not None:
                self._flow_ended(ended, now)
            return (FORWARD, key_client(s.key))

        service = self._by_port.get((proto << 16) | dport)
        if service is None:
            return self._drop(DropReason.NOT_FOR_US)
        row = self._forward.get(flow_key(proto, src, sport, dport))
        if row is None or (flags & SYN and not flags & ACK and row.state in ENDED):
            if proto == TCP and flags & _SAR != SYN:
                service.count_drop(DropReason.NO_SESSION)
                return self._drop(DropReason.NO_SESSION)
            reopen = None
            if row is not None:  # a new SYN on an ended row: as the IPv4 path does
                self.table.remove(row)
                reopen = row
            opened = self._open(
                service, proto, src, sport, flags, seq, length, buf, l4, end, now, reopen
            )
            if not isinstance(opened, Session):
                return opened
            row = opened
        elif proto == TCP:
            ended = self._tracker.track_client(row, flags, seq, ack, win, now)
            if ended is not None:
                self._flow_ended(ended, now)
        else:
            row.seen = now
        deltas = row.deltas
        pool = row.pool
        _count(row, to_backend=end - start)
        next_hop = pool.backend.ip_int
        if row.__class__ is Nat64Session:
            new_start = translate_to_v4(
                buf, start, l4, proto, pool.fwd_addresses, row.fwd_ports,
                deltas >> 48, (deltas >> 32) & 0xFFFF, partial,
            )  # fmt: skip
            if self._send_first:  # RSTs for evicted rows first; then this packet, made whole
                packet = finish_checksum4(bytearray(buf[new_start:end]), partial)
                return (REPLIES, 0, (*self._send_first.take(), (packet, next_hop)))
            return (TRANSLATED, next_hop, new_start)
        rewrite6(
            buf, start, l4, proto, pool.fwd_addresses, row.fwd_ports,
            deltas >> 48, (deltas >> 32) & 0xFFFF, partial,
        )  # fmt: skip
        if self._send_first:
            return (SEND_FIRST, next_hop, self._send_first.take())
        return (FORWARD, next_hop)

    def _track_reply(
        self, s: Session, buf: bytearray, l4: int, end: int, proto: int, flags: int,
        seq: int, ack: int, win: int, now: float,
    ) -> Ended | None:  # fmt: skip
        """A backend's packet through its row's state (the IPv4 path does the same inline:
        there it runs for every packet, and a call costs)."""
        if proto != TCP:
            self._tracker.track_udp_reply(s, now)
            return None
        if flags & SYN and s.state is State.SYN_SENT:
            self._tracker.note_server_wscale(s, tcp_window_scale(buf, l4, end))
        return self._tracker.track_server(s, flags, seq, ack, win, now)

    def _nat64_from_backend(
        self, s: Session, buf: bytearray, start: int, l4: int, end: int, proto: int,
        flags: int, seq: int, ack: int, win: int, partial: bool, now: float,
    ) -> Action:  # fmt: skip
        """An IPv4 backend's packet to a NAT64 row's NAT port: tracked as any reply, then made
        the IPv6 packet its client expects. One that would grow past the MTU is answered with
        fragmentation-needed (lbnat does not fragment), so the backend's path MTU learns."""
        size = end - l4 + 40
        if self.mtu < size <= self.mtu + 20:
            self.count_drop(DropReason.PACKET_TOO_BIG)
            rest = self.mtu - 20
            quote = bytes(buf[start : l4 + 8])
            error = icmp4_error(
                s.pool.fwd_addresses, ICMP_DEST_UNREACHABLE, _FRAGMENTATION_NEEDED, rest, quote
            )
            return (REPLY, error, s.pool.backend.ip_int)
        ended = self._track_reply(s, buf, l4, end, proto, flags, seq, ack, win, now)
        deltas = s.deltas
        if l4 - 40 < start and start >= FRAME_PRELUDE:
            # It grows (an IPv4 header under 40 bytes): the data plane's 10 bytes before the
            # frame move with it, before the new header overwrites their end.
            moved = l4 - 40 - FRAME_PRELUDE
            buf[moved : moved + 10] = bytes(buf[start - FRAME_PRELUDE : start - 14])
        new_start = translate_to_v6(
            buf, start, l4, proto, s.rev_addresses, s.rev_ports,
            (deltas >> 16) & 0xFFFF, deltas & 0xFFFF, partial,
        )  # fmt: skip
        _count(s, to_client=end - new_start)
        if ended is not None:
            self._flow_ended(ended, now)
        return (TRANSLATED, key_client(s.key), new_start)


def _count(row: Session, to_backend: int = 0, to_client: int = 0) -> None:
    """A packet of `row` forwarded: its backend's and service's counters."""
    pool, service = row.pool, row.service
    if to_backend:
        pool.to_backend_packets += 1
        pool.to_backend_bytes += to_backend
        size = to_backend
    else:
        pool.to_client_packets += 1
        pool.to_client_bytes += to_client
        size = to_client
    service.packets += 1
    service.bytes += size


__all__ = ["ICMPV6", "IPv6Path"]
