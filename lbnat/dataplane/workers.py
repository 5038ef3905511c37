"""The data plane as one loop in the main process, or as N worker processes.

    main process                                    worker i (python -m lbnat.dataplane.workers)
    health thread, control and admin servers        RingLoop/PacketLoop + Engine (its own rows,
    registry (backends, health)                     its slice of the NAT ports)
    WorkerPool ── socketpair, pickled messages ──── changes in; answers and events out
    holds every worker's packet socket              maps its socket's rings; owns nothing shared
    (PACKET_FANOUT group, lbnat.dataplane.fanout)   but the round-robin cursors (one word each)

`InlinePlane` (one worker) runs the loop on the main thread, as lbnat did before workers.
`WorkerPool` (N workers) starts one process per worker; the main thread supervises: a worker that
exits is started again on the same socket (its place in the fanout group is kept, so every
other worker's flows keep their worker) while the others go on forwarding. The restarted worker
takes its flows back: each worker keeps a record of every row in a memfd of its own
(`RowMemory`, lbnat.checkpoint) that the main process creates and passes to every incarnation
of that worker; the new one rebuilds the rows from it before it reads its first frame, and
the frames that waited in the kept socket's ring meanwhile find them. The memfd lives as long as
the main process: a restart of lbnat starts with empty tables, unless `--state-file` puts the
rows in files instead (lbnat.statefile, lbnat.dataplane.handover): then the next lbnat restores
them too, through the same path. With one worker the loop keeps a checkpoint only then (no
process of its own restarts it: without a file nobody would ever read it).

With --ip6 every loop has a second packet socket, bound to ETH_P_IPV6 (its own filter, ring and,
with several workers, fanout group: lbnat.dataplane.fanout.steering_program6); the main process
holds both sockets of every worker and passes both to each incarnation.

Both implement lbnat.messages.DataPlane: `change()` sends a change to every engine, `ask()`
returns every engine's answer (lbnat.views), events come back through `on_events`. The
messages on a worker's socketpair are the frozen dataclasses of lbnat.messages.
"""

from __future__ import annotations

import argparse
import logging
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from lbnat.checkpoint import (
    HEADER_SIZE,
    RestoreReport,
    RowCheckpoint,
    checkpoint_bytes,
    records_below,
    restore,
)
from lbnat.dataplane.bpf import attach_filter
from lbnat.dataplane.fanout import join, steering_program, steering_program6
from lbnat.dataplane.kernel import ETH_P_IPV6
from lbnat.dataplane.link import Link, Neighbours, link_mtu
from lbnat.dataplane.loop import PacketLoop, RingLoop
from lbnat.dataplane.offload import attach_fast_path
from lbnat.dataplane.packet_socket import open_packet_socket, reject_all
from lbnat.dataplane.rings import RingSpec
from lbnat.engine import Engine, Event, NoBackend
from lbnat.messages import (
    Answer,
    ApplyChange,
    Ask,
    Change,
    Events,
    FromWorker,
    Question,
    Ready,
    SetServices,
    Stop,
    SyncOut,
    ToWorker,
    WorkerFailed,
    WorkerSetup,
)
from lbnat.owners import FlowOwners
from lbnat.scheduler import SharedCursor
from lbnat.standby import Standby, SyncRecords
from lbnat.views import answer, apply_change

EventSink = Callable[[int, list[Event]], None]  # (worker index, events)
SyncSink = Callable[[SyncRecords], None]  # a batch of a worker's row changes (lbnat.standby)

START_TIMEOUT = 15.0  # seconds for a worker to report ready (with an empty checkpoint)
# ... and more per record its checkpoint holds: a restore costs about 30 us a row here (about
# what opening it cost), so a worker restored with 500,000 rows is given 115 s, not killed
# for being slow and restarted into the same restore for ever.
RESTORE_TIMEOUT_PER_ROW = 200e-6
RESTART_DELAY = 1.0  # seconds between restarts of the same worker
SUPERVISE_EVERY = 0.2  # seconds between looks at the workers (and the daemon's upkeep)


