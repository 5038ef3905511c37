"""A worker's rows, kept where the worker that replaces it finds them (issue 16).

A worker keeps one fixed-size record per row in a buffer it is given: in lbnat a memfd that the
main process creates for each worker and passes to every incarnation of it
(lbnat.dataplane.workers), so a worker restarted after a crash rebuilds its rows, with the
same NAT ports, backends and states, before it reads its first frame (`restore`).

A record is written when a row is opened, when its state changes and when it is removed (the
table tells `RowCheckpoint` through `SessionTable.checkpoint`): per flow, never per packet, so
the packet path costs what it did. Sequence tracking is not kept (it changes with every
packet): a restored row picks it up from its next packets (lbnat.nat.UNKNOWN_ACK).

Layout, little-endian. A 64-byte header:

    offset size
     0     8    magic b"lbnatrow"
     8     2    format (2; 1 was the IPv4-only layout of 40-byte slots, read and converted)
    10     2    record size (64)
    12     4    high water: slots ever handed out; records are looked for only below it
    16    48    reserved (0)

then one 64-byte slot per row. Bytes 0-39 are format 1's whole record, unchanged: an IPv4
row's record is the same 40 bytes as before IPv6 (and the session sync still sends just those,
so an IPv4-only pair of two versions still understands each other); bytes 40-63 hold what an
IPv6 address has beyond its low 32 bits. Bytes 0-31 (and 40-63) are what a row keeps for its
life, written once when it opens and covered by a CRC; bytes 32-34 are what its state changes
move, written alone (three bytes, no CRC to redo) and checked by range when read:

     0     1    the row's form: 0 = a free slot, 1 = IPv4 (client and backend), 2 = IPv6
                (client and backend), 3 = NAT64 (an IPv6 client, an IPv4 backend)
     1     1    protocol (6 TCP, 17 UDP)
     2     2    service port
     4     2    client port
     6     2    backend port
     8     4    client address, its low 32 bits (an IPv4 address: all of it)
    12     4    backend address, its low 32 bits
    16     2    NAT port
    18     1    SYN-proxy flags: bit 0 the row is SYN-proxied (lbnat.synproxy), bit 1 its
                offset is known (the backend has answered), bits 2-6 its window shift towards
                the client + 15; 0 for any other row
    19     1    SYN-proxy: its window shift towards the backend + 15 (0 for any other row)
    20     4    SYN-proxy: its sequence offset (0 for any other row)
    24     4    created: the whole second the row was opened (the engine's clock)
    28     4    CRC-32 of bytes 0-27, and of bytes 40-63 after them in forms 2 and 3: a
                record torn by a kill in mid-write is refused
    32     1    state (lbnat.nat.State)
    33     1    flags: bits 0-1 the FINs seen (1 client, 2 backend; Session.fins), 2-7 zero
    34     1    window scales, (client << 4) | backend, 15 = not offered (Session.wscale)
    35     5    reserved (0)
    40    12    forms 2 and 3: the client's IPv6 address, its high 96 bits (big-endian, as
                the address is written); 0 in form 1
    52    12    form 2: the backend's IPv6 address, its high 96 bits; 0 in forms 1 and 3

A buffer in format 1 (40-byte slots, left by an lbnat before IPv6 in a --state-file's row
file) is converted in place when it is opened, its records moved to 64-byte slots from the
last one down (the file is already large enough: it is sized for 64-byte slots), then its
header rewritten.

(A field of bytes 0-27 that changes later, a SYN-proxied row's offset and window shifts, is
written with the whole of them and the CRC again: a proxied row's state changes rewrite its
whole record. A proxied row whose backend had not answered yet is not restored: its handshake
state (the kept ACK, lbnat's SYN) is not kept, and the client's next segment, whose ACK still
carries a valid cookie, opens the flow again.) A kill in mid-write of a state change leaves the
old or the new value in each of bytes 32-34, each a state the row could be in; a kill in
mid-write of an open leaves a record whose CRC does not match, dropped (the flow was only
being opened: its SYN comes again). A slot is free again once its row is removed (the format
byte set to 0, one byte: never torn). Slots are reused last-freed first, so the pages a memfd
really allocates stay near the number of rows the worker holds at its busiest.

Pure: works on the buffer it is given (a memoryview of a bytearray or of an mmap), reads no
clock (`now` comes in).
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast
from zlib import crc32

from lbnat import addresses
from lbnat.backends import Backend
from lbnat.engine import Engine
from lbnat.nat import DrSession, Session, State
from lbnat.packet import TCP, UDP
from lbnat.proxyproto import ProxyProtoSession
from lbnat.service import ServiceState
from lbnat.synproxy import ProxiedSession, offset_delta

PROXIED = 0x01  # SYN-proxy flags: the row is SYN-proxied
OFFSET_KNOWN = 0x02  # and its backend has answered: the offset and window shifts are set
_SHIFT_BIAS = 15  # window shifts (-14..14) are kept + 15

MAGIC = b"lbnatrow"
FORMAT = 2
V4_FORMAT = 1  # the layout before IPv6: 40-byte slots (converted when opened)

FORM_V4 = 1  # a record's first byte: the row's families
FORM_V6 = 2
FORM_NAT64 = 3

_HEADER = struct.Struct("<8sHHI48x")
_HIGH_WATER = struct.Struct("<I")
_HIGH_WATER_AT = 12
HEADER_SIZE = _HEADER.size  # 64

# The field table above: what a row keeps for its life (covered by the CRC that follows it),
# then what its state changes move.
_FIXED = struct.Struct("<BBHHHIIHBBII")
FIXED_SIZE = _FIXED.size  # 28
_CRC = struct.Struct("<I")
_MOVING = struct.Struct("<BBB")
MOVING_AT = FIXED_SIZE + _CRC.size  # 32
V4_RECORD_SIZE = 40  # format 1's record, and an IPv4 row's bytes in the session sync
_RECORD = struct.Struct("<28sIBBB5x24s")
RECORD_SIZE = _RECORD.size  # 64
_EXTRA_AT = V4_RECORD_SIZE
_HIGH = struct.Struct(">12s12s")  # the addresses' high 96 bits (bytes 40-63)
_LOW32 = 0xFFFFFFFF
_NO_HIGH = bytes(24)
_V6_BITS = addresses.V6 - 1

_TCP_STATES = frozenset(s for s in State if s not in (State.UDP_UNREPLIED, State.UDP_REPLIED))
_UDP_STATES = frozenset((State.UDP_UNREPLIED, State.UDP_REPLIED))
_STATES_OF = {TCP: _TCP_STATES, UDP: _UDP_STATES}


def checkpoint_bytes(rows: int) -> int:
    """The size of a buffer with room for `rows` records."""
    return HEADER_SIZE + max(0, rows) * RECORD_SIZE


def records_below(header: bytes) -> int:
    """How many slots a restore will look at (the high water mark), from a buffer's first
    HEADER_SIZE bytes; 0 for a buffer never formatted."""
    if len(header) < HEADER_SIZE:
        return 0
    magic, form, record_size, high_water = _HEADER.unpack_from(header)
    if (magic, form, record_size) != (MAGIC, FORMAT, RECORD_SIZE):
        return 0
    return int(high_water)


def _form(client_ip: int, backend_ip: int) -> int:
    """The record form of a row of these addresses (ValueError: an IPv4 client is never
    translated to an IPv6 backend)."""
    if client_ip <= _LOW32:
        if backend_ip > _LOW32:
            raise ValueError("an IPv4 client with an IPv6 backend is no row (no NAT46)")
        return FORM_V4
    return FORM_V6 if backend_ip > _LOW32 else FORM_NAT64


def _high(address: int) -> bytes:
    """An IPv6 address's high 96 bits as 12 bytes (zeros for an IPv4 address)."""
    return ((address & _V6_BITS) >> 32).to_bytes(12, "big") if address > _LOW32 else bytes(12)


