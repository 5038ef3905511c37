"""The packet loops: frames from the packet socket through the engine and back out.

One thread runs `run()` and owns the engine (and so the session table): no lock is taken per
packet. Other threads talk to it only through `submit(command)`: a callable that the loop runs on
the engine between batches (new backend snapshots, admin requests). A worker process adds its
control connection with `watch()`: the loop calls back when that descriptor is readable.

Two ways to move frames, the same engine in between:
- `PacketLoop` (`--io socket`, the simple path): one `recv_into` and one `send` per frame, from
  one reusable buffer that the engine rewrites in place.
- `RingLoop` (`--io rings`, the default): the mmap'ed TPACKET rings of lbnat.dataplane.rings.
  The engine rewrites each frame where the kernel put it in the receive ring, the loop copies it
  into the transmit ring, and one `send()` per batch transmits them all.

With --ip6 a loop serves two packet sockets, the IPv4 one and the IPv6 one (bound to
ETH_P_IPV6, its own filter, ring and fanout group): it waits on both and drains each in a pass
of its own, so an IPv4 packet costs what it did. Frames go out on the socket of their family
(the transmit ring takes both: its socket, bound to protocol 0, lets the kernel read the
protocol from the Ethernet header). A packet the engine translated into the other family
(NAT64, lbnat.actions.TRANSLATED) gets its vnet and Ethernet headers rewritten in front of its
new IP header (lbnat.dataplane.frames), in the HEADROOM every receive path keeps before the
frame: the rings' tp_reserve, an offset in the recv_into buffer.

A link flap (the interface set down and up, a lost carrier, a driver reload) is survived with
the table: the kernel keeps the socket bound and its rings mapped, reports ENETDOWN once on a
read and refuses every send while the link is down (ENXIO once the interface is gone). The
reads note it and go on (`_link_error`), the sends count the frame as dropped (`link_down`)
and the rows stay; the main process watches the interface and logs the transitions
(lbnat.linkwatch; docs/architecture.md, "Link flaps").
"""

from __future__ import annotations

import errno
import mmap
import queue
import select
import socket
import threading
import time
from collections.abc import Callable

from lbnat.actions import TRANSLATED
from lbnat.dataplane.frames import translated, with_ethertype
from lbnat.dataplane.kernel import (
    BLOCK_HEADER,
    BLOCK_STATUS_OFFSET,
    ETH_HLEN,
    ETH_OFFSET,
    HEADROOM,
    IP_OFFSET,
    NO_VNET_HDR,
    TP_STATUS_COPY,
    TP_STATUS_LEN,
    TP_STATUS_USER,
    V2_HEADER,
    V3_HEADER,
    VNET_F_NEEDS_CSUM,
    VNET_HDR_LEN,
    ZERO_STATUS,
)
from lbnat.dataplane.link import Neighbours
from lbnat.dataplane.rings import LINK_ERRORS, RingSpec, RxBlocks, RxFrames, TxRing
from lbnat.drops import DropReason
from lbnat.engine import DROP, FORWARD, REPLIES, REPLY, Engine, Event
from lbnat.standby import SyncRecords

Command = Callable[[Engine], None]

BATCH = 256  # frames handled before the loop looks at timers, commands and events
TICK_EVERY = 0.1  # seconds between expiry sweeps
NEIGHBOUR_REFRESH = 2.0  # seconds between re-reads of the kernel's neighbour table
PENDING_POLL = 0.005  # seconds between neighbour checks while frames wait for a MAC
RECV_BUFFER = 1 << 17  # a 64 KB GSO super-packet plus headers fits with room to spare
ETHERTYPE_AT = ETH_OFFSET + 12  # a frame's Ethernet type, from its vnet header's start