class WorkerError(Exception):
    """A worker could not be started (the message is for the user)."""


# --- messages: a 4-byte length, then a pickle (both ends are this program) ---------------------

_LENGTH = struct.Struct("<I")


def send_message(sock: socket.socket, message: object) -> None:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LENGTH.pack(len(data)) + data)


class MessageReader:
    """Reassembles messages from a stream of bytes."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= 4:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if len(self._buffer) < 4 + length:
                break
            messages.append(pickle.loads(self._buffer[4 : 4 + length]))
            del self._buffer[: 4 + length]
        return messages


def receive_message(sock: socket.socket, reader: MessageReader) -> Any:
    """Block until one whole message has arrived (the setup message)."""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise EOFError("the main process closed the control connection")
        messages = reader.feed(data)
        if messages:
            return messages[0]


# --- round-robin cursors shared by the workers ---------------------------------------------------

_U64 = struct.Struct("<Q")


class SharedCursors:
    """One 8-byte word per service in a memfd that every worker maps (lbnat.scheduler's
    SharedCursor): the round-robin turn is global, not per worker."""

    SLOTS = 512

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("lbnat-cursors", 0)
            os.ftruncate(fd, self.SLOTS * 8)
        self.fd = fd
        self.map = mmap.mmap(fd, self.SLOTS * 8)

    def cursor(self, slot: int) -> _Cursor:
        return _Cursor(self.map, slot * 8)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class _Cursor:
    __slots__ = ("_at", "_map")

    def __init__(self, shared: mmap.mmap, at: int) -> None:
        self._map, self._at = shared, at

    def load(self) -> int:
        return int(_U64.unpack_from(self._map, self._at)[0])

    def store(self, value: int) -> None:
        _U64.pack_into(self._map, self._at, value)


class RowMemory:
    """One worker's row checkpoint (lbnat.checkpoint): a memfd the main process creates, keeps
    and passes to every incarnation of the worker, with room for `rows` records. Its pages are
    allocated as records are first written, so a large table cap costs nothing up front.

    With `path` (--state-file) the records are in that file instead, so that they outlive
    lbnat: a file that exists is kept as it is (a previous lbnat's rows, restored by the
    worker) and only grown, never shrunk (a smaller table cap must not cut records off)."""

    def __init__(self, index: int, rows: int, path: str | None = None) -> None:
        self.path = path
        if path is None:
            self.fd = os.memfd_create(f"lbnat-rows-{index}")  # close-on-exec; pass_fds passes it
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inheritable either
        try:
            size = checkpoint_bytes(rows)
            if os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)  # sparse: pages come as records are written
        except OSError:
            os.close(self.fd)
            raise

    def records(self) -> int:
        """Slots the next worker's restore will look at (the checkpoint's high water mark)."""
        return records_below(os.pread(self.fd, HEADER_SIZE, 0))

    def close(self) -> None:
        try:
            if self.path is not None:
                os.fsync(self.fd)  # the workers' (or the loop's) mapped writes, for the next lbnat
        finally:
            os.close(self.fd)


def map_checkpoint(fd: int) -> RowCheckpoint:
    """A worker's view of its RowMemory (the checkpoint's memoryview keeps the mapping open
    for the process's life)."""
    return RowCheckpoint(memoryview(mmap.mmap(fd, os.fstat(fd).st_size)))


def merge_reports(reports: Sequence[RestoreReport]) -> RestoreReport:
    """Several workers' restores as one."""
    dropped: dict[str, int] = {}
    for report in reports:
        for why, n in report.dropped.items():
            dropped[why] = dropped.get(why, 0) + n
    rows = sum(report.rows for report in reports)
    return RestoreReport(rows, sum(report.open_flows for report in reports), dropped)


# --- building a loop (the same in the main process and in a worker) -----------------------------


