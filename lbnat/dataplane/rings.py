"""mmap'ed TPACKET rings: frames in and out of the kernel without a syscall per packet.

Receive: the kernel copies each frame the socket's filter accepts into a ring shared with lbnat
and flips a status word; lbnat reads, rewrites in place and flips the word back. Two layouts:

- a *frame* ring (TPACKET_V2, the default): fixed 2 KB slots, one status word per slot. A frame
  is visible the moment the kernel has written it. A GSO super-packet (up to 64 KB) does not fit
  a slot: with PACKET_COPY_THRESH the kernel then puts a truncated copy in the slot marked
  TP_STATUS_COPY and queues the whole frame on the socket, where the per-packet path reads it.
  Order is kept: the slot marks the place in the stream.
- a *block* ring (TPACKET_V3): frames packed into large blocks, one status word per block.
  Cheaper per frame and it holds GSO super-packets whole, but the kernel hands a block over only
  when it is full or its retire timer fires (1 ms at least): at low rates every frame waits up
  to a millisecond. Measured here: p50 about 750 us from the wire to Python against 130 us for
  the frame ring (docs/architecture.md, "Rings"). Kept behind `--rx-ring blocks` to compare.

Transmit: a TPACKET_V2 frame ring on a second packet socket (bound with protocol 0, so it
receives nothing). lbnat copies the rewritten frame, virtio_net_hdr first, into a free slot, marks
it TP_STATUS_SEND_REQUEST, and one `send()` at the end of a batch makes the kernel transmit every
marked slot (PACKET_QDISC_BYPASS: straight to the driver). The kernel accepts the vnet header on
ring frames too (GSO type and size, partial checksums), but a slot holds 2 KB: a frame larger
than that (a GSO super-packet) is sent per packet on the receive socket after the ring is flushed,
so frames leave in the order they came.

Both rings are set up before the socket is bound (and before it joins a fanout group: changing a
ring later would re-register the socket and reorder the group). A worker that is restarted maps
the same rings again and finds its place with `resync()`.
"""

from __future__ import annotations

import errno
import mmap
import socket
import struct
from dataclasses import dataclass
from typing import Literal

from lbnat.dataplane.kernel import (
    BLOCK_HEADER,
    PACKET_COPY_THRESH,
    PACKET_LOSS,
    PACKET_QDISC_BYPASS,
    PACKET_RESERVE,
    PACKET_RX_RING,
    PACKET_TX_RING,
    PACKET_VERSION,
    PACKET_VNET_HDR,
    RING_RESERVE,
    SO_SNDBUFFORCE,
    SOL_PACKET,
    TP_STATUS_AVAILABLE,
    TP_STATUS_SEND_REQUEST,
    TP_STATUS_USER,
    TPACKET_REQ,
    TPACKET_REQ3,
    TPACKET_V2,
    TPACKET_V3,
    TX_DATA_OFFSET,
    V2_LEN_OFFSET,
)

RxKind = Literal["frames", "blocks"]

# What a packet socket's send() and recv() raise while its interface is down or after it is
# gone, measured on 6.18 with veth (docs/architecture.md, "Link flaps"): ENETDOWN (recv: once,
# from the socket's sk_err, when the device goes down or away; send: every time while it is
# down), ENXIO (send, once the device is unregistered). ENODEV and ENETUNREACH were not seen
# here; they say the same of a device or its network, so lbnat takes them alike.
LINK_ERRORS = frozenset({errno.ENETDOWN, errno.ENXIO, errno.ENODEV, errno.ENETUNREACH})

U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class RingSpec:
    """Sizes of a worker's rings. The defaults hold about 1,000 MTU-sized frames each way."""

    rx: RxKind = "frames"
    frame_size: int = 2048  # receive and transmit slots: a 1514-byte frame plus headers fits
    frames: int = 1024
    block_size: int = 1 << 18  # blocks: a 64 KB GSO super-packet fits whole
    blocks: int = 32
    retire_ms: int = 1  # blocks: hand a partly filled block over after this long
    tx_frames: int = 512


FRAME_BLOCK = 1 << 16  # a frame ring is made of 64 KB blocks of whole frames


