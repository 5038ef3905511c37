"""The packet loop: frames from the packet socket through the engine and back out.

One thread runs `PacketLoop.run` and owns the engine (and so the session table): no lock is
taken per packet. Other threads talk to it only through `submit(command)`: a callable that the
loop runs on the engine between batches (new backend snapshots from the health checker, admin
requests). Frames are read into one reusable buffer and, when forwarded, sent from that same
buffer: the engine rewrote the headers in place, the loop writes the Ethernet header.
"""

from __future__ import annotations

import errno
import queue
import select
import socket
import threading
import time
from collections.abc import Callable

from lbnat.dataplane.link import Neighbours
from lbnat.dataplane.packet_socket import IP_OFFSET, NO_VNET_HDR, RECV_BUFFER, VNET_F_NEEDS_CSUM
from lbnat.drops import DropReason
from lbnat.engine import DROP, FORWARD, Engine, Event

Command = Callable[[Engine], None]

BATCH = 256  # frames handled before the loop looks at timers, commands and events
TICK_EVERY = 0.1  # seconds between expiry sweeps
NEIGHBOUR_REFRESH = 2.0  # seconds between re-reads of the kernel's neighbour table
PENDING_POLL = 0.005  # seconds between neighbour checks while frames wait for a MAC


class PacketLoop:
    def __init__(
        self,
        engine: Engine,
        sock: socket.socket,
        neighbours: Neighbours,
        on_events: Callable[[list[Event]], None],
        clock: Callable[[], float] = time.monotonic,
        on_tick: Callable[[Engine, float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.sock = sock
        self.neighbours = neighbours
        self.on_events = on_events
        self.clock = clock
        self.on_tick = on_tick  # housekeeping on the loop's thread (draining backends)
        self.commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.sent = 0
        self.send_errors = 0

    def submit(self, command: Command) -> None:
        """Run `command(engine)` on the loop's thread, between batches. Thread-safe."""
        self.commands.put(command)

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        engine = self.engine
        handle = engine.handle
        recv_into = self.sock.recv_into
        send = self.sock.send
        headers = self.neighbours.headers
        header_for = self.neighbours.header_for
        clock = self.clock
        buf = bytearray(RECV_BUFFER)
        view = memoryview(buf)
        dontwait = socket.MSG_DONTWAIT
        start = IP_OFFSET
        now = clock()
        next_tick = now + TICK_EVERY
        next_refresh = now + NEIGHBOUR_REFRESH

        while not self.stopping.is_set():
            timeout = PENDING_POLL if self.neighbours.pending else TICK_EVERY
            try:
                readable, _, _ = select.select([self.sock], [], [], timeout)
            except InterruptedError:
                readable = []
            if readable:
                # One clock read per batch: rows touched in a batch share one float object as
                # their last-seen time (memory per row), and a batch lasts well under 1 ms.
                now = clock()
                for _ in range(BATCH):
                    try:
                        n = recv_into(buf, 0, dontwait)
                    except BlockingIOError:
                        break
                    except InterruptedError:
                        continue
                    action = handle(buf, start, n, bool(buf[0] & VNET_F_NEEDS_CSUM), now)
                    verb = action[0]
                    if verb == DROP:
                        continue
                    if verb == FORWARD:
                        header = headers.get(action[1])
                        if header is None:
                            header = header_for(action[1])
                        if header is None:
                            self._hold(action[1], bytes(view[:n]), now)
                            continue
                        buf[10:24] = header
                        self._send(send, view[:n])
                    else:  # REPLY: a packet the engine made (a RST)
                        self.send_packet(action[1], action[2], now)
            now = clock()
            if self.neighbours.pending:
                ready, given_up = self.neighbours.release(now)
                for header, frame in ready:
                    self._send(send, frame[:10] + header + frame[24:])
                for _ in range(given_up):
                    engine.count_drop(DropReason.NO_NEXT_HOP)
            if now >= next_refresh:
                self.neighbours.refresh()
                next_refresh = now + NEIGHBOUR_REFRESH
            if now >= next_tick:
                engine.tick(now)
                if self.on_tick is not None:
                    self.on_tick(engine, now)
                next_tick = now + TICK_EVERY
            self._drain_commands()
            if engine.events:
                self.on_events(engine.take_events())

    def send_packet(self, packet: bytes, destination: int, now: float) -> None:
        """Send an IPv4 packet lbnat made itself (complete checksums, no GSO)."""
        header = self.neighbours.header_for(destination)
        if header is None:
            self._hold(destination, NO_VNET_HDR + bytes(14) + packet, now)
        else:
            self._send(self.sock.send, NO_VNET_HDR + header + packet)

    def _hold(self, destination: int, frame: bytes, now: float) -> None:
        if not self.neighbours.hold(destination, frame, now):
            self.engine.count_drop(DropReason.NO_NEXT_HOP)

    def _send(self, send: Callable[[memoryview | bytes], int], frame: memoryview | bytes) -> None:
        try:
            send(frame)
            self.sent += 1
        except OSError as error:
            # ENOBUFS/EAGAIN: the device queue is full; the sender will retransmit.
            self.send_errors += 1
            self.engine.count_drop(DropReason.SEND_FAILED)
            if error.errno not in (errno.ENOBUFS, errno.EAGAIN, errno.ENETDOWN, errno.EMSGSIZE):
                raise

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            command(self.engine)