def build_loop(
    engine: Engine,
    sock: socket.socket,
    link: Link,
    io: str,
    rings: RingSpec,
    on_events: Callable[[list[Event]], None],
    on_tick: Callable[[Engine, float], None] | None = None,
    sock6: socket.socket | None = None,
) -> PacketLoop:
    """The loop over `sock` (and `sock6`, the IPv6 socket, with --ip6); the engine learns the
    interface's MTU (path MTU of translated packets)."""
    set_mtu(engine, link_mtu(link.interface))
    neighbours = Neighbours(link)
    if io == "rings":
        return RingLoop(engine, sock, neighbours, on_events, rings, on_tick=on_tick, sock6=sock6)
    return PacketLoop(engine, sock, neighbours, on_events, on_tick=on_tick, sock6=sock6)


def set_mtu(engine: Engine, mtu: int | None) -> None:
    """engine.mtu (lbnat.engine: 1500 unless told) from the interface's; unchanged when the
    MTU cannot be read."""
    if mtu is not None:
        engine.mtu = mtu


def open_worker_sockets(
    link: Link,
    program: bytes,
    nat_ports: tuple[int, int],
    workers: int,
    io: str,
    rings: RingSpec,
    ipv6: bool = False,
) -> list[socket.socket]:
    """One packet socket per worker (with its receive ring when `io` is rings), in one fanout
    group when there are several. Each rejects everything until the group is complete, so no
    frame is ever queued on a socket the group does not steer. `ipv6`: the IPv6 sockets
    (ETH_P_IPV6, `program` from build_filter6), in a group of their own; open them after the
    IPv4 ones, so that each group's members are in creation order (lbnat.dataplane.fanout)."""
    ring = rings if io == "rings" else None
    socks: list[socket.socket] = []
    extra = {"protocol": ETH_P_IPV6} if ipv6 else {}
    steering = steering_program6 if ipv6 else steering_program
    try:
        for _ in range(workers):
            socks.append(open_packet_socket(link.interface, reject_all(), rx_ring=ring, **extra))
        if workers > 1:
            join(socks, steering(nat_ports, workers))
        for sock in socks:
            attach_filter(sock, program)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def start_plane(
    socks: list[socket.socket],
    inline_loop: Callable[[], PacketLoop],
    setup_for: Callable[[int], WorkerSetup],
    on_events: EventSink,
    log: Callable[..., None],
    row_files: Sequence[str] | None = None,
    on_sync: SyncSink | None = None,
    socks6: Sequence[socket.socket] = (),
) -> InlinePlane | WorkerPool:
    """One socket: the loop `inline_loop()` builds, on the main thread. Several: a worker
    process on each, started and ready. With `row_files` (one per worker: --state-file) each
    engine keeps its rows in its file and starts with the rows found there. With `on_sync`
    (the session sync is on) each engine journals its rows to it and applies a peer's
    (lbnat.standby). `socks6` (--ip6): every worker's IPv6 socket, in the same order (the
    inline loop is given socks6[0] by `inline_loop`). On failure the sockets are closed."""
    if len(socks) == 1:
        rows: RowMemory | None = None
        try:
            loop = inline_loop()
            report = RestoreReport()
            if row_files:
                rows = RowMemory(0, loop.engine.table.cap, row_files[0])
                # as a worker does: the rows before the first frame (the fast path is
                # attached already, so the established ones go back into the kernel)
                report = restore(loop.engine, map_checkpoint(rows.fd), time.monotonic())
            if on_sync is not None:  # after the restore: the journal tees into its checkpoint
                loop.engine.standby = Standby(loop.engine, 0)
                loop.on_sync = on_sync
        except BaseException:
            if rows is not None:
                rows.close()
            socks[0].close()
            for sock in socks6:
                sock.close()
            raise
        return InlinePlane(loop, socks[0], rows, report, socks6[0] if socks6 else None)
    pool = WorkerPool(
        socks, setup_for, on_events, log, SharedCursors(), row_files, on_sync, list(socks6)
    )
    try:
        pool.start()
    except BaseException:
        pool.close()
        raise
    return pool


# --- one worker: the loop in the main process -------------------------------------------------