def _address(low: int, high: bytes, v6: bool) -> int:
    return addresses.V6 | (int.from_bytes(high, "big") << 32) | low if v6 else low


@dataclass(frozen=True, slots=True)
class RowRecord:
    """One row as its record holds it."""

    proto: int
    state: State
    fins: int
    service_port: int
    client_ip: int
    client_port: int
    backend_ip: int
    backend_port: int
    nat_port: int
    wscale: int
    created: int
    proxy_flags: int = 0
    seq_offset: int = 0
    proxy_window: int = 0  # the window shift towards the backend + 15 (proxied rows)


def record_of(s: Session) -> RowRecord:
    """What `RowCheckpoint.write` stores for row `s` (either family)."""
    backend = s.pool.backend
    flags = window = offset = 0
    if isinstance(s, ProxiedSession):  # not a NAT64 row, the other subclass of Session
        flags, window, offset = proxy_fields(s)
    return RowRecord(
        s.proto, s.state, s.fins, s.service_port, s.client_ip, s.client_port,
        backend.ip_int, backend.port, s.nat_port, s.wscale, s.created & 0xFFFFFFFF,
        flags, offset, window,
    )  # fmt: skip


def encode_record(record: RowRecord) -> bytes:
    """The record's RECORD_SIZE bytes (an IPv4 row's first V4_RECORD_SIZE bytes are its whole
    record of format 1). ValueError for an IPv4 client with an IPv6 backend."""
    form = _form(record.client_ip, record.backend_ip)
    return _pack(
        form, record.proto, record.service_port, record.client_port, record.backend_port,
        record.client_ip, record.backend_ip, record.nat_port, record.proxy_flags,
        record.proxy_window, record.seq_offset, record.created, record.state, record.fins,
        record.wscale,
    )  # fmt: skip


