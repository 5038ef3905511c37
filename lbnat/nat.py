"""The NAT session table: one row per flow, found from either side, expired by state.

    forward:  (proto, service port, client ip, client port) -> Session (a dict keyed by one int,
                                                                       `forward_key`)
    reverse:  (proto, backend ip, backend port, NAT port) -> Session (a per-backend array
                                             indexed by NAT port; the pools by `pool_key`)

These key functions are the one definition of the keys' layouts; the engine calls them too.

A `PortPool` per (proto, backend) hands out NAT ports so that (backend, NAT port) is unique:
two clients that use the same source port get different NAT ports, and the reverse lookup
needs no dict of its own (which is most of why a row costs under 500 bytes).

TCP rows follow a simplified Linux conntrack / IPVS state machine with per-state timeouts
(`ConnectionTracker`, the table's `tracker`).
Sequence numbers are tracked just enough to tell an in-window RST (closes the row) from a
stale or forged one (forwarded, changes nothing): each side's last ACK and scaled window. A row
rebuilt from a worker's checkpoint (`SessionTable.adopt`, lbnat.checkpoint) starts with both
ACKs unknown (`UNKNOWN_ACK`) and picks them up from the next packets, as conntrack does; until
then a RST is forwarded but closes nothing (counted in `rst_ignored`).

`SessionTable.checkpoint`, when set, hears of every row's opening (from the engine), change of
state and removal: per flow, never per packet (lbnat.checkpoint keeps them in shared memory).

Expiry is lazy: a packet only sets `session.seen`; a row's deadline is seen + its state's
timeout. Rows sit in one-second buckets keyed by the deadline they had when filed; a sweep
visits only the buckets that came due and either expires a row or re-files it at its newer
deadline, so a sweep costs O(due rows), never a scan of the table, and the packet path touches
no timer structure (`ExpiryBuckets`).

Pure: time comes in as `now` (seconds, any monotonic origin); nothing here reads a clock.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from lbnat import addresses
from lbnat.addresses import V4_MAX
from lbnat.backends import Backend, BackendKey
from lbnat.packet import ACK, ADDRESS, FIN, PORT_PAIR, RST, SYN, TCP, rewrite_deltas, swapped
from lbnat.service import ServiceState


class State(enum.IntEnum):
    SYN_SENT = 0
    SYN_RECV = 1
    ESTABLISHED = 2
    FIN_WAIT = 3  # a FIN seen from one side
    TIME_WAIT = 4  # FINs seen from both sides: the flow has ended, the row lingers
    CLOSE = 5  # an in-window RST: the flow has ended, the row lingers briefly
    UDP_UNREPLIED = 6
    UDP_REPLIED = 7


ENDED = (State.TIME_WAIT, State.CLOSE)
HALF_OPEN = (State.SYN_SENT, State.SYN_RECV, State.UDP_UNREPLIED)

UNKNOWN_ACK = -1
"""A side's last ACK before a restored row has seen one (no u32 sequence number equals it)."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds a row lives without traffic, per state (Linux conntrack's defaults)."""

    syn_sent: float = 120.0
    syn_recv: float = 60.0
    established: float = 900.0
    fin_wait: float = 120.0
    time_wait: float = 120.0
    close: float = 10.0
    udp: float = 30.0
    udp_replied: float = 120.0
    # Half-open rows (SYN_SENT, SYN_RECV, unanswered UDP) while the table is under pressure
    # (more than PRESSURE_HALF_OPEN of them): conntrack's early drop, made a timeout.
    half_open_under_pressure: float = 5.0

    def by_state(self) -> tuple[float, ...]:
        return (
            self.syn_sent,
            self.syn_recv,
            self.established,
            self.fin_wait,
            self.time_wait,
            self.close,
            self.udp,
            self.udp_replied,
        )

    def under_pressure(self) -> tuple[float, ...]:
        """`by_state()` with the half-open states' timeouts cut to `half_open_under_pressure`."""
        short = self.half_open_under_pressure
        return tuple(
            min(timeout, short) if state in HALF_OPEN else timeout
            for state, timeout in zip(State, self.by_state(), strict=True)
        )


PRESSURE_HALF_OPEN = 1024
"""Half-open rows of one table above which it is under pressure (a SYN flood, or backends that
do not answer): their timeout is cut to `Timeouts.half_open_under_pressure` until they are
back under half of this. A busy LB's honest half-open rows live one RTT each: at 10,000 new
flows/s and 10 ms that is about 100."""


class EndReason(enum.Enum):
    FIN = "fin"
    RST = "rst"
    TIMEOUT = "timeout"
    EVICTED = "evicted"
    BACKEND_DEAD = "backend_dead"  # --on-dead reset: lbnat reset both ends


class Refusal(enum.Enum):
    """Why `SessionTable.open` could not make a row."""

    NAT_PORTS_EXHAUSTED = "nat_ports_exhausted"
    TABLE_FULL = "table_full"


def forward_key(proto: int, client_ip: int, client_port: int, service_port: int) -> int:
    """One int for (proto, service port, client ip, client port). The service port is part of
    the key: one client socket may talk to two services of the LB from the same port."""
    return (proto << 64) | (service_port << 48) | (client_ip << 16) | client_port


