"""The sans-IO core: an IPv4 packet and the time in, one verdict out, events on the side.

    engine.handle(buf, start, end, partial, now) -> Action
    engine.tick(now)                              # expiry sweep; call between batches
    engine.events              # FlowOpened / FlowEnded / NoBackend, drained by the I/O edge

The packet is rewritten in place in `buf` (the data plane's receive buffer). An action is a
plain tuple, so the verdict costs no object construction on the packet path:

    (FORWARD, next_hop)          send buf[start:end] as rewritten, to IPv4 address next_hop (int)
    (REPLY, packet, next_hop)    send this new IPv4 packet instead (a RST lbnat makes itself,
                                 or the SYN proxy's SYN-ACK, SYN or kept ACK: lbnat.synproxy)
    (DROP, reason)               send nothing; the reason has been counted
    (SEND_FIRST, next_hop, ((packet, next_hop), ...))
                                 send these new packets, then forward buf[start:end] as FORWARD
                                 does (a new flow that took the NAT port of an evicted half-open
                                 row: the backend is told with a RST to forget the old one first)

Direction is told by the destination port on the LB address: a service's VIP port means
client -> backend; a port in the NAT range means backend -> client (a reply to a NAT port).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from lbnat import addresses
from lbnat.actions import DROP as DROP  # re-exported: the data plane and the tests read them here
from lbnat.actions import DROP_ACTIONS
from lbnat.actions import FORWARD as FORWARD
from lbnat.actions import REPLIES as REPLIES
from lbnat.actions import REPLY as REPLY
from lbnat.actions import SEND_FIRST as SEND_FIRST
from lbnat.actions import Action as Action
from lbnat.addresses import V4_MAX
from lbnat.backends import Backend, BackendKey
from lbnat.direct import DirectPath, open_row
from lbnat.drops import DropReason
from lbnat.engine6 import IPv6Path
from lbnat.engine_icmp import IcmpTurns
from lbnat.engine_pp import ProxyProtoPath
from lbnat.nat import (
    ENDED,
    UNKNOWN_ACK,
    Affinity,
    DrSession,
    Ended,
    EndReason,
    Nat64Session,
    Refusal,
    Session,
    SessionTable,
    State,
    Timeouts,
    backend_pool_key,
    flow_key,
    forward_key,
    key_client_ip,
    pool_key,
)
from lbnat.packet import (
    ACK,
    ICMP,
    RST,
    SYN,
    TCP,
    parse,
    rewrite,
    tcp_window_scale,
)
from lbnat.packet6 import tcp_segment_any
from lbnat.proxyproto import ProxyProtoSession, start_row
from lbnat.scheduler import Scheduler, SharedCursor, make_scheduler
from lbnat.service import Service, ServiceState
from lbnat.syncookie import SynProxySettings
from lbnat.synproxy import ProxiedSession, SynProxy

if TYPE_CHECKING:  # an annotation only: lbnat.standby builds on this module
    from lbnat.owners import FlowOwners
    from lbnat.standby import Standby

_SAR = SYN | ACK | RST  # a bare SYN has only the first of these: a new flow
_DROP_ACTIONS = DROP_ACTIONS
_REFUSAL_DROPS = {
    Refusal.NAT_PORTS_EXHAUSTED: DropReason.NAT_PORTS_EXHAUSTED,
    Refusal.TABLE_FULL: DropReason.TABLE_FULL,
}


_MASK64 = (1 << 64) - 1
SHARES_TURNS = ("rr", "lc")  # schedulers whose rotation workers can share (see _Rotation)


def ip_text(address: int) -> str:
    """An address int of either family as text (lbnat.addresses)."""
    return addresses.text(address)


def ip_int(text: str) -> int:
    """Address text of either family as an int (lbnat.addresses)."""
    return addresses.parse(text)


@dataclass(frozen=True, slots=True)
class FlowOpened:
    service: str
    client: tuple[str, int]
    backend: BackendKey
    nat_port: int
    open_flows: int = 0  # open flows of this engine with this one


@dataclass(frozen=True, slots=True)
class FlowEnded:
    """A flow is over (FIN both ways, an in-window RST, a timeout). Printed at once, as the
    original does: "client <ip,port> terminated" and "Current NAT table length : N"."""

    service: str
    client: tuple[str, int]
    backend: BackendKey
    reason: EndReason
    open_flows: int


@dataclass(frozen=True, slots=True)
class NoBackend:
    service: str
    client: tuple[str, int]


Event = FlowOpened | FlowEnded | NoBackend


class _ActiveFlows(Mapping[BackendKey, int]):
    """Open flows per backend of one service, read from the port pools (for least-conn)."""

    def __init__(self, table: SessionTable, service: ServiceState) -> None:
        self._table = table
        self._service = service

    def __getitem__(self, key: BackendKey) -> int:
        backend = self._service.by_key[key]
        pool = self._table.pools.get(
            backend_pool_key(self._service.proto, backend.ip_int, backend.port)
        )
        return 0 if pool is None else pool.active

    def __iter__(self) -> Iterator[BackendKey]:
        return iter(self._service.by_key)

    def __len__(self) -> int:
        return len(self._service.by_key)


class Services(Mapping[str, ServiceState]):
    """An engine's services, by name (the mapping) and by (proto << 16) | port (`by_port`, the
    packet path's index); each with its scheduler, whose turns workers share through a cursor
    per service, and its client-IP affinity records (`affinity`, only services that have it).
    """

    def __init__(
        self, nat_ports: tuple[int, int], cursors: Callable[[str], SharedCursor | None] | None
    ) -> None:
        self._nat_first, self._nat_last = nat_ports
        self._cursors = cursors
        self._by_name: dict[str, ServiceState] = {}
        self.by_port: dict[int, ServiceState] = {}
        self.dr_by_port: dict[int, ServiceState] = {}  # direct-routed services (lbnat.direct)
        self.affinity: dict[str, Affinity] = {}

    def __getitem__(self, name: str) -> ServiceState:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def add(self, spec: Service) -> ServiceState:
        if spec.name in self._by_name:
            raise ValueError(f"service {spec.name!r} is defined twice")
        if self._nat_first <= spec.port <= self._nat_last:
            raise ValueError(
                f"service {spec.name}: port {spec.port} is inside the NAT port range "
                f"{self._nat_first}-{self._nat_last}"
            )
        key = (spec.proto_number << 16) | spec.port
        if key in self.by_port or key in self.dr_by_port:
            raise ValueError(f"service {spec.name}: {spec.proto} port {spec.port} is already used")
        service = ServiceState(spec, self._scheduler(spec))
        self._by_name[spec.name] = service
        (self.dr_by_port if service.dr else self.by_port)[key] = service
        if spec.affinity_timeout:
            self.affinity[spec.name] = Affinity(spec.affinity_timeout)
        return service

    def reconfigure(self, spec: Service) -> None:
        """Apply a reloaded service's scheduler and affinity (same protocol and port)."""
        state = self._by_name[spec.name]
        if (spec.proto_number, spec.port) != (state.proto, state.port):
            raise ValueError(f"service {spec.name}: its protocol and port cannot change live")
        if spec.mode != state.spec.mode:
            raise ValueError(f"service {spec.name}: its mode (nat, dr) cannot change live")
        if spec.proxy_protocol != state.spec.proxy_protocol:
            raise ValueError(f"service {spec.name}: its proxy_protocol cannot change live")
        if spec.scheduler != state.spec.scheduler:
            state.scheduler = self._scheduler(spec)
            state.scheduler.update(state.backends)
        if spec.affinity_timeout:
            current = self.affinity.get(spec.name)
            if current is None or current.timeout != spec.affinity_timeout:
                self.affinity[spec.name] = Affinity(spec.affinity_timeout)
        else:
            self.affinity.pop(spec.name, None)
        state.spec = spec

    def _scheduler(self, spec: Service) -> Scheduler:
        cursor = self._cursors(spec.name) if self._cursors is not None else None
        if cursor is not None and spec.scheduler in SHARES_TURNS:
            return make_scheduler(spec.scheduler, cursor=cursor)
        return make_scheduler(spec.scheduler)


