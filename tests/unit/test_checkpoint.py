"""Tests for lbnat.checkpoint: the record layout (table-driven and a hypothesis round trip),
the records the engine's rows leave as they open, change state and go, and the restore of
those records into a fresh engine, whose rows forward the next packet exactly as the original
rows did (scapy packets, every translation checked by the harness of fixtures.py)."""

from __future__ import annotations

import copy
import dataclasses
import struct
import zlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnat import addresses
from lbnat.checkpoint import (
    HEADER_SIZE,
    RECORD_SIZE,
    RestoreReport,
    RowCheckpoint,
    RowRecord,
    checkpoint_bytes,
    decode_record,
    encode_record,
    record_of,
    records_below,
    restore,
)
from lbnat.engine import FORWARD, Engine
from lbnat.nat import UNKNOWN_ACK, State, Timeouts
from lbnat.service import Service
from tests.unit.fixtures import (
    CLIENT1,
    CLIENT2,
    LB,
    EngineHarness,
    Flow,
    UdpFlow,
    addr,
    check_table,
    tcp_backends,
)

TCP_STATES = [s for s in State if s not in (State.UDP_UNREPLIED, State.UDP_REPLIED)]
UDP_STATES = [State.UDP_UNREPLIED, State.UDP_REPLIED]


def new_buffer(rows: int = 64) -> memoryview:
    return memoryview(bytearray(checkpoint_bytes(rows)))


def attached(lab: EngineHarness, buffer: memoryview) -> RowCheckpoint:
    """A checkpoint on `buffer` following `lab`'s engine (what a worker does at start)."""
    checkpoint = RowCheckpoint(buffer)
    assert restore(lab.engine, checkpoint, lab.now) == RestoreReport()
    return checkpoint


REPORTS: dict[int, RestoreReport] = {}  # id(harness) -> what its restore did


def restored(
    buffer: memoryview, now: float = 0.0, lab: EngineHarness | None = None
) -> EngineHarness:
    """A fresh harness (or `lab`, fresh) whose engine took over the rows in `buffer` at `now`;
    `report(lab)` says what the restore did."""
    lab = lab or EngineHarness()
    lab.now = now
    REPORTS[id(lab)] = restore(lab.engine, RowCheckpoint(buffer), now)
    check_table(lab.table)
    return lab


def report(lab: EngineHarness) -> RestoreReport:
    return REPORTS[id(lab)]


# --- the record -----------------------------------------------------------------------------------

RECORD = RowRecord(
    proto=6, state=State.ESTABLISHED, fins=0, service_port=80, client_ip=addr(CLIENT1),
    client_port=40000, backend_ip=addr("198.18.0.21"), backend_port=8080, nat_port=61000,
    wscale=(7 << 4) | 9, created=1234,
)  # fmt: skip


def recrc6(data: bytes) -> bytes:
    """An IPv6 record with its CRC (of bytes 0-27 and 40-63) made right again."""
    crc = zlib.crc32(data[:28] + data[40:]).to_bytes(4, "little")
    return data[:28] + crc + data[32:]


def with_byte(data: bytes, at: int, value: int) -> bytes:
    changed = bytearray(data)
    changed[at] = value
    return bytes(changed)


def recrc(data: bytes) -> bytes:
    """`data` with its CRC made right again (to test the checks after the CRC)."""
    return data[:28] + zlib.crc32(data[:28]).to_bytes(4, "little") + data[32:]


DECODE_CASES = ["free", "torn-body", "torn-crc", "format", "proto", "udp-state", "state"]
DECODE_CASES += ["flags", "short", "proxy-bit-7", "proxy-window", "proxied-udp"]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (bytes(RECORD_SIZE), None),  # a free slot
        (with_byte(encode_record(RECORD), 12, 0x99), "CRC"),  # a torn record
        (with_byte(encode_record(RECORD), 29, 0x99), "CRC"),
        (recrc(with_byte(encode_record(RECORD), 0, 4)), "form 4"),
        (recrc(with_byte(encode_record(RECORD), 1, 1)), "protocol 1"),
        (with_byte(encode_record(RECORD), 32, int(State.UDP_REPLIED)), "state 7"),
        (with_byte(encode_record(RECORD), 32, 99), "state 99"),
        (with_byte(encode_record(RECORD), 33, 4), "flags"),
        (encode_record(RECORD)[:20], "64 bytes"),
        (recrc(with_byte(encode_record(RECORD), 18, 0x80)), "SYN-proxy fields"),
        (recrc(with_byte(encode_record(RECORD), 19, 31)), "SYN-proxy fields"),
        (
            with_byte(recrc(with_byte(with_byte(encode_record(RECORD), 1, 17), 18, 1)), 32, 7),
            "SYN-proxy fields",
        ),
    ],
    ids=DECODE_CASES,
)
def test_decode_refuses_what_no_row_can_be(data: bytes, error: str | None) -> None:
    if error is None:
        assert decode_record(data) is None
    else:
        with pytest.raises(ValueError, match=error):
            decode_record(data)