def key_client_ip(key: int) -> int:
    """The client's IPv4 address in a forward key (the IPv4 packet path's; `key_client` reads
    either family)."""
    return (key >> 16) & 0xFFFFFFFF


def pool_key(proto: int, backend_ip: int, backend_port: int) -> int:
    """One int for (proto, backend ip, backend port): the key of an IPv4 backend's port pool."""
    return (proto << 48) | (backend_ip << 16) | backend_port


# Both families (lbnat.addresses: an IPv6 address is an int with bit 128 set). The IPv4 keys
# above are these keys' low bits: an IPv6 address's bits above its low 32 go on top of them,
# so an IPv4 key is the same int either way and the IPv4 packet path keeps its cheaper
# functions, while the IPv6 path, the sync, the checkpoint and the views use these.


def flow_key(proto: int, client_ip: int, client_port: int, service_port: int) -> int:
    """`forward_key` for a client of either family."""
    return forward_key(proto, client_ip & 0xFFFFFFFF, client_port, service_port) | (
        (client_ip >> 32) << 72
    )


def key_client(key: int) -> int:
    """The client's address (either family) in a forward key."""
    return ((key >> 72) << 32) | ((key >> 16) & 0xFFFFFFFF)


def backend_pool_key(proto: int, backend_ip: int, backend_port: int) -> int:
    """`pool_key` for a backend of either family."""
    return pool_key(proto, backend_ip & 0xFFFFFFFF, backend_port) | ((backend_ip >> 32) << 56)


def _pool_key_of(proto: int, backend: Backend) -> int:
    """A backend's pool key (IPv4's own function where it can: this runs once per new flow)."""
    ip = backend.ip_int
    if ip <= V4_MAX:
        return pool_key(proto, ip, backend.port)
    return backend_pool_key(proto, ip, backend.port)


# Shared int objects for every port and window value: a row that holds one of these holds a
# pointer, not a 28-byte int of its own (memory per row, see Session).
PORTS: tuple[int, ...] = tuple(range(65536))


class _Fifo:
    """Rows in arrival order, for eviction and port recycling, with lazy deletion.

    A row leaves by being skipped when it reaches the front (its owner only lowers `live`), so
    leaving costs nothing and an entry costs 8 bytes where an OrderedDict entry costs ~100. The
    queue is compacted when dead entries outnumber live ones, so it stays O(live).
    """

    __slots__ = ("_queue", "_valid", "live")

    def __init__(self, valid: Callable[[Session], bool]) -> None:
        self._queue: deque[Session] = deque()
        self._valid = valid
        self.live = 0

    def push(self, row: Session) -> None:
        self._queue.append(row)
        self.live += 1
        if len(self._queue) > 2 * self.live + 64:
            self._queue = deque(r for r in self._queue if self._valid(r))

    def oldest(self) -> Session | None:
        queue = self._queue
        while queue:
            row = queue[0]
            if self._valid(row):
                return row
            queue.popleft()
        return None

    def rows(self) -> list[Session]:
        return [r for r in self._queue if self._valid(r)]


def _is_half_open(row: Session) -> bool:
    return row.bucket >= 0 and row.state in HALF_OPEN


def _is_ended(row: Session) -> bool:
    return row.bucket >= 0 and row.state in ENDED


class PortPool:
    """NAT ports towards one (proto, backend ip, backend port), and the rows that hold them.

    `rows[nat_port - first]` is the reverse map. Never-used ports are handed out first, then
    freed ports oldest-freed first, so a port is reused as late as possible (the backend may
    still hold the old connection in TIME_WAIT). It also keeps the per-backend counters.
    """

    __slots__ = (
        "_closed",
        "_half_open",
        "active",
        "backend",
        "first",
        "flows",
        "free",
        "fwd_addresses",
        "last",
        "next_unused",
        "rows",
        "source",
        "timeout_of",
        "to_backend_bytes",
        "to_backend_packets",
        "to_client_bytes",
        "to_client_packets",
    )

    def __init__(
        self,
        backend: Backend,
        lb_ip: int,
        first: int,
        last: int,
        timeout_of: tuple[float, ...] = (),
    ) -> None:
        self.backend = backend
        self.first = first
        self.last = last
        self.timeout_of = timeout_of or Timeouts().by_state()
        self.next_unused = first
        self.free: deque[int] = deque()
        self.rows: list[Session | None] = [None] * (last - first + 1)
        self._closed = _Fifo(_is_ended)  # this backend's ended rows, oldest first
        self._half_open = _Fifo(_is_half_open)  # its half-open rows: ports to take back
        # src LB, dst backend: the same for every flow to this backend.
        self.source = lb_ip  # the LB's address of the backend's family (lbnat.addresses int)
        self.fwd_addresses = addresses.packed(lb_ip) + addresses.packed(backend.ip_int)
        self.active = 0  # open flows (not ended)
        self.flows = 0  # flows ever scheduled here
        # what lbnat forwarded for this backend's flows, per direction (the kernel's folded in)
        self.to_backend_packets = 0
        self.to_backend_bytes = 0
        self.to_client_packets = 0
        self.to_client_bytes = 0

    @property
    def ports_in_use(self) -> int:
        """NAT ports held by a row (open, lingering or half-open) now."""
        return self.next_unused - self.first - len(self.free)

    def take(self) -> int | None:
        if self.next_unused <= self.last:
            port = PORTS[self.next_unused]
            self.next_unused += 1
            return port
        if self.free:
            return self.free.popleft()
        return None

    def claim(self, nat_port: int) -> bool:
        """Take this very port (a restored row's); False if it is outside the pool or held.
        Ports skipped over become free ones; claiming in rising order never searches."""
        index = nat_port - self.first
        if not 0 <= index < len(self.rows) or self.rows[index] is not None:
            return False
        if nat_port >= self.next_unused:
            self.free.extend(PORTS[self.next_unused : nat_port])
            self.next_unused = nat_port + 1
        else:
            self.free.remove(nat_port)  # held by no row, so either free or never used
        return True

    def lookup(self, nat_port: int) -> Session | None:
        index = nat_port - self.first
        if 0 <= index < len(self.rows):
            return self.rows[index]
        return None

    @property
    def closed(self) -> list[Session]:
        """This backend's ended rows, oldest first."""
        return self._closed.rows()

    @property
    def half_open(self) -> list[Session]:
        """This backend's half-open rows, oldest first."""
        return self._half_open.rows()

    @property
    def rows_held(self) -> int:
        return sum(1 for row in self.rows if row is not None)