class PacketLoop:
    def __init__(
        self,
        engine: Engine,
        sock: socket.socket,
        neighbours: Neighbours,
        on_events: Callable[[list[Event]], None],
        clock: Callable[[], float] = time.monotonic,
        on_tick: Callable[[Engine, float], None] | None = None,
        sock6: socket.socket | None = None,
    ) -> None:
        self.engine = engine
        # the session sync's journal, sent on after every batch (lbnat.standby): None when off
        self.on_sync: Callable[[SyncRecords], None] | None = None
        self.sock = sock
        self.sock6 = sock6  # the IPv6 packet socket (--ip6), or None
        self.neighbours = neighbours
        self.on_events = on_events
        self.clock = clock
        self.on_tick = on_tick  # housekeeping on the loop's thread (draining backends)
        self.commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.sent = 0
        self.send_errors = 0
        self.link_errors = 0  # reads that found the link down or gone
        self._watched: dict[int, Callable[[], None]] = {}
        # Frames are read HEADROOM bytes in: a translated packet may grow in front of them.
        self._buf = bytearray(HEADROOM + RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._rx_view = self._view[HEADROOM:]

    def submit(self, command: Command) -> None:
        """Run `command(engine)` on the loop's thread, between batches. Thread-safe."""
        self.commands.put(command)

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Call `on_readable()` on the loop's thread whenever `fd` is readable."""
        self._watched[fd] = on_readable

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        engine = self.engine
        clock = self.clock
        sock, sock6 = self.sock, self.sock6
        fds = [sock.fileno(), *self._watched]
        packet_fd = fds[0]
        packet6_fd = -1
        if sock6 is not None:
            packet6_fd = sock6.fileno()
            fds.append(packet6_fd)
        now = clock()
        next_tick = now + TICK_EVERY
        next_refresh = now + NEIGHBOUR_REFRESH

        while not self.stopping.is_set():
            timeout = PENDING_POLL if self.neighbours.pending else TICK_EVERY
            try:
                readable, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:
                readable = []
            for fd in readable:
                if fd == packet_fd:
                    # One clock read per batch: rows touched in a batch share one float object
                    # as their last-seen time (memory per row); a batch lasts well under 1 ms.
                    self._receive(clock(), sock)
                elif fd == packet6_fd:
                    self._receive(clock(), sock6)  # type: ignore[arg-type]
                else:
                    self._watched[fd]()
            now = clock()
            if self.neighbours.pending:
                ready, given_up = self.neighbours.release(now)
                for header, frame in ready:
                    self._send(frame[:ETH_OFFSET] + header + frame[IP_OFFSET:],
                               self._sock_for(header[12]))  # fmt: skip
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
            standby = engine.standby
            if standby is not None and standby.journal.pending and self.on_sync is not None:
                self.on_sync(standby.journal.drain(now))

    def _receive(self, now: float, sock: socket.socket) -> None:
        """Up to BATCH frames from `sock` (the IPv4 or the IPv6 one), one recv and one send
        each, read HEADROOM bytes into the buffer."""
        handle = self.engine.handle
        recv_into = sock.recv_into
        headers = self.neighbours.headers
        buf, view, rx_view = self._buf, self._view, self._rx_view
        dontwait = socket.MSG_DONTWAIT
        # The frame's layout as locals: read per packet, a local costs what a literal does.
        base, needs_csum = HEADROOM, VNET_F_NEEDS_CSUM
        eth, start = HEADROOM + ETH_OFFSET, HEADROOM + IP_OFFSET
        for _ in range(BATCH):
            try:
                n = recv_into(rx_view, 0, dontwait)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as error:
                self._link_error(error)  # the link went down or away: nothing to read now
                break
            end = base + n
            # The frame starts with its virtio_net_hdr, whose first byte holds the flags.
            action = handle(buf, start, end, bool(buf[base] & needs_csum), now)
            verb = action[0]
            if verb != FORWARD:
                if verb == DROP:
                    continue
                if verb == REPLY:  # a packet the engine made (a RST) instead of this one
                    self.send_packet(action[1], action[2], now)
                    continue
                if verb == TRANSLATED:  # into the other family: headers before its new start
                    self._send_translated(buf, start, action[2], end, action[1], now)
                    continue
                for packet, destination in action[2]:  # SEND_FIRST, REPLIES: these go first
                    self.send_packet(packet, destination, now)
                if verb == REPLIES:  # ... and this frame not at all
                    continue
            header = headers.get(action[1])
            if header is None:
                header = self.neighbours.header_for(action[1])
                if header is None:
                    self._hold(action[1], bytes(view[base:end]), now)
                    continue
            buf[eth:start] = header
            self._send(view[base:end], sock)

    def _translated_frame(
        self,
        buf: bytearray | mmap.mmap,
        view: memoryview,
        start: int,
        new_start: int,
        end: int,
        hop: int,
        now: float,
    ) -> memoryview | None:
        """A translated packet's frame, its headers written before `new_start`; None when
        its next hop is not resolved yet (the frame is held until it is, or dropped)."""
        header = self.neighbours.header_for(hop)
        at = translated(buf, start, new_start, header or bytes(ETH_HLEN))
        if header is None:
            self._hold(hop, bytes(view[at:end]), now)
            return None
        return view[at:end]

    def _send_translated(
        self, buf: bytearray, start: int, new_start: int, end: int, hop: int, now: float
    ) -> None:
        frame = self._translated_frame(buf, self._view, start, new_start, end, hop, now)
        if frame is not None:
            self._send(frame, self._sock_for(frame[ETHERTYPE_AT]))

    def _sock_for(self, ethertype_high: int) -> socket.socket:
        """The socket a frame leaves on, by the first byte of its Ethernet type (0x86: IPv6):
        one bound to another protocol would give the kernel the wrong skb->protocol for a
        GSO frame."""
        if ethertype_high == 0x86 and self.sock6 is not None:
            return self.sock6
        return self.sock

    def send_packet(self, packet: bytes, destination: int, now: float) -> None:
        """Send an IPv4 or IPv6 packet lbnat made itself (complete checksums, no GSO); its
        Ethernet type by its version."""
        header = self.neighbours.header_for(destination)
        if header is None:
            self._hold(destination, NO_VNET_HDR + bytes(ETH_HLEN) + packet, now)
        else:
            header = with_ethertype(header, packet[0])
            self._send(NO_VNET_HDR + header + packet, self._sock_for(header[12]))

    def _hold(self, destination: int, frame: bytes, now: float) -> None:
        if not self.neighbours.hold(destination, frame, now):
            self.engine.count_drop(DropReason.NO_NEXT_HOP)

    def _send(self, frame: memoryview | bytes, sock: socket.socket) -> None:
        """One frame, one syscall, on a receive socket (the one of the frame's family)."""
        try:
            sock.send(frame)
            self.sent += 1
        except OSError as error:
            self.send_errors += 1
            if error.errno in LINK_ERRORS:  # the row stays: the sender retransmits once it is up
                self.engine.count_drop(DropReason.LINK_DOWN)
                return
            # ENOBUFS/EAGAIN: the device queue is full; the sender will retransmit.
            self.engine.count_drop(DropReason.SEND_FAILED)
            if error.errno not in (errno.ENOBUFS, errno.EAGAIN, errno.EMSGSIZE):
                raise

    def _link_error(self, error: OSError) -> None:
        """A read gave `error`: ENETDOWN (or a friend) is the kernel saying, once per socket,
        that the interface went down or away. Noted and survived: the socket and its rings stay
        bound, the kernel hooks them in again when the link is up, and the main process logs
        the transition (it watches the interface). Anything else is a bug: raised."""
        if error.errno not in LINK_ERRORS:
            raise error
        self.link_errors += 1

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            command(self.engine)

    def close(self) -> None:
        """Release what the loop mapped or opened itself (not the receive socket)."""


class RingLoop(PacketLoop):
    """The same loop over mmap'ed rings: `sock` already carries the receive ring (set up before
    it was bound, lbnat.dataplane.rings.setup_rx_ring); the transmit ring is opened here."""

    MAX_BLOCKS = 8  # blocks handled per wake-up before timers get a turn

    def __init__(
        self,
        engine: Engine,
        sock: socket.socket,
        neighbours: Neighbours,
        on_events: Callable[[list[Event]], None],
        spec: RingSpec,
        clock: Callable[[], float] = time.monotonic,
        on_tick: Callable[[Engine, float], None] | None = None,
        sock6: socket.socket | None = None,
    ) -> None:
        super().__init__(engine, sock, neighbours, on_events, clock, on_tick, sock6)
        self.spec = spec
        self.rx: RxFrames | RxBlocks = self._map_rx(sock, spec)
        self.rx6: RxFrames | RxBlocks | None = None
        try:
            if sock6 is not None:
                self.rx6 = self._map_rx(sock6, spec)
            self.tx = TxRing(neighbours.link.interface, spec)
        except BaseException:
            self.rx.close()
            if self.rx6 is not None:
                self.rx6.close()
            raise

    @staticmethod
    def _map_rx(sock: socket.socket, spec: RingSpec) -> RxFrames | RxBlocks:
        return RxBlocks(sock, spec) if spec.rx == "blocks" else RxFrames(sock, spec)

    def _receive(self, now: float, sock: socket.socket) -> None:
        """Called when `sock` is readable: nothing in its ring then means lost sync."""
        rx = self.rx if sock is self.sock else self.rx6
        assert rx is not None
        if isinstance(rx, RxBlocks):
            handled = self._receive_blocks(now, rx)
        else:
            handled = self._receive_frames(now, rx, sock)
        self._flush()
        if not handled and not rx.resync():
            self._drain_socket(sock)

    def _receive_frames(self, now: float, rx: RxFrames, sock: socket.socket) -> int:
        m, view, size, count = rx.map, rx.view, rx.frame_size, rx.count
        index = rx.index
        forward = self._forward
        unpack = V2_HEADER.unpack_from
        # Kernel numbers as locals: read per packet, a local costs what a literal does.
        user, copy = TP_STATUS_USER, TP_STATUS_COPY
        status_len, kernel_owned = TP_STATUS_LEN, ZERO_STATUS
        vnet_len = VNET_HDR_LEN
        handled = 0
        for _ in range(BATCH):
            at = index * size
            status = m[at]  # tp_status's low byte: the USER and COPY bits
            if not status & user:
                break
            _, length, snap, mac = unpack(m, at)
            if status & copy:
                self._receive_copy(now, sock)
            elif snap < length:
                self.engine.count_drop(DropReason.RING_TRUNCATED)
            else:
                # tp_mac: where the Ethernet header starts; the virtio_net_hdr is just before it.
                mac_at = at + mac
                forward(m, view, mac_at - vnet_len, mac_at + snap, now)
            m[at : at + status_len] = kernel_owned  # the slot is the kernel's again
            index = 0 if index + 1 == count else index + 1
            handled += 1
        rx.index = index
        return handled

    def _receive_blocks(self, now: float, rx: RxBlocks) -> int:
        m, view, size, count = rx.map, rx.view, rx.block_size, rx.count
        forward = self._forward
        unpack = V3_HEADER.unpack_from
        vnet_len = VNET_HDR_LEN  # read per packet: a local costs what a literal does
        handled = 0
        for _ in range(self.MAX_BLOCKS):
            block = rx.index * size
            _, _, status, frames, first, _, _ = BLOCK_HEADER.unpack_from(m, block)
            if not status & TP_STATUS_USER:
                break
            at = block + first
            for _ in range(frames):
                next_offset, snap, length, _, mac = unpack(m, at)
                if snap < length:
                    self.engine.count_drop(DropReason.RING_TRUNCATED)
                else:
                    # tp_mac: where the Ethernet header starts; the virtio_net_hdr is before it.
                    mac_at = at + mac
                    forward(m, view, mac_at - vnet_len, mac_at + snap, now)
                at += next_offset
            handled += frames
            status_at = block + BLOCK_STATUS_OFFSET
            m[status_at : status_at + TP_STATUS_LEN] = ZERO_STATUS
            rx.index = 0 if rx.index + 1 == count else rx.index + 1
        return handled

    def _forward(
        self,
        m: bytearray | mmap.mmap,
        view: memoryview,
        vnet: int,
        end: int,
        now: float,
        _needs_csum: int = VNET_F_NEEDS_CSUM,
        _eth: int = ETH_OFFSET,
        _ip: int = IP_OFFSET,
    ) -> None:
        """One frame at m[vnet:end], its virtio_net_hdr first (whose first byte holds the
        flags): through the engine and out. No caller passes the `_` parameters: they bind the
        frame's layout to locals once, at definition, so this per-packet path reads them as
        cheaply as literals. (Keyword-only defaults would not do: filling them in costs a dict
        walk per call, measured 4% slower on the whole method.)"""
        action = self.engine.handle(m, vnet + _ip, end, bool(m[vnet] & _needs_csum), now)  # type: ignore[arg-type]
        verb = action[0]
        if verb != FORWARD:
            if verb == DROP:
                return
            if verb == REPLY:  # a packet the engine made (a RST) instead of this one
                self.send_packet(action[1], action[2], now)
                return
            if verb == TRANSLATED:  # into the other family: headers before its new start
                self._put_translated(m, view, vnet + _ip, action[2], end, action[1], now)
                return
            for packet, destination in action[2]:  # SEND_FIRST, REPLIES: these go first
                self.send_packet(packet, destination, now)
            if verb == REPLIES:  # ... and this frame not at all
                return
        header = self.neighbours.headers.get(action[1])
        if header is None:
            header = self.neighbours.header_for(action[1])
            if header is None:
                self._hold(action[1], bytes(view[vnet:end]), now)
                return
        m[vnet + _eth : vnet + _ip] = header
        frame = view[vnet:end]
        if not self.tx.put(frame):
            self._flush()  # what is queued leaves first: frames keep order
            self._send(frame, self._sock_for(m[vnet + ETHERTYPE_AT]))

    def _put_translated(
        self,
        m: bytearray | mmap.mmap,
        view: memoryview,
        start: int,
        new_start: int,
        end: int,
        hop: int,
        now: float,
    ) -> None:
        frame = self._translated_frame(m, view, start, new_start, end, hop, now)
        if frame is not None and not self.tx.put(frame):
            self._flush()
            self._send(frame, self._sock_for(frame[ETHERTYPE_AT]))

    def _flush(self) -> None:
        tx = self.tx
        self.sent += tx.flush()
        if tx.lost:  # the link was down or gone: the marked slots were taken back
            for _ in range(tx.lost):
                self.engine.count_drop(DropReason.LINK_DOWN)
            tx.lost = 0

    def _receive_copy(self, now: float, sock: socket.socket) -> None:
        """A frame too big for a slot (a GSO super-packet): the whole of it is on the socket.
        The link's error, if one is pending, comes before it (the kernel reports sk_err first
        and keeps the frame queued): then the second read gets the frame. Read HEADROOM
        bytes in, as PacketLoop reads."""
        for _ in range(2):
            try:
                n = sock.recv_into(self._rx_view, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                self._link_error(error)
                continue
            self._forward(self._buf, self._view, HEADROOM, HEADROOM + n, now)
            return
        self.engine.count_drop(DropReason.RING_TRUNCATED)

    def _drain_socket(self, sock: socket.socket) -> None:
        """The socket said readable and the ring holds nothing: whole frames left on the socket
        whose slots are gone (lost while a worker restarted), or the link's error (ENETDOWN,
        reported once when it went down or away). Drop and count the frames; note the error."""
        link_errors = 0
        while True:
            try:
                sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self._link_error(error)
                link_errors += 1
                if link_errors > 1:  # the kernel reports it once; never spin on it
                    return
                continue  # frames queued behind the error are still there
            self.engine.count_drop(DropReason.RING_TRUNCATED)

    def send_packet(self, packet: bytes, destination: int, now: float) -> None:
        self._flush()
        super().send_packet(packet, destination, now)

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
        if self.rx6 is not None:
            self.rx6.close()