def test_the_layout_is_the_documented_one() -> None:
    record = dataclasses.replace(RECORD, fins=3, proxy_flags=5, seq_offset=0x01020304)
    data = encode_record(record)
    assert len(data) == RECORD_SIZE == 64 and HEADER_SIZE == 64
    assert data[0] == 1 and data[1] == 6
    assert int.from_bytes(data[2:4], "little") == 80
    assert int.from_bytes(data[4:6], "little") == 40000
    assert int.from_bytes(data[6:8], "little") == 8080
    assert data[8:12] == bytes([11, 0, 18, 198])  # little-endian 198.18.0.11
    assert data[12:16] == bytes([21, 0, 18, 198])
    assert int.from_bytes(data[16:18], "little") == 61000
    assert data[18] == 5 and data[19] == 0
    assert data[20:24] == bytes([4, 3, 2, 1])
    assert int.from_bytes(data[24:28], "little") == 1234
    assert int.from_bytes(data[28:32], "little") == zlib.crc32(data[:28])
    assert data[32] == State.ESTABLISHED and data[33] == 3 and data[34] == 0x79
    assert data[35:] == bytes(29)  # reserved, then no IPv6 address bytes
    assert decode_record(data[:40]) == record  # format 1's record: what the sync sends


V6_CLIENT = addresses.parse("2001:db8::11")
V6_BACKEND = addresses.parse("2001:db8:1::21")
RECORD6 = dataclasses.replace(RECORD, client_ip=V6_CLIENT, backend_ip=V6_BACKEND)
RECORD64 = dataclasses.replace(RECORD, client_ip=V6_CLIENT)  # NAT64: an IPv4 backend