class Session:
    """One row: about 450 bytes with its share of the maps (`python -m lbnat_bench.scale`).

    Slots only; per-packet state is kept in objects rows can share: the last-seen time is the
    packet loop's `now` of the batch (not a deadline float per row), ports and windows are the
    shared ints of PORTS, both directions' checksum deltas are packed into one int.
    """

    __slots__ = (
        "ack_c",
        "ack_s",
        "bucket",
        "created",
        "deltas",
        "fins",
        "fwd_ports",
        "key",
        "nat_port",
        "pool",
        "rev_addresses",
        "rev_ports",
        "seen",
        "service",
        "slot",
        "state",
        "win_c",
        "win_s",
        "wscale",
    )

    def __init__(self) -> None:
        self.key = 0  # forward key, see forward_key()
        self.service: ServiceState
        self.pool: PortPool
        self.nat_port = 0
        self.state = State.SYN_SENT
        self.created = 0  # whole second
        self.seen = 0.0  # time of the last packet that refreshed the row
        self.bucket = 0  # the expiry bucket (a second) the row is filed in; -1 once removed
        # Rewrites: addresses/ports to write per direction and the checksum deltas of both,
        # (fwd_ip << 48) | (fwd_l4 << 32) | (rev_ip << 16) | rev_l4; see lbnat.packet.rewrite.
        self.fwd_ports = b""
        self.rev_addresses = b""
        self.rev_ports = b""
        self.deltas = 0
        # TCP tracking: each side's last ACK and raw window; window scales packed as
        # (client << 4) | server (15: not offered); FINs seen (1 client, 2 server).
        self.ack_c = 0
        self.win_c = 0
        self.ack_s = 0
        self.win_s = 0
        self.wscale = 0
        self.fins = 0
        self.slot = -1  # its record in the worker's checkpoint (lbnat.checkpoint); -1: none

    # Derived views, for tests, logs and `lbnat sessions`; never used per packet.
    @property
    def expires(self) -> float:
        return self.seen + self.pool.timeout_of[self.state]

    @property
    def proto(self) -> int:
        return (self.key >> 64) & 0xFF

    @property
    def service_port(self) -> int:
        return (self.key >> 48) & 0xFFFF

    @property
    def client_ip(self) -> int:
        return key_client(self.key)

    @property
    def client_port(self) -> int:
        return self.key & 0xFFFF

    @property
    def client(self) -> tuple[str, int]:
        return addresses.text(self.client_ip), self.client_port

    @property
    def backend(self) -> Backend:
        return self.pool.backend

    def as_client_sends(self) -> tuple[bytes, bytes]:
        """(addresses, ports) of the flow's packets as the client sends them, before the
        forward rewrite: (client, VIP) and (client port, service port), the reply rewrite's
        bytes swapped."""
        return swapped(self.rev_addresses), swapped(self.rev_ports)

    @property
    def ended(self) -> bool:
        return self.state in ENDED


class Nat64Session(Session):
    """A row whose client is IPv6 and whose backend is IPv4 (NAT64, lbnat.engine6): its
    packets change family both ways, so its rewrite bytes are 32 address bytes towards the
    client and its pool's 8 towards the backend. The kernel fast path never takes it."""

    __slots__ = ()


class DrSession(Session):
    """A direct-routed row (lbnat.direct): the client's packets go to the backend unchanged and
    its replies never pass lbnat. It holds no NAT port (`nat_port` 0, not in its pool's
    reverse array), its state comes from the client's segments alone, both ACKs stay
    UNKNOWN_ACK (lbnat never resets its backend), and neither the checkpoint nor the session
    sync carries it (the kernel fast path takes an established one as one identity entry)."""

    __slots__ = ()


