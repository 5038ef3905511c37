"""One engine's side of the session sync (docs/sync-protocol.md): what it tells its peer, and
the peer's rows it keeps as standby rows.

What this module may know: the engine, its session table and the sync's records
(lbnat.syncwire). It touches no socket, thread or clock: `now` comes in. The main process's
`lbnat.dataplane.syncnode` carries the records between the nodes; the workers run this.

    packets ──► Engine ──► SessionTable ──(RowSink: write, clear, alive)──► SyncJournal
                                                                          │  ├─► RowCheckpoint
                                          drained after every batch  ◄────┘  (the tee's inner)
                                          as one SyncRecords event ──► main process ──► peer

    peer ──► main process ──► StandbyChange(InstallRows | EndRows | RefreshRows | MarkStale
                              | ResyncComplete) ──► Standby.apply ──► the same SessionTable

A **standby row** is an ordinary row of the table, installed from a peer's record exactly as a
restore rebuilds one (same client, backend, NAT port, state; sequence tracking picked up from
its next packets). What makes it standby is only its deadline: its peer's last-seen time plus
its state's timeout plus `GRACE`, set again by each of the peer's records. The peer refreshes a
long-lived row when the row comes due on its side and has seen packets since (`alive`), so a
standby copy outlives its original's due time by `GRACE` and the refresh finds it. When the
VIP moves here, packets reach the row and it is this node's like any other.

The journal is muted while peer records are applied: a standby row's install, change and
removal are written to the checkpoint (a worker restart or a hitless restart keeps them) but
never sent back, so two nodes never echo each other's records.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lbnat.checkpoint import Dropped, RowRecord, place_of, rebuild, record_of
from lbnat.nat import ENDED, HALF_OPEN, DrSession, EndReason, RowSink, Session, flow_key
from lbnat.proxyproto import ProxyProtoSession
from lbnat.syncwire import (
    EndRows,
    InstallRows,
    MarkStale,
    RefreshRows,
    ResyncComplete,
    RowEnd,
    RowKey,
    RowRefresh,
    RowUpdate,
)

if TYPE_CHECKING:
    from lbnat.engine import Engine

GRACE = 5.0
"""Seconds a standby row outlives its original's deadline: the original's refresh (sent when
it comes due, batched, carried by the main process) reaches the standby row before it goes."""

MAX_IDLE = 0xFFFF  # the records' idle field (seconds)
U32 = 0xFFFFFFFF

RowChange = RowUpdate | RowEnd | RowRefresh
StandbyEffect = InstallRows | EndRows | RefreshRows | MarkStale | ResyncComplete


def synced(s: Session) -> bool:
    """A row worth a peer's copy: past its handshake (a SYN flood's rows never reach the wire,
    and a SYN-proxied row whose backend has not answered cannot be restored anyway)."""
    return (  # (not synced: lbnat.direct, lbnat.engine_pp)
        s.state not in HALF_OPEN
        and s.__class__ is not DrSession
        and s.__class__ is not ProxyProtoSession
    )


def row_key(s: Session) -> RowKey:
    return RowKey(s.proto, s.service_port, s.client_ip, s.client_port, s.nat_port)


def client_key(k: RowKey | RowRecord) -> int:
    """The forward key (lbnat.nat.flow_key: an IPv4 client's is its forward_key) of the client
    socket a record names."""
    return flow_key(k.proto, k.client_ip, k.client_port, k.service_port)


def idle_of(s: Session, now: float) -> int:
    return min(MAX_IDLE, max(0, int(now - s.seen)))


@dataclass(frozen=True, slots=True)
class SyncRecords:
    """One batch of a worker's row changes, for its peers (an engine event: it travels from a
    worker to the main process with the others)."""

    worker: int
    records: tuple[RowChange, ...]


class SyncJournal:
    """The table's RowSink when the sync is on: tells `inner` (the checkpoint, if any) every
    change, and keeps this batch's changes for the peers. Per flow, never per packet: a row's
    opening and changes of state, its removal, and a refresh when it comes due alive."""

    def __init__(self, worker: int, inner: RowSink | None) -> None:
        self.worker = worker
        self.inner = inner
        self.muted = False  # applying a peer's records: nothing goes back to it
        self._rows: dict[Session, None] = {}  # rows opened or changed, in order, once each
        self._ends: list[RowKey] = []
        self._alive: list[Session] = []

    @property
    def pending(self) -> bool:
        return bool(self._rows or self._ends or self._alive)

    def write(self, s: Session) -> None:
        if self.inner is not None:
            self.inner.write(s)
        if not self.muted and synced(s):
            self._rows[s] = None

    def clear(self, s: Session) -> None:
        if self.inner is not None:
            self.inner.clear(s)
        if self.muted:
            return
        self._rows.pop(s, None)
        if synced(s):
            self._ends.append(row_key(s))

    def alive(self, s: Session) -> None:
        if self.inner is not None:
            self.inner.alive(s)
        if not self.muted and synced(s):
            self._alive.append(s)

    def drain(self, now: float) -> SyncRecords:
        """This batch's records: the ends first (an END of a row, then a ROW of a new row of the
        same client socket, must leave the new one), then refreshes, then the rows as they are
        now (a row changed twice in a batch is sent once)."""
        records: list[RowChange] = [RowEnd(key) for key in self._ends]
        rows = self._rows
        for s in self._alive:
            if s.bucket >= 0 and s not in rows:
                records.append(RowRefresh(row_key(s), idle_of(s, now)))
        worker = self.worker
        for s in rows:
            if s.bucket >= 0:
                records.append(RowUpdate(record_of(s), worker, idle_of(s, now)))
        self._rows, self._ends, self._alive = {}, [], []
        return SyncRecords(worker, tuple(records))


class Standby:
    """The sync in one engine: its journal, and the peer's rows applied to its table. Rows
    whose NAT port is outside this engine's slice are another worker's and skipped; a row in
    this slice from another worker of the peer cannot be found by its client's packets here
    (the pair runs different worker counts or NAT ranges) and is refused (`misfit`)."""

    def __init__(self, engine: Engine, worker: int) -> None:
        self.engine = engine
        self.worker = worker
        self.journal = SyncJournal(worker, engine.table.checkpoint)
        engine.table.checkpoint = self.journal
        self.stale: set[int] = set()  # forward keys of rows a resync has not confirmed yet
        self.counts: Counter[str] = Counter()  # installed, updated, ended, refreshed, swept, ...

    def apply(self, effect: StandbyEffect, now: float) -> None:
        if self.engine.owners is not None:  # mesh: the peers' rows tell whose flows they are
            self._own(effect, now)
            return
        self.journal.muted = True
        try:
            match effect:
                case InstallRows(_, rows, clock):
                    self._install(rows, clock, now)
                case EndRows(_, keys):
                    self._end(keys)
                case RefreshRows(_, refreshes):
                    self._refresh(refreshes, now)
                case MarkStale():  # the rows a bulk can confirm (not the handshakes)
                    forward = self.engine.table.forward
                    self.stale = {key for key, s in forward.items() if synced(s)}
                case ResyncComplete():
                    self._sweep()
        finally:
            self.journal.muted = False

    def _own(self, effect: StandbyEffect, now: float) -> None:
        """Instances behind an ECMP router (--sync-mode mesh): a peer's rows are not copied
        into this table (the peer's NAT source address is its own) but kept as who owns
        which flow, for the packets the router sends here by mistake (lbnat.owners)."""
        owners = self.engine.owners
        assert owners is not None
        match effect:
            case InstallRows(peer, rows, _):
                owners.install(peer, rows, now)
                self.counts["owned"] += len(rows)
            case EndRows(peer, keys):
                owners.end(peer, keys)
            case RefreshRows(peer, refreshes):
                owners.refresh(peer, refreshes, now)
            case MarkStale(peer):
                owners.mark_stale(peer)
            case ResyncComplete(peer):
                self.counts["swept"] += owners.resync_complete(peer)

    def bulk(self, now: float) -> list[RowUpdate]:
        """Every row a peer should hold a copy of, as it is now (a resync's answer)."""
        worker = self.worker
        return [
            RowUpdate(record_of(s), worker, idle_of(s, now))
            for s in self.engine.table.forward.values()
            if synced(s)
        ]

    # --- applying a peer's records ---------------------------------------------------------

    def _mine(self, nat_port: int) -> bool:
        return self.engine.nat_first <= nat_port <= self.engine.nat_last

    def _hold(self, s: Session, idle: int, now: float) -> None:
        seen = now - idle
        self.engine.table.hold(s, seen, seen + s.pool.timeout_of[s.state] + GRACE)

    def _row_named(self, k: RowKey) -> Session | None:
        """The row an END or REFRESH names: its client socket's, if it holds that NAT port (an
        older row of a reused socket is another row)."""
        row = self.engine.table.forward.get(client_key(k))
        return row if row is not None and row.nat_port == k.nat_port else None

    def _install(self, rows: Sequence[RowUpdate], clock: int, now: float) -> None:
        engine = self.engine
        table = engine.table
        floor_now = math.floor(now)
        for update in rows:
            r = update.row
            if not self._mine(r.nat_port):
                continue
            if update.worker != self.worker:
                self.counts["misfit"] += 1
                continue
            key = client_key(r)
            self.stale.discard(key)
            place = place_of(engine, r)
            if isinstance(place, Dropped):
                self.counts[place.value] += 1
                continue
            service, backend = place
            row = table.forward.get(key)
            if row is not None and row.nat_port == r.nat_port and row.pool.backend is backend:
                self._update(row, update, now)
                continue
            if row is not None:  # an older row of a reused client socket: the peer's is newer
                table.remove(row)
            pool = table.pool_for(r.proto, backend)
            index = r.nat_port - pool.first
            if 0 <= index < len(pool.rows) and (holder := pool.rows[index]) is not None:
                table.remove(holder)  # the peer gave this port to another flow since
            row = rebuild(engine, r, service, backend, now)
            if row is None:
                self.counts[Dropped.CONFLICT.value] += 1
                continue
            created = floor_now - ((clock - r.created) & U32)  # the peer's age of the row
            if 0 <= created <= floor_now:
                row.created = table.expiry.shared_second(created)
            self.journal.write(row)  # muted: into the checkpoint only
            self._hold(row, update.idle, now)
            self.counts["installed"] += 1

    def _update(self, row: Session, update: RowUpdate, now: float) -> None:
        r, table = update.row, self.engine.table
        row.fins, row.wscale = r.fins, r.wscale
        if r.state != row.state:
            if r.state in ENDED and not row.ended:
                reason = EndReason.FIN if r.state == ENDED[0] else EndReason.RST
                table.end(row, r.state, now, reason)
            elif r.state not in ENDED and not row.ended:
                table.move(row, r.state, now)
        self._hold(row, update.idle, now)
        self.counts["updated"] += 1

    def _end(self, keys: Sequence[RowKey]) -> None:
        for k in keys:
            if self._mine(k.nat_port) and (row := self._row_named(k)) is not None:
                self.engine.table.remove(row)
                self.counts["ended"] += 1

    def _refresh(self, refreshes: Sequence[RowRefresh], now: float) -> None:
        for refresh in refreshes:
            k = refresh.key
            if self._mine(k.nat_port) and (row := self._row_named(k)) is not None:
                self.stale.discard(row.key)
                self._hold(row, refresh.idle, now)
                self.counts["refreshed"] += 1

    def _sweep(self) -> None:
        """A resync completed: rows it did not confirm are gone on the peer (their END lost)."""
        table = self.engine.table
        for key in self.stale:
            row = table.forward.get(key)
            if row is not None:
                table.remove(row)
                self.counts["swept"] += 1
        self.stale = set()