def _frame_count(frame_size: int, frames: int) -> int:
    """`frames` rounded up to whole blocks: the slots the kernel actually makes."""
    per_block = FRAME_BLOCK // frame_size
    return -(-frames // per_block) * per_block


def _frame_request(frame_size: int, frames: int) -> bytes:
    """struct tpacket_req for a frame ring."""
    count = _frame_count(frame_size, frames)
    return TPACKET_REQ.pack(FRAME_BLOCK, count * frame_size // FRAME_BLOCK, frame_size, count)


def setup_rx_ring(sock: socket.socket, spec: RingSpec) -> None:
    """Give an unbound packet socket its receive ring (the socket must already have
    PACKET_VNET_HDR set: the kernel then writes a virtio_net_hdr before each frame's MAC),
    with RING_RESERVE bytes of headroom before that header in every slot: a translated packet
    (NAT64) grows forward into it (lbnat.dataplane.kernel.HEADROOM)."""
    sock.setsockopt(SOL_PACKET, PACKET_RESERVE, RING_RESERVE)  # before the ring, or EBUSY
    if spec.rx == "blocks":
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        request = TPACKET_REQ3.pack(
            spec.block_size,
            spec.blocks,
            spec.frame_size,
            spec.block_size * spec.blocks // spec.frame_size,
            spec.retire_ms,
            0,
            0,
        )
    else:
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        sock.setsockopt(SOL_PACKET, PACKET_COPY_THRESH, 1)
        request = _frame_request(spec.frame_size, spec.frames)
    sock.setsockopt(SOL_PACKET, PACKET_RX_RING, request)


class RxFrames:
    """The receive side of a TPACKET_V2 ring, mapped into this process."""

    def __init__(self, sock: socket.socket, spec: RingSpec) -> None:
        self.frame_size = spec.frame_size
        self.count = _frame_count(spec.frame_size, spec.frames)
        self.map = mmap.mmap(sock.fileno(), self.frame_size * self.count)
        self.view = memoryview(self.map)
        self.index = 0
        self.resync()

    def resync(self) -> bool:
        """Point `index` at the oldest frame the kernel handed over: the first of the run of
        user-owned slots (the kernel fills slots in order). True if one was found."""
        m, size, count = self.map, self.frame_size, self.count
        owned = [m[i * size] & TP_STATUS_USER for i in range(count)]
        for i in range(count):
            if owned[i] and not owned[i - 1]:
                self.index = i
                return True
        return all(owned)  # every slot is full: any one is as old as the ring allows

    def close(self) -> None:
        self.view.release()
        self.map.close()


class RxBlocks:
    """The receive side of a TPACKET_V3 ring, mapped into this process."""

    def __init__(self, sock: socket.socket, spec: RingSpec) -> None:
        self.block_size = spec.block_size
        self.count = spec.blocks
        self.map = mmap.mmap(sock.fileno(), self.block_size * self.count)
        self.view = memoryview(self.map)
        self.index = 0
        self.resync()

    def resync(self) -> bool:
        """Point `index` at the user-owned block with the lowest sequence number."""
        oldest: tuple[int, int] | None = None
        for i in range(self.count):
            _, _, status, _, _, _, seq = BLOCK_HEADER.unpack_from(self.map, i * self.block_size)
            if status & TP_STATUS_USER and (oldest is None or seq < oldest[0]):
                oldest = (seq, i)
        if oldest is None:
            return False
        self.index = oldest[1]
        return True

    def close(self) -> None:
        self.view.release()
        self.map.close()


class TxRing:
    """A transmit ring on its own packet socket bound to `interface` with protocol 0."""

    def __init__(self, interface: str, spec: RingSpec, buffer_bytes: int = 32 << 20) -> None:
        self.frame_size = spec.frame_size
        self.capacity = spec.frame_size - TX_DATA_OFFSET  # bytes of vnet header + frame
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            self.sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            # A frame the kernel cannot send is skipped (marked free) instead of stopping the ring.
            self.sock.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, buffer_bytes)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            self.count = _frame_count(spec.frame_size, spec.tx_frames)
            self.sock.setsockopt(
                SOL_PACKET, PACKET_TX_RING, _frame_request(spec.frame_size, spec.tx_frames)
            )
            self.map = mmap.mmap(self.sock.fileno(), self.frame_size * self.count)
            self.sock.bind((interface, 0))
        except BaseException:
            self.sock.close()
            raise
        self.view = memoryview(self.map)
        self.index = 0
        self.queued = 0  # slots marked since the last flush
        self.full = 0  # frames that found no free slot (sent per packet instead)
        self.lost = 0  # frames taken back from the ring because the link was down or gone

    def put(self, frame: memoryview | bytes) -> bool:
        """Copy one frame (virtio_net_hdr + Ethernet + IP) into the next slot. False when it
        does not fit a slot or the slot is still in flight: the caller sends it another way."""
        n = len(frame)
        if n > self.capacity:
            return False
        m = self.map
        at = self.index * self.frame_size
        if m[at]:  # still SEND_REQUEST or SENDING from the last round
            self.flush()
            if m[at]:
                self.full += 1
                return False
        data = at + TX_DATA_OFFSET
        self.view[data : data + n] = frame
        U32.pack_into(m, at + V2_LEN_OFFSET, n)
        m[at] = TP_STATUS_SEND_REQUEST  # last: the slot is the kernel's from here on
        self.index = 0 if self.index + 1 == self.count else self.index + 1
        self.queued += 1
        return True

    def flush(self) -> int:
        """Have the kernel send every marked slot. Returns how many were queued; with the link
        down or gone none was, and the marked slots are taken back (counted in `lost`)."""
        queued = self.queued
        if queued:
            self.queued = 0
            try:
                self.sock.send(b"", socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass  # slots stay marked and go out with the next flush
            except OSError as error:
                if error.errno in LINK_ERRORS:
                    # (slots an earlier EAGAIN left marked were counted as sent then)
                    return max(0, queued - self.reclaim())
                # ENOBUFS: slots stay marked as with EAGAIN; the sender retransmits what is lost
        return queued

    def reclaim(self) -> int:
        """Free every slot still marked for sending; how many there were. Only after a send()
        the link refused: the kernel then returned before it looked at a slot (tpacket_snd
        checks the device first), and nothing else reads a marked slot between two of our
        send() calls. Without this the frames of a link-down would wait in the ring and leave
        stale on the first flush after the link is back, and a long outage would fill it."""
        m, size = self.map, self.frame_size
        lost = 0
        for at in range(0, size * self.count, size):
            if m[at] == TP_STATUS_SEND_REQUEST:
                m[at] = TP_STATUS_AVAILABLE
                lost += 1
        self.lost += lost
        return lost

    def close(self) -> None:
        self.view.release()
        self.map.close()
        self.sock.close()
