"""ICMP errors about lbnat's flows, turned around: a part of lbnat.engine.Engine.

Pure. An ICMP error names its flow by the packet it quotes. Two directions, both families, and
between families for NAT64 rows (lbnat.engine6):

- From the backend's side: the quote is what lbnat sent a backend (LB:NAT port -> backend), and
  the error came from the backend or a router on the way (port unreachable, fragmentation
  needed / packet too big, time exceeded). It is translated for the client, as if the VIP had
  answered about the client's own packet.
- From the client's side: the quote is what lbnat sent a client (VIP:service port -> client),
  typically a router's fragmentation-needed / packet-too-big when the small link is on the
  client's side. It is translated for the backend, whose segments were too big, as if they had
  been sent to the LB: without this, path-MTU discovery through a NAT load balancer breaks
  (katran #82, cilium #34380: the client's side never reaches the server).

Same-family errors of IPv4 are rewritten in place (lbnat.packet.rewrite_icmp_error); the rest
are rebuilt (lbnat.packet6: rare, and a change of family rewrites every field anyway), with
RFC 7915's type and code maps.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, cast

from lbnat.actions import FORWARD, REPLY, Action
from lbnat.addresses import V6
from lbnat.drops import DropReason
from lbnat.nat import Nat64Session, Session, SessionTable, flow_key, forward_key, key_client
from lbnat.packet import (
    ADDRESS,
    IP_DESTINATION,
    PORT_PAIR,
    IcmpError,
    parse_icmp_error,
    rewrite_deltas,
    rewrite_icmp_error,
    swapped,
)
from lbnat.packet6 import (
    ICMP6_PACKET_TOO_BIG,
    V4_TO_V6,
    V6_TO_V4,
    icmp4_error,
    icmp6_error,
    parse_icmp6_error,
    quote4_as_v6,
    quote6_as,
    quote6_as_v4,
    v4_mtu_as_v6,
    v6_mtu_as_v4,
)

if TYPE_CHECKING:
    from lbnat.service import ServiceState


class IcmpTurns:
    """The engine's ICMP turns; the engine's attributes they use are declared here for the
    type checker."""

    lb_ip: int
    vip: int
    lb_ip6: int
    nat_first: int
    nat_last: int
    icmp_translated: int
    table: SessionTable
    _forward: dict[int, Session]
    _by_port: dict[int, ServiceState]

    if TYPE_CHECKING:

        def _drop(self, reason: DropReason) -> Action: ...

    def _icmp_error(self, buf: bytearray, start: int, end: int) -> Action:
        """`_icmp4_turn`, and a drop counted `bad_icmp` if the message's own lengths make no
        sense where it is turned (never a traceback: a worker would die of it)."""
        try:
            return self._icmp4_turn(buf, start, end)
        except (struct.error, ValueError, IndexError):
            return self._drop(DropReason.BAD_ICMP)

    def _icmp6_error(self, buf: bytearray, start: int, end: int) -> Action:
        """`_icmp6_turn`, with `_icmp_error`'s guard."""
        try:
            return self._icmp6_turn(buf, start, end)
        except (struct.error, ValueError, IndexError):
            return self._drop(DropReason.BAD_ICMP)

    def _icmp4_turn(self, buf: bytearray, start: int, end: int) -> Action:
        """An ICMP error about a packet lbnat sent to a backend (port unreachable, fragmentation
        needed, ...), from the backend or a router on the way: translated for the client, as if
        the VIP had answered about the client's own packet. Or about a packet lbnat sent to a
        client (a router's fragmentation-needed on the client's side): translated for the
        backend, whose segments were too big, as if they had been sent to the LB."""
        error = parse_icmp_error(buf, start, end)
        if not isinstance(error, tuple):
            return self._drop(error)
        _, _, proto, src, dst, sport, dport = error
        (outer_dst,) = ADDRESS.unpack_from(buf, start + IP_DESTINATION)
        if (
            outer_dst == self.vip
            and src == self.vip
            and (proto << 16) | sport in self._by_port  # from a service's port
        ):
            return self._icmp_to_backend(buf, start, error)
        if (
            outer_dst != self.lb_ip
            or src != self.lb_ip
            or not self.nat_first <= sport <= self.nat_last
        ):
            return self._drop(DropReason.NOT_FOR_US)  # about the LB host's own traffic
        row = self.table.reverse(proto, dst, dport, sport)
        if row is None:
            return self._drop(DropReason.NO_SESSION)
        if row.__class__ is Nat64Session:  # its client is IPv6: lbnat.engine6
            return self._icmp4_to_client6(buf, start, error, row)
        # The quote is the packet as lbnat forwarded it (LB:NAT port -> backend): it becomes
        # the client's own packet again, and the error comes from the VIP to the client.
        addresses, ports = row.as_client_sends()
        ip_delta, l4_delta = rewrite_deltas(row.pool.fwd_addresses, addresses, row.fwd_ports, ports)
        rewrite_icmp_error(
            buf, start, error, row.rev_addresses, addresses, ports, ip_delta, l4_delta
        )
        self.icmp_translated += 1
        return (FORWARD, row.client_ip)

    def _icmp_to_backend(self, buf: bytearray, start: int, error: IcmpError) -> Action:
        """An ICMP error about what lbnat sent an IPv4 client (quote VIP:port -> client): the
        quote becomes the backend's own packet (backend -> LB:NAT port), from the LB."""
        _, _, proto, _, client, service_port, client_port = error
        row = self._forward.get(forward_key(proto, client, client_port, service_port))
        if row is None:
            return self._drop(DropReason.NO_SESSION)
        pool = row.pool
        quote_addresses, quote_ports = swapped(pool.fwd_addresses), swapped(row.fwd_ports)
        ip_delta, l4_delta = rewrite_deltas(
            row.rev_addresses, quote_addresses, row.rev_ports, quote_ports
        )
        rewrite_icmp_error(
            buf, start, error, pool.fwd_addresses, quote_addresses, quote_ports, ip_delta, l4_delta
        )
        self.icmp_translated += 1
        return (FORWARD, pool.backend.ip_int)

    # --- ICMP errors ---------------------------------------------------------------------------

    def _icmp6_turn(self, buf: bytearray, start: int, end: int) -> Action:
        """An ICMPv6 error to the LB's IPv6 address about a flow of either side."""
        error = parse_icmp6_error(buf, start, end)
        if error.__class__ is not tuple:
            return self._drop(cast(DropReason, error))
        _, kind, code, rest, quote, proto, inner_l4, message_end = error
        outer_dst = V6 | int.from_bytes(buf[start + 24 : start + 40], "big")
        quoted_src = V6 | int.from_bytes(buf[quote + 8 : quote + 24], "big")
        quoted_dst = V6 | int.from_bytes(buf[quote + 24 : quote + 40], "big")
        sport, dport = PORT_PAIR.unpack_from(buf, inner_l4)
        if outer_dst != self.lb_ip6 or quoted_src != self.lb_ip6:
            return self._drop(DropReason.NOT_FOR_US)  # about the LB host's own traffic
        if self.nat_first <= sport <= self.nat_last:  # about what lbnat sent an IPv6 backend
            row = self.table.reverse(proto, quoted_dst, dport, sport)
            if row is None:
                return self._drop(DropReason.NO_SESSION)
            addresses, ports = row.as_client_sends()
            l4_delta = rewrite_deltas(row.pool.fwd_addresses, addresses, row.fwd_ports, ports)[1]
            quoted = quote6_as(buf, quote, inner_l4, message_end, proto, addresses, ports, l4_delta)
            self.icmp_translated += 1
            packet = icmp6_error(row.rev_addresses, kind, code, rest, quoted)
            return (REPLY, packet, key_client(row.key))
        # About what lbnat sent a client (a router's packet-too-big on the client's side).
        if (proto << 16) | sport not in self._by_port:
            return self._drop(DropReason.NOT_FOR_US)
        row = self._forward.get(flow_key(proto, quoted_dst, dport, sport))
        if row is None:
            return self._drop(DropReason.NO_SESSION)
        pool = row.pool
        addresses, ports = swapped(pool.fwd_addresses), swapped(row.fwd_ports)
        l4_delta = rewrite_deltas(row.rev_addresses, addresses, row.rev_ports, ports)[1]
        if row.__class__ is Nat64Session:
            mapped = V6_TO_V4.get((kind, code))
            if mapped is None:
                return self._drop(DropReason.NOT_TCP_UDP)
            rest = v6_mtu_as_v4(rest) if kind == ICMP6_PACKET_TOO_BIG else 0
            quoted = quote6_as_v4(
                buf, quote, inner_l4, message_end, proto, addresses, ports, l4_delta
            )
            packet = icmp4_error(pool.fwd_addresses, *mapped, rest, quoted)
        else:
            quoted = quote6_as(buf, quote, inner_l4, message_end, proto, addresses, ports, l4_delta)
            packet = icmp6_error(pool.fwd_addresses, kind, code, rest, quoted)
        self.icmp_translated += 1
        return (REPLY, packet, pool.backend.ip_int)

    def _icmp4_to_client6(
        self, buf: bytearray, start: int, error: IcmpError, row: Session
    ) -> Action:
        """An ICMPv4 error from a NAT64 row's backend side, made the ICMPv6 error its IPv6
        client would have had (RFC 7915 4.2)."""
        icmp, inner, proto = error[0], error[1], error[2]
        kind, code = buf[icmp], buf[icmp + 1]
        mapped = V4_TO_V6.get((kind, code))
        if mapped is None:
            return self._drop(DropReason.NOT_TCP_UDP)
        rest = 0
        if mapped[0] == ICMP6_PACKET_TOO_BIG:
            rest = v4_mtu_as_v6(int.from_bytes(buf[icmp + 4 : icmp + 8], "big"))
        total = (buf[start + 2] << 8) | buf[start + 3]
        addresses, ports = row.as_client_sends()
        l4_delta = rewrite_deltas(row.pool.fwd_addresses, addresses, row.fwd_ports, ports)[1]
        quoted = quote4_as_v6(buf, inner, start + total, proto, addresses, ports, l4_delta)
        self.icmp_translated += 1
        packet = icmp6_error(row.rev_addresses, *mapped, rest, quoted)
        return (REPLY, packet, key_client(row.key))
