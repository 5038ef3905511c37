"""Direct routing (IPVS "DR", `mode: dr` per service; docs/dr.md).

A DR service's client packet to VIP:port finds or makes its row as a NAT service's does (the
forward map, the schedulers, affinity, draining, health) and is forwarded unchanged: the
verdict is (FORWARD, backend_ip) with no rewrite, so the data plane writes the backend's MAC
over the frame's and the IP packet still says dst VIP. The backend holds the VIP on lo and
answers the client directly: lbnat never sees a reply.

So a DR row's state comes from the client's segments alone (IPVS's input-only table,
`transition`): the SYN opens it, the client's first ACK establishes it, the client's FIN or
RST ends it, and timeouts do the rest. A DR row (lbnat.nat.DrSession) holds none of its
backend's NAT ports: it is in the forward map and its pool's counters, not in the pool's
reverse array. The checkpoint and the session sync leave it out (a restarted lbnat or a
standby drops a DR flow's next packet, not a SYN, as no_session: the client reconnects). An
established DR row goes into the kernel fast path as one identity entry
(lbnat.fastpath.dr_entry).

DR services are kept apart from NAT services (`DirectPath._dr_by_port`): the packet path looks
there only when a packet's port is not a NAT service's, so a NAT service's packets pay
nothing for DR.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lbnat import addresses
from lbnat.actions import FORWARD, SEND_FIRST, Action
from lbnat.backends import Backend, BackendKey
from lbnat.drops import DropReason
from lbnat.nat import (
    ENDED,
    PRESSURE_HALF_OPEN,
    UNKNOWN_ACK,
    DrSession,
    Ended,
    EndReason,
    PortPool,
    Refusal,
    Session,
    SessionTable,
    State,
    backend_pool_key,
    forward_key,
)
from lbnat.packet import ACK, FIN, RST, SYN, TCP, Headers
from lbnat.service import ServiceState

if TYPE_CHECKING:
    from lbnat.engine import PendingResets, Services

_SYN_SENT = State.SYN_SENT
_ESTABLISHED = State.ESTABLISHED
_FIN_WAIT = State.FIN_WAIT
_TIME_WAIT = State.TIME_WAIT
_CLOSE = State.CLOSE


def transition(state: State, flags: int) -> tuple[State, EndReason | None]:
    """A TCP DR row's next state on a segment from the client, and the flow's end if this
    segment ends it. Pure; the whole table (docs/dr.md):

        any open state + RST           -> CLOSE       (ended: rst)
        any open state + FIN           -> TIME_WAIT   (ended: fin; the row lingers time_wait,
                                                       refreshed by the client's later ACKs)
        SYN_SENT  + SYN (retransmitted)-> SYN_SENT
        SYN_SENT  + ACK                -> ESTABLISHED (the client's handshake ACK)
        ESTABLISHED + anything else    -> ESTABLISHED
        TIME_WAIT / CLOSE + anything   -> unchanged (a new SYN is a new flow: the engine's)
    """
    if state in ENDED:
        return state, None
    if flags & RST:
        return _CLOSE, EndReason.RST
    if flags & FIN:
        return _TIME_WAIT, EndReason.FIN
    if state is _SYN_SENT and flags & ACK and not flags & SYN:
        return _ESTABLISHED, None
    return state, None


def open_row(
    table: SessionTable,
    now: float,
    service: ServiceState,
    proto: int,
    client_ip: int,
    client_port: int,
    vip: int,
    backend: Backend,
    key: int,
) -> tuple[Session | Refusal, list[Ended]]:
    """Make a DR row (SessionTable.open's counterpart without a NAT port): the table's cap
    and its eviction as for NAT rows; the backend's pool counts the flow."""
    pool = table.pool_for(proto, backend)
    ended: list[Ended] = []
    if len(table.forward) >= table.cap:
        victim = table._closed.oldest() or table._half_open.oldest()
        if victim is None:
            table.refused[Refusal.TABLE_FULL] += 1
            return Refusal.TABLE_FULL, ended
        if victim.ended:
            table.remove(victim)
            table.evicted += 1
        else:
            ended.append(table._evict(victim))
    # A UDP DR row never sees a reply: it is filed as replied (not half-open, so a busy DR
    # UDP service neither puts the table under pressure nor is evicted as a flood's rows).
    state = _SYN_SENT if proto == TCP else State.UDP_REPLIED
    row = table._file(DrSession(), key, service, pool, 0, state, now, vip)
    row.ack_c = row.ack_s = UNKNOWN_ACK  # lbnat never resets a DR flow's ends
    pool.flows += 1
    if table.half_open_count > PRESSURE_HALF_OPEN and not table.under_pressure:
        table._enter_pressure()
    return row, ended


def track(table: SessionTable, s: Session, flags: int, now: float) -> Ended | None:
    """Account a TCP segment from the client on DR row `s` (`transition`), through the table
    so that its counters, eviction queues and timeouts follow."""
    state = s.state
    new, reason = transition(state, flags)
    if reason is not None:
        return table.end(s, new, now, reason)
    if new is not state:
        table.move(s, new, now)
    else:
        s.seen = now  # (an ended row too: a half-closed download's ACKs keep it lingering)
    return None


class DirectPath:
    """The Engine's DR half (a mixin): DR services' packets, `handle_dr`."""

    _dr_by_port: dict[int, ServiceState]
    services: Services
    table: SessionTable
    _send_first: PendingResets

    if TYPE_CHECKING:

        def _drop(self, reason: DropReason) -> Action: ...

        def _flow_ended(self, ended: Ended, now: float) -> None: ...

        def _open(
            self, service: ServiceState, proto: int, client_ip: int, client_port: int,
            flags: int, seq: int, length: int, buf: bytearray, l4: int, end: int, now: float,
            reopen: Session | None = None, row_class: type[Session] = Session,
        ) -> Session | Action: ...  # fmt: skip

    def pool_of(self, service: str, backend: BackendKey) -> PortPool | None:
        """The port pool (rows and counters) of one backend of a service, if it has had flows."""
        state = self.services[service]
        return self.table.pools.get(
            backend_pool_key(state.proto, addresses.parse(backend[0]), backend[1])
        )

    def active_flows(self, service: str, backend: BackendKey) -> int:
        """Open flows of `service` to `backend` (a pool may be shared by two services)."""
        pool = self.pool_of(service, backend)
        if pool is None:
            return 0
        state = self.services[service]
        if state.dr:  # the pool's open rows but its NAT rows (no other DR service shares it)
            return pool.active - sum(1 for r in pool.rows if r is not None and not r.ended)
        return sum(1 for r in pool.rows if r is not None and r.service is state and not r.ended)

    def handle_dr(
        self,
        service: ServiceState,
        buf: bytearray,
        start: int,
        end: int,
        headers: Headers,
        now: float,
    ) -> Action:
        """A client's packet to DR service `service` (`headers`: lbnat.packet.parse's): its
        row found or made, then forwarded as it came (the data plane puts the backend's MAC
        on it)."""
        proto, l4, src, _dst, sport, _dport, flags, seq, _ack, _win, length = headers
        table = self.table
        row = table.forward.get(forward_key(proto, src, sport, service.port))
        if row is None or (flags & SYN and not flags & ACK and row.state in ENDED):
            if proto == TCP and (flags & (SYN | ACK | RST)) != SYN:
                service.count_drop(DropReason.NO_SESSION)
                return self._drop(DropReason.NO_SESSION)
            reopen = None
            if row is not None:
                table.remove(row)  # an ended row; the client reused its port: a new flow
                reopen = row
            opened = self._open(
                service, proto, src, sport, flags, seq, length, buf, l4, end, now, reopen,
                DrSession,
            )  # fmt: skip
            if not isinstance(opened, Session):
                return opened
            row = opened
            row.ack_c = row.ack_s = UNKNOWN_ACK  # (start_tcp set ack_s: never used for DR)
        elif proto == TCP:
            if row.state is _ESTABLISHED and not flags & 0x07:  # no FIN, SYN, RST: most
                row.seen = now
            elif (ended := track(table, row, flags, now)) is not None:
                self._flow_ended(ended, now)
        else:
            row.seen = now
        pool = row.pool
        pool.to_backend_packets += 1
        pool.to_backend_bytes += end - start
        service.packets += 1
        service.bytes += end - start
        if self._send_first:  # RSTs for NAT rows this flow's row evicted from a full table
            return (SEND_FIRST, pool.backend.ip_int, self._send_first.take())
        return (FORWARD, pool.backend.ip_int)


__all__ = ["DirectPath", "open_row", "track", "transition"]
