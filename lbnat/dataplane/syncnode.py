"""The session sync's I/O (docs/sync-protocol.md): one UDP socket and one thread in the main
process, between the engines' journals and the peers.

    workers ── SyncRecords (lbnat.standby) ──► submit ──► batched for BATCH s ──► UPDATE
    datagrams, one signed stream per peer (syncwire.SyncSender) ──────────────────► peers
    peers ──► datagram ──► SyncInbox (decode, checks, SyncReceiver per peer) ──► effects:
        InstallRows, EndRows, RefreshRows,   ──► StandbyChange to every engine (not while
        MarkStale, ResyncComplete                this node is master: its rows are the truth)
        RequestResync                        ──► a REQUEST datagram to the peer
        SendBulk                             ──► every engine's rows (AskSyncRows), sent as
                                                 BULK datagrams, BULK_RATE a second
        MarkReady                            ──► ready: `lbnat ha-check` passes

The role comes from keepalived's notify script (`lbnat ha-role`, lbnat.daemon): a master
ignores its peer's rows, a node that becomes backup asks the master for a resync (its own rows
give way to the master's), and a backup or faulty node sends no row changes of its own (it
serves no flow; its standby rows expire on their own, silently).

Everything that touches the inbox and the senders runs on the sync thread: `submit` and
`set_role` hand their work over under a lock.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import ipaddress
import itertools
import logging
import math
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lbnat.config import SyncConfig
from lbnat.messages import StandbyChange
from lbnat.standby import RowChange, SyncRecords, client_key
from lbnat.syncwire import (
    EndRows,
    InstallRows,
    MarkReady,
    MarkStale,
    RefreshRows,
    RequestId,
    RequestResync,
    ResyncComplete,
    RowEnd,
    RowUpdate,
    SendBulk,
    SyncInbox,
    SyncSender,
)

BATCH = 0.010  # seconds a row change waits for others to share its datagram
HEARTBEAT = 1.0  # seconds without a datagram to a peer before an empty UPDATE
TICK = 0.1  # seconds between looks at the receivers' timers
BULK_RATE = 2000  # bulk datagrams a second (30 rows each: 60,000 rows/s, 22 Mbit/s)
BULK_ROWS = 30  # ROW records per bulk datagram (syncwire: 30 fill one, with its chunk record)
MAX_PENDING = 1_000_000  # records waiting for the sync thread before new ones are dropped
RECEIVE_BUFFER = 4 << 20  # a lost datagram costs a resync: room for bursts
IP_FREEBIND = 15  # linux/in.h: bind an address the host does not hold (yet)


class Role(enum.Enum):
    """This node's VRRP role, as keepalived's notify script last said (UNKNOWN: not yet)."""

    UNKNOWN = "unknown"
    MASTER = "master"
    BACKUP = "backup"
    FAULT = "fault"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class SyncPeer:
    address: str
    port: int

    @property
    def id(self) -> int:
        """Its sender id: its IPv4 address as a number (docs/sync-protocol.md)."""
        return address_id(self.address)


def address_id(address: str) -> int:
    return int(ipaddress.IPv4Address(address))


@dataclass(slots=True)
class _Bulk:
    """A bulk under way to one peer: the rows still to send (a snapshot taken when it was
    asked for), paced. A row that changes or ends meanwhile goes as an UPDATE and leaves this
    queue, so no older snapshot of it follows its newer state."""

    request: RequestId
    rows: dict[int, RowUpdate]  # by client socket (standby.client_key)
    sent: int = 0


class SyncNode:
    """The sync socket and its thread. `change` hands a standby change to every engine;
    `ask_rows` returns every engine's rows (for a peer's resync); `log` is the daemon's."""

    def __init__(
        self,
        settings: SyncConfig,
        change: Callable[[StandbyChange], None],
        ask_rows: Callable[[], Sequence[RowUpdate]],
        log: Callable[..., None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.change = change
        self.ask_rows = ask_rows
        self.log = log
        self.clock = clock
        peers = [SyncPeer(address, port) for address, port in settings.peers]
        self.peers = {peer.id: peer for peer in peers}
        self._by_address = {(peer.address, peer.port): peer for peer in peers}
        self.epoch = time.time_ns() // 1000  # the wall clock at start, in microseconds
        now = clock()
        self.inbox = SyncInbox(settings.secret, list(self.peers), self.epoch, now)
        self.senders = {
            peer: SyncSender(address_id(settings.listen), self.epoch, settings.secret)
            for peer in self.peers
        }
        self.role = Role.UNKNOWN
        self.counts: Counter[str] = Counter()  # datagrams and records each way, ...
        self.drops: Counter[str] = Counter()  # datagrams refused before the inbox saw them
        self._lock = threading.Lock()
        self._pending: list[RowChange] = []
        self._pending_since = 0.0
        self._demote = False
        self._bulks: dict[int, _Bulk] = {}
        self._last_sent = dict.fromkeys(self.peers, float("-inf"))
        self._unreachable: set[int] = set()  # peers whose last send failed (logged once)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # a first pending record wakes the thread from an idle wait (at most TICK) at once
        self._wake, self._waker = socket.socketpair()
        self._wake.setblocking(False)
        self._waker.setblocking(False)
        self.sock = self._open()

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            sock.bind((self.settings.listen, self.settings.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    # --- from other threads ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lbnat-sync", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        self.sock.close()
        self._wake.close()
        self._waker.close()

    def submit(self, records: SyncRecords) -> None:
        """A batch of a worker's row changes (on its reader thread, or the loop's)."""
        if not records.records:
            return
        with self._lock:
            if len(self._pending) >= MAX_PENDING:  # the sync thread is stuck: memory is bounded
                self.counts["records_dropped"] += len(records.records)
                return
            first = not self._pending
            if first:
                self._pending_since = self.clock()
            self._pending.extend(records.records)
        if first:
            with contextlib.suppress(OSError):  # full: the thread is awake anyway
                self._waker.send(b"!")

    def set_role(self, role: Role) -> None:
        """keepalived's word (lbnat ha-role): logged, and acted on by the sync thread."""
        with self._lock:
            previous, self.role = self.role, role
            if role is Role.BACKUP and previous is not Role.BACKUP:
                self._demote = True
        if role is not previous:
            self.log(f"sync: role {previous.value} -> {role.value} (keepalived)", "sync_role",
                     role=role.value, previous=previous.value)  # fmt: skip

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ready(self) -> bool:
        """This node holds its peers' flows (lbnat-ha check), and its sync is running."""
        return self.inbox.ready and (self._thread is None or self._thread.is_alive())

    def status(self) -> dict[str, Any]:
        now = self.clock()
        peers = []
        for peer_id, receiver in self.inbox.receivers.items():
            peer = self.peers[peer_id]
            peers.append({
                "address": f"{peer.address}:{peer.port}",
                "state": receiver.state.value,
                "ready": receiver.ready,
                "heard": receiver.epoch is not None,
                "bulk_to_peer": peer_id in self._bulks,
                "last_sent_ago": round(now - self._last_sent[peer_id], 3)
                if math.isfinite(self._last_sent[peer_id]) else None,
            })  # fmt: skip
        dropped = Counter(dict(self.drops))  # copies first: the sync thread adds reasons
        dropped.update(dict(self.inbox.drops))
        return {
            "mode": self.settings.mode,
            "role": self.role.value,
            "ready": self.ready,
            "listen": f"{self.settings.listen}:{self.settings.port}",
            "epoch": self.epoch,
            "peers": peers,
            "counts": dict(self.counts),
            "running": self.running,
            "dropped": dict(dropped),
        }

    # --- the sync thread -----------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            try:
                next_tick = self._turn(next_tick)
            except Exception as error:  # a bug must not end the sync silently: logged, counted
                self.counts["internal_errors"] += 1
                if self.counts["internal_errors"] == 1:
                    self.log(f"sync: internal error: {error!r} (counted; the sync goes on)",
                             "sync_error", level=logging.ERROR)  # fmt: skip
                self._stop.wait(TICK)

    def _turn(self, next_tick: float) -> float:
        """One wait and what it found: datagrams, timers, batches, bulks, heartbeats; the time
        of the next look at the timers."""
        now = self.clock()
        timeout = max(0.0, next_tick - now)  # idle: the next look at the timers
        if self._pending or self._bulks:
            timeout = min(timeout, BATCH)  # a batch to send, or the next bulk datagrams
        try:
            readable, _, _ = select.select([self.sock, self._wake], [], [], timeout)
        except (InterruptedError, ValueError):
            readable = []
        now = self.clock()
        if self._wake in readable:
            with contextlib.suppress(OSError):
                self._wake.recv(4096)
        if self.sock in readable:
            self._receive(now)
        with self._lock:
            demote, self._demote = self._demote, False
        if demote:
            self._carry_out(self.inbox.demoted(now), now)
        if now >= next_tick:
            self._carry_out(self.inbox.tick(now), now)
            next_tick = now + TICK
        self._flush(now)
        self._pace_bulks(now)
        self._heartbeats(now)
        return next_tick

    def _receive(self, now: float) -> None:
        for _ in range(256):  # then the timers and the sends get their turn
            try:
                datagram, source = self.sock.recvfrom(65536)  # whole: an oversize is seen
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error of an earlier send (the peer is down): read on
                continue
            self.counts["datagrams_received"] += 1
            if source not in self._by_address:
                self.drops["stranger"] += 1  # not from a configured peer's address and port
                continue
            self._carry_out(self.inbox.receive(datagram, now), now)

    def _carry_out(self, effects: Sequence[object], now: float) -> None:
        for effect in effects:
            match effect:
                case InstallRows() | EndRows() | RefreshRows() | MarkStale() | ResyncComplete():
                    if self.role is Role.MASTER:
                        self.counts["ignored_as_master"] += 1
                        continue
                    if isinstance(effect, InstallRows):
                        self.counts["rows_received"] += len(effect.rows)
                    if isinstance(effect, ResyncComplete):
                        peer = self.peers[effect.peer]
                        self.log(f"sync: resync from {peer.address} complete", "sync_resynced",
                                 peer=peer.address)  # fmt: skip
                    self.change(StandbyChange(effect))
                case RequestResync(peer_id, request):
                    peer = self.peers[peer_id]
                    self.log(f"sync: asking {peer.address} for its flows (resync "
                             f"{request.number})", "sync_request", peer=peer.address)  # fmt: skip
                    self._send(peer_id, self.senders[peer_id].request(request, now), now)
                case SendBulk(peer_id, request):
                    self._start_bulk(peer_id, request)
                case MarkReady(peer_id, alone):
                    peer = self.peers[peer_id]
                    why = f"{peer.address} silent since the start" if alone else (
                        f"holds {peer.address}'s flows")  # fmt: skip
                    if self.inbox.ready:  # each peer's MarkReady comes once: the last one logs
                        self.log(f"sync: ready ({why})", "sync_ready", peer=peer.address,
                                 alone=alone)  # fmt: skip

    def _start_bulk(self, peer_id: int, request: RequestId) -> None:
        try:
            rows = list(self.ask_rows())
        except Exception as error:  # a worker away or stuck: the peer asks again (10 s)
            self.log(f"sync: cannot answer {self.peers[peer_id].address}'s resync: {error}",
                     "sync_bulk_failed", level=logging.WARNING)  # fmt: skip
            return
        # A new request from the peer replaces a bulk still going to it.
        self._bulks[peer_id] = _Bulk(request, {client_key(u.row): u for u in rows})
        self.log(f"sync: sending {len(rows)} flows to {self.peers[peer_id].address} (resync "
                 f"{request.number})", "sync_bulk", rows=len(rows))  # fmt: skip

    def _pace_bulks(self, now: float) -> None:
        """A few bulk datagrams per turn (about BULK_RATE a second), between the updates:
        each is encoded when it goes, so every datagram of the stream takes its number in the
        order it is sent."""
        for peer_id, bulk in list(self._bulks.items()):
            sender = self.senders[peer_id]
            for _ in range(max(1, int(BULK_RATE * BATCH))):
                keys = list(itertools.islice(bulk.rows, BULK_ROWS))
                chunk = [bulk.rows.pop(key) for key in keys]
                bulk.sent += len(chunk)
                final = None if bulk.rows else bulk.sent
                self._send(peer_id, sender.bulk(bulk.request, chunk, final, now), now)
                self.counts["bulk_rows_sent"] += len(chunk)
                if final is not None:
                    del self._bulks[peer_id]
                    break

    def _flush(self, now: float) -> None:
        with self._lock:
            if not self._pending or now - self._pending_since < BATCH:
                return
            records, self._pending = self._pending, []
            role = self.role
        if role in (Role.BACKUP, Role.FAULT, Role.STOP):
            self.counts["records_withheld"] += len(records)  # it serves no flow of its own
            return
        self.counts["records_sent"] += len(records)
        if self._bulks:  # these rows' newer state goes now: their snapshot must not follow
            for record in records:
                if isinstance(record, RowUpdate):
                    key = client_key(record.row)
                elif isinstance(record, RowEnd):
                    key = client_key(record.key)
                else:  # a refresh carries no row: the snapshot still has to install it
                    continue
                for bulk in self._bulks.values():
                    if bulk.rows.pop(key, None) is not None:
                        self.counts["bulk_rows_superseded"] += 1
        for peer_id, sender in self.senders.items():
            self._send(peer_id, sender.updates(records, now), now)

    def _heartbeats(self, now: float) -> None:
        for peer_id, sender in self.senders.items():
            if now - self._last_sent[peer_id] >= HEARTBEAT:
                self._send(peer_id, sender.updates([], now), now)

    def _send(self, peer_id: int, datagrams: list[bytes], now: float) -> None:
        peer = self.peers[peer_id]
        self._last_sent[peer_id] = now
        for datagram in datagrams:
            try:
                self.sock.sendto(datagram, (peer.address, peer.port))
            except BlockingIOError:  # the socket's send buffer is full: this one is lost
                self.counts["send_buffer_full"] += 1
                continue
            except OSError as error:
                self.counts["send_errors"] += 1
                if peer_id not in self._unreachable:
                    self._unreachable.add(peer_id)
                    reason = errno.errorcode.get(error.errno or 0, str(error))
                    self.log(f"sync: cannot send to {peer.address}: {error.strerror or reason}"
                             " (datagrams are lost until it answers again)", "sync_unreachable",
                             level=logging.WARNING, peer=peer.address)  # fmt: skip
                return
            self.counts["datagrams_sent"] += 1
        if peer_id in self._unreachable:
            self._unreachable.discard(peer_id)
            self.log(f"sync: sending to {peer.address} again", "sync_reachable",
                     peer=peer.address)  # fmt: skip