def _pack(
    form: int, proto: int, service_port: int, client_port: int, backend_port: int,
    client_ip: int, backend_ip: int, nat_port: int, proxy_flags: int, proxy_window: int,
    seq_offset: int, created: int, state: int, fins: int, wscale: int,
) -> bytes:  # fmt: skip
    fixed = _FIXED.pack(
        form, proto, service_port, client_port, backend_port, client_ip & _LOW32,
        backend_ip & _LOW32, nat_port, proxy_flags, proxy_window, seq_offset, created,
    )  # fmt: skip
    if form == FORM_V4:
        return _RECORD.pack(fixed, crc32(fixed), state, fins, wscale, _NO_HIGH)
    extra = _HIGH.pack(_high(client_ip), _high(backend_ip))
    return _RECORD.pack(fixed, crc32(fixed + extra), state, fins, wscale, extra)


def decode_record(data: bytes) -> RowRecord | None:
    """The row a record holds; None for a free slot. ValueError (with the reason) for a record
    that is torn or holds what no row can (an unknown form, protocol, state or flag). `data`
    is a whole record (RECORD_SIZE bytes), or an IPv4 row's V4_RECORD_SIZE bytes (format 1's
    record, as the session sync's ROW records carry it)."""
    if len(data) == V4_RECORD_SIZE:
        if data[0] not in (0, FORM_V4):
            raise ValueError(f"a {V4_RECORD_SIZE}-byte record is an IPv4 row's, not form {data[0]}")
        data = bytes(data) + bytes(RECORD_SIZE - V4_RECORD_SIZE)
    if len(data) != RECORD_SIZE:
        raise ValueError(f"a record is {RECORD_SIZE} bytes, not {len(data)}")
    if data[0] == 0:
        return None
    fixed, crc, state, flags, wscale, extra = _RECORD.unpack(data)
    form = data[0]
    if form not in (FORM_V4, FORM_V6, FORM_NAT64):
        raise ValueError(f"record form {form} is not one of 1-3")
    if crc != crc32(fixed if form == FORM_V4 else fixed + extra):
        raise ValueError("its CRC does not match (torn by a kill in mid-write?)")
    (
        _, proto, service_port, client_port, backend_port, client_low, backend_low, nat_port,
        proxy_flags, proxy_window, seq_offset, created,
    ) = _FIXED.unpack(fixed)  # fmt: skip
    client_high, backend_high = _HIGH.unpack(extra)
    if form == FORM_V4 and extra.count(0) != len(extra):
        raise ValueError("an IPv4 row's record has address bytes past its own")
    if form == FORM_NAT64 and backend_high.count(0) != len(backend_high):
        raise ValueError("a NAT64 row's IPv4 backend has IPv6 address bytes")
    client_ip = _address(client_low, client_high, form != FORM_V4)
    backend_ip = _address(backend_low, backend_high, form == FORM_V6)
    states = _STATES_OF.get(proto)
    if states is None:
        raise ValueError(f"protocol {proto} is not TCP or UDP")
    if state not in states:
        raise ValueError(f"state {state} is not one of a protocol {proto} row")
    if flags & ~0x03:
        raise ValueError(f"unknown flags {flags:#x}")
    if proxy_flags and form != FORM_V4:
        raise ValueError("an IPv6 row is never SYN-proxied")
    if proxy_flags & 0x80 or proxy_window > 2 * _SHIFT_BIAS or (proxy_flags and proto != TCP):
        raise ValueError(f"SYN-proxy fields {proxy_flags:#x} {proxy_window:#x} are not a row's")
    return RowRecord(
        proto, State(state), flags, service_port, client_ip, client_port, backend_ip,
        backend_port, nat_port, wscale, created, proxy_flags, seq_offset, proxy_window,
    )  # fmt: skip