class InlinePlane:
    """One worker: the packet loop runs on the main thread, the engine lives in this process."""

    def __init__(
        self,
        loop: PacketLoop,
        sock: socket.socket,
        rows: RowMemory | None = None,
        restored: RestoreReport | None = None,
        sock6: socket.socket | None = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.sock6 = sock6
        self.rows = rows  # the loop's row checkpoint (--state-file only)
        self._restored = restored or RestoreReport()
        self._thread: threading.Thread | None = None

    def restored(self) -> RestoreReport:
        """The rows taken over at start (--state-file)."""
        return self._restored

    def run(self, upkeep: Callable[[float], None]) -> None:
        self.loop.on_tick = lambda engine, now: upkeep(now)
        self._thread = threading.current_thread()
        self.loop.run()

    def stop(self) -> None:
        self.loop.stop()

    def change(self, change: Change) -> None:
        loop = self.loop

        def apply(engine: Engine) -> None:
            now = time.monotonic()
            for packet, destination in apply_change(engine, change, now):
                loop.send_packet(packet, destination, now)

        loop.submit(apply)

    def ask(self, question: Question, timeout: float = 5.0) -> list[Any]:
        return [value for _, value in self.ask_each(question, timeout)]

    def ask_each(self, question: Question, timeout: float = 5.0) -> list[tuple[int, Any]]:
        if threading.current_thread() is self._thread:  # asked from the loop's own upkeep
            return [(0, answer(self.loop.engine, question, time.monotonic()))]
        done = threading.Event()
        box: list[tuple[bool, Any]] = []

        def command(engine: Engine) -> None:
            try:
                box.append((True, answer(engine, question, time.monotonic())))
            except Exception as error:  # handed to the asking thread
                box.append((False, error))
            finally:
                done.set()

        self.loop.submit(command)
        if not done.wait(timeout):
            raise TimeoutError("the packet loop did not answer in time")
        ok, value = box[0]
        if not ok:
            raise value
        return [(0, value)]

    def set_filter(self, program: bytes, program6: bytes | None = None) -> None:
        attach_filter(self.sock, program)
        if self.sock6 is not None and program6 is not None:
            attach_filter(self.sock6, program6)

    def info(self) -> list[dict[str, object]]:
        return [{"index": 0, "pid": os.getpid(), "alive": True, "restarts": 0}]

    def close(self) -> None:
        self.loop.close()
        self.loop.neighbours.close()
        self.sock.close()
        if self.sock6 is not None:
            self.sock6.close()
        if self.rows is not None:
            self.rows.close()
            self.rows = None


# --- N workers: processes -----------------------------------------------------------------------


class WorkerProcess:
    """The main process's end of one worker: its process, control connection and answers."""

    def __init__(
        self,
        index: int,
        sock: socket.socket,
        cursors: SharedCursors,
        on_events: EventSink,
        row_file: str | None = None,
        on_sync: SyncSink | None = None,
        sock6: socket.socket | None = None,
    ) -> None:
        self.index = index
        self.on_sync = on_sync
        self.row_file = row_file  # --state-file: the rows in this file, not in a memfd
        self.sock = sock
        self.sock6 = sock6  # its IPv6 packet socket (--ip6)
        self.cursors = cursors
        self.on_events = on_events
        self.proc: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None
        self.restarts = 0
        self.started = 0.0
        self._send_lock = threading.Lock()
        self._answers: dict[int, tuple[threading.Event, list[Any]]] = {}
        self.ready_pid: int | None = None  # set by the current process's Ready
        self.restored = RestoreReport()  # the current process's rows taken over (its Ready)
        self.rows: RowMemory | None = None  # made at the first start, kept for every restart
        self.errors: list[str] = []

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, setup: WorkerSetup) -> None:
        if self.rows is None:
            self.rows = RowMemory(self.index, setup.table_cap, self.row_file)
        parent, child = socket.socketpair()
        fds = (self.sock.fileno(), child.fileno(), self.cursors.fd, self.rows.fd)
        maps = tuple(fd for fd in (setup.offload_fd, setup.offload6_fd) if fd >= 0)
        inherited = (*fds, *maps)  # the BPF maps
        if self.sock6 is not None:
            inherited = (*inherited, self.sock6.fileno())
        command = [
            sys.executable,
            "-m",
            "lbnat.dataplane.workers",
            "--packet-fd",
            str(fds[0]),
            "--control-fd",
            str(fds[1]),
            "--cursor-fd",
            str(fds[2]),
            "--rows-fd",
            str(fds[3]),
        ]
        if self.sock6 is not None:
            command += ["--packet6-fd", str(self.sock6.fileno())]
        ready = threading.Event()  # this start's own: a reader of a stopped process sets only its
        self.ready_pid = None
        self.restored = RestoreReport()
        self.errors = []  # this start's
        try:
            self.proc = subprocess.Popen(command, pass_fds=inherited, stdin=subprocess.DEVNULL)
        finally:
            child.close()
        self.control = parent
        self.started = time.monotonic()
        threading.Thread(
            target=self._read, args=(parent, ready), name=f"lbnat-worker-{self.index}", daemon=True
        ).start()
        self.send(setup)
        timeout = START_TIMEOUT + self.rows.records() * RESTORE_TIMEOUT_PER_ROW
        if not ready.wait(timeout) or self.ready_pid is None:
            detail = "; ".join(self.errors) or (
                "it exited before it was ready"
                if ready.is_set()
                else f"no word from it in {timeout:.0f} s"
            )
            self.stop(1.0)
            raise WorkerError(f"worker {self.index} did not start: {detail}")

    def _read(self, control: socket.socket, ready: threading.Event) -> None:
        reader = MessageReader()
        while True:
            try:
                data = control.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                break
            for message in reader.feed(data):
                if isinstance(message, Ready):
                    self.restored = message.restored
                    self.ready_pid = message.pid
                    ready.set()
                else:
                    self._receive(message)
        for done, _ in list(self._answers.values()):  # nobody will answer now
            done.set()
        ready.set()

    def _receive(self, message: FromWorker) -> None:
        match message:
            case Events(events):
                self.on_events(self.index, events)
            case SyncOut(records):
                if self.on_sync is not None:
                    self.on_sync(records)
            case Answer(request, ok, value):
                waiting = self._answers.pop(request, None)
                if waiting is not None:
                    waiting[1].append((ok, value))
                    waiting[0].set()
            case WorkerFailed(error):
                self.errors.append(error)

    def send(self, message: WorkerSetup | ToWorker) -> bool:
        control = self.control
        if control is None:
            return False
        with self._send_lock:
            try:
                send_message(control, message)
            except OSError:
                return False
        return True

    def request(self, request: int, question: Question) -> tuple[threading.Event, list[Any]]:
        """Ask; the event is set when the answer is in the list (or the worker is gone)."""
        done = threading.Event()
        box: list[Any] = []
        self._answers[request] = (done, box)
        if not self.send(Ask(request, question)):
            self._answers.pop(request, None)
            done.set()
        return done, box

    def stop(self, timeout: float = 2.0) -> None:
        self.send(Stop())
        proc = self.proc
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.control is not None:
            self.control.close()
            self.control = None

    def close(self) -> None:
        """Stop the process and let its row checkpoint go (lbnat is stopping)."""
        self.stop()
        if self.rows is not None:
            self.rows.close()
            self.rows = None