def backend_reset(row: Session) -> tuple[bytes, int]:
    """A RST that makes an evicted half-open row's backend forget its half-open connection on
    (LB, NAT port): at the sequence number it expects (the client's ISN + 1, kept in ack_s).
    Its source is the row's own (the LB's address of the backend's family)."""
    server = row.pool.backend
    return tcp_segment_any(
        row.pool.source, server.ip_int, row.nat_port, server.port, row.ack_s, 0, RST
    ), (server.ip_int)


def forward_after_resets(
    buf: bytearray,
    start: int,
    l4: int,
    end: int,
    proto: int,
    row: Session,
    partial: bool,
    resets: tuple[tuple[bytes, int], ...],
) -> Action:
    """The first packet of a flow whose row evicted others: rewritten as any client packet
    is, but sent after the RSTs that make the backends forget the evicted rows (one of them
    held this NAT port: a SYN reaching the backend's old half-open connection would only be
    answered with an ACK for the old one)."""
    deltas = row.deltas
    pool = row.pool
    rewrite(
        buf, start, l4, proto, pool.fwd_addresses, row.fwd_ports,
        deltas >> 48, (deltas >> 32) & 0xFFFF, partial,
    )  # fmt: skip
    pool.to_backend_packets += 1
    pool.to_backend_bytes += end - start
    row.service.packets += 1
    row.service.bytes += end - start
    return (SEND_FIRST, pool.backend.ip_int, resets)