class RowCheckpoint:
    """A worker's rows as records in `buffer` (see the module's layout). A buffer without a
    valid header is formatted (empty); one with a header is read by `restore` first.

    As the table's `checkpoint` it hears of each row's opening and state changes (`write`)
    and of its removal (`clear`). A row keeps its slot in `Session.slot`."""

    def __init__(self, buffer: memoryview) -> None:
        if buffer.readonly or buffer.format != "B" or buffer.ndim != 1:
            raise ValueError("a checkpoint needs a writable, flat buffer of bytes")
        self._buffer = buffer
        size = len(buffer)
        if size < HEADER_SIZE:
            raise ValueError(f"a checkpoint needs at least {HEADER_SIZE} bytes, not {size}")
        self.slots = (size - HEADER_SIZE) // RECORD_SIZE
        magic, form, record_size, high_water = _HEADER.unpack_from(self._buffer, 0)
        if (magic, form, record_size) == (MAGIC, V4_FORMAT, V4_RECORD_SIZE):
            high_water = self._convert_v4(min(int(high_water), self.slots))
        elif (magic, form, record_size) != (MAGIC, FORMAT, RECORD_SIZE):
            # A fresh buffer, or another layout: nothing in it is a row of this one.
            self._buffer[:HEADER_SIZE] = _HEADER.pack(MAGIC, FORMAT, RECORD_SIZE, 0)
            high_water = 0
        self.high_water: int = min(int(high_water), self.slots)
        self._free: list[int] = []  # slots below the high water mark, last freed on top
        self.full = 0  # rows that found no free slot (the buffer is smaller than the table)

    def _convert_v4(self, high_water: int) -> int:
        """Format 1's 40-byte slots (an earlier lbnat's row file) as this format's 64-byte
        ones, in place: from the last slot down, so no record is overwritten before it has
        moved (slot i moves from 40 i to 64 i, never below where it was). A record keeps its
        40 bytes, its form byte 1 and its CRC; the bytes after it are zeroed. Returns the high
        water mark, the same slots."""
        buffer = self._buffer
        for slot in range(high_water - 1, -1, -1):
            old = HEADER_SIZE + slot * V4_RECORD_SIZE
            new = HEADER_SIZE + slot * RECORD_SIZE
            record = buffer[old : old + V4_RECORD_SIZE].tobytes()
            buffer[new : new + RECORD_SIZE] = record + bytes(RECORD_SIZE - V4_RECORD_SIZE)
        self._buffer[:HEADER_SIZE] = _HEADER.pack(MAGIC, FORMAT, RECORD_SIZE, high_water)
        return high_water

    def used_slots(self) -> list[int]:
        """Slots below the high water mark whose format byte says they hold a row."""
        start = HEADER_SIZE
        marks = self._buffer[start : start + self.high_water * RECORD_SIZE : RECORD_SIZE].tobytes()
        return [slot for slot, mark in enumerate(marks) if mark]

    def record(self, slot: int) -> RowRecord | None:
        """The row in `slot` (None: free); ValueError for a torn or impossible record."""
        at = HEADER_SIZE + slot * RECORD_SIZE
        return decode_record(self._buffer[at : at + RECORD_SIZE].tobytes())

    def settle(self, held: set[int], stale: list[int]) -> None:
        """After a restore: the slots of `stale` records are cleared, and every slot below
        the high water mark not `held` by a restored row is free."""
        for slot in stale:
            self._buffer[HEADER_SIZE + slot * RECORD_SIZE] = 0
        self._free = [slot for slot in range(self.high_water - 1, -1, -1) if slot not in held]

    def write(self, s: Session) -> None:
        if s.__class__ is DrSession or s.__class__ is ProxyProtoSession:  # (lbnat.direct,
            return  # lbnat.engine_pp: not checkpointed)
        slot = s.slot
        buffer = self._buffer
        proxy_flags = proxy_window = offset = 0
        if isinstance(s, ProxiedSession):  # its offset is set on a change of state
            proxy_flags, proxy_window, offset = proxy_fields(s)
        elif slot >= 0:
            # A change of state: a row's addresses, ports, backend and NAT port are fixed for
            # its life; only the three bytes its state changes move are written.
            at = HEADER_SIZE + slot * RECORD_SIZE + MOVING_AT
            _MOVING.pack_into(buffer, at, s.state, s.fins, s.wscale)
            return
        if slot < 0:  # a new row (a proxied row's change of state rewrites its own slot)
            if self._free:
                slot = self._free.pop()
            elif self.high_water < self.slots:
                slot = self.high_water
                self.high_water = slot + 1
                _HIGH_WATER.pack_into(buffer, _HIGH_WATER_AT, self.high_water)
            else:
                self.full += 1
                return
            s.slot = slot
        # Packed field by field from the row rather than through record_of(): no RowRecord
        # per write (the engine opens flows at thousands per second).
        backend = s.pool.backend
        client_ip, backend_ip = s.client_ip, backend.ip_int
        at = HEADER_SIZE + slot * RECORD_SIZE
        if client_ip <= _LOW32 and backend_ip <= _LOW32:  # IPv4: format 1's record, inline
            fixed = _FIXED.pack(
                FORM_V4, s.proto, s.service_port, s.client_port, backend.port, client_ip,
                backend_ip, s.nat_port, proxy_flags, proxy_window, offset, s.created & _LOW32,
            )  # fmt: skip
            _RECORD.pack_into(
                buffer, at, fixed, crc32(fixed), s.state, s.fins, s.wscale, _NO_HIGH
            )  # (bytes 40-63 cleared: the slot may have held an IPv6 row)
            return
        buffer[at : at + RECORD_SIZE] = _pack(
            _form(client_ip, backend_ip), s.proto, s.service_port, s.client_port, backend.port,
            client_ip, backend_ip, s.nat_port, proxy_flags, proxy_window, offset,
            s.created & _LOW32, s.state, s.fins, s.wscale,
        )  # fmt: skip

    def clear(self, s: Session) -> None:
        slot = s.slot
        if slot < 0:
            return
        self._buffer[HEADER_SIZE + slot * RECORD_SIZE] = 0  # one byte: a kill cannot tear it
        self._free.append(slot)
        s.slot = -1

    def alive(self, s: Session) -> None:
        """Nothing to write: a record holds no last-seen time (a restored row starts its
        timeout again)."""

    def __len__(self) -> int:
        """Rows held (slots handed out and not freed)."""
        return self.high_water - len(self._free)