class WorkerPool:
    """N worker processes behind one fanout group; the main thread supervises them."""

    def __init__(
        self,
        socks: list[socket.socket],
        setup_for: Callable[[int], WorkerSetup],
        on_events: EventSink,
        log: Callable[..., None],
        cursors: SharedCursors,
        row_files: Sequence[str] | None = None,
        on_sync: SyncSink | None = None,
        socks6: Sequence[socket.socket] = (),
    ) -> None:
        self.socks = socks
        self.socks6 = list(socks6)
        self.setup_for = setup_for
        self.log = log
        self.cursors = cursors
        files: Sequence[str | None] = row_files or [None] * len(socks)
        six: Sequence[socket.socket | None] = self.socks6 or [None] * len(socks)
        self.procs = [
            WorkerProcess(i, s, cursors, on_events, f, on_sync, s6)
            for i, (s, f, s6) in enumerate(zip(socks, files, six, strict=True))
        ]
        self._first: list[RestoreReport] = []  # each worker's rows taken over at start
        self.stopping = threading.Event()
        self._requests = 0
        self._request_lock = threading.Lock()

    def start(self) -> None:
        for proc in self.procs:
            proc.start(self.setup_for(proc.index))
            self._first.append(proc.restored)

    def restored(self) -> RestoreReport:
        """The rows every worker took over at start (--state-file), summed."""
        return merge_reports(self._first)

    def run(self, upkeep: Callable[[float], None]) -> None:
        while not self.stopping.wait(SUPERVISE_EVERY):
            now = time.monotonic()
            for proc in self.procs:
                if not proc.alive and now - proc.started >= RESTART_DELAY:
                    self._restart(proc)
            upkeep(now)

    def _restart(self, proc: WorkerProcess) -> None:
        code = proc.proc.returncode if proc.proc is not None else None
        pid = proc.proc.pid if proc.proc is not None else 0
        proc.stop(0.5)
        proc.restarts += 1
        try:
            proc.start(self.setup_for(proc.index))
        except (WorkerError, OSError) as error:
            self.log(f"worker {proc.index} : restart failed: {error}", "worker_failed",
                     level=logging.ERROR, worker=proc.index, error=str(error))  # fmt: skip
            return
        assert proc.proc is not None
        restored = proc.restored
        dropped = ""
        if restored.dropped:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(restored.dropped.items()))
            dropped = f" ({restored.dropped_total} rows dropped: {reasons})"
        self.log(
            f"worker {proc.index} : pid {pid} exited (code {code}); restarted as pid "
            f"{proc.proc.pid}, its {restored.open_flows} flows restored{dropped}, the other "
            "workers kept forwarding",
            "worker_restarted",
            level=logging.WARNING,  # its flows survived, but a worker died
            worker=proc.index,
            old_pid=pid,
            pid=proc.proc.pid,
            exit_code=code,
            restored_flows=restored.open_flows,
            restored_rows=restored.rows,
            dropped_rows=dict(restored.dropped),
        )

    def stop(self) -> None:
        self.stopping.set()

    def change(self, change: Change) -> None:
        for proc in self.procs:
            proc.send(ApplyChange(change))

    def ask(self, question: Question, timeout: float = 5.0) -> list[Any]:
        """Every live worker's answer (a dead one, being restarted, has none)."""
        return [value for _, value in self.ask_each(question, timeout)]

    def ask_each(self, question: Question, timeout: float = 5.0) -> list[tuple[int, Any]]:
        """Every live worker's answer with its index."""
        with self._request_lock:
            self._requests += 1
            request = self._requests
        waits = [(proc, proc.request(request, question)) for proc in self.procs if proc.alive]
        deadline = time.monotonic() + timeout
        answers = []
        for proc, (done, box) in waits:
            if not done.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"worker {proc.index} did not answer in time")
            if not box:
                continue  # it died meanwhile
            ok, value = box[0]
            if not ok:
                raise RuntimeError(f"worker {proc.index}: {value}")
            answers.append((proc.index, value))
        return answers

    def set_filter(self, program: bytes, program6: bytes | None = None) -> None:
        for sock in self.socks:
            attach_filter(sock, program)
        if program6 is not None:
            for sock in self.socks6:
                attach_filter(sock, program6)

    def info(self) -> list[dict[str, object]]:
        return [
            {
                "index": p.index,
                "pid": p.proc.pid if p.proc is not None else None,
                "alive": p.alive,
                "restarts": p.restarts,
            }
            for p in self.procs
        ]

    def close(self) -> None:
        for proc in self.procs:
            proc.close()
        for sock in [*self.socks, *self.socks6]:
            sock.close()
        self.cursors.close()