def row_class_for(row_class: type[Session], client_ip: int, backend: Backend) -> type[Session]:
    """The class of a new row: `Nat64Session` when a plain row's client is IPv6 and its
    backend IPv4."""
    if row_class is Session and client_ip > V4_MAX and backend.ip_int <= V4_MAX:
        return Nat64Session
    return row_class


@dataclass(frozen=True, slots=True)
class Ended:
    """A flow that just ended (its row may linger). `open_flows` counts the rest."""

    session: Session
    reason: EndReason
    open_flows: int


_ESTABLISHED = State.ESTABLISHED
_SYN_SENT = State.SYN_SENT
_SYN_RECV = State.SYN_RECV


class KernelRows(Protocol):
    """The rows a kernel fast path rewrites (lbnat.fastpath.FastPath), told of every change."""

    def changed(self, s: Session) -> None: ...

    def removed(self, s: Session) -> None: ...

    def refresh(self, s: Session) -> None: ...

    def settle(self, now: float) -> None: ...


class RowSink(Protocol):
    """Hears of a row's changes that outlive a worker (lbnat.checkpoint.RowCheckpoint)."""

    def write(self, s: Session) -> None:
        """The row was opened or its state changed."""

    def clear(self, s: Session) -> None:
        """The row is gone."""

    def alive(self, s: Session) -> None:
        """The row came due and has seen a packet since it was filed (the session sync's
        refresh of a long-lived row, lbnat.standby; once per timeout, never per packet)."""


class ExpiryBuckets:
    """Rows filed by deadline in one-second buckets, and a heap of the seconds that have one.

    A row is filed under the second its deadline had when filed (`row.bucket`); a bucket entry
    whose row has been removed or re-filed since is skipped when its second comes due. Whole
    seconds are shared int objects (`shared_second`): rows hold a pointer, not an int each.
    """

    COMPACT_SLACK = 4096  # stale entries allowed beyond the rows filed, before a compaction

    def __init__(self) -> None:
        self._buckets: dict[int, list[Session]] = {}
        self._due: list[int] = []  # heap of bucket seconds
        self._seconds: dict[int, int] = {}  # one shared int object per live second
        self._entries = 0  # in all buckets, stale ones (rows removed or re-filed) included

    def shared_second(self, second: int) -> int:
        return self._seconds.setdefault(second, second)

    def file(self, s: Session, deadline: float) -> None:
        second = math.ceil(deadline)
        second = self._seconds.setdefault(second, second)
        s.bucket = second
        self._entries += 1
        bucket = self._buckets.get(second)
        if bucket is None:
            self._buckets[second] = [s]
            heapq.heappush(self._due, second)
        else:
            bucket.append(s)

    def compact(self, rows: int) -> None:
        """Drop the stale entries once they outnumber the `rows` filed (plus a slack). A stale
        entry keeps a removed row's memory alive until its second comes due: under a SYN flood
        whose rows are evicted by the thousand a second, that is most of lbnat's memory. Costs
        O(entries), once per `rows + COMPACT_SLACK` removals: O(1) a removal, amortised."""
        if self._entries <= 2 * rows + self.COMPACT_SLACK:
            return
        kept = 0
        for second in list(self._buckets):
            bucket = [s for s in self._buckets[second] if s.bucket == second]
            if bucket:
                self._buckets[second] = bucket
                kept += len(bucket)
            else:
                del self._buckets[second]  # its heap entry finds nothing when it comes due
        self._entries = kept

    def pop_due(self, now: float) -> Iterator[Session]:
        """Empty every bucket whose second is <= now, yielding the rows still filed there.
        The caller expires each row or files it again (at a deadline later than now)."""
        due = self._due
        while due and due[0] <= now:
            second = heapq.heappop(due)
            self._seconds.pop(second, None)
            bucket = self._buckets.pop(second, ())
            self._entries -= len(bucket)
            for s in bucket:
                if s.bucket == second:  # else removed, or re-filed earlier
                    yield s
        if len(self._seconds) > 4 * len(self._buckets) + 4096:
            # created-second entries are only for sharing objects; drop the old ones.
            self._seconds = {k: k for k in self._buckets}

    @property
    def entries(self) -> int:
        """Entries in all buckets, stale ones included (what `compact` bounds)."""
        return self._entries

    def holds(self, s: Session) -> bool:
        """Is `s` filed in the bucket it names (an invariant the tests check)."""
        return s.bucket in self._due and any(r is s for r in self._buckets[s.bucket])

    def next_deadline(self) -> float | None:
        return float(self._due[0]) if self._due else None


