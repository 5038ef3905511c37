"""The Engine's PROXY protocol half (a mixin): the packet path of the rows of services with
`proxy_protocol: "v2"` (lbnat.proxyproto has the header and the shift; docs/proxy-protocol.md).

Such a row is a `ProxyProtoSession`: the engine's per-packet test `row.__class__ is not
Session`, already paid by every packet on that branch's way, sends it here, so plain NAT rows
pay nothing. Only IPv4 clients get such rows (an IPv6 client's row is the IPv6 path's, without
the header); the kernel fast path takes them once their header is acknowledged (the tc
program shifts the numbers too, lbnat.fastpath), the checkpoint and the session sync leave
them out (their shift is not in the record).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lbnat import proxyproto
from lbnat.actions import FORWARD, REPLY, SEND_FIRST, Action
from lbnat.nat import ConnectionTracker, Ended, State, key_client_ip
from lbnat.packet import SYN, TCP, fold, rewrite, tcp_window_scale
from lbnat.proxyproto import ProxyProtoSession
from lbnat.service import ServiceState
from lbnat.synproxy import rewrite_to_backend


class ProxyProtoPath:
    """Packets of `ProxyProtoSession` rows, both ways."""

    _tracker: ConnectionTracker

    if TYPE_CHECKING:

        def _flow_ended(self, ended: Ended, now: float) -> None: ...

    def pp_from_client(
        self, row: ProxyProtoSession, service: ServiceState, buf: bytearray, start: int,
        l4: int, end: int, flags: int, seq: int, ack: int, win: int, partial: bool, now: float,
    ) -> Action:  # fmt: skip
        """A client's segment: its sequence number shifted past the header, and the header
        segment before it (or instead of it) when it is due."""
        ended = self._tracker.track_client(row, flags, seq, ack, win, now)
        pure = proxyproto.replaces(row, buf, start, l4, flags, seq)
        extra, send = proxyproto.from_client(row, buf, l4, flags, seq, now, pure)
        pool = row.pool
        rewrite_to_backend(buf, start, l4, end, row, extra, partial)
        if ended is not None:
            self._flow_ended(ended, now)
        backend_ip = pool.backend.ip_int
        if not send:
            return (FORWARD, backend_ip)
        header = proxyproto.header_packet(row, buf[start:end], l4 - start)
        if pure:
            return (REPLY, header, backend_ip)
        return (SEND_FIRST, backend_ip, ((header, backend_ip),))

    def pp_from_backend(
        self, row: ProxyProtoSession, buf: bytearray, start: int, l4: int, end: int, flags: int,
        seq: int, ack: int, win: int, partial: bool, now: float,
    ) -> Action:  # fmt: skip
        """A backend's segment: its acknowledgement and SACK blocks in the client's numbers."""
        extra, ack = proxyproto.from_backend(row, buf, l4, end, flags, ack)
        if flags & SYN and row.state is State.SYN_SENT:
            self._tracker.note_server_wscale(row, tcp_window_scale(buf, l4, end))
        ended = self._tracker.track_server(row, flags, seq, ack, win, now)
        deltas = row.deltas
        rewrite(
            buf, start, l4, TCP, row.rev_addresses, row.rev_ports,
            (deltas >> 16) & 0xFFFF, fold((deltas & 0xFFFF) + extra), partial,
        )  # fmt: skip
        pool = row.pool
        pool.to_client_packets += 1
        pool.to_client_bytes += end - start
        service = row.service
        service.packets += 1
        service.bytes += end - start
        if ended is not None:
            self._flow_ended(ended, now)
        return (FORWARD, key_client_ip(row.key))