def test_the_ipv6_layouts_are_the_documented_ones() -> None:
    data = encode_record(RECORD6)
    assert data[0] == 2 and data[8:12] == bytes([0x11, 0, 0, 0])  # the low 32 bits, LE
    assert data[12:16] == bytes([0x21, 0, 0, 0])
    assert data[40:52] == bytes.fromhex("20010db8" + "00000000" * 2)
    assert data[52:64] == bytes.fromhex("20010db8" + "00010000" + "00000000")
    assert int.from_bytes(data[28:32], "little") == zlib.crc32(data[:28] + data[40:])
    nat64 = encode_record(RECORD64)
    assert nat64[0] == 3 and nat64[12:16] == bytes([21, 0, 18, 198]) and nat64[52:] == bytes(12)
    assert decode_record(data) == RECORD6 and decode_record(nat64) == RECORD64
    with pytest.raises(ValueError, match="no NAT46"):
        encode_record(dataclasses.replace(RECORD, backend_ip=V6_BACKEND))


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (encode_record(RECORD6)[:40], "an IPv4 row's, not form 2"),
        (with_byte(encode_record(RECORD6), 50, 0x99), "CRC"),  # the address's high bits
        (with_byte(encode_record(RECORD), 45, 1), "address bytes past its own"),
        (
            recrc6(with_byte(encode_record(RECORD64), 60, 1)),
            "IPv4 backend has IPv6 address bytes",
        ),
        (
            recrc6(with_byte(encode_record(RECORD6), 18, 1)),
            "never SYN-proxied",
        ),
    ],
    ids=["v6-in-40-bytes", "torn-high-bits", "v4-with-high-bits", "nat64-backend", "v6-proxy"],
)
def test_decode_refuses_ipv6_records_no_row_can_be(data: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        decode_record(data)


records = st.builds(
    RowRecord,
    proto=st.just(6),
    state=st.sampled_from(TCP_STATES),
    fins=st.integers(0, 3),
    service_port=st.integers(1, 65535),
    client_ip=st.integers(0, 2**32 - 1),
    client_port=st.integers(0, 65535),
    backend_ip=st.integers(0, 2**32 - 1),
    backend_port=st.integers(1, 65535),
    nat_port=st.integers(1, 65535),
    wscale=st.integers(0, 255),
    created=st.integers(0, 2**32 - 1),
    proxy_flags=st.integers(0, 127),  # bit 7 is no flag of a row's
    seq_offset=st.integers(0, 2**32 - 1),
    proxy_window=st.integers(0, 30),  # a window shift (-15..15) + 15
) | st.builds(
    RowRecord,
    proto=st.just(17),
    state=st.sampled_from(UDP_STATES),
    fins=st.just(0),
    service_port=st.integers(1, 65535),
    client_ip=st.integers(0, 2**32 - 1),
    client_port=st.integers(0, 65535),
    backend_ip=st.integers(0, 2**32 - 1),
    backend_port=st.integers(1, 65535),
    nat_port=st.integers(1, 65535),
    wscale=st.just(0),
    created=st.integers(0, 2**32 - 1),
)
ipv6_addresses = st.integers(0, 2**128 - 1).map(lambda low: addresses.V6 | low)
ipv6_records = st.builds(  # IPv6 rows (both sides IPv6, or NAT64): never SYN-proxied
    RowRecord,
    proto=st.sampled_from([6, 17]),
    state=st.just(State.ESTABLISHED),
    fins=st.integers(0, 3),
    service_port=st.integers(1, 65535),
    client_ip=ipv6_addresses,
    client_port=st.integers(0, 65535),
    backend_ip=ipv6_addresses | st.integers(0, 2**32 - 1),
    backend_port=st.integers(1, 65535),
    nat_port=st.integers(1, 65535),
    wscale=st.integers(0, 255),
    created=st.integers(0, 2**32 - 1),
).map(lambda r: r if r.proto == 6 else dataclasses.replace(r, state=State.UDP_REPLIED, fins=0))
records = records | ipv6_records


@given(st.binary(min_size=64, max_size=64) | st.binary(min_size=40, max_size=40) | st.binary())
def test_decode_never_raises_but_value_error_on_any_bytes(data: bytes) -> None:
    try:
        record = decode_record(data)
    except ValueError:
        return
    assert record is None or decode_record(encode_record(record)) == record


@given(records)
def test_a_record_comes_back_as_it_was_written(record: RowRecord) -> None:
    data = encode_record(record)
    assert len(data) == RECORD_SIZE
    assert decode_record(data) == record


@given(records, st.integers(0, 31) | st.integers(40, 63), st.integers(1, 255))
def test_a_changed_byte_of_the_fixed_part_or_its_crc_is_caught(
    record: RowRecord, at: int, flip: int
) -> None:
    data = bytearray(encode_record(record))
    data[at] ^= flip
    if at == 0 and data[0] == 0:
        assert decode_record(bytes(data)) is None  # the slot reads as free: harmless
    else:
        with pytest.raises(ValueError):
            decode_record(bytes(data))


@given(records, st.integers(32, 34), st.integers(0, 255))
def test_a_moving_byte_reads_as_a_state_the_row_could_be_in_or_is_refused(
    record: RowRecord, at: int, value: int
) -> None:
    """What a kill in mid-write of a state change can leave: never a traceback, never another
    row, at worst a record refused."""
    data = bytearray(encode_record(record))
    data[at] = value
    try:
        decoded = decode_record(bytes(data))
    except ValueError:
        return
    assert decoded is not None
    assert dataclasses.replace(decoded, state=record.state, fins=0, wscale=0) == (
        dataclasses.replace(record, fins=0, wscale=0)
    )
    assert decoded.state in (TCP_STATES if record.proto == 6 else UDP_STATES)


def test_a_change_of_state_writes_only_the_three_moving_bytes() -> None:
    lab = EngineHarness()
    attached(lab, buffer := new_buffer())
    flow = lab.flow(CLIENT1, 40000)
    flow.syn(options=[("WScale", 7)])
    before = buffer.tobytes()
    flow.synack(options=[("WScale", 9)])
    after = buffer.tobytes()
    at = HEADER_SIZE
    changed = [i - at for i in range(len(before)) if before[i] != after[i]]
    assert changed and set(changed) <= {32, 33, 34}
    row = flow.session
    assert row is not None
    assert decode_record(after[at : at + RECORD_SIZE]) == record_of(row)


# --- the records rows leave -----------------------------------------------------------------------


def records_in(checkpoint: RowCheckpoint) -> dict[int, RowRecord]:
    found = {}
    for slot in checkpoint.used_slots():
        record = checkpoint.record(slot)
        assert record is not None
        found[slot] = record
    return found


def test_rows_write_their_record_on_open_and_state_change_and_clear_it_on_removal() -> None:
    lab = EngineHarness(timeouts=Timeouts(time_wait=5.0))
    checkpoint = attached(lab, buffer := new_buffer())
    flow = lab.flow(CLIENT1, 40000)
    flow.syn(options=[("WScale", 7)])
    row = flow.session
    assert row is not None and row.slot == 0
    assert records_in(checkpoint) == {0: record_of(row)}
    assert records_in(checkpoint)[0].state == State.SYN_SENT
    assert records_in(checkpoint)[0].wscale == (7 << 4) | 15  # written after the SYN's tracking
    flow.synack(options=[("WScale", 9)])
    assert records_in(checkpoint)[0].state == State.SYN_RECV
    assert records_in(checkpoint)[0].wscale == (7 << 4) | 9
    flow.ack()
    flow.data_c()
    flow.data_s()
    assert records_in(checkpoint) == {0: record_of(row)}
    assert records_in(checkpoint)[0].state == State.ESTABLISHED
    flow.fin_c()
    assert (records_in(checkpoint)[0].state, records_in(checkpoint)[0].fins) == (State.FIN_WAIT, 1)
    flow.fin_s()
    assert records_in(checkpoint)[0].state == State.TIME_WAIT
    lab.advance(10.0)  # the linger runs out: the row goes, and its record
    assert flow.session is None and records_in(checkpoint) == {} and len(checkpoint) == 0
    assert buffer[HEADER_SIZE] == 0


def test_a_freed_slot_is_reused_first_and_the_high_water_mark_is_kept() -> None:
    lab = EngineHarness(timeouts=Timeouts(syn_sent=5.0))
    checkpoint = attached(lab, buffer := new_buffer())
    lab.flow(CLIENT1, 40000).syn()
    lab.advance(1.0)
    lab.flow(CLIENT1, 40001).syn()
    lab.advance(4.5)  # the first flow's SYN_SENT timeout is over
    assert len(checkpoint) == 1 and checkpoint.high_water == 2
    flow = lab.flow(CLIENT2, 40002)
    flow.syn()
    assert flow.session is not None and flow.session.slot == 0
    assert int.from_bytes(buffer[12:16], "little") == 2  # the header's high water mark


def test_a_write_is_exactly_the_encoded_record() -> None:
    lab = EngineHarness()
    checkpoint = attached(lab, buffer := new_buffer())
    flow = lab.flow(CLIENT1, 40000)
    flow.syn()
    flow.synack()
    flow.ack()
    row = flow.session
    assert row is not None
    at = HEADER_SIZE + row.slot * RECORD_SIZE
    assert buffer[at : at + RECORD_SIZE].tobytes() == encode_record(record_of(row))
    assert len(checkpoint) == 1


def test_a_buffer_smaller_than_the_table_counts_the_rows_it_cannot_hold() -> None:
    lab = EngineHarness()
    checkpoint = attached(lab, new_buffer(2))
    for port in range(40000, 40004):
        assert lab.flow(CLIENT1, port).syn().forwarded  # forwarding does not depend on it
    assert len(checkpoint) == 2 and checkpoint.full == 2


def test_a_format_1_buffer_is_converted_in_place_and_its_rows_restored() -> None:
    """An lbnat before IPv6 left 40-byte slots (a --state-file's row file): this one moves them
    to 64-byte slots, last first, and restores them as its own."""
    original = EngineHarness()
    attached(original, buffer := new_buffer())
    flows = [established(original, CLIENT2, port) for port in (40000, 40001, 40002)]
    middle = flows[1].session
    assert middle is not None
    original.table.remove(middle)  # a free slot in the middle
    old = memoryview(bytearray(len(buffer)))  # the same rows, as format 1 wrote them
    old[:HEADER_SIZE] = struct.pack("<8sHHI48x", b"lbnatrow", 1, 40, 3)
    for slot in range(3):
        record = buffer[HEADER_SIZE + slot * RECORD_SIZE : HEADER_SIZE + slot * RECORD_SIZE + 40]
        old[HEADER_SIZE + slot * 40 : HEADER_SIZE + (slot + 1) * 40] = record
    assert records_below(old[:HEADER_SIZE].tobytes()) == 0  # not this format's, until opened
    checkpoint = RowCheckpoint(old)
    assert old[8:12].tobytes() == struct.pack("<HH", 2, 64) and checkpoint.used_slots() == [0, 2]
    assert old.tobytes() == buffer.tobytes()
    lab = restored(old)
    assert report(lab).rows == 2 and report(lab).dropped == {}


def test_a_buffer_of_another_layout_is_started_afresh() -> None:
    buffer = new_buffer()
    buffer[:8] = b"somethin"
    buffer[HEADER_SIZE] = 1
    checkpoint = RowCheckpoint(buffer)
    assert buffer[:8].tobytes() == b"lbnatrow" and checkpoint.high_water == 0
    assert checkpoint.used_slots() == []
    with pytest.raises(ValueError, match="at least 64 bytes"):
        RowCheckpoint(memoryview(bytearray(10)))
    with pytest.raises(ValueError, match="writable"):
        RowCheckpoint(memoryview(bytes(100)))


# --- restore ----------------------------------------------------------------------------------


def established(lab: EngineHarness, client: str, port: int) -> Flow:
    flow = lab.flow(client, port)
    flow.syn(options=[("WScale", 7)])
    flow.synack(options=[("WScale", 8)])
    flow.ack()
    flow.data_c()
    flow.data_s()
    return flow


def state_of(flow: Flow) -> State | None:
    """The flow's state, read afresh (an assert on `flow.state` narrows it for mypy)."""
    return flow.state


def twin_of(flow: Flow, lab: EngineHarness) -> Flow:
    """The same connection (its sequence numbers where they are) seen through `lab`."""
    twin = copy.copy(flow)
    twin.lab, twin.results = lab, []
    return twin


def tcp_in(state: State) -> Callable[[EngineHarness], Flow]:
    """A builder of one TCP flow left in `state`."""

    def build(lab: EngineHarness) -> Flow:
        flow = lab.flow(CLIENT1, 41000)
        flow.syn(options=[("WScale", 7)])
        if state is not State.SYN_SENT:
            flow.synack(options=[("WScale", 8)])
        if state not in (State.SYN_SENT, State.SYN_RECV):
            flow.ack()
            flow.data_c()
        if state in (State.FIN_WAIT, State.TIME_WAIT):
            flow.fin_c()
        if state is State.TIME_WAIT:
            flow.fin_s()
        if state is State.CLOSE:
            flow.data_s()
            flow.rst_c()
        assert flow.state is state
        return flow

    return build


# (the state to leave a flow in, the next packets after the restore: one per step)
NEXT_PACKETS: list[tuple[State, list[str]]] = [
    (State.SYN_SENT, ["synack", "ack", "data_c", "data_s"]),
    (State.SYN_RECV, ["ack", "data_c", "data_s"]),
    (State.ESTABLISHED, ["data_c", "data_s", "fin_s", "fin_c", "ack"]),
    (State.FIN_WAIT, ["data_s", "fin_s", "ack"]),
    (State.TIME_WAIT, ["ack"]),
    (State.CLOSE, ["data_s"]),
]


@pytest.mark.parametrize(("state", "steps"), NEXT_PACKETS, ids=[s.name for s, _ in NEXT_PACKETS])
@pytest.mark.parametrize("partial", [False, True], ids=["complete", "partial"])
def test_a_restored_tcp_row_forwards_the_next_packets_as_the_original_did(
    state: State, steps: list[str], partial: bool
) -> None:
    original = EngineHarness(partial=partial)
    attached(original, buffer := new_buffer())
    for port in (40000, 40001, 40002):  # rows on other backends and NAT ports around it
        established(original, CLIENT2, port)
    flow = tcp_in(state)(original)
    row = flow.session
    assert row is not None

    lab = restored(buffer, lab=EngineHarness(partial=partial))
    twin = twin_of(flow, lab)
    again = twin.session
    assert again is not None and again is not row
    assert (again.state, again.nat_port, again.backend, again.wscale, again.fins) == (
        row.state, row.nat_port, row.backend, row.wscale, row.fins,
    )  # fmt: skip
    assert report(lab).rows == 4
    for step in steps:
        mine = getattr(flow, step)()
        theirs = getattr(twin, step)()
        assert (theirs.action, bytes(theirs.out)) == (mine.action, bytes(mine.out)), step
        assert twin.state == flow.state, step
        check_table(lab.table)


@pytest.mark.parametrize("replied", [False, True])
def test_a_restored_udp_row_forwards_as_the_original_did(replied: bool) -> None:
    original = EngineHarness()
    attached(original, buffer := new_buffer())
    flow = original.udp_flow(CLIENT1, 5000)
    assert flow.request(b"q1").forwarded
    if replied:
        assert flow.reply(b"a1").forwarded
    lab = restored(buffer)
    twin = UdpFlow(lab, CLIENT1, 5000, flow.backend, flow.nat_port)
    assert twin.state == flow.state
    for send in ("request", "reply"):
        mine, theirs = getattr(flow, send)(), getattr(twin, send)()
        assert (theirs.action, bytes(theirs.out)) == (mine.action, bytes(mine.out))
    assert twin.state == State.UDP_REPLIED


def test_restore_counts_flows_keeps_ended_rows_ended_and_new_flows_take_free_ports() -> None:
    original = EngineHarness()
    attached(original, buffer := new_buffer())
    flows = [established(original, CLIENT1, port) for port in range(40000, 40006)]
    tcp_in(State.TIME_WAIT)(original)
    original.advance(0.5)
    lab = restored(buffer, now=100.0)
    assert report(lab) == RestoreReport(rows=7, open_flows=6)
    assert lab.table.open_flows == 6 and len(lab.table.closed) == 1
    assert lab.engine.packets == 0  # nothing forwarded yet
    held = {(r.backend.key, r.nat_port) for r in lab.table}
    for port in range(42000, 42010):  # new flows: fresh NAT ports, never a held one
        new = lab.flow(CLIENT2, port)
        assert new.syn().forwarded
        session = new.session
        assert session is not None and (session.backend.key, session.nat_port) not in held
    check_table(lab.table)
    assert all(twin.session is not None for twin in (lab.flow(f.client, f.port) for f in flows))


def test_timeouts_restart_from_the_restore_time() -> None:
    original = EngineHarness(timeouts=Timeouts(established=30.0))
    attached(original, buffer := new_buffer())
    established(original, CLIENT1, 40000)
    original.advance(25.0)  # 5 s before its original deadline
    lab = restored(buffer, 1000.0, EngineHarness(timeouts=Timeouts(established=30.0)))
    lab.advance(20.0)
    assert len(lab.table) == 1
    lab.advance(11.0)
    assert len(lab.table) == 0 and [type(e).__name__ for e in lab.events()] == ["FlowEnded"]


def test_a_rst_is_ignored_and_counted_until_the_peer_has_acked_again() -> None:
    original = EngineHarness()
    attached(original, buffer := new_buffer())
    flow = established(original, CLIENT1, 40000)
    lab = restored(buffer)
    twin = twin_of(flow, lab)
    session = twin.session
    assert session is not None and session.ack_c == session.ack_s == UNKNOWN_ACK
    assert twin.rst_c().forwarded  # forwarded (the backend decides), the row stays
    assert twin.state is State.ESTABLISHED and lab.table.rst_ignored == 1
    twin.data_s()  # the backend's ACK: what a client RST is checked against
    assert twin.rst_c().forwarded
    assert state_of(twin) is State.CLOSE


def test_a_refusal_of_a_restored_syn_is_ignored_and_counted() -> None:
    original = EngineHarness()
    attached(original, buffer := new_buffer())
    flow = original.flow(CLIENT1, 40000)
    flow.syn()
    lab = restored(buffer)
    twin = twin_of(flow, lab)
    assert twin.refuse().forwarded
    assert twin.state is State.SYN_SENT and lab.table.rst_ignored == 1


def test_a_reset_of_restored_rows_sends_only_the_rsts_it_can_aim() -> None:
    original = EngineHarness()
    attached(original, buffer := new_buffer())
    flow = established(original, CLIENT1, 40000)
    lab = restored(buffer)
    twin = twin_of(flow, lab)
    # The client's ACK is known again (what it expects next, a RST to it carries that); the
    # backend's is not: a RST to the backend would be a guess.
    twin.data_c()
    assert twin.backend is not None
    packets = lab.engine.reset_flows("web", (twin.backend, 8080), lab.now)
    assert [hop for _, hop in packets] == [addr(CLIENT1)]
    assert len(lab.table) == 0


def test_records_of_gone_services_and_backends_are_dropped_counted_and_cleared() -> None:
    original = EngineHarness()
    attached(original, buffer := new_buffer())
    flows = [established(original, CLIENT1, port) for port in range(40000, 40006)]
    udp = original.udp_flow(CLIENT2, 5353)
    udp.request()
    # A reload removed the UDP service and the third backend.
    backends = tuple(tcp_backends(2))
    lab = EngineHarness()
    lab.engine = Engine(LB, [Service("web", "tcp", 80, "rr", 0.0, backends)])
    report = restore(lab.engine, checkpoint := RowCheckpoint(buffer), 0.0)
    assert report.dropped == {"no_service": 1, "no_backend": 2} and report.dropped_total == 3
    assert report.rows == report.open_flows == 4 == len(lab.engine.table)
    assert len(checkpoint) == 4 and len(checkpoint.used_slots()) == 4
    assert {f.backend for f in flows} == {"198.18.0.21", "198.18.0.22", "198.18.0.23"}
    check_table(lab.engine.table)
    # The freed slots are handed out again.
    lab2 = EngineHarness()
    lab2.engine = lab.engine
    new = lab2.flow(CLIENT2, 45000)
    assert new.syn().forwarded and new.session is not None and new.session.slot < 7


def test_torn_and_foreign_records_are_dropped_the_rest_restored() -> None:
    original = EngineHarness()
    checkpoint = attached(original, buffer := new_buffer())
    for port in range(40000, 40004):
        established(original, CLIENT1, port)
    torn = HEADER_SIZE + 1 * RECORD_SIZE + 10
    buffer[torn] ^= 0xFF  # a kill in mid-write
    assert checkpoint.record(0) is not None
    # Slots 0-2 hold NAT port 61000 (one on each backend), slot 3 port 61001; 61000 is not
    # this engine's port any more, and slot 1 is torn.
    lab = restored(buffer, lab=EngineHarness(nat_ports=(61001, 65535)))
    assert report(lab).dropped == {"torn": 1, "conflict": 2}
    assert report(lab).rows == 1
    assert RowCheckpoint(buffer).used_slots() == [3]  # the dropped records are cleared


def test_the_records_a_restore_will_look_at_are_read_from_the_header() -> None:
    original = EngineHarness()
    attached(original, buffer := new_buffer())
    assert records_below(buffer[:HEADER_SIZE].tobytes()) == 0
    for port in range(40000, 40003):
        original.flow(CLIENT1, port).syn()
    assert records_below(buffer[:HEADER_SIZE].tobytes()) == 3
    assert records_below(bytes(HEADER_SIZE)) == records_below(b"") == 0


def test_a_fresh_buffer_restores_nothing() -> None:
    lab = restored(new_buffer())
    assert report(lab) == RestoreReport()
    assert len(lab.table) == 0
    assert lab.flow().syn().action[0] == FORWARD


def test_evicting_a_restored_half_open_row_sends_no_rst_it_cannot_aim() -> None:
    """A restored row does not know the client's ISN (its ACKs are picked up later): evicting
    it sends no RST (the backend's half-open connection times out) and raises nothing."""
    buffer = new_buffer()
    original = EngineHarness(1, cap=1)
    attached(original, buffer)
    assert original.flow(CLIENT1, 40000).syn().forwarded
    twin = restored(buffer, 1.0, EngineHarness(1, cap=1))
    assert report(twin).rows == 1
    result = twin.flow(CLIENT2, 40001).syn()
    assert result.kind == FORWARD and result.sent_first == []
    assert twin.table.evicted == 1
    check_table(twin.table)