class SessionTable:
    """The rows: the forward map, the port pools (the reverse map), expiry, the cap and
    eviction, the table's counters. `tracker` moves a row's state as its packets pass."""

    def __init__(
        self,
        lb_ip: int,
        port_range: tuple[int, int] = (61000, 65535),
        timeouts: Timeouts | None = None,
        cap: int = 1_000_000,
        lb_ip6: int = -1,
    ) -> None:
        first, last = port_range
        if not 0 < first <= last < 65536:
            raise ValueError(f"bad NAT port range {first}-{last}")
        if cap < 1:
            raise ValueError("the table cap must be at least 1")
        self.lb_ip = lb_ip
        self.lb_ip6 = lb_ip6  # the source towards IPv6 backends (lbnat.addresses int), -1: none
        self.port_range = (first, last)
        self.timeouts = timeouts or Timeouts()
        self.timeout_of = self.timeouts.by_state()  # the pressure tuple while under pressure
        self.under_pressure = False  # see PRESSURE_HALF_OPEN
        self.cap = cap
        self.forward: dict[int, Session] = {}
        self.pools: dict[int, PortPool] = {}
        self.open_flows = 0
        self._half_open = _Fifo(_is_half_open)  # eviction candidates, oldest first
        self._closed = _Fifo(_is_ended)
        self.expiry = ExpiryBuckets()
        self.tracker = ConnectionTracker(self)
        self.refused = {reason: 0 for reason in Refusal}
        self.evicted = 0
        self.ports_reclaimed = 0  # half-open rows that gave their NAT port to a new flow
        self.pressure_spells = 0  # times the table went under pressure
        self.rst_ignored = 0
        self.checkpoint: RowSink | None = None  # set by lbnat.checkpoint.restore
        self.kernel: KernelRows | None = None  # set by the data plane when it offloads

    def __len__(self) -> int:
        return len(self.forward)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self.forward.values()))

    @property
    def half_open_count(self) -> int:
        """How many rows are half-open (what the SYN proxy's auto mode and PRESSURE_HALF_OPEN
        are compared with)."""
        return self._half_open.live

    @property
    def half_open(self) -> list[Session]:
        """Half-open rows (SYN_SENT, SYN_RECV, UDP_UNREPLIED), oldest first."""
        return self._half_open.rows()

    @property
    def closed(self) -> list[Session]:
        """Ended rows still lingering (TIME_WAIT, CLOSE), oldest first."""
        return self._closed.rows()

    # --- lookups ----------------------------------------------------------------------------

    def reverse(
        self, proto: int, backend_ip: int, backend_port: int, nat_port: int
    ) -> Session | None:
        pool = self.pools.get(backend_pool_key(proto, backend_ip, backend_port))
        return None if pool is None else pool.lookup(nat_port)

    def pool_for(self, proto: int, backend: Backend) -> PortPool:
        key = _pool_key_of(proto, backend)
        pool = self.pools.get(key)
        if pool is None:
            source = self.lb_ip6 if backend.ip_int > V4_MAX else self.lb_ip
            if source < 0:
                raise ValueError(f"backend {backend.name} is IPv6 and lbnat has no IPv6 address")
            pool = PortPool(backend, source, *self.port_range, self.timeout_of)
            self.pools[key] = pool
        else:
            pool.backend = backend  # the newest snapshot's record (health, weight)
        return pool

    # --- creating and removing rows ---------------------------------------------------------

    def open(
        self,
        now: float,
        service: ServiceState,
        proto: int,
        client_ip: int,
        client_port: int,
        vip: int,
        backend: Backend,
        nat_port: int | None = None,
        row_class: type[Session] = Session,
        key: int = -1,
    ) -> tuple[Session | Refusal, list[Ended]]:
        """Make the row for a new flow to `backend`. Returns the row (or why not) and any flows
        that eviction ended to make room. `nat_port`: the port of the row just removed for
        this client socket, to be taken again (it is the last one freed). `row_class`: a
        Session subclass with more slots (lbnat.synproxy's rows). `key`: the flow's key, when the
        caller has it (`flow_key`)."""
        pool = self.pool_for(proto, backend)
        if nat_port is not None and pool.free and pool.free[-1] == nat_port:
            pool.free.pop()
        else:
            nat_port = pool.take()
        ended: list[Ended] = []
        if nat_port is None:
            # Recycle the port of this backend's longest-ended row rather than refuse a flow;
            # failing that, its oldest half-open row's (a SYN flood's rows are all half-open;
            # an established flow never gives up its port).
            closed = pool._closed.oldest()
            if closed is not None:
                self.remove(closed)
            elif (half_open := pool._half_open.oldest()) is not None:
                ended.append(self._evict(half_open))
                self.ports_reclaimed += 1
            nat_port = pool.take()
        if nat_port is None:
            self.refused[Refusal.NAT_PORTS_EXHAUSTED] += 1
            return Refusal.NAT_PORTS_EXHAUSTED, []
        if len(self.forward) >= self.cap:
            # Only now, with a port in hand: evicting for a flow that is refused anyway would
            # end a flow for nothing.
            victim = self._closed.oldest() or self._half_open.oldest()
            if victim is None:
                pool.free.appendleft(nat_port)
                self.refused[Refusal.TABLE_FULL] += 1
                return Refusal.TABLE_FULL, ended
            if victim.ended:
                self.remove(victim)
                self.evicted += 1
            else:
                ended.append(self._evict(victim))

        if key < 0:
            key = flow_key(proto, client_ip, client_port, service.port)
        state = State.SYN_SENT if proto == TCP else State.UDP_UNREPLIED
        if client_ip > V4_MAX and backend.ip_int <= V4_MAX and row_class is Session:
            row_class = Nat64Session
        row = row_class()
        s = self._file(row, key, service, pool, nat_port, state, now, vip)
        pool.flows += 1
        if self._half_open.live > PRESSURE_HALF_OPEN and not self.under_pressure:
            self._enter_pressure()
        return s, ended

    def _evict(self, victim: Session) -> Ended:
        """End an open (half-open) row to make room: removed and counted. The row keeps its
        state and NAT port, so the engine can reset the backend's side of it."""
        self.remove(victim)
        self.evicted += 1
        return Ended(victim, EndReason.EVICTED, self.open_flows)

    def adopt(
        self,
        now: float,
        service: ServiceState,
        proto: int,
        client_ip: int,
        client_port: int,
        vip: int,
        backend: Backend,
        nat_port: int,
        state: State,
        row_class: type[Session] = Session,
    ) -> Session | None:
        """Rebuild a row a previous worker had (lbnat.checkpoint.restore): this NAT port, this
        state, its timeout running from `now`, both sides' ACKs unknown until its next packets
        (`row_class`: as in `open`; the caller fills in a subclass's own slots).
        None when the client socket or the port is taken, or the table is full. The flow is not
        counted as a new one (it was scheduled before)."""
        key = flow_key(proto, client_ip, client_port, service.port)
        if key in self.forward or len(self.forward) >= self.cap or vip < 0:
            return None  # (vip < 0: the client's family has no address here)
        pool = self.pool_for(proto, backend)
        if not pool.claim(nat_port):
            return None
        row = row_class_for(row_class, client_ip, backend)()
        s = self._file(row, key, service, pool, PORTS[nat_port], state, now, vip)
        s.ack_c = s.ack_s = UNKNOWN_ACK
        return s

    def _file(
        self, s: Session, key: int, service: ServiceState, pool: PortPool, nat_port: int,
        state: State, now: float, vip: int,
    ) -> Session:  # fmt: skip
        """Fill in new row `s` and file it: the forward map, its pool's array, the counters,
        the eviction queues its state belongs to, the expiry bucket of its timeout."""
        s.key = key
        s.service = service
        s.pool = pool
        s.nat_port = nat_port
        s.created = self.expiry.shared_second(math.floor(now))
        _prepare_rewrites(s, key_client(key), key & 0xFFFF, vip, pool.backend.port)
        s.state = state
        self.forward[key] = s
        if nat_port:  # (a direct-routed row holds none: lbnat.direct)
            pool.rows[nat_port - pool.first] = s
        if state in ENDED:
            self._closed.push(s)
            pool._closed.push(s)
        else:
            pool.active += 1
            self.open_flows += 1
        if state in HALF_OPEN:
            self._half_open.push(s)
            pool._half_open.push(s)
        s.seen = now
        self.expiry.file(s, now + self.timeout_of[state])
        if self.kernel is not None:
            self.kernel.changed(s)  # a restored established row (adopt) goes back to the kernel
        return s

    def remove(self, s: Session) -> None:
        """Forget a row at once (its port goes back to the pool). Idempotent."""
        if s.bucket < 0:
            return
        if s.state in HALF_OPEN:
            self._half_open.live -= 1
            s.pool._half_open.live -= 1
        if s.state in ENDED:
            self._closed.live -= 1
            s.pool._closed.live -= 1
        else:
            self.open_flows -= 1
            s.pool.active -= 1
        s.bucket = -1
        del self.forward[s.key]
        pool = s.pool
        if s.nat_port:  # (a direct-routed row holds none: lbnat.direct)
            pool.rows[s.nat_port - pool.first] = None
            pool.free.append(s.nat_port)
        self.expiry.compact(len(self.forward))
        if self.checkpoint is not None:
            self.checkpoint.clear(s)
        if self.kernel is not None:
            self.kernel.removed(s)

    def end(self, s: Session, state: State, now: float, reason: EndReason) -> Ended:
        """Move an open row to TIME_WAIT or CLOSE: the flow is over, the row lingers."""
        if s.state in HALF_OPEN:
            self._half_open.live -= 1
            s.pool._half_open.live -= 1
        s.state = state
        self.open_flows -= 1
        s.pool.active -= 1
        self._closed.push(s)
        s.pool._closed.push(s)
        self._deadline(s, now)
        if self.checkpoint is not None:
            self.checkpoint.write(s)
        if self.kernel is not None:
            self.kernel.changed(s)
        return Ended(s, reason, self.open_flows)

    def move(self, s: Session, state: State, now: float) -> None:
        """Change the state of an open row and restart its timeout."""
        if s.state in HALF_OPEN and state not in HALF_OPEN:
            self._half_open.live -= 1
            s.pool._half_open.live -= 1
        s.state = state
        self._deadline(s, now)
        if self.checkpoint is not None:
            self.checkpoint.write(s)
        if self.kernel is not None:
            self.kernel.changed(s)

    def hold(self, s: Session, seen: float, deadline: float) -> None:
        """Set the row's last-seen time and file it under `deadline`, later or earlier (a
        standby row of the session sync: its peer's last-seen, and a grace, lbnat.standby)."""
        s.seen = seen
        self.expiry.file(s, deadline)

    def _deadline(self, s: Session, now: float) -> None:
        s.seen = now
        deadline = now + self.timeout_of[s.state]
        # A later deadline is found by the sweep; an earlier one needs an earlier bucket.
        if math.ceil(deadline) < s.bucket:
            self.expiry.file(s, deadline)

    # --- expiry -----------------------------------------------------------------------------

    def expire(self, now: float) -> list[Ended]:
        """Remove every row whose deadline has passed. Returns the flows this ended (rows that
        had already ended, by FIN or RST, go silently)."""
        ended: list[Ended] = []
        timeout_of = self.timeout_of
        kernel = self.kernel
        if kernel is not None:
            kernel.settle(now)  # rows established long enough enter the kernel
        for s in self.expiry.pop_due(now):
            if kernel is not None:
                kernel.refresh(s)  # a row in the kernel was last seen there
            deadline = s.seen + timeout_of[s.state]
            if deadline > now:
                self.expiry.file(s, deadline)
                if self.checkpoint is not None:
                    self.checkpoint.alive(s)
                continue
            was_open = s.state not in ENDED
            self.remove(s)
            if was_open:
                ended.append(Ended(s, EndReason.TIMEOUT, self.open_flows))
        if self.under_pressure and self._half_open.live < PRESSURE_HALF_OPEN // 2:
            self._set_timeouts(self.timeouts.by_state(), pressure=False)
        return ended

    # --- pressure: conntrack's early drop, as a shorter timeout of half-open rows ----------

    def _enter_pressure(self) -> None:
        """Cut the half-open rows' timeouts, and move the rows already filed to their new,
        earlier deadlines (once per spell: O(half-open rows))."""
        self._set_timeouts(self.timeouts.under_pressure(), pressure=True)
        self.pressure_spells += 1
        for s in self._half_open.rows():
            deadline = s.seen + self.timeout_of[s.state]
            if math.ceil(deadline) < s.bucket:
                self.expiry.file(s, deadline)

    def _set_timeouts(self, timeout_of: tuple[float, ...], pressure: bool) -> None:
        self.timeout_of = timeout_of
        self.under_pressure = pressure
        for pool in self.pools.values():
            pool.timeout_of = timeout_of

    def next_deadline(self) -> float | None:
        return self.expiry.next_deadline()