# --- the worker process itself ------------------------------------------------------------------


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbnat worker", description="one lbnat data-plane worker")
    parser.add_argument("--packet-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--cursor-fd", type=int, required=True)
    parser.add_argument("--rows-fd", type=int, required=True)
    parser.add_argument("--packet6-fd", type=int, default=-1)  # the IPv6 socket (--ip6)
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group: the main process decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=args.control_fd)
    reader = MessageReader()
    try:
        setup = receive_message(control, reader)
    except (EOFError, OSError):
        return 1
    if not isinstance(setup, WorkerSetup):
        send_message(control, WorkerFailed(f"expected its setup first, got {setup!r}"))
        return 1
    cursors = SharedCursors(args.cursor_fd)
    slots = dict(setup.cursor_slots)

    def cursor(service: str) -> SharedCursor | None:
        slot = slots.get(service)
        return None if slot is None else cursors.cursor(slot)

    sock = socket.socket(fileno=args.packet_fd)
    sock6 = None if args.packet6_fd < 0 else socket.socket(fileno=args.packet6_fd)
    try:
        engine = Engine(
            setup.lb_ip,
            setup.specs,
            setup.nat_ports,
            setup.timeouts,
            setup.table_cap,
            cursor,
            setup.syn_proxy,
            setup.vip,
            setup.ip6,
        )
    except ValueError as error:
        send_message(control, WorkerFailed(str(error)))
        return 1
    lock = threading.Lock()

    def send(message: FromWorker) -> None:
        with lock:
            send_message(control, message)

    def on_events(events: list[Event]) -> None:
        if not setup.flow_events:
            events = [event for event in events if isinstance(event, NoBackend)]
        if events:
            send(Events(events))

    try:
        loop = build_loop(engine, sock, setup.link, setup.io, setup.rings, on_events, sock6=sock6)
    except OSError as error:
        send(WorkerFailed(f"cannot open its rings: {error}"))
        return 1
    if setup.offload_fd >= 0:
        attach_fast_path(
            engine, setup.offload_fd, loop.neighbours, setup.ifindex, setup.offload6_fd
        )
    # The rows of this worker's predecessor, rebuilt before the first frame is read (and
    # those in the kernel handed to it again: their entries outlived the dead worker).
    try:
        checkpoint = map_checkpoint(args.rows_fd)
    except (OSError, ValueError) as error:
        send(WorkerFailed(f"cannot map its row checkpoint: {error}"))
        return 1
    restored = restore(engine, checkpoint, time.monotonic())
    if setup.sync:  # after the restore: the journal tees into the checkpoint
        if setup.sync_mode == "mesh":
            engine.owners = FlowOwners(setup.timeouts)
        engine.standby = Standby(engine, setup.index)
        loop.on_sync = lambda records: send(SyncOut(records))

    def on_control() -> None:
        try:
            data = control.recv(1 << 20)
        except OSError:
            data = b""
        if not data:  # the main process is gone
            loop.stop()
            return
        now = time.monotonic()
        for message in reader.feed(data):
            match message:
                case ApplyChange(change):
                    if isinstance(change, SetServices):
                        slots.update(change.cursor_slots)
                    try:
                        for packet, destination in apply_change(engine, change, now):
                            loop.send_packet(packet, destination, now)
                    except ValueError as error:
                        send(WorkerFailed(str(error)))
                case Ask(request, question):
                    try:
                        send(Answer(request, True, answer(engine, question, now)))
                    except (ValueError, KeyError) as error:
                        send(Answer(request, False, str(error)))
                case Stop():
                    loop.stop()

    def on_term(signum: int, frame: FrameType | None) -> None:
        loop.stop()

    signal.signal(signal.SIGTERM, on_term)
    loop.watch(control.fileno(), on_control)
    send(Ready(os.getpid(), restored))
    try:
        loop.run()
    finally:
        loop.close()
        loop.neighbours.close()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