def proxy_fields(row: ProxiedSession) -> tuple[int, int, int]:
    """(flags, window byte, offset) of a SYN-proxied row's record."""
    if row.offset < 0:
        return PROXIED, 0, 0
    flags = PROXIED | OFFSET_KNOWN | ((row.win_to_client + _SHIFT_BIAS) << 2)
    return flags, row.win_to_backend + _SHIFT_BIAS, row.offset


def adopt_proxy(row: ProxiedSession, record: RowRecord) -> None:
    """Give a restored SYN-proxied row its offset, checksum deltas and window shifts."""
    row.offset = record.seq_offset
    row.seq_delta = offset_delta(row.offset)
    row.ack_delta = offset_delta(-row.offset & 0xFFFFFFFF)
    row.win_to_client = ((record.proxy_flags >> 2) & 0x1F) - _SHIFT_BIAS
    row.win_to_backend = record.proxy_window - _SHIFT_BIAS


class Dropped(enum.Enum):
    """Why a record was not restored."""

    TORN = "torn"  # its CRC does not match, or it holds what no row can
    NO_SERVICE = "no_service"  # its service is gone (a reload removed it)
    NO_BACKEND = "no_backend"  # its backend is no longer one of the service's
    CONFLICT = "conflict"  # its client socket or NAT port is taken, outside this worker's
    # NAT ports, or the table is full
    HANDSHAKE = "handshake"  # a SYN-proxied row whose backend had not answered (see above)
    NO_IPV6 = "no_ipv6"  # an IPv6 client's row, and this lbnat has no ip6 (a peer's, say)