def _prepare_rewrites(
    s: Session, client_ip: int, client_port: int, vip: int, backend_port: int
) -> None:
    """Both directions' rewrites of a new row, computed once: the address and port bytes to
    write and the checksum deltas (lbnat.packet.rewrite), packed into `s.deltas` as
    (fwd_ip << 48) | (fwd_l4 << 32) | (rev_ip << 16) | rev_l4."""
    pool, service = s.pool, s.service
    # (ADDRESS.pack for IPv4: a C call, and this runs once per new flow)
    client_address = ADDRESS.pack(client_ip) if client_ip <= V4_MAX else addresses.packed(client_ip)
    vip_address = ADDRESS.pack(vip) if vip <= V4_MAX else addresses.packed(vip)
    s.fwd_ports = PORT_PAIR.pack(s.nat_port, backend_port)
    fwd_ip, fwd_l4 = rewrite_deltas(
        client_address + vip_address,
        pool.fwd_addresses,
        PORT_PAIR.pack(client_port, service.port),
        s.fwd_ports,
    )
    s.rev_addresses = vip_address + client_address
    s.rev_ports = service.reply_ports(client_port)
    rev_ip, rev_l4 = rewrite_deltas(
        swapped(pool.fwd_addresses),
        s.rev_addresses,
        PORT_PAIR.pack(backend_port, s.nat_port),
        s.rev_ports,
    )
    s.deltas = (fwd_ip << 48) | (fwd_l4 << 32) | (rev_ip << 16) | rev_l4


