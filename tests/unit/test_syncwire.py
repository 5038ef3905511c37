"""lbnat.syncwire: the session sync wire format and the per-peer receiver (docs/sync-protocol.md).

Table-driven: every record kind round trips; datagrams are filled to the byte and no further;
every way a datagram is refused has its case and its counted reason; the receiver's state
table is walked step by step. Hypothesis: any valid records come back as they went, no bytes
make decode raise, and no single flipped bit of a signed datagram is ever accepted. Time is a
parameter: no test sleeps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnat import addresses
from lbnat.checkpoint import RowRecord, encode_record
from lbnat.nat import State
from lbnat.syncwire import (
    HEADER_SIZE,
    MAC_SIZE,
    MAGIC,
    MAX_DATAGRAM,
    ROOM,
    SIZES,
    TRANSITIONS,
    VERSION,
    BulkChunk,
    BulkDone,
    Dropped,
    DropReason,
    EndRows,
    Event,
    InstallRows,
    Kind,
    MarkReady,
    MarkStale,
    Message,
    MessageType,
    Record,
    RefreshRows,
    RequestId,
    RequestResync,
    ResyncComplete,
    ResyncRequest,
    RowEnd,
    RowKey,
    RowRefresh,
    RowUpdate,
    SendBulk,
    SyncInbox,
    SyncReceiver,
    SyncSender,
    SyncState,
    decode,
    encode,
    pack_record,
)
from tests.unit.fixtures import CLIENT1, addr

SECRET = b"sync-secret"
OTHER_SECRET = b"another-secret"
PEER = 1
PEERS = frozenset({PEER})
EPOCH = 1_700_000_000_000_000  # the peer's: its start in microseconds
OWN_EPOCH = 1_700_000_100_000_000
CLOCK = 86_400  # the peer's engine clock, whole seconds

ROW = RowRecord(
    proto=6, state=State.ESTABLISHED, fins=0, service_port=80, client_ip=addr(CLIENT1),
    client_port=40000, backend_ip=addr("198.18.0.21"), backend_port=8080, nat_port=61000,
    wscale=(7 << 4) | 9, created=1234,
)  # fmt: skip
UDP_ROW = RowRecord(
    proto=17, state=State.UDP_REPLIED, fins=0, service_port=53, client_ip=addr(CLIENT1),
    client_port=5353, backend_ip=addr("198.18.0.22"), backend_port=5300, nat_port=61001,
    wscale=0, created=99,
)  # fmt: skip
PROXIED_ROW = RowRecord(
    proto=6, state=State.SYN_RECV, fins=0, service_port=443, client_ip=addr(CLIENT1),
    client_port=40001, backend_ip=addr("198.18.0.23"), backend_port=8443, nat_port=61002,
    wscale=0x7F, created=5, proxy_flags=0x03 | (22 << 2), seq_offset=0xDEADBEEF, proxy_window=8,
)  # fmt: skip
KEY = RowKey(6, 80, addr(CLIENT1), 40000, 61000)
REQUEST = RequestId(OWN_EPOCH, 1)

UPDATE = RowUpdate(ROW, worker=1, idle=5)
ROW6 = dataclasses.replace(
    ROW, client_ip=addresses.parse("2001:db8::11"), backend_ip=addresses.parse("2001:db8::21")
)
NAT64_ROW = dataclasses.replace(ROW, client_ip=addresses.parse("2001:db8::11"))
UPDATE6 = RowUpdate(ROW6, worker=1, idle=5)
KEY6 = RowKey(6, 80, addresses.parse("2001:db8::11"), 40000, 61000)
END = RowEnd(KEY)
REFRESH = RowRefresh(KEY, idle=30)


def sign(body: bytes, secret: bytes = SECRET) -> bytes:
    return body + hmac.new(secret, body, hashlib.sha256).digest()


def forge(
    records: bytes,
    count: int,
    message_type: int = MessageType.UPDATE,
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    sender: int = PEER,
    epoch: int = EPOCH,
    seq: int = 0,
    clock: int = CLOCK,
) -> bytes:
    """A datagram built by hand from raw record bytes, signed with SECRET: the checks after
    the MAC see exactly what is given here."""
    header = struct.pack(
        "<4sBBHIQQI", magic, version, message_type, count, sender, epoch, seq, clock
    )
    return sign(header + records)


def send(
    message_type: MessageType, records: Sequence[Record], seq: int = 0, **options: object
) -> list[bytes]:
    settings: dict[str, object] = {
        "sender": PEER, "epoch": EPOCH, "seq": seq, "clock": CLOCK, "secret": SECRET
    }  # fmt: skip
    settings.update(options)
    return encode(message_type, records, **settings)  # type: ignore[arg-type]


def received(datagrams: Sequence[bytes]) -> list[Record]:
    records: list[Record] = []
    for datagram in datagrams:
        message = decode(datagram, SECRET, PEERS)
        assert isinstance(message, Message), message
        records += message.records
    return records


# --- the layout -----------------------------------------------------------------------------


def test_the_sizes_are_the_documented_ones() -> None:
    assert (HEADER_SIZE, MAC_SIZE, ROOM, MAX_DATAGRAM) == (32, 32, 1336, 1400)
    assert SIZES == {
        Kind.ROW: 44, Kind.END: 12, Kind.REFRESH: 14, Kind.RESYNC_REQUEST: 13,
        Kind.BULK_CHUNK: 13, Kind.BULK_DONE: 17, Kind.ROW6: 68, Kind.END6: 24, Kind.REFRESH6: 26,
    }  # fmt: skip


def test_a_row_record_carries_the_checkpoint_record_verbatim() -> None:
    data = pack_record(UPDATE)
    assert data[:4] == bytes([Kind.ROW, 1, 5, 0])
    assert data[4:] == encode_record(ROW)[:40]  # an IPv4 row: format 1's record, as ever
    data6 = pack_record(UPDATE6)
    assert data6[:4] == bytes([Kind.ROW6, 1, 5, 0])
    assert data6[4:] == encode_record(ROW6)


def test_ipv6_end_and_refresh_carry_the_whole_address() -> None:
    assert pack_record(RowEnd(KEY6)) == bytes([Kind.END6, 6]) + (80).to_bytes(2, "little") + (
        bytes.fromhex("20010db8000000000000000000000011")
    ) + (40000).to_bytes(2, "little") + (61000).to_bytes(2, "little")
    assert pack_record(RowRefresh(KEY6, 9))[-2:] == (9).to_bytes(2, "little")


ROUND_TRIPS = {
    "row": (MessageType.UPDATE, [UPDATE]),
    "row-udp": (MessageType.UPDATE, [RowUpdate(UDP_ROW, worker=255, idle=65535)]),
    "row-syn-proxied": (MessageType.UPDATE, [RowUpdate(PROXIED_ROW)]),
    "end": (MessageType.UPDATE, [END]),
    "refresh": (MessageType.UPDATE, [REFRESH]),
    "mixed-in-order": (MessageType.UPDATE, [UPDATE, REFRESH, END, UPDATE]),
    "ipv6": (MessageType.UPDATE, [UPDATE6, RowRefresh(KEY6, 3), RowEnd(KEY6), UPDATE]),
    "nat64": (MessageType.UPDATE, [RowUpdate(NAT64_ROW, worker=3, idle=1)]),
    "bulk-ipv6": (MessageType.BULK, [BulkChunk(REQUEST), UPDATE, UPDATE6, BulkDone(REQUEST, 2)]),
    "heartbeat": (MessageType.UPDATE, []),
    "resync-request": (MessageType.REQUEST, [ResyncRequest(REQUEST)]),
    "bulk-chunk": (MessageType.BULK, [BulkChunk(REQUEST), UPDATE, RowUpdate(UDP_ROW)]),
    "bulk-done": (MessageType.BULK, [BulkChunk(REQUEST), UPDATE, BulkDone(REQUEST, 7)]),
    "bulk-empty-table": (MessageType.BULK, [BulkChunk(REQUEST), BulkDone(REQUEST, 0)]),
    "bulk-extremes": (
        MessageType.BULK,
        [BulkChunk(RequestId(2**64 - 1, 2**32 - 1)), BulkDone(RequestId(0, 0), 2**32 - 1)],
    ),
}


@pytest.mark.parametrize(("message_type", "records"), ROUND_TRIPS.values(), ids=ROUND_TRIPS)
def test_every_record_kind_round_trips(message_type: MessageType, records: list[Record]) -> None:
    [datagram] = send(message_type, records, seq=41)
    message = decode(datagram, SECRET, PEERS)
    assert message == Message(message_type, PEER, EPOCH, 41, CLOCK, tuple(records))


def test_encode_refuses_what_the_wire_cannot_carry() -> None:
    cases: list[tuple[MessageType, list[Record]]] = [
        (MessageType.UPDATE, [ResyncRequest(REQUEST)]),  # not an update's
        (MessageType.REQUEST, []),
        (MessageType.REQUEST, [ResyncRequest(REQUEST), ResyncRequest(REQUEST)]),
        (MessageType.BULK, [UPDATE]),  # no BulkChunk first
        (MessageType.BULK, [BulkChunk(REQUEST), BulkDone(REQUEST, 1), UPDATE]),
        (MessageType.BULK, [BulkChunk(REQUEST), END]),
        (MessageType.UPDATE, [RowUpdate(ROW, worker=256)]),
        (MessageType.UPDATE, [RowRefresh(KEY, idle=65536)]),
        (MessageType.UPDATE, [RowEnd(RowKey(1, 80, 1, 2, 3))]),  # ICMP is no row's
        (MessageType.UPDATE, [RowEnd(RowKey(6, 80, 2**32, 2, 3))]),  # neither family's
        (MessageType.UPDATE, [RowEnd(RowKey(6, 80, 2**130, 2, 3))]),
    ]
    for message_type, records in cases:
        with pytest.raises(ValueError):
            send(message_type, records)
    with pytest.raises(ValueError, match="secret"):
        send(MessageType.UPDATE, [], secret=b"")
    with pytest.raises(ValueError, match="no room"):
        send(MessageType.UPDATE, [UPDATE], limit=HEADER_SIZE + MAC_SIZE + 43)


# --- batching -------------------------------------------------------------------------------

# 28 rows (1,232 bytes), 4 REFRESHes (56) and 4 ENDs (48) fill the 1,336 bytes of a datagram's
# records exactly.
BATCH_IDS = ["heartbeat", "30-rows", "31-rows", "exactly-full", "one-over", "111-ends"]
BATCH_IDS += ["112-ends", "bulk-30", "bulk-31", "bulk-done-spills"]
EXACTLY_FULL: list[Record] = [*[UPDATE] * 28, *[REFRESH] * 4, *[END] * 4]


@pytest.mark.parametrize(
    ("message_type", "records", "sizes", "counts"),
    [
        (MessageType.UPDATE, [], [64], [0]),
        (MessageType.UPDATE, [UPDATE] * 30, [1384], [30]),
        (MessageType.UPDATE, [UPDATE] * 31, [1384, 108], [30, 1]),
        (MessageType.UPDATE, EXACTLY_FULL, [MAX_DATAGRAM], [36]),
        (MessageType.UPDATE, [*EXACTLY_FULL, END], [MAX_DATAGRAM, 76], [36, 1]),
        (MessageType.UPDATE, [END] * 111, [1396], [111]),
        (MessageType.UPDATE, [END] * 112, [1396, 76], [111, 1]),
        # a bulk's datagrams each start with its 13-byte BulkChunk: 30 rows still fit
        (MessageType.BULK, [BulkChunk(REQUEST), *[UPDATE] * 30], [1397], [31]),
        (MessageType.BULK, [BulkChunk(REQUEST), *[UPDATE] * 31], [1397, 121], [31, 2]),
        (
            MessageType.BULK,
            [BulkChunk(REQUEST), *[UPDATE] * 30, BulkDone(REQUEST, 30)],
            [1397, 94],
            [31, 2],
        ),
    ],
    ids=BATCH_IDS,
)
def test_batching_fills_a_datagram_to_the_byte_and_no_further(
    message_type: MessageType, records: list[Record], sizes: list[int], counts: list[int]
) -> None:
    datagrams = send(message_type, records, seq=7)
    assert [len(d) for d in datagrams] == sizes
    messages = [decode(d, SECRET, PEERS) for d in datagrams]
    assert all(isinstance(m, Message) for m in messages)
    assert [m.seq for m in messages if isinstance(m, Message)] == list(range(7, 7 + len(sizes)))
    assert [len(m.records) for m in messages if isinstance(m, Message)] == counts
    if message_type is MessageType.BULK:
        assert all(m.records[0] == BulkChunk(REQUEST) for m in messages if isinstance(m, Message))
        assert [r for r in received(datagrams) if not isinstance(r, BulkChunk)] == records[1:]
    else:
        assert received(datagrams) == records


def test_a_smaller_limit_makes_smaller_datagrams() -> None:
    datagrams = send(MessageType.UPDATE, [UPDATE] * 10, limit=HEADER_SIZE + MAC_SIZE + 88)
    assert [len(d) for d in datagrams] == [152] * 5


# --- drops ----------------------------------------------------------------------------------

GOOD = send(MessageType.UPDATE, [UPDATE, END])[0]
END_BYTES = pack_record(END)


def flipped(data: bytes, at: int, mask: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[at] ^= mask
    return bytes(changed)


def torn_row() -> bytes:
    data = bytearray(pack_record(UPDATE))
    data[4 + 12] ^= 0xFF  # inside the checkpoint record's CRC-covered part
    return bytes(data)


DROPS: dict[str, tuple[bytes, DropReason]] = {
    "bad-mac-wrong-secret": (
        send(MessageType.UPDATE, [UPDATE], secret=OTHER_SECRET)[0], DropReason.BAD_MAC),
    "bad-mac-record-changed": (flipped(GOOD, HEADER_SIZE + 10), DropReason.BAD_MAC),
    "bad-mac-seq-changed": (flipped(GOOD, 20), DropReason.BAD_MAC),
    "bad-mac-mac-changed": (flipped(GOOD, len(GOOD) - 1), DropReason.BAD_MAC),
    "bad-mac-cut-short": (GOOD[:-1], DropReason.BAD_MAC),
    "truncated-header": (GOOD[:40], DropReason.TRUNCATED),
    "truncated-nothing": (b"", DropReason.TRUNCATED),
    "truncated-record": (forge(END_BYTES[:6], 1), DropReason.TRUNCATED),
    "count-beyond-records": (forge(END_BYTES, 2), DropReason.TRUNCATED),
    "trailing-bytes": (forge(END_BYTES + b"\0", 1), DropReason.TRAILING),
    "count-short-of-records": (forge(END_BYTES * 2, 1), DropReason.TRAILING),
    "wrong-magic": (forge(END_BYTES, 1, magic=b"lbsx"), DropReason.BAD_MAGIC),
    "wrong-version": (forge(END_BYTES, 1, version=2), DropReason.BAD_VERSION),
    "unknown-sender": (send(MessageType.UPDATE, [END], sender=9)[0], DropReason.UNKNOWN_SENDER),
    "unknown-type": (forge(END_BYTES, 1, 9), DropReason.UNKNOWN_TYPE),
    "unknown-kind": (forge(b"\x7f" + END_BYTES[1:], 1), DropReason.UNKNOWN_KIND),
    "kind-zero": (forge(b"\x00" + END_BYTES[1:], 1), DropReason.UNKNOWN_KIND),
    "oversize": (forge(END_BYTES * 112, 112), DropReason.OVERSIZE),
    "oversize-garbage": (bytes(MAX_DATAGRAM + 1), DropReason.OVERSIZE),
    "request-in-update": (
        forge(pack_record(ResyncRequest(REQUEST)), 1), DropReason.MISPLACED),
    "two-requests": (
        forge(pack_record(ResyncRequest(REQUEST)) * 2, 2, MessageType.REQUEST),
        DropReason.MISPLACED,
    ),
    "empty-request": (forge(b"", 0, MessageType.REQUEST), DropReason.MISPLACED),
    "bulk-without-chunk": (forge(pack_record(UPDATE), 1, MessageType.BULK), DropReason.MISPLACED),
    "bulk-done-mid-way": (
        forge(
            pack_record(BulkChunk(REQUEST)) + pack_record(BulkDone(REQUEST, 1))
            + pack_record(UPDATE), 3, MessageType.BULK,
        ),
        DropReason.MISPLACED,
    ),
    "end-in-bulk": (
        forge(pack_record(BulkChunk(REQUEST)) + END_BYTES, 2, MessageType.BULK),
        DropReason.MISPLACED,
    ),
    "row-torn-checkpoint-record": (forge(torn_row(), 1), DropReason.BAD_RECORD),
    "row-free-slot": (forge(bytes([Kind.ROW, 0, 0, 0]) + bytes(40), 1), DropReason.BAD_RECORD),
    "end-not-tcp-or-udp": (forge(b"\x02\x01" + END_BYTES[2:], 1), DropReason.BAD_RECORD),
}  # fmt: skip


@pytest.mark.parametrize(("datagram", "reason"), DROPS.values(), ids=DROPS)
def test_every_bad_datagram_is_dropped_with_its_reason(datagram: bytes, reason: DropReason) -> None:
    assert decode(datagram, SECRET, PEERS) == Dropped(reason)
    inbox = SyncInbox(SECRET, PEERS, OWN_EPOCH, started=0.0)
    assert inbox.receive(datagram, now=1.0) == []
    assert inbox.drops == {reason.value: 1}
    assert inbox.receivers[PEER].epoch is None  # nothing of it was believed


def test_decode_takes_any_buffer() -> None:
    assert decode(bytearray(GOOD), SECRET, PEERS) == decode(GOOD, SECRET, PEERS)
    assert decode(memoryview(GOOD), SECRET, PEERS) == decode(GOOD, SECRET, PEERS)


def test_replays_and_old_epochs_are_dropped_and_counted_by_the_inbox() -> None:
    inbox = SyncInbox(SECRET, PEERS, OWN_EPOCH, started=0.0)
    assert inbox.tick(0.0) == requested(1)
    first, second = (send(MessageType.UPDATE, [UPDATE], seq=seq)[0] for seq in (0, 1))
    assert inbox.receive(first, now=1.0) == [InstallRows(PEER, (UPDATE,), CLOCK)]
    assert inbox.receive(second, now=1.0) == [InstallRows(PEER, (UPDATE,), CLOCK)]
    assert inbox.receive(first, now=1.0) == []  # replayed
    assert inbox.receive(second, now=1.0) == []  # replayed
    restarted = send(MessageType.UPDATE, [END], epoch=EPOCH + 1)[0]
    assert inbox.receive(restarted, now=2.0)[0] == EndRows(PEER, (KEY,))
    old = send(MessageType.UPDATE, [UPDATE], seq=2)[0]  # from before the restart
    assert inbox.receive(old, now=2.0) == []
    assert inbox.drops == {"replay": 2, "old_epoch": 1}


def test_a_secret_is_required() -> None:
    with pytest.raises(ValueError, match="secret"):
        SyncInbox(b"", PEERS, OWN_EPOCH, started=0.0)


# --- the receiver's state table -------------------------------------------------------------


def message(
    seq: int,
    records: Sequence[Record] = (),
    message_type: MessageType = MessageType.UPDATE,
    epoch: int = EPOCH,
) -> Message:
    return Message(message_type, PEER, epoch, seq, CLOCK, tuple(records))


def receiver() -> SyncReceiver:
    return SyncReceiver(PEER, OWN_EPOCH, started=0.0)


def requested(number: int) -> list[object]:
    return [MarkStale(PEER), RequestResync(PEER, RequestId(OWN_EPOCH, number))]


def bulk(seq: int, number: int, rows: int, done: int | None = None) -> Message:
    records: list[Record] = [BulkChunk(RequestId(OWN_EPOCH, number)), *[UPDATE] * rows]
    if done is not None:
        records.append(BulkDone(RequestId(OWN_EPOCH, number), done))
    return message(seq, records, MessageType.BULK)


Step = tuple[str, float, object, object, SyncState]  # (what, now, input, effects, state after)
IN_SYNC_AT_2: list[Step] = [
    ("tick", 0.0, None, requested(1), SyncState.RESYNCING),
    ("receive", 0.1, bulk(0, 1, 2), [InstallRows(PEER, (UPDATE, UPDATE), CLOCK)],
     SyncState.RESYNCING),
    (
        "receive", 0.2, bulk(1, 1, 1, done=3),
        [InstallRows(PEER, (UPDATE,), CLOCK), ResyncComplete(PEER), MarkReady(PEER)],
        SyncState.IN_SYNC,
    ),
]  # fmt: skip

SCENARIOS: dict[str, list[Step]] = {
    "a-node-that-becomes-backup-asks-the-master-again": [
        *IN_SYNC_AT_2,
        ("demoted", 5.0, None, requested(2), SyncState.RESYNCING),
        # demoted again while it runs: asked anew, once the spacing allows
        ("demoted", 5.5, None, [], SyncState.RESYNC_NEEDED),
        ("tick", 6.0, None, requested(3), SyncState.RESYNCING),
    ],
    "demoted-during-its-first-resync-asks-again-after-the-spacing": [
        ("tick", 0.0, None, requested(1), SyncState.RESYNCING),
        ("demoted", 0.2, None, [], SyncState.RESYNC_NEEDED),
        ("tick", 1.0, None, requested(2), SyncState.RESYNCING),
    ],
    "a-start-asks-for-a-resync": [
        ("tick", 0.0, None, requested(1), SyncState.RESYNCING),
        ("tick", 0.5, None, [], SyncState.RESYNCING),
    ],
    "resync-chunks-then-done-make-it-ready": IN_SYNC_AT_2,
    "in-order-updates-apply-in-order": [
        *IN_SYNC_AT_2,
        ("receive", 3.0, message(2, [UPDATE]), [InstallRows(PEER, (UPDATE,), CLOCK)],
         SyncState.IN_SYNC),
        (
            "receive", 3.0, message(3, [UPDATE, END, REFRESH, UPDATE]),
            [InstallRows(PEER, (UPDATE,), CLOCK), EndRows(PEER, (KEY,)),
             RefreshRows(PEER, (REFRESH,)), InstallRows(PEER, (UPDATE,), CLOCK)],
            SyncState.IN_SYNC,
        ),
        ("receive", 3.0, message(4), [], SyncState.IN_SYNC),  # a heartbeat
    ],
    "a-gap-asks-for-a-resync": [
        *IN_SYNC_AT_2,
        (
            "receive", 3.0, message(5, [END]), [EndRows(PEER, (KEY,)), *requested(2)],
            SyncState.RESYNCING,
        ),
        ("receive", 3.1, message(3, [UPDATE]), Dropped(DropReason.REPLAY), SyncState.RESYNCING),
        ("receive", 3.1, message(6, [UPDATE]), [InstallRows(PEER, (UPDATE,), CLOCK)],
         SyncState.RESYNCING),
        ("receive", 3.2, bulk(7, 2, 0, done=0), [ResyncComplete(PEER)], SyncState.IN_SYNC),
    ],
    "a-gap-within-min-interval-asks-at-a-later-tick": [
        ("tick", 0.0, None, requested(1), SyncState.RESYNCING),
        ("receive", 0.1, message(0), [], SyncState.RESYNCING),
        ("receive", 0.2, message(2), [], SyncState.RESYNC_NEEDED),
        ("tick", 0.9, None, [], SyncState.RESYNC_NEEDED),
        ("tick", 1.0, None, requested(2), SyncState.RESYNCING),
    ],
    "a-gap-during-a-resync-starts-it-over": [
        ("tick", 0.0, None, requested(1), SyncState.RESYNCING),
        ("receive", 0.1, bulk(0, 1, 1), [InstallRows(PEER, (UPDATE,), CLOCK)], SyncState.RESYNCING),
        ("receive", 1.5, bulk(2, 1, 1), [InstallRows(PEER, (UPDATE,), CLOCK), *requested(2)],
         SyncState.RESYNCING),
        # the first request's DONE no longer completes anything
        ("receive", 1.6, bulk(3, 1, 0, done=2), [], SyncState.RESYNCING),
        ("receive", 1.7, bulk(4, 2, 1, done=1), [InstallRows(PEER, (UPDATE,), CLOCK),
         ResyncComplete(PEER), MarkReady(PEER)], SyncState.IN_SYNC),
    ],
    "requests-back-off-while-no-resync-completes": [
        ("tick", 0.0, None, requested(1), SyncState.RESYNCING),
        ("receive", 0.1, message(0), [], SyncState.RESYNCING),
        ("receive", 1.0, message(2), requested(2), SyncState.RESYNCING),  # spacing 1 s
        ("receive", 2.0, message(4), [], SyncState.RESYNC_NEEDED),  # now 2 s
        ("tick", 2.9, None, [], SyncState.RESYNC_NEEDED),
        ("tick", 3.0, None, requested(3), SyncState.RESYNCING),
        ("receive", 6.9, message(6), [], SyncState.RESYNC_NEEDED),  # now 4 s
        ("tick", 7.0, None, requested(4), SyncState.RESYNCING),
        ("receive", 7.1, bulk(7, 4, 0, done=0), [ResyncComplete(PEER), MarkReady(PEER)],
         SyncState.IN_SYNC),
        # done: the spacing is 1 s again
        ("receive", 15.0, message(9), requested(5), SyncState.RESYNCING),
        ("receive", 15.5, message(11), [], SyncState.RESYNC_NEEDED),
        ("tick", 16.0, None, requested(6), SyncState.RESYNCING),
    ],
    "a-done-whose-count-differs-asks-again": [
        ("tick", 0.0, None, requested(1), SyncState.RESYNCING),
        ("receive", 0.1, bulk(0, 1, 2, done=3), [InstallRows(PEER, (UPDATE, UPDATE), CLOCK)],
         SyncState.RESYNC_NEEDED),
        ("tick", 1.0, None, requested(2), SyncState.RESYNCING),
    ],
    "another-requesters-bulk-installs-rows-and-completes-nothing": [
        *IN_SYNC_AT_2,
        (
            "receive", 3.0,
            message(2, [BulkChunk(RequestId(77, 1)), UPDATE, BulkDone(RequestId(77, 1), 1)],
                    MessageType.BULK),
            [InstallRows(PEER, (UPDATE,), CLOCK)], SyncState.IN_SYNC,
        ),
    ],
    "an-epoch-change-asks-for-a-resync": [
        *IN_SYNC_AT_2,
        ("receive", 3.0, message(0, [UPDATE], epoch=EPOCH + 1),
         [InstallRows(PEER, (UPDATE,), CLOCK), *requested(2)], SyncState.RESYNCING),
        ("receive", 3.1, message(2, [UPDATE]), Dropped(DropReason.OLD_EPOCH),
         SyncState.RESYNCING),
        ("receive", 3.2, message(1, [END], epoch=EPOCH + 1), [EndRows(PEER, (KEY,))],
         SyncState.RESYNCING),
    ],
    "a-resync-not-done-in-time-is-asked-again": [
        ("tick", 0.0, None, requested(1), SyncState.RESYNCING),
        ("receive", 0.1, message(0), [], SyncState.RESYNCING),
        ("receive", 5.0, bulk(1, 1, 1), [InstallRows(PEER, (UPDATE,), CLOCK)], SyncState.RESYNCING),
        ("tick", 14.9, None, [], SyncState.RESYNCING),  # the chunk moved the deadline
        ("tick", 15.0, None, requested(2), SyncState.RESYNCING),
    ],
    "a-peer-never-heard-from-is-absent": [
        ("tick", 0.0, None, requested(1), SyncState.RESYNCING),
        ("tick", 2.9, None, [], SyncState.RESYNCING),
        ("tick", 3.0, None, [MarkReady(PEER, alone=True)], SyncState.RESYNCING),
        ("tick", 4.0, None, [], SyncState.RESYNCING),
    ],
    "a-peer-that-started-later-is-asked-again-at-its-first-word": [
        ("tick", 0.0, None, requested(1), SyncState.RESYNCING),  # to nobody yet
        ("receive", 2.0, message(0, epoch=OWN_EPOCH + 2_000_000), requested(2),
         SyncState.RESYNCING),
    ],
    "a-peer-that-started-earlier-is-not-asked-twice": [
        ("tick", 0.0, None, requested(1), SyncState.RESYNCING),
        ("receive", 0.1, message(0), [], SyncState.RESYNCING),  # its heartbeat before the bulk
    ],
    "a-later-peers-first-word-that-is-our-bulk-completes-it": [
        ("tick", 0.0, None, requested(1), SyncState.RESYNCING),
        ("receive", 0.1, Message(MessageType.BULK, PEER, OWN_EPOCH + 1, 0, CLOCK,
         (BulkChunk(RequestId(OWN_EPOCH, 1)), BulkDone(RequestId(OWN_EPOCH, 1), 0))),
         [ResyncComplete(PEER), MarkReady(PEER)], SyncState.IN_SYNC),
    ],
    "a-peers-request-is-answered-with-a-bulk": [
        ("receive", 0.0, message(0, [ResyncRequest(RequestId(EPOCH, 3))], MessageType.REQUEST),
         [SendBulk(PEER, RequestId(EPOCH, 3)), *requested(1)], SyncState.RESYNCING),
    ],
}  # fmt: skip


@pytest.mark.parametrize("steps", SCENARIOS.values(), ids=SCENARIOS)
def test_the_receivers_state_table(steps: list[Step]) -> None:
    peer = receiver()
    for number, (what, now, given_input, effects, state) in enumerate(steps):
        if what == "tick":
            outcome: object = peer.tick(now)
        elif what == "demoted":
            outcome = peer.demoted(now)
        else:
            assert isinstance(given_input, Message)
            outcome = peer.receive(given_input, now)
        assert (outcome, peer.state) == (effects, state), f"step {number}: {what} at {now}"


def test_the_transition_table_is_the_documented_one() -> None:
    assert TRANSITIONS[(SyncState.RESYNC_NEEDED, Event.REQUEST_SENT)] is SyncState.RESYNCING
    assert TRANSITIONS[(SyncState.RESYNCING, Event.BULK_DONE)] is SyncState.IN_SYNC
    assert TRANSITIONS[(SyncState.RESYNCING, Event.BULK_SHORT)] is SyncState.RESYNC_NEEDED
    assert TRANSITIONS[(SyncState.RESYNCING, Event.RESYNC_TIMEOUT)] is SyncState.RESYNC_NEEDED
    # a node that becomes backup asks again, unless a resync is already under way or due
    assert TRANSITIONS[(SyncState.IN_SYNC, Event.DEMOTED)] is SyncState.RESYNC_NEEDED
    assert TRANSITIONS[(SyncState.RESYNCING, Event.DEMOTED)] is SyncState.RESYNC_NEEDED
    for state in SyncState:
        assert TRANSITIONS[(state, Event.GAP)] is SyncState.RESYNC_NEEDED
        assert TRANSITIONS[(state, Event.NEW_EPOCH)] is SyncState.RESYNC_NEEDED
    assert len(TRANSITIONS) == 6 + 2 * len(SyncState)
    # IN_SYNC is reached only by a completed bulk
    assert [key for key, to in TRANSITIONS.items() if to is SyncState.IN_SYNC] == [
        (SyncState.RESYNCING, Event.BULK_DONE)
    ]


def test_two_nodes_resync_end_to_end() -> None:
    """A starting node B asks A for its rows over the wire and is ready once they are in."""
    a_out, b_out = SyncSender(1, EPOCH, SECRET), SyncSender(2, OWN_EPOCH, SECRET)
    a_in = SyncInbox(SECRET, {2}, EPOCH, started=0.0)
    b_in = SyncInbox(SECRET, {1}, OWN_EPOCH, started=100.0)
    a_rows = [RowUpdate(ROW, worker=0, idle=i) for i in range(70)]
    assert a_in.tick(100.0)[-1] == MarkReady(2, alone=True)  # A alone for a while
    [stale, ask] = b_in.tick(100.0)
    assert isinstance(ask, RequestResync) and stale == MarkStale(1)
    assert not b_in.ready
    [answer] = [e for d in b_out.request(ask.request, now=100.0) for e in a_in.receive(d, 100.0)]
    assert answer == SendBulk(2, ask.request)
    chunks = a_out.bulk(answer.request, a_rows, final=len(a_rows), now=5000.5)
    assert len(chunks) == 3 and a_out.seq == 3
    effects = [e for d in chunks for e in b_in.receive(d, 100.1)]
    installed = [row for e in effects if isinstance(e, InstallRows) for row in e.rows]
    assert installed == a_rows
    assert {e.clock for e in effects if isinstance(e, InstallRows)} == {5000}  # A's clock
    assert effects[-2:] == [ResyncComplete(1), MarkReady(1)]
    assert b_in.ready and b_in.drops == {}
    lost = a_out.updates([END], now=5001.0)  # never reaches B
    assert a_out.seq == 4 and len(lost) == 1
    assert b_in.receive(a_out.updates([REFRESH], now=5001.0)[0], 101.0) == [
        RefreshRows(1, (REFRESH,)),
        MarkStale(1),
        RequestResync(1, RequestId(OWN_EPOCH, 2)),
    ]


# --- properties -----------------------------------------------------------------------------

TCP_STATES = [s for s in State if s not in (State.UDP_UNREPLIED, State.UDP_REPLIED)]
u16, u32 = st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1)
rows = st.builds(
    RowRecord, proto=st.just(6), state=st.sampled_from(TCP_STATES), fins=st.integers(0, 3),
    service_port=u16, client_ip=u32, client_port=u16, backend_ip=u32, backend_port=u16,
    nat_port=u16, wscale=st.integers(0, 255), created=u32, proxy_flags=st.integers(0, 127),
    seq_offset=u32, proxy_window=st.integers(0, 30),
) | st.builds(
    RowRecord, proto=st.just(17), state=st.sampled_from([State.UDP_UNREPLIED, State.UDP_REPLIED]),
    fins=st.just(0), service_port=u16, client_ip=u32, client_port=u16, backend_ip=u32,
    backend_port=u16, nat_port=u16, wscale=st.just(0), created=u32,
)  # fmt: skip
v6 = st.integers(0, 2**128 - 1).map(lambda low: addresses.V6 | low)
rows = rows | st.builds(  # IPv6 clients: to IPv6 backends or (NAT64) IPv4 ones; never proxied
    RowRecord, proto=st.just(6), state=st.sampled_from(TCP_STATES), fins=st.integers(0, 3),
    service_port=u16, client_ip=v6, client_port=u16, backend_ip=v6 | u32, backend_port=u16,
    nat_port=u16, wscale=st.integers(0, 255), created=u32,
)  # fmt: skip
keys = st.builds(
    RowKey, proto=st.sampled_from([6, 17]), service_port=u16, client_ip=u32 | v6,
    client_port=u16, nat_port=u16,
)  # fmt: skip
updates = st.one_of(
    st.builds(RowUpdate, rows, worker=st.integers(0, 255), idle=u16),
    st.builds(RowEnd, keys),
    st.builds(RowRefresh, keys, idle=u16),
)
request_ids = st.builds(RequestId, st.integers(0, 2**64 - 1), u32)


@given(st.lists(updates, max_size=80), st.integers(0, 2**63))
def test_updates_come_back_as_they_went(records: list[Record], seq: int) -> None:
    datagrams = send(MessageType.UPDATE, records, seq=seq)
    assert all(len(d) <= MAX_DATAGRAM for d in datagrams)
    assert received(datagrams) == records


@given(request_ids, st.lists(st.builds(RowUpdate, rows, worker=st.integers(0, 255)), max_size=70))
def test_a_bulk_comes_back_as_it_went(request: RequestId, bulk_rows: list[RowUpdate]) -> None:
    records: list[Record] = [BulkChunk(request), *bulk_rows, BulkDone(request, len(bulk_rows))]
    datagrams = send(MessageType.BULK, records)
    assert all(len(d) <= MAX_DATAGRAM for d in datagrams)
    back = received(datagrams)
    assert [r for r in back if not isinstance(r, BulkChunk)] == records[1:]
    assert back.count(BulkChunk(request)) == len(datagrams)


@given(st.binary(max_size=MAX_DATAGRAM + 8))
def test_decode_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    assert isinstance(decode(data, SECRET, PEERS), Dropped)


@given(st.integers(0, 255), st.integers(0, 2**16 - 1), st.binary(max_size=ROOM + 8))
def test_decode_never_raises_on_signed_arbitrary_records(
    message_type: int, count: int, body: bytes
) -> None:
    """Past the MAC, as if the peer itself were broken: still a Message or a Dropped."""
    outcome = decode(forge(body, count, message_type), SECRET, PEERS)
    assert isinstance(outcome, Message | Dropped)


@given(st.lists(updates, min_size=1, max_size=30), st.data())
def test_no_single_flipped_bit_of_a_signed_datagram_is_accepted(
    records: list[Record], data: st.DataObject
) -> None:
    datagram = send(MessageType.UPDATE, records)[0]
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1))
    outcome = decode(flipped(datagram, bit // 8, 1 << (bit % 8)), SECRET, PEERS)
    assert isinstance(outcome, Dropped)
    header_reasons = {DropReason.BAD_MAGIC, DropReason.BAD_VERSION, DropReason.UNKNOWN_SENDER}
    assert outcome.reason in {DropReason.BAD_MAC} | header_reasons


# --- the protocol page's worked example ----------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "sync-protocol.md"


def example_hex() -> bytes:
    """The hex dump in the worked example of docs/sync-protocol.md, as bytes."""
    text = DOC.read_text()
    block = text.split("<!-- worked-example -->", 2)[1]
    dump = re.findall(r"^[0-9a-f]{4}:((?: [0-9a-f]{2})+)", block, re.MULTILINE)
    return bytes.fromhex("".join(dump))


def test_the_worked_example_is_what_encode_makes() -> None:
    [datagram] = encode(
        MessageType.UPDATE, [UPDATE, END], sender=1, epoch=EPOCH, seq=41, clock=CLOCK,
        secret=b"example-secret",
    )  # fmt: skip
    assert example_hex() == datagram
    assert decode(datagram, b"example-secret", {1}) == Message(
        MessageType.UPDATE, 1, EPOCH, 41, CLOCK, (UPDATE, END)
    )
    text = DOC.read_text()  # the shell check's input and output
    assert f"printf '%s' {datagram[:-MAC_SIZE].hex()} " in text
    assert f"{datagram[-MAC_SIZE:].hex()} *stdin" in text


@given(
    st.lists(
        st.tuples(st.sampled_from([Kind.ROW6, Kind.END6, Kind.REFRESH6, Kind.ROW]), st.binary()),
        max_size=6,
    ),
    st.sampled_from([MessageType.UPDATE, MessageType.BULK]),
)
def test_signed_ipv6_records_of_any_bytes_decode_or_drop(
    parts: list[tuple[Kind, bytes]], message_type: MessageType
) -> None:
    """Records of the IPv6 kinds (and ROW, whose 40 bytes must be an IPv4 row's) with any
    contents, whole or cut: a Message whose rows encode back to what came, or a Dropped."""
    body = b"".join(
        bytes([kind]) + (data + bytes(SIZES[kind]))[: SIZES[kind] - 1] for kind, data in parts
    )
    outcome = decode(forge(body, len(parts), message_type), SECRET, PEERS)
    assert isinstance(outcome, Message | Dropped)
    if isinstance(outcome, Message):
        assert b"".join(pack_record(record) for record in outcome.records) == body
