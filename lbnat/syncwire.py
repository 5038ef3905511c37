"""Session sync between load balancers: the wire format and the receiver's state machine (issue
19). docs/sync-protocol.md is the protocol; this module is its pure core.

What this module may know, and nothing else (as h11's _state.py says of its own):

- the bytes of one datagram at a time, the shared secret, and which sender ids are peers;
- per peer, what the peer's own datagrams told it: the peer's epoch, the sequence number it
  expects next, the resync it asked for and how many rows that resync has brought;
- the time, only as the `now` its caller passes in.

It never opens a socket, starts a thread, reads the clock or draws a random number, and it
holds no rows: it tells an I/O layer (which does not exist yet) what to do with them through
typed effects (`InstallRows`, `EndRows`, `RefreshRows`, `MarkStale`, `ResyncComplete`,
`MarkReady`, `RequestResync`, `SendBulk`).

The receiver's states, per peer (`SyncReceiver`; the table is `TRANSITIONS`):

    state          event                                  effects                  next
    -------------  -------------------------------------  -----------------------  -------------
    RESYNC_NEEDED  a request is due: at a tick, or at     MarkStale,               RESYNCING
                   once on a gap or epoch change, once    RequestResync
                   the spacing since the last request
                   has passed (1 s, doubling to 30 s)
    RESYNCING      BULK_DONE of our request whose row     ResyncComplete           IN_SYNC
                   count is what its chunks carried       (+ MarkReady, 1st time)
    RESYNCING      BULK_DONE of our request, another      -                        RESYNC_NEEDED
                   count
    RESYNCING      no BULK_DONE resync_timeout after the  -                        RESYNC_NEEDED
                   request or its last chunk (tick)
    any            a datagram past a gap in the sequence  its records' effects     RESYNC_NEEDED
    any            a datagram of a newer epoch (restart)  its records' effects     RESYNC_NEEDED
    any            a datagram in order                    its records' effects     (same)
    any            a datagram below the expected number   dropped: replay          (same)
    any            a datagram of an older epoch           dropped: old_epoch       (same)
    not IN_SYNC    a tick alone_after the start with      MarkReady(alone=True)    (same)
                   nothing ever heard from the peer
    RESYNCING      the first datagram ever heard from a   its records' effects     RESYNC_NEEDED
                   peer that started after this node,     (asks again when due)
                   not a chunk of our bulk (our request
                   went before it listened)

The first datagram from a peer (no epoch known yet) is taken in order: its epoch and
sequence number are adopted. A receiver starts in RESYNC_NEEDED, so its first tick asks.

Hand-written: no library fits. The wire is a fixed binary layout of our own (conntrackd's and
IPVS's sync formats are theirs, not ours to reuse), and `struct` plus `hmac` from the standard
library are all it takes; a schema library (protobuf, construct) would add a dependency to
say what two `struct.Struct`s say.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import struct
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from lbnat.addresses import V4_MAX, V6
from lbnat.checkpoint import (
    FORM_V4,
    RECORD_SIZE,
    V4_RECORD_SIZE,
    RowRecord,
    decode_record,
    encode_record,
)
from lbnat.packet import TCP, UDP

MAGIC = b"lbsy"
VERSION = 1
DEFAULT_PORT = 7001
"""UDP port of the sync channel, unicast and multicast alike (the control channel's 7000 + 1)."""

MAX_DATAGRAM = 1400
"""Bytes in a datagram, header and MAC included: fits a 1500-byte MTU with IPv6 (40), UDP (8)
and room for a tunnel's headers, so sync datagrams are never fragmented."""

# magic, version, type, count, sender, epoch, sequence, the sender's clock (whole seconds)
_HEADER = struct.Struct("<4sBBHIQQI")
HEADER_SIZE = _HEADER.size  # 32
MAC_SIZE = 32  # HMAC-SHA256, whole
ROOM = MAX_DATAGRAM - HEADER_SIZE - MAC_SIZE  # 1336 bytes of records

U16, U32, U64 = 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF


class MessageType(enum.IntEnum):
    """The header's type byte: which records a datagram may carry."""

    UPDATE = 1  # ROW, END, REFRESH records and their IPv6 kinds (none: a heartbeat)
    REQUEST = 2  # exactly one RESYNC_REQUEST record
    BULK = 3  # a BULK_CHUNK record first, then ROW (ROW6) records, a BULK_DONE record last if
    # final


class Kind(enum.IntEnum):
    """A record's first byte."""

    ROW = 1
    END = 2
    REFRESH = 3
    RESYNC_REQUEST = 4
    BULK_CHUNK = 5
    BULK_DONE = 6
    # Rows of IPv6 clients (issue 21): kinds of their own, so that an IPv4 row's records are
    # the bytes they were (an IPv4-only pair of two versions still understands each other).
    ROW6 = 7
    END6 = 8
    REFRESH6 = 9


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowUpdate:
    """A row opened or changed: its checkpoint record (exactly what `checkpoint.restore`
    rebuilds a row from), the sender's worker whose NAT port slice holds it, and the seconds
    since it last saw a packet (so the standby's copy expires when the original would; the
    maker caps it at 65535, `encode` refuses more)."""

    row: RowRecord
    worker: int = 0
    idle: int = 0


@dataclass(frozen=True, slots=True)
class RowKey:
    """Names one row: its forward key (protocol, service port, client address and port) and
    its NAT port, so an END or REFRESH for an older row of a reused client socket, to which the
    sender may have given another NAT port, cannot touch the newer one. `client_ip` is either
    family's (lbnat.addresses: an IPv6 address has bit 128 set)."""

    proto: int
    service_port: int
    client_ip: int
    client_port: int
    nat_port: int


@dataclass(frozen=True, slots=True)
class RowEnd:
    """The row has left the sender's table (timed out, evicted, removed). A flow that ended by
    FINs or a RST was a RowUpdate to TIME_WAIT or CLOSE first: the row lingers until then."""

    key: RowKey


@dataclass(frozen=True, slots=True)
class RowRefresh:
    """A long-lived row is still alive and last saw a packet `idle` seconds ago."""

    key: RowKey
    idle: int = 0


@dataclass(frozen=True, slots=True)
class RequestId:
    """Names one bulk resync: the requester's epoch and its count of requests in that epoch,
    so a bulk still in flight for a requester's previous life never completes its new one."""

    epoch: int
    number: int


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    """Send me every row you hold, in a bulk answering `request`."""

    request: RequestId


@dataclass(frozen=True, slots=True)
class BulkChunk:
    """The ROW records after this one in the datagram answer `request`."""

    request: RequestId


@dataclass(frozen=True, slots=True)
class BulkDone:
    """The bulk answering `request` is complete: `rows` ROW records in all its chunks."""

    request: RequestId
    rows: int


Record = RowUpdate | RowEnd | RowRefresh | ResyncRequest | BulkChunk | BulkDone

# kind, worker, idle, an IPv4 row's checkpoint record (its first 40 bytes, format 1's): 44
_ROW = struct.Struct(f"<BBH{V4_RECORD_SIZE}s")
_ROW6 = struct.Struct(f"<BBH{RECORD_SIZE}s")  # the same with a whole 64-byte record: 68
_END = struct.Struct("<BBHIHH")  # kind, proto, service port, client ip, client port, NAT port
_REFRESH = struct.Struct("<BBHIHHH")  # the same, then idle
_END6 = struct.Struct("<BBH16sHH")  # the same with the client's IPv6 address (network order)
_REFRESH6 = struct.Struct("<BBH16sHHH")
_REQUEST = struct.Struct("<BQI")  # kind, requester's epoch, request number (also BULK_CHUNK)
_DONE = struct.Struct("<BQII")  # kind, epoch, number, rows

SIZES = {
    Kind.ROW: _ROW.size,  # 44
    Kind.END: _END.size,  # 12
    Kind.REFRESH: _REFRESH.size,  # 14
    Kind.RESYNC_REQUEST: _REQUEST.size,  # 13
    Kind.BULK_CHUNK: _REQUEST.size,  # 13
    Kind.BULK_DONE: _DONE.size,  # 17
    Kind.ROW6: _ROW6.size,  # 68
    Kind.END6: _END6.size,  # 24
    Kind.REFRESH6: _REFRESH6.size,  # 26
}
_KIND_OF: dict[type, Kind] = {
    RowUpdate: Kind.ROW,
    RowEnd: Kind.END,
    RowRefresh: Kind.REFRESH,
    ResyncRequest: Kind.RESYNC_REQUEST,
    BulkChunk: Kind.BULK_CHUNK,
    BulkDone: Kind.BULK_DONE,
}
_ALLOWED = {
    MessageType.UPDATE: frozenset(
        {Kind.ROW, Kind.END, Kind.REFRESH, Kind.ROW6, Kind.END6, Kind.REFRESH6}
    ),
    MessageType.REQUEST: frozenset({Kind.RESYNC_REQUEST}),
    MessageType.BULK: frozenset({Kind.BULK_CHUNK, Kind.ROW, Kind.ROW6, Kind.BULK_DONE}),
}
_V6_KIND = {Kind.ROW: Kind.ROW6, Kind.END: Kind.END6, Kind.REFRESH: Kind.REFRESH6}


def kind_of(record: Record) -> Kind:
    """The record's kind on the wire: a row of an IPv6 client takes the IPv6 kind."""
    kind = _KIND_OF[type(record)]
    if isinstance(record, RowUpdate):
        return Kind.ROW6 if record.row.client_ip > V4_MAX else kind
    if isinstance(record, RowEnd | RowRefresh):
        return _V6_KIND[kind] if record.key.client_ip > V4_MAX else kind
    return kind


def record_size(record: Record) -> int:
    return SIZES[kind_of(record)]


def _check(name: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise ValueError(f"{name} {value} does not fit (0-{top})")


def _key_fields(key: RowKey) -> tuple[int, int, int | bytes, int, int]:
    """The key's fields for END/REFRESH (an IPv4 client) or END6/REFRESH6 (an IPv6 one, its
    address as 16 bytes)."""
    if key.proto not in (TCP, UDP):
        raise ValueError(f"protocol {key.proto} is not TCP or UDP")
    client: int | bytes = key.client_ip
    if key.client_ip > V4_MAX:
        _check("IPv6 client_ip's 128 bits", key.client_ip - V6, V6 - 1)  # V6 | 128 bits
        client = (key.client_ip - V6).to_bytes(16, "big")
    else:
        _check("client_ip", key.client_ip, U32)
    for name in ("service_port", "client_port", "nat_port"):
        _check(name, getattr(key, name), U16)
    return key.proto, key.service_port, client, key.client_port, key.nat_port


def pack_record(record: Record) -> bytes:
    """One record's bytes; ValueError for a value its field cannot hold (our own rows only
    come here, so that is a bug of the caller's, not bad input from the wire)."""
    if isinstance(record, RowUpdate):
        _check("worker", record.worker, 0xFF)
        _check("idle", record.idle, U16)
        data = encode_record(record.row)
        if data[0] == FORM_V4:  # format 1's 40 bytes, as before IPv6
            return _ROW.pack(Kind.ROW, record.worker, record.idle, data[:V4_RECORD_SIZE])
        return _ROW6.pack(Kind.ROW6, record.worker, record.idle, data)
    if isinstance(record, RowEnd):
        fields = _key_fields(record.key)
        if isinstance(fields[2], bytes):
            return _END6.pack(Kind.END6, *fields)
        return _END.pack(Kind.END, *fields)
    if isinstance(record, RowRefresh):
        _check("idle", record.idle, U16)
        fields = _key_fields(record.key)
        if isinstance(fields[2], bytes):
            return _REFRESH6.pack(Kind.REFRESH6, *fields, record.idle)
        return _REFRESH.pack(Kind.REFRESH, *fields, record.idle)
    request = record.request
    _check("epoch", request.epoch, U64)
    _check("request number", request.number, U32)
    if isinstance(record, BulkDone):
        _check("rows", record.rows, U32)
        return _DONE.pack(Kind.BULK_DONE, request.epoch, request.number, record.rows)
    kind = Kind.RESYNC_REQUEST if isinstance(record, ResyncRequest) else Kind.BULK_CHUNK
    return _REQUEST.pack(kind, request.epoch, request.number)


# --- datagrams ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One datagram that passed every check of `decode`."""

    type: MessageType
    sender: int
    epoch: int
    seq: int
    clock: int  # the sender's engine clock, whole seconds mod 2**32: what `created` is counted in
    records: tuple[Record, ...]


class DropReason(enum.Enum):
    """Why a datagram changed nothing; each is counted (SyncInbox.drops)."""

    OVERSIZE = "oversize"  # longer than MAX_DATAGRAM
    TRUNCATED = "truncated"  # shorter than a header and a MAC, or than its records
    TRAILING = "trailing"  # bytes left after `count` records
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    UNKNOWN_SENDER = "unknown_sender"  # not a configured peer (our own looped-back ones too)
    BAD_MAC = "bad_mac"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_KIND = "unknown_kind"
    MISPLACED = "misplaced"  # a record kind its message type does not carry, or out of place
    BAD_RECORD = "bad_record"  # a field no row can hold (a ROW's checkpoint record refused)
    REPLAY = "replay"  # a sequence number already passed in the sender's epoch
    OLD_EPOCH = "old_epoch"  # from before the sender's restart


@dataclass(frozen=True, slots=True)
class Dropped:
    reason: DropReason


def _sign(secret: bytes, data: bytes) -> bytes:
    return hmac.new(secret, data, hashlib.sha256).digest()


def _datagram(
    message_type: MessageType, records: Sequence[bytes], sender: int, epoch: int, seq: int,
    clock: int, secret: bytes,
) -> bytes:  # fmt: skip
    body = _HEADER.pack(MAGIC, VERSION, message_type, len(records), sender, epoch, seq, clock)
    body += b"".join(records)
    return body + _sign(secret, body)


def encode(
    message_type: MessageType,
    records: Sequence[Record],
    *,
    sender: int,
    epoch: int,
    seq: int,
    clock: int,
    secret: bytes,
    limit: int = MAX_DATAGRAM,
) -> list[bytes]:
    """`records` as signed datagrams of at most `limit` bytes, in order, numbered `seq`,
    `seq + 1`, ... (the caller's next sequence number moves on by the length of the list),
    each stamped with `clock`, the sender's engine clock in whole seconds (mod 2**32: the
    clock the rows' `created` is counted in).

    UPDATE: as many records per datagram as fit; no records makes one heartbeat.
    REQUEST: one ResyncRequest, one datagram.
    BULK: `records` is a BulkChunk, then RowUpdates, then optionally a BulkDone; the BulkChunk
    is repeated at the head of every datagram, so each says which request it answers.
    ValueError for records the type does not carry or values out of range."""
    if not secret:
        raise ValueError("a sync secret is required")
    _check("sender", sender, U32)
    _check("epoch", epoch, U64)
    _check("sequence number", seq, U64 - len(records))
    clock &= U32
    room = limit - HEADER_SIZE - MAC_SIZE
    head: list[bytes] = []
    body = list(records)
    if message_type is MessageType.BULK:
        if not body or not isinstance(body[0], BulkChunk):
            raise ValueError("a bulk starts with its BulkChunk")
        head = [pack_record(body.pop(0))]
        rows = body[:-1] if body and isinstance(body[-1], BulkDone) else body
        if not all(isinstance(record, RowUpdate) for record in rows):
            raise ValueError("a bulk is its BulkChunk, RowUpdates, then maybe a BulkDone")
    elif message_type is MessageType.REQUEST and (
        len(body) != 1 or not isinstance(body[0], ResyncRequest)
    ):
        raise ValueError("a request carries exactly one ResyncRequest")
    allowed = _ALLOWED[message_type]
    packed: list[bytes] = []
    for record in body:
        if kind_of(record) not in allowed:
            raise ValueError(f"a {message_type.name} datagram does not carry {record!r}")
        packed.append(pack_record(record))
    head_size = sum(map(len, head))
    if room < head_size + max((len(p) for p in packed), default=0):
        raise ValueError(f"limit {limit} leaves no room for a record")
    datagrams: list[bytes] = []
    batch: list[bytes] = list(head)
    used = head_size
    for data in packed:
        if used + len(data) > room:
            datagrams.append(_datagram(message_type, batch, sender, epoch, seq, clock, secret))
            seq += 1
            batch, used = list(head), head_size
        batch.append(data)
        used += len(data)
    if batch or not datagrams:  # a last batch, or a heartbeat with no records at all
        datagrams.append(_datagram(message_type, batch, sender, epoch, seq, clock, secret))
    return datagrams


def _unpack_record(kind: Kind, data: bytes, at: int) -> Record | DropReason:
    """The record of `kind` at `at` (its size checked by the caller)."""
    if kind in (Kind.ROW, Kind.ROW6):
        _, worker, idle, raw = (_ROW if kind is Kind.ROW else _ROW6).unpack_from(data, at)
        if kind is Kind.ROW6 and raw[0] == FORM_V4:
            return DropReason.BAD_RECORD  # an IPv4 row is a ROW: one encoding per row
        try:
            row = decode_record(raw)
        except ValueError:
            return DropReason.BAD_RECORD
        return DropReason.BAD_RECORD if row is None else RowUpdate(row, worker, idle)
    if kind in (Kind.END, Kind.REFRESH, Kind.END6, Kind.REFRESH6):
        layout = {Kind.END: _END, Kind.REFRESH: _REFRESH, Kind.END6: _END6}.get(kind, _REFRESH6)
        fields = layout.unpack_from(data, at)
        if fields[1] not in (TCP, UDP):
            return DropReason.BAD_RECORD
        client = fields[3]
        if isinstance(client, bytes):
            client = V6 | int.from_bytes(client, "big")
        key = RowKey(fields[1], fields[2], client, fields[4], fields[5])
        return RowEnd(key) if kind in (Kind.END, Kind.END6) else RowRefresh(key, fields[6])
    if kind is Kind.BULK_DONE:
        _, epoch, number, rows = _DONE.unpack_from(data, at)
        return BulkDone(RequestId(epoch, number), rows)
    _, epoch, number = _REQUEST.unpack_from(data, at)
    request = RequestId(epoch, number)
    return ResyncRequest(request) if kind is Kind.RESYNC_REQUEST else BulkChunk(request)


def _misplaced(message_type: MessageType, kinds: list[Kind]) -> bool:
    """Whether the record kinds break their message type's layout (see MessageType)."""
    if any(kind not in _ALLOWED[message_type] for kind in kinds):
        return True
    if message_type is MessageType.REQUEST:
        return len(kinds) != 1
    if message_type is MessageType.BULK:
        if not kinds or kinds[0] is not Kind.BULK_CHUNK or Kind.BULK_CHUNK in kinds[1:]:
            return True
        return Kind.BULK_DONE in kinds[1:-1]
    return False


def decode(
    datagram: bytes | bytearray | memoryview,
    secret: bytes,
    peers: Collection[int],
    limit: int = MAX_DATAGRAM,
) -> Message | Dropped:
    """One received datagram as a Message, or Dropped with the first check it failed, in this
    order: size, header length, magic, version, sender among `peers`, MAC (constant time),
    message type, records (each kind known, whole, allowed by the type, with fields a row can
    hold), no bytes after them. Never raises, whatever the bytes. Whether the sequence number
    is new is the receiver's business (SyncReceiver): it knows what came before."""
    size = len(datagram)
    if size > limit:
        return Dropped(DropReason.OVERSIZE)
    if size < HEADER_SIZE + MAC_SIZE:
        return Dropped(DropReason.TRUNCATED)
    magic, version, type_byte, count, sender, epoch, seq, clock = _HEADER.unpack_from(datagram)
    if magic != MAGIC:
        return Dropped(DropReason.BAD_MAGIC)
    if version != VERSION:
        return Dropped(DropReason.BAD_VERSION)
    if sender not in peers:
        return Dropped(DropReason.UNKNOWN_SENDER)
    signed = size - MAC_SIZE
    data = bytes(datagram[:signed])
    if not hmac.compare_digest(_sign(secret, data), bytes(datagram[signed:])):
        return Dropped(DropReason.BAD_MAC)
    # From here on the bytes are the peer's own: what fails now is a peer's bug or a version
    # skew, never an attacker (who cannot make a valid MAC).
    if type_byte not in _ALLOWED:
        return Dropped(DropReason.UNKNOWN_TYPE)
    message_type = MessageType(type_byte)
    records: list[Record] = []
    kinds: list[Kind] = []
    at = HEADER_SIZE
    for _ in range(count):
        if at >= signed:
            return Dropped(DropReason.TRUNCATED)
        kind_byte = data[at]
        if kind_byte not in SIZES:
            return Dropped(DropReason.UNKNOWN_KIND)
        kind = Kind(kind_byte)
        if at + SIZES[kind] > signed:
            return Dropped(DropReason.TRUNCATED)
        record = _unpack_record(kind, data, at)
        if isinstance(record, DropReason):
            return Dropped(record)
        records.append(record)
        kinds.append(kind)
        at += SIZES[kind]
    if at != signed:
        return Dropped(DropReason.TRAILING)
    if _misplaced(message_type, kinds):
        return Dropped(DropReason.MISPLACED)
    return Message(message_type, sender, epoch, seq, clock, tuple(records))


# --- effects --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstallRows:
    """Install (or update) these standby rows from `peer`; each is fresh again (not stale).
    `clock` is the peer's clock when it sent them: a row opened `clock - row.created` seconds
    ago (mod 2**32) and last saw a packet `idle` seconds ago, whatever this node's clock says."""

    peer: int
    rows: tuple[RowUpdate, ...]
    clock: int


@dataclass(frozen=True, slots=True)
class EndRows:
    """Remove these standby rows of `peer` (a row whose NAT port differs is another row)."""

    peer: int
    keys: tuple[RowKey, ...]


@dataclass(frozen=True, slots=True)
class RefreshRows:
    """These standby rows of `peer` saw a packet `idle` seconds ago; each is fresh again."""

    peer: int
    refreshes: tuple[RowRefresh, ...]


@dataclass(frozen=True, slots=True)
class MarkStale:
    """Mark every standby row of `peer` stale: a resync has been asked for."""

    peer: int


@dataclass(frozen=True, slots=True)
class RequestResync:
    """Send `peer` a REQUEST datagram for `request`."""

    peer: int
    request: RequestId


@dataclass(frozen=True, slots=True)
class ResyncComplete:
    """The resync from `peer` is complete: remove its standby rows still stale."""

    peer: int


@dataclass(frozen=True, slots=True)
class MarkReady:
    """As far as `peer` is concerned this node may take traffic: its first resync completed,
    or (`alone`) the peer never spoke within `alone_after` of the start, so it holds no rows
    that this node could be missing."""

    peer: int
    alone: bool = False


@dataclass(frozen=True, slots=True)
class SendBulk:
    """`peer` asked for every row: send it a BULK answering `request` (`encode`)."""

    peer: int
    request: RequestId


Effect = (
    InstallRows | EndRows | RefreshRows | MarkStale | RequestResync | ResyncComplete | MarkReady
    | SendBulk
)  # fmt: skip


def apply_records(message: Message) -> list[Effect]:
    """The effects of a datagram's records, in their order (a ROW then the END of the same row
    in one datagram must leave it ended): runs of one kind become one effect."""
    effects: list[Effect] = []
    peer, clock = message.sender, message.clock
    for record in message.records:
        last = effects[-1] if effects else None
        if isinstance(record, RowUpdate):
            if isinstance(last, InstallRows):
                effects[-1] = InstallRows(peer, (*last.rows, record), clock)
            else:
                effects.append(InstallRows(peer, (record,), clock))
        elif isinstance(record, RowEnd):
            if isinstance(last, EndRows):
                effects[-1] = EndRows(peer, (*last.keys, record.key))
            else:
                effects.append(EndRows(peer, (record.key,)))
        elif isinstance(record, RowRefresh):
            if isinstance(last, RefreshRows):
                effects[-1] = RefreshRows(peer, (*last.refreshes, record))
            else:
                effects.append(RefreshRows(peer, (record,)))
        elif isinstance(record, ResyncRequest):
            effects.append(SendBulk(peer, record.request))
        # BulkChunk and BulkDone move the receiver's state; they install nothing themselves.
    return effects


# --- the receiver ---------------------------------------------------------------------------


class SyncState(enum.Enum):
    RESYNC_NEEDED = "resync_needed"
    RESYNCING = "resyncing"
    IN_SYNC = "in_sync"


class Event(enum.Enum):
    REQUEST_SENT = "request_sent"  # a tick (or gap, epoch change) found a request due
    GAP = "gap"
    NEW_EPOCH = "new_epoch"
    BULK_DONE = "bulk_done"  # of our current request, with the row count its chunks carried
    BULK_SHORT = "bulk_short"  # of our current request, with another count
    RESYNC_TIMEOUT = "resync_timeout"
    DEMOTED = "demoted"  # this node became a backup: its rows must be the master's again


_ANY = tuple(SyncState)
TRANSITIONS: dict[tuple[SyncState, Event], SyncState] = {
    (SyncState.RESYNC_NEEDED, Event.REQUEST_SENT): SyncState.RESYNCING,
    (SyncState.RESYNCING, Event.BULK_DONE): SyncState.IN_SYNC,
    (SyncState.RESYNCING, Event.BULK_SHORT): SyncState.RESYNC_NEEDED,
    (SyncState.RESYNCING, Event.RESYNC_TIMEOUT): SyncState.RESYNC_NEEDED,
    (SyncState.IN_SYNC, Event.DEMOTED): SyncState.RESYNC_NEEDED,
    # one under way was asked for (and its rows marked stale) while this node was master,
    # when its stale marks were not applied: asked again
    (SyncState.RESYNCING, Event.DEMOTED): SyncState.RESYNC_NEEDED,
    **{(state, Event.GAP): SyncState.RESYNC_NEEDED for state in _ANY},
    **{(state, Event.NEW_EPOCH): SyncState.RESYNC_NEEDED for state in _ANY},
}
"""(state, event) -> next state. A pair not in the table leaves the state as it is: a datagram
in order, a BULK_DONE of another request, a request not yet due."""


@dataclass(slots=True)
class SyncReceiver:
    """What this node knows of one peer's stream, and what to do with each of its datagrams.

    `own_epoch` names this node's requests (RequestId). Requests are spaced out: the first may
    go at once, each next one only `interval` seconds after the last, and `interval` doubles
    with each request up to `max_interval`, back to `min_interval` once a resync completes (a
    lossy link, or someone on the path dropping one datagram a second, must not turn the peer
    into a sender of whole-table bulks back to back). A resync not complete `resync_timeout`
    seconds after the request or its last chunk is asked for again. A peer never heard from
    by `alone_after` seconds after `started` is taken as absent (MarkReady(alone=True))."""

    peer: int
    own_epoch: int
    started: float
    min_interval: float = 1.0
    max_interval: float = 30.0
    resync_timeout: float = 10.0
    alone_after: float = 3.0
    state: SyncState = SyncState.RESYNC_NEEDED
    epoch: int | None = None  # the peer's, once heard
    expected: int = 0  # the peer's next sequence number
    requests: int = 0  # requests asked in own_epoch
    request: RequestId | None = None  # the resync under way (RESYNCING)
    bulk_rows: int = 0  # ROW records its chunks have brought so far
    deadline: float = 0.0  # RESYNCING: when to give it up and ask again
    next_request: float = float("-inf")  # no request before this
    interval: float = 0.0  # what the next request's spacing will be (min_interval at first)
    ready: bool = False
    drops: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.interval = self.min_interval

    def _move(self, event: Event) -> None:
        self.state = TRANSITIONS.get((self.state, event), self.state)

    def _ask_if_due(self, now: float) -> list[Effect]:
        """RESYNC_NEEDED: the request, once the spacing since the last one has passed."""
        if self.state is not SyncState.RESYNC_NEEDED or now < self.next_request:
            return []
        self.requests += 1
        self.request = RequestId(self.own_epoch, self.requests)
        self.bulk_rows = 0
        self.next_request = now + self.interval
        self.interval = min(self.interval * 2, self.max_interval)
        self.deadline = now + self.resync_timeout
        self._move(Event.REQUEST_SENT)
        return [MarkStale(self.peer), RequestResync(self.peer, self.request)]

    def tick(self, now: float) -> list[Effect]:
        """Timers: a request due, a resync given up, a peer never heard from."""
        effects: list[Effect] = []
        if self.state is SyncState.RESYNCING and now >= self.deadline:
            self._move(Event.RESYNC_TIMEOUT)
        effects += self._ask_if_due(now)
        if not self.ready and self.epoch is None and now - self.started >= self.alone_after:
            self.ready = True
            effects.append(MarkReady(self.peer, alone=True))
        return effects

    def demoted(self, now: float) -> list[Effect]:
        """This node has become a backup (keepalived's notify): the rows it served itself must
        give way to the master's, so the peer is asked for a resync (a new one: one under way
        began while this node was master, which applied none of its stale marks; the spacing
        between requests holds)."""
        self._move(Event.DEMOTED)
        return self._ask_if_due(now)

    def receive(self, message: Message, now: float) -> list[Effect] | Dropped:
        """A decoded datagram of this peer's: its effects, or Dropped (replay, old epoch)."""
        if self.epoch is not None and message.epoch < self.epoch:
            return self._drop(DropReason.OLD_EPOCH)
        if self.epoch is not None and message.epoch == self.epoch:
            if message.seq < self.expected:
                return self._drop(DropReason.REPLAY)
            if message.seq > self.expected:
                self._move(Event.GAP)  # the datagram itself is newer than what we hold: used
        elif self.epoch is not None:  # a newer epoch: the peer restarted, its stream is new
            self._move(Event.NEW_EPOCH)
        elif (
            self.state is SyncState.RESYNCING
            and message.epoch > self.own_epoch
            and not self._answers(message)
        ):
            # The first word from a peer that started after this node, whose first request
            # went at its start: most likely to nobody. Asked again when the spacing allows,
            # not after resync_timeout (instances started one after another, an added one).
            self._move(Event.NEW_EPOCH)
        self.epoch = message.epoch
        self.expected = message.seq + 1
        effects = apply_records(message)
        effects += self._bulk(message, now)
        effects += self._ask_if_due(now)
        return effects

    def _answers(self, message: Message) -> bool:
        """Is this a chunk of the bulk our request under way asked for?"""
        chunk = message.records[0] if message.records else None
        return isinstance(chunk, BulkChunk) and chunk.request == self.request

    def _bulk(self, message: Message, now: float) -> list[Effect]:
        """A BULK datagram's part in the resync under way (rows of any bulk are installed:
        whoever asked, they are the peer's rows as of now, in its stream's order)."""
        if message.type is not MessageType.BULK or self.state is not SyncState.RESYNCING:
            return []
        chunk = message.records[0]
        if not isinstance(chunk, BulkChunk) or chunk.request != self.request:
            return []
        done = message.records[-1]
        self.bulk_rows += sum(isinstance(r, RowUpdate) for r in message.records)
        self.deadline = now + self.resync_timeout
        if not isinstance(done, BulkDone):
            return []
        if done.rows != self.bulk_rows:
            self._move(Event.BULK_SHORT)
            return []
        self._move(Event.BULK_DONE)
        self.request = None
        self.interval = self.min_interval
        effects: list[Effect] = [ResyncComplete(self.peer)]
        if not self.ready:
            self.ready = True
            effects.append(MarkReady(self.peer))
        return effects

    def _drop(self, reason: DropReason) -> Dropped:
        self.drops[reason.value] += 1
        return Dropped(reason)


class SyncInbox:
    """Every datagram this node receives: decoded, checked, handed to its peer's receiver; the
    drops counted by reason (`drops`), whichever check refused them."""

    def __init__(
        self, secret: bytes, peers: Collection[int], own_epoch: int, started: float
    ) -> None:
        if not secret:
            raise ValueError("a sync secret is required: an unsigned sync would let anyone on "
                             "the path install rows")  # fmt: skip
        self.secret = secret
        self.receivers = {peer: SyncReceiver(peer, own_epoch, started) for peer in peers}
        self.drops: Counter[str] = Counter()

    def receive(self, datagram: bytes, now: float) -> list[Effect]:
        message = decode(datagram, self.secret, self.receivers)
        if isinstance(message, Dropped):
            self.drops[message.reason.value] += 1
            return []
        outcome = self.receivers[message.sender].receive(message, now)
        if isinstance(outcome, Dropped):
            self.drops[outcome.reason.value] += 1
            return []
        return outcome

    def tick(self, now: float) -> list[Effect]:
        return [effect for r in self.receivers.values() for effect in r.tick(now)]

    def demoted(self, now: float) -> list[Effect]:
        return [effect for r in self.receivers.values() for effect in r.demoted(now)]

    @property
    def ready(self) -> bool:
        """This node may take traffic: every peer's first resync completed (or it is absent)."""
        return all(receiver.ready for receiver in self.receivers.values())


@dataclass(slots=True)
class SyncSender:
    """This node's outgoing stream to one destination (a unicast peer or the multicast group):
    its id, its epoch (new at every start, greater than the last: see the protocol), and the
    next sequence number, which every datagram to that destination takes in turn."""

    sender: int
    epoch: int
    secret: bytes
    seq: int = 0

    def _send(
        self, message_type: MessageType, records: Sequence[Record], now: float
    ) -> list[bytes]:
        datagrams = encode(
            message_type, records, sender=self.sender, epoch=self.epoch, seq=self.seq,
            clock=math.floor(now), secret=self.secret,
        )  # fmt: skip
        self.seq += len(datagrams)
        return datagrams

    def updates(
        self, records: Sequence[RowUpdate | RowEnd | RowRefresh], now: float
    ) -> list[bytes]:
        """Row changes (none: a heartbeat). `now` is the engine's clock, the rows' `created`'s."""
        return self._send(MessageType.UPDATE, records, now)

    def request(self, request: RequestId, now: float) -> list[bytes]:
        return self._send(MessageType.REQUEST, [ResyncRequest(request)], now)

    def bulk(
        self, request: RequestId, rows: Sequence[RowUpdate], final: int | None, now: float
    ) -> list[bytes]:
        """Chunks answering `request`; `final` (the bulk's row count over all calls) ends it."""
        tail: list[Record] = [] if final is None else [BulkDone(request, final)]
        return self._send(MessageType.BULK, [BulkChunk(request), *rows, *tail], now)