class PendingResets(list[tuple[bytes, int]]):
    """The RSTs `Engine._open` made for the rows it evicted, to send before the new flow's
    first packet (SEND_FIRST, REPLIES)."""

    def take(self) -> tuple[tuple[bytes, int], ...]:
        """Every RST waiting, in order; none is left after."""
        resets = tuple(self)
        self.clear()
        return resets


class Engine(IPv6Path, IcmpTurns, DirectPath, ProxyProtoPath):
    def __init__(
        self,
        lb_ip: str,
        services: Sequence[Service],
        nat_ports: tuple[int, int] = (61000, 65535),
        timeouts: Timeouts | None = None,
        table_cap: int = 1_000_000,
        cursors: Callable[[str], SharedCursor | None] | None = None,
        syn_proxy: SynProxySettings | None = None,
        vip: str | None = None,
        ip6: str | None = None,
    ) -> None:
        # lb_ip (SRCIP) sources the traffic to backends, whose replies come back to it; vip is
        # where clients connect: the same address, unless instances share a VIP (--vip,
        # docs/scale-out.md), when each must get back the replies of its own flows.
        self.lb_ip = ip_int(lb_ip)
        self.vip = self.lb_ip if vip is None else ip_int(vip)
        # The LB's IPv6 address (dual stack, lbnat.engine6): clients' VIP and the source towards
        # IPv6 backends alike; -1 (no address equals it) when lbnat serves IPv4 alone.
        self.lb_ip6 = -1 if ip6 is None else addresses.parse(ip6)
        if self.lb_ip > addresses.V4_MAX or (ip6 is not None and self.lb_ip6 <= addresses.V4_MAX):
            raise ValueError("SRCIP is an IPv4 address and ip6 an IPv6 one")
        self.mtu = 1500  # the interface's, set by the data plane: what a translation may grow to
        self.table = SessionTable(self.lb_ip, nat_ports, timeouts, table_cap, self.lb_ip6)
        # The table's parts the packet path uses, bound once (none of them is ever replaced).
        self._forward = self.table.forward
        self._pools = self.table.pools
        self._tracker = self.table.tracker
        self.nat_first, self.nat_last = self.table.port_range
        # Workers share round-robin turns through a cursor per service (lbnat.dataplane.workers).
        self.services = Services(self.table.port_range, cursors)
        # The services' own dicts, bound once: the packet path reads them without a hop.
        self._by_port = self.services.by_port
        self._dr_by_port = self.services.dr_by_port
        self._affinity = self.services.affinity
        for spec in services:
            self.services.add(spec)
        self.events: list[Event] = []
        self.standby: Standby | None = None  # the session sync, when on (lbnat.standby)
        # Other instances' flows (lbnat.owners), with the sync in mesh mode: forwarded to them
        self.owners: FlowOwners | None = None
        self._send_first = PendingResets()  # RSTs for rows _open evicted
        self.drops: dict[DropReason, int] = {}
        self.packets = 0
        self.icmp_translated = 0
        self.syn_proxy = SynProxy(
            syn_proxy or SynProxySettings(mode="off"), self.lb_ip, self._tracker,
            self._flow_ended, self.count_drop, self._open, self._send_first.take, self.vip,
        )  # fmt: skip

    def set_backends(self, service: str, backends: Sequence[Backend]) -> None:
        """Publish a new snapshot of a service's backends (health, weights, draining)."""
        state = self.services[service]
        state.publish(tuple(backends))
        for backend in state.backends:
            pool = self.table.pools.get(backend_pool_key(state.proto, backend.ip_int, backend.port))
            if pool is not None:
                pool.backend = backend

    # --- the packet path ---------------------------------------------------------------------

    def handle(self, buf: bytearray, start: int, end: int, partial: bool, now: float) -> Action:
        self.packets += 1
        headers = parse(buf, start, end)
        if headers.__class__ is not tuple:
            if headers is DropReason.NOT_TCP_UDP and buf[start + 9] == ICMP:
                return self._icmp_error(buf, start, end)
            if headers is DropReason.NOT_IPV4 and buf[start] >> 4 == 6 and self.lb_ip6 >= 0:
                return self._handle6(buf, start, end, partial, now)  # lbnat.engine6
            return self._drop(headers)  # type: ignore[arg-type]
        proto, l4, src, dst, sport, dport, flags, seq, ack, win, length = headers
        if dst != self.lb_ip and dst != self.vip:
            return self._drop(DropReason.NOT_FOR_US)

        if self.nat_first <= dport <= self.nat_last and dst == self.lb_ip:  # backend -> client
            pool = self._pools.get(pool_key(proto, src, sport))
            if pool is None:
                return self._drop(DropReason.NO_SESSION)
            s = pool.rows[dport - pool.first]
            if s is None:
                return self._drop(DropReason.NO_SESSION)
            if s.__class__ is not Session:
                if s.__class__ is ProxyProtoSession:  # PROXY protocol: lbnat.engine_pp
                    return self.pp_from_backend(s, buf, start, l4, end, flags, seq, ack, win,
                                                partial, now)  # fmt: skip
                if s.__class__ is Nat64Session:  # its client is IPv6: lbnat.engine6
                    return self._nat64_from_backend(
                        s, buf, start, l4, end, proto, flags, seq, ack, win, partial, now
                    )
                # a SYN-proxied row: sequence numbers translated
                return self.syn_proxy.from_backend(
                    cast(ProxiedSession, s), buf, start, l4, end, flags, seq, ack, win, partial, now
                )
            ended = None
            if proto == TCP:
                if flags & SYN and s.state is State.SYN_SENT:
                    self._tracker.note_server_wscale(s, tcp_window_scale(buf, l4, end))
                ended = self._tracker.track_server(s, flags, seq, ack, win, now)
            else:
                self._tracker.track_udp_reply(s, now)
            deltas = s.deltas
            rewrite(
                buf, start, l4, proto, s.rev_addresses, s.rev_ports,
                (deltas >> 16) & 0xFFFF, deltas & 0xFFFF, partial,
            )  # fmt: skip
            pool.to_client_packets += 1
            pool.to_client_bytes += end - start
            service = s.service
            service.packets += 1
            service.bytes += end - start
            if ended is not None:
                self._flow_ended(ended, now)
            return (FORWARD, key_client_ip(s.key))

        target = self._by_port.get((proto << 16) | dport)
        if target is None or dst != self.vip:
            if dst == self.vip and (direct := self._dr_by_port.get((proto << 16) | dport)):
                return self.handle_dr(direct, buf, start, end, headers, now)  # lbnat.direct
            return self._drop(DropReason.NOT_FOR_US)
        service = target
        row = self._forward.get(forward_key(proto, src, sport, dport))
        owners = self.owners
        if owners is not None and (row is None or row.ended) and flags & _SAR != SYN:
            # Not a new flow, and no live row: another instance's live flow that the router's
            # hash moved here (behind ECMP, --sync-mode mesh)? Its owner gets it unchanged.
            owner = owners.owner_of(forward_key(proto, src, sport, dport), now)
            if owner is not None:
                if owners.pass_on(buf, start):
                    return (FORWARD, owner)
                return self._drop(DropReason.OWNER_LOOP)
        if row is None or (flags & SYN and not flags & ACK and row.state in ENDED):
            if proto == TCP and (flags & (SYN | ACK | RST)) != SYN:
                proxy = self.syn_proxy
                if row is None and not flags & 0x07 and proxy.mode != "off":
                    return proxy.cookie_ack(service, buf, start, l4, end, headers, partial, now)
                service.count_drop(DropReason.NO_SESSION)
                return self._drop(DropReason.NO_SESSION)
            cookies = proto == TCP and not service.proxy_protocol  # (docs/proxy-protocol.md)
            if cookies and self.syn_proxy.proxies(self.table.half_open_count):
                if row is not None:
                    self.table.remove(row)  # an ended row; the client reused its port
                return self.syn_proxy.answer_syn(service, buf, l4, end, src, sport, seq, now)
            reopen: Session | None = None
            if row is not None:
                # A new SYN on an ended row is a new flow. It keeps the old flow's backend and
                # NAT port when it can (as conntrack does): that backend may still hold the
                # old connection in TIME_WAIT, and only this same client socket's sequence
                # numbers and timestamps are sure to be newer than the old ones, so only its
                # SYN is accepted there without a challenge ACK and a 1 s retry.
                self.table.remove(row)
                reopen = row
            opened = self._open(
                service, proto, src, sport, flags, seq, length, buf, l4, end, now, reopen
            )
            if not isinstance(opened, Session):
                return opened
            row = opened
            if self._send_first:
                resets = self._send_first.take()
                return forward_after_resets(buf, start, l4, end, proto, row, partial, resets)
        elif proto == TCP:
            if row.__class__ is not Session:  # a SYN-proxied row: sequence numbers translated
                if row.__class__ is ProxyProtoSession:  # or PROXY protocol's: lbnat.engine_pp
                    return self.pp_from_client(row, service, buf, start, l4, end, flags, seq, ack,
                                               win, partial, now)  # fmt: skip
                proxied = cast(ProxiedSession, row)
                return self.syn_proxy.from_client(
                    proxied, service, buf, start, l4, end, flags, seq, ack, win, partial, now
                )
            ended = self._tracker.track_client(row, flags, seq, ack, win, now)
            if ended is not None:
                self._flow_ended(ended, now)
        else:
            row.seen = now
        deltas = row.deltas
        pool = row.pool
        rewrite(
            buf, start, l4, proto, pool.fwd_addresses, row.fwd_ports,
            deltas >> 48, (deltas >> 32) & 0xFFFF, partial,
        )  # fmt: skip
        pool.to_backend_packets += 1
        pool.to_backend_bytes += end - start
        service.packets += 1
        service.bytes += end - start
        return (FORWARD, pool.backend.ip_int)

    def _open(
        self,
        service: ServiceState,
        proto: int,
        client_ip: int,
        client_port: int,
        flags: int,
        seq: int,
        length: int,
        buf: bytearray,
        l4: int,
        end: int,
        now: float,
        reopen: Session | None = None,
        row_class: type[Session] = Session,
    ) -> Session | Action:
        """Schedule a new flow: its row, or the action to take when it cannot be made.

        `reopen` is the ended row this client socket had: its backend and NAT port are taken
        again if that backend may still take new flows."""
        # (the IPv4 key's own function where it can: a new flow's cost is the connection rate)
        if client_ip <= V4_MAX:
            key = forward_key(proto, client_ip, client_port, service.port)
        else:
            key = flow_key(proto, client_ip, client_port, service.port)
        backend: Backend | None = None
        nat_port: int | None = None
        if reopen is not None:
            previous = service.by_key.get(reopen.pool.backend.key)
            if previous is not None and previous.eligible:
                backend, nat_port = previous, reopen.nat_port
        affinity = self._affinity.get(service.name)
        if affinity is not None and backend is None:
            remembered = affinity.get(service.port, client_ip, now)
            if remembered is not None:
                candidate = service.by_key.get(remembered)
                if candidate is not None and candidate.eligible:
                    backend = candidate
        if backend is None:
            # With affinity a client hashes by its address alone: maglev then gives its flows
            # one backend in every worker and every instance behind ECMP, record or not.
            flow_hash = key if affinity is None else flow_key(proto, client_ip, 0, service.port)
            if client_ip > V4_MAX:  # the schedulers hash the low 64 bits: fold the rest in
                flow_hash = (flow_hash ^ (flow_hash >> 64) ^ (flow_hash >> 128)) & _MASK64
            backend = service.scheduler.pick(flow_hash, _ActiveFlows(self.table, service))
        if backend is not None and backend.ip_int > V4_MAX >= client_ip:
            # An IPv4 client and IPv6 backends: not translated (lbnat.engine6, NO_NAT46)
            service.count_drop(DropReason.NO_NAT46)
            return self._drop(DropReason.NO_NAT46)
        if backend is None:
            service.count_drop(DropReason.NO_BACKEND)
            self.count_drop(DropReason.NO_BACKEND)
            self.events.append(NoBackend(service.name, (ip_text(client_ip), client_port)))
            if proto == TCP:
                # Refuse at once, as a closed port would: a RST+ACK acknowledging the SYN and
                # any data it carried (RFC 793: SEG.SEQ + SEG.LEN, the SYN counting one).
                ack = (seq + 1 + length) & 0xFFFFFFFF
                vip = self.vip_of(client_ip)
                rst = tcp_segment_any(vip, client_ip, service.port, client_port, 0, ack, RST | ACK)
                return (REPLY, rst, client_ip)
            return _DROP_ACTIONS[DropReason.NO_BACKEND]
        vip = self.vip if client_ip <= V4_MAX else self.lb_ip6
        if service.proxy_protocol and client_ip <= V4_MAX and row_class is Session:
            row_class = ProxyProtoSession
        if row_class is DrSession:  # a direct-routed row holds no NAT port (lbnat.direct)
            opened, evicted = open_row(
                self.table, now, service, proto, client_ip, client_port, vip, backend, key
            )
        else:
            opened, evicted = self.table.open(
                now, service, proto, client_ip, client_port, vip, backend, nat_port, row_class,
                key,
            )  # fmt: skip
        for victim in evicted:
            self._flow_ended(victim, now)
            gone = victim.session
            if gone.proto == TCP and gone.ack_s != UNKNOWN_ACK:  # (a restored row may not know)
                self._send_first.append(backend_reset(gone))
        if isinstance(opened, Refusal):
            self._send_first.clear()  # (a refusal after an eviction: the backend times out)
            service.count_drop(_REFUSAL_DROPS[opened])
            return self._drop(_REFUSAL_DROPS[opened])
        if proto == TCP:
            self._tracker.start_tcp(opened, seq, flags, tcp_window_scale(buf, l4, end))
            if opened.__class__ is ProxyProtoSession:
                start_row(opened, client_ip, client_port, seq, vip, service.port)
        checkpoint = self.table.checkpoint
        if checkpoint is not None:  # now that the row's tracking (window scale) is set
            checkpoint.write(opened)
        if affinity is not None:
            affinity.remember(service.port, client_ip, backend.key, now)
        service.flows += 1
        flows = self.table.open_flows
        self.events.append(FlowOpened(service.name, opened.client, backend.key, opened.nat_port,
                                      flows))  # fmt: skip
        return opened

    def _drop(self, reason: DropReason) -> Action:
        self.count_drop(reason)
        return _DROP_ACTIONS[reason]

    def count_drop(self, reason: DropReason) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _flow_ended(self, ended: Ended, now: float) -> None:
        s = ended.session
        s.service.count_end(ended.reason.value)
        affinity = self._affinity.get(s.service.name)
        if affinity is not None:
            # IPVS persistence counts from the end of the client's last connection.
            affinity.remember(s.service.port, s.client_ip, s.backend.key, now)
        self.events.append(
            FlowEnded(s.service.name, s.client, s.backend.key, ended.reason, ended.open_flows)
        )

    def reset_flows(self, service: str, backend: BackendKey, now: float) -> list[tuple[bytes, int]]:
        """End every open flow of `service` to `backend` (`--on-dead reset`): see reset_flows."""
        return reset_flows(self, service, backend, now)

    # --- between batches ---------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Expire rows and affinity records whose time has come."""
        for ended in self.table.expire(now):
            self._flow_ended(ended, now)
        if self.owners is not None:
            self.owners.expire(now)
        for affinity in self._affinity.values():
            affinity.expire(now)

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    @property
    def open_flows(self) -> int:
        return self.table.open_flows