@dataclass(frozen=True, slots=True)
class RestoreReport:
    """What `restore` did: rows rebuilt, how many of them are open flows (not ended), and the
    records dropped, by reason (Dropped values)."""

    rows: int = 0
    open_flows: int = 0
    dropped: Mapping[str, int] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


def place_of(engine: Engine, r: RowRecord) -> tuple[ServiceState, Backend] | Dropped:
    """The service and backend the row of record `r` belongs to in `engine`, or why it cannot
    be rebuilt there (its service or backend is gone; a SYN-proxied row before its backend's
    answer)."""
    if addresses.is_v6(r.client_ip) and engine.lb_ip6 < 0:
        return Dropped.NO_IPV6
    service = engine.services.by_port.get((r.proto << 16) | r.service_port)
    if service is None:
        return Dropped.NO_SERVICE
    backend = service.by_key.get((addresses.text(r.backend_ip), r.backend_port))
    if backend is None:
        return Dropped.NO_BACKEND
    if r.proxy_flags & PROXIED and not r.proxy_flags & OFFSET_KNOWN:
        return Dropped.HANDSHAKE
    return service, backend


def vip_of(engine: Engine, client_ip: int) -> int:
    """The VIP a client of this family connected to: the engine's IPv4 VIP, or its ip6
    (`Engine.vip_of` where the engine has it)."""
    own = getattr(engine, "vip_of", None)
    if own is not None:
        return int(own(client_ip))
    return engine.lb_ip6 if addresses.is_v6(client_ip) else engine.vip


def rebuild(
    engine: Engine, r: RowRecord, service: ServiceState, backend: Backend, now: float
) -> Session | None:
    """The row of record `r` in `engine`'s table, as the original was: the same NAT port,
    state, window scales and FINs (and SYN-proxy offset), its timeout from `now`; None when
    its client socket or NAT port is taken, or the table is full (lbnat.nat.adopt). Shared by
    the restore below and the session sync's standby rows (lbnat.standby)."""
    proxied = bool(r.proxy_flags & PROXIED)
    row = engine.table.adopt(
        now, service, r.proto, r.client_ip, r.client_port, vip_of(engine, r.client_ip),
        backend, r.nat_port, r.state, ProxiedSession if proxied else Session,
    )  # fmt: skip
    if row is None:
        return None
    if proxied:
        adopt_proxy(cast(ProxiedSession, row), r)
    row.wscale, row.fins = r.wscale, r.fins
    return row


def restore(engine: Engine, checkpoint: RowCheckpoint, now: float) -> RestoreReport:
    """Rebuild in `engine` (before its first packet) every row `checkpoint` holds, as the
    table's own rows: same NAT port and backend, same state, its timeout counted from `now`,
    sequence tracking picked up from the next packets. Records whose service or backend is
    gone, or that cannot be read, are dropped, counted and cleared. From then on the
    checkpoint follows the engine's table (`table.checkpoint`)."""
    dropped: dict[str, int] = {}
    stale: list[int] = []

    def drop(slot: int, reason: Dropped) -> None:
        dropped[reason.value] = dropped.get(reason.value, 0) + 1
        stale.append(slot)

    records: list[tuple[int, RowRecord]] = []
    for slot in checkpoint.used_slots():
        try:
            record = checkpoint.record(slot)
        except ValueError:
            drop(slot, Dropped.TORN)
            continue
        if record is not None:
            records.append((slot, record))
    # Rising NAT ports: a port pool then claims each without a search (PortPool.claim).
    records.sort(key=lambda entry: entry[1].nat_port)
    table = engine.table
    held: set[int] = set()
    open_flows = 0
    floor_now = math.floor(now)
    for slot, r in records:
        place = place_of(engine, r)
        if isinstance(place, Dropped):
            drop(slot, place)
            continue
        row = rebuild(engine, r, *place, now)
        if row is None:
            drop(slot, Dropped.CONFLICT)
            continue
        row.slot = slot
        if r.created <= floor_now:  # the age `lbnat sessions` shows goes on
            row.created = table.expiry.shared_second(r.created)
        held.add(slot)
        open_flows += not row.ended
    checkpoint.settle(held, stale)
    table.checkpoint = checkpoint
    return RestoreReport(len(held), open_flows, dropped)