class ConnectionTracker:
    """A row's state as its packets pass (conntrack's job): TCP states from each side's
    segments, the RST window check, a UDP row's first reply. A change of state goes through the
    table (`move`, `end`), which keeps the timeouts, the counters and the eviction order."""

    __slots__ = ("_table",)

    def __init__(self, table: SessionTable) -> None:
        self._table = table

    def track_client(
        self, s: Session, flags: int, seq: int, ack: int, win: int, now: float
    ) -> Ended | None:
        """Account a TCP segment from the client on row `s`. Returns the flow's end, if this
        segment ended it."""
        state = s.state
        if state is _ESTABLISHED and not flags & 0x07:  # no FIN, SYN, RST: the common case
            s.seen = now
            s.ack_c = ack
            s.win_c = PORTS[win]
            return None
        if state is _ESTABLISHED and self._table.kernel is not None:
            self._table.kernel.refresh(s)  # the kernel carried its latest ACKs and windows
        if flags & RST:
            return self._reset(s, seq, s.ack_s, s.win_s, s.wscale & 0x0F, now)
        if flags & ACK:
            s.ack_c = ack
            s.win_c = PORTS[win]
        if flags & SYN:
            if state is _SYN_SENT:
                # A retransmitted SYN (or a new ISN from the same port): same row, refreshed.
                self._client_syn(s, seq)
            if state not in ENDED:
                s.seen = now
            return None
        if state is _SYN_RECV and flags & ACK:
            state = _ESTABLISHED
        return self._fin_or_refresh(s, state, flags, 1, now)

    def track_server(
        self, s: Session, flags: int, seq: int, ack: int, win: int, now: float
    ) -> Ended | None:
        """Account a TCP segment from the backend on row `s`."""
        state = s.state
        if state is _ESTABLISHED and not flags & 0x07:
            s.seen = now
            s.ack_s = ack
            s.win_s = PORTS[win]
            return None
        if state is _ESTABLISHED and self._table.kernel is not None:
            self._table.kernel.refresh(s)
        if flags & RST:
            if state is _SYN_SENT:
                # A refused connection: acceptable only if it acknowledges the client's SYN.
                if flags & ACK and ack == s.ack_s:
                    return self._table.end(s, State.CLOSE, now, EndReason.RST)
                self._table.rst_ignored += 1
                return None
            return self._reset(s, seq, s.ack_c, s.win_c, s.wscale >> 4, now)
        if flags & SYN:
            if state is _SYN_SENT and flags & ACK:
                s.ack_s = ack
                s.win_s = PORTS[win]  # never scaled in a SYN
                # Until the client ACKs, "what the client acknowledges" is the backend's ISN + 1
                # (as _client_syn does for the other side): a RST from the backend right after
                # its SYN-ACK carries that sequence and must close the row.
                s.ack_c = (seq + 1) & 0xFFFFFFFF
                self._table.move(s, _SYN_RECV, now)
            elif state is _SYN_RECV:
                s.seen = now  # a retransmitted SYN-ACK
            return None
        if flags & ACK:
            s.ack_s = ack
            s.win_s = PORTS[win]
        return self._fin_or_refresh(s, state, flags, 2, now)

    def _fin_or_refresh(
        self, s: Session, state: State, flags: int, side: int, now: float
    ) -> Ended | None:
        """The shared tail of both directions: a FIN moves the row on (the second FIN ends the
        flow); any other segment of an open row restarts its state's timeout."""
        if s.state in ENDED:
            return None  # late packets of an ended flow are translated, the linger runs out
        if flags & FIN:
            s.fins |= side
            if s.fins == 3:
                return self._table.end(s, State.TIME_WAIT, now, EndReason.FIN)
            state = State.FIN_WAIT
        if state != s.state:
            self._table.move(s, state, now)
        else:
            s.seen = now
        return None

    def start_tcp(self, s: Session, seq: int, flags: int, client_wscale: int | None) -> None:
        """Initialise tracking from the client's first SYN."""
        s.wscale = ((15 if client_wscale is None else client_wscale) << 4) | 15
        self._client_syn(s, seq)

    @staticmethod
    def note_server_wscale(s: Session, server_wscale: int | None) -> None:
        """Record the backend's window scale from its SYN-ACK. Scaling is in force only when
        both sides offered it (RFC 7323); otherwise both shifts are 0."""
        client = s.wscale >> 4
        if server_wscale is None or client == 15:
            s.wscale = 0
        else:
            s.wscale = (client << 4) | server_wscale

    @staticmethod
    def _client_syn(s: Session, seq: int) -> None:
        # Until the backend speaks, "what the backend acknowledges" is the client's ISN + 1:
        # the only sequence a RST from the client may carry, and the ACK a refusing RST needs.
        s.ack_s = (seq + 1) & 0xFFFFFFFF
        s.win_s = 0

    def _reset(
        self, s: Session, seq: int, peer_ack: int, peer_win: int, peer_scale: int, now: float
    ) -> Ended | None:
        """A RST closes the row only when its sequence number is inside the window the peer
        advertised: [peer's last ACK, ACK + window]; one behind is allowed for a sender that
        has not seen its last segment acknowledged. Windows are kept raw and scaled here (a
        SYN's window, never scaled, is then over-estimated: lenient only before the
        handshake completes)."""
        if s.state in ENDED:
            return None
        if peer_ack == UNKNOWN_ACK:  # a restored row before the peer's first ACK: no window
            self._table.rst_ignored += 1
            return None
        offset = (seq - peer_ack) & 0xFFFFFFFF
        window = peer_win << min(peer_scale, 14)
        if offset <= max(window, 1) or offset == 0xFFFFFFFF:
            return self._table.end(s, State.CLOSE, now, EndReason.RST)
        self._table.rst_ignored += 1
        return None

    def track_udp_reply(self, s: Session, now: float) -> None:
        if s.state == State.UDP_UNREPLIED:
            self._table.move(s, State.UDP_REPLIED, now)
        else:
            s.seen = now


class Affinity:
    """Client-IP persistence (IPVS's): while a client's record lives, its new flows go to the
    same backend. The record is refreshed by each new flow; expiry is O(expired)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._records: OrderedDict[tuple[int, int], tuple[BackendKey, float]] = OrderedDict()

    def get(self, service_port: int, client_ip: int, now: float) -> BackendKey | None:
        record = self._records.get((service_port, client_ip))
        if record is None or record[1] <= now:
            return None
        return record[0]

    def remember(self, service_port: int, client_ip: int, backend: BackendKey, now: float) -> None:
        key = (service_port, client_ip)
        self._records[key] = (backend, now + self.timeout)
        self._records.move_to_end(key)

    def expire(self, now: float) -> None:
        records = self._records
        while records:
            key, (_, deadline) = next(iter(records.items()))
            if deadline > now:
                break
            del records[key]

    def __len__(self) -> int:
        return len(self._records)