def reset_flows(
    engine: Engine, service: str, backend: BackendKey, now: float
) -> list[tuple[bytes, int]]:
    """End every open flow of `service` to `backend` (`--on-dead reset`, HAProxy's
    on-marked-down shutdown-sessions): a RST to each end, rows removed, FlowEnded events.
    Returns the packets to send, with their next hop.

    Each RST carries the sequence number its receiver expects next (the peer's last ACK
    tracked), so the endpoint accepts it. A client in SYN_SENT has not seen the backend's
    numbers (it gets none, retries its SYN), nor has a restored row's end (UNKNOWN_ACK)."""
    state = engine.services[service]
    pool = engine.pool_of(service, backend)
    if pool is None:
        return []
    backend_ip, port = ip_int(backend[0]), backend[1]
    lb_ip = pool.source  # of the backend's family
    packets: list[tuple[bytes, int]] = []
    for row in [r for r in pool.rows if r is not None and r.service is state and not r.ended]:
        if engine.table.kernel is not None:  # its latest ACKs are the kernel's
            engine.table.kernel.refresh(row)
        if state.proto == TCP:
            client_ip, client_port = row.client_ip, row.client_port
            if row.state is not State.SYN_SENT and row.ack_c != UNKNOWN_ACK:
                rst = tcp_segment_any(
                    engine.vip_of(client_ip), client_ip, state.port, client_port, row.ack_c, 0,
                    RST,
                )  # fmt: skip
                packets.append((rst, client_ip))
            if row.ack_s != UNKNOWN_ACK:
                seq = row.ack_s  # a PROXY row's is the client's numbering: add the header
                if row.__class__ is ProxyProtoSession and row.pp_state == 2:
                    seq = (seq + len(row.pp_header)) & 0xFFFFFFFF
                rst = tcp_segment_any(lb_ip, backend_ip, row.nat_port, port, seq, 0, RST)
                packets.append((rst, backend_ip))
        engine.table.remove(row)
        engine._flow_ended(Ended(row, EndReason.BACKEND_DEAD, engine.table.open_flows), now)
    return packets
