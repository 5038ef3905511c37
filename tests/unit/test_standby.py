"""Tests for lbnat.standby: what an engine's journal sends its peer, and the peer's rows applied
to another engine as standby rows, which then forward the flow's next packets exactly as the
original rows did. Every record goes through the wire format (lbnat.syncwire encode, decode,
apply_records) on its way, as between two lbnats.

    master (EngineHarness + Standby) ── drain ── encode ── decode ── apply ──► backup (the same)
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnat.nat import State, Timeouts
from lbnat.standby import GRACE, Standby, SyncRecords, row_key
from lbnat.syncwire import (
    EndRows,
    InstallRows,
    MarkStale,
    Message,
    MessageType,
    RefreshRows,
    ResyncComplete,
    RowEnd,
    RowKey,
    RowRefresh,
    RowUpdate,
    apply_records,
    decode,
    encode,
)
from tests.unit.fixtures import CLIENT1, CLIENT2, EngineHarness, Flow, check_table
from tests.unit.test_checkpoint import NEXT_PACKETS, established, tcp_in, twin_of

SECRET = b"pair"
PEER = 0x01020304


def node(
    worker: int = 0, backends: int = 3, nat_ports: tuple[int, int] = (61000, 65535),
    timeouts: Timeouts | None = None,
) -> tuple[EngineHarness, Standby]:  # fmt: skip
    lab = EngineHarness(backends, nat_ports=nat_ports, timeouts=timeouts)
    return lab, Standby(lab.engine, worker)


def relay(records: SyncRecords, to: Standby, now: float) -> None:
    """`records` over the wire, applied at `to` (as the sync node does for a backup)."""
    if not records.records:
        return
    for datagram in encode(
        MessageType.UPDATE, records.records, sender=PEER, epoch=1, seq=0,
        clock=math.floor(now), secret=SECRET,
    ):  # fmt: skip
        message = decode(datagram, SECRET, {PEER})
        assert isinstance(message, Message)
        for effect in apply_records(message):
            assert isinstance(effect, InstallRows | EndRows | RefreshRows)
            to.apply(effect, now)
    check_table(to.engine.table, GRACE)


def sync(master: tuple[EngineHarness, Standby], backup: tuple[EngineHarness, Standby]) -> None:
    lab, standby = master
    relay(standby.journal.drain(lab.now), backup[1], backup[0].now)


def rows_of(lab: EngineHarness) -> set[tuple[int, int, State]]:
    return {(s.key, s.nat_port, s.state) for s in lab.table.forward.values()}


# --- what the journal sends ---------------------------------------------------------------


def test_a_handshake_is_not_sent_an_established_row_is_once_per_batch() -> None:
    lab, standby = node()
    flow = lab.flow(CLIENT1, 41000)
    flow.syn()
    flow.synack()
    assert not standby.journal.pending  # a SYN flood's rows never reach the wire
    flow.ack()
    flow.data_c()
    flow.fin_c()  # ESTABLISHED, then FIN_WAIT, in one batch
    records = standby.journal.drain(lab.now).records
    assert [type(r) for r in records] == [RowUpdate]
    update = records[0]
    assert isinstance(update, RowUpdate)
    assert (update.row.state, update.worker, update.idle) == (State.FIN_WAIT, 0, 0)
    assert standby.journal.drain(lab.now).records == ()


def test_a_row_that_goes_in_its_batch_is_only_an_end_and_ends_go_first() -> None:
    lab, standby = node()
    gone = established(lab, CLIENT1, 41000)
    standby.journal.drain(lab.now)
    session = gone.session
    assert session is not None
    lab.table.remove(session)
    established(lab, CLIENT2, 41001)
    records = standby.journal.drain(lab.now).records
    assert [type(r) for r in records] == [RowEnd, RowUpdate]


def test_a_row_found_alive_when_it_comes_due_is_refreshed() -> None:
    lab, standby = node(timeouts=Timeouts(established=100.0))
    flow = established(lab, CLIENT1, 41000)
    standby.journal.drain(lab.now)
    lab.now = 60.0
    flow.data_c()  # seen again: at 100 s the row is re-filed, not removed
    lab.engine.tick(100.5)
    records = standby.journal.drain(100.5).records
    assert records and isinstance(records[0], RowRefresh)
    assert records[0].idle == 40


# --- the backup's rows ----------------------------------------------------------------------


@pytest.mark.parametrize(("state", "steps"), NEXT_PACKETS, ids=[s.name for s, _ in NEXT_PACKETS])
def test_a_standby_row_forwards_the_next_packets_as_the_original_did(
    state: State, steps: list[str]
) -> None:
    master, backup = node(), node()
    for port in (40000, 40001):
        established(master[0], CLIENT2, port)
    flow = tcp_in(state)(master[0])
    sync(master, backup)
    if state in (State.SYN_SENT, State.SYN_RECV):
        assert flow.session is not None and twin_of(flow, backup[0]).session is None
        return  # not synced: the client retransmits its SYN to the new master
    twin = twin_of(flow, backup[0])
    row, again = flow.session, twin.session
    assert row is not None and again is not None
    assert (again.state, again.nat_port, again.backend, again.wscale, again.fins) == (
        row.state, row.nat_port, row.backend, row.wscale, row.fins,
    )  # fmt: skip
    assert backup[1].counts["installed"] == 3
    assert not backup[1].journal.pending  # nothing is echoed back
    for step in steps:
        mine, theirs = getattr(flow, step)(), getattr(twin, step)()
        assert (theirs.action, bytes(theirs.out)) == (mine.action, bytes(mine.out)), step
        assert twin.state == flow.state, step


def test_a_standby_row_follows_its_original_state_and_end() -> None:
    master, backup = node(), node()
    flow = established(master[0], CLIENT1, 41000)
    sync(master, backup)
    flow.fin_c()
    flow.fin_s()
    sync(master, backup)
    assert rows_of(backup[0]) == rows_of(master[0])
    assert twin_of(flow, backup[0]).state is State.TIME_WAIT
    session = flow.session
    assert session is not None
    master[0].table.remove(session)
    sync(master, backup)
    assert rows_of(backup[0]) == set()
    assert backup[1].counts["ended"] == 1


def test_a_standby_row_outlives_its_original_by_the_grace_unless_refreshed() -> None:
    timeouts = Timeouts(established=100.0)
    master, backup = node(timeouts=timeouts), node(timeouts=timeouts)
    flow = established(master[0], CLIENT1, 41000)
    sync(master, backup)
    backup[0].engine.tick(100.0 + GRACE - 1)
    assert twin_of(flow, backup[0]).session is not None
    backup[0].engine.tick(100.0 + GRACE + 1)
    assert twin_of(flow, backup[0]).session is None  # its peer is gone: no refresh came

    master2, backup2 = node(timeouts=timeouts), node(timeouts=timeouts)
    flow = established(master2[0], CLIENT1, 41000)
    sync(master2, backup2)
    master2[0].now = 60.0
    flow.data_c()
    master2[0].engine.tick(100.5)  # due, alive: refreshed
    backup2[0].now = 100.5
    relay(master2[1].journal.drain(100.5), backup2[1], 100.5)
    backup2[0].engine.tick(100.0 + GRACE + 1)
    assert twin_of(flow, backup2[0]).session is not None
    backup2[0].engine.tick(160.0 + GRACE + 1)
    assert twin_of(flow, backup2[0]).session is None
    assert backup2[1].counts["refreshed"] == 1


def test_a_resync_sweeps_the_rows_it_did_not_confirm() -> None:
    master, backup = node(), node()
    kept = established(master[0], CLIENT1, 41000)
    lost = established(master[0], CLIENT1, 41001)
    sync(master, backup)
    session = lost.session
    assert session is not None
    master[0].table.remove(session)
    master[1].journal.drain(master[0].now)  # its END is lost on the way
    backup[1].apply(MarkStale(PEER), 1.0)
    relay(SyncRecords(0, tuple(master[1].bulk(1.0))), backup[1], 1.0)
    backup[1].apply(ResyncComplete(PEER), 1.0)
    assert twin_of(kept, backup[0]).session is not None
    assert twin_of(lost, backup[0]).session is None
    assert backup[1].counts["swept"] == 1


def test_an_end_of_an_older_row_of_the_same_client_socket_leaves_the_newer_one() -> None:
    master, backup = node(), node()
    flow = established(master[0], CLIENT1, 41000)
    sync(master, backup)
    row = flow.session
    assert row is not None
    key = row_key(row)
    older = RowKey(key.proto, key.service_port, key.client_ip, key.client_port, key.nat_port + 1)
    relay(SyncRecords(0, (RowEnd(older),)), backup[1], 0.0)
    assert twin_of(flow, backup[0]).session is not None
    assert backup[1].counts["ended"] == 0


def test_rows_of_another_worker_are_skipped_and_a_misfit_is_counted() -> None:
    master = node(worker=0, nat_ports=(61000, 62999))
    backup1 = node(worker=1, nat_ports=(63000, 65535))  # the other slice: not its rows
    backup0 = node(worker=1, nat_ports=(61000, 62999))  # its slice, another worker's number
    flow = established(master[0], CLIENT1, 41000)
    records = master[1].journal.drain(0.0)
    relay(records, backup1[1], 0.0)
    relay(records, backup0[1], 0.0)
    assert twin_of(flow, backup1[0]).session is None and not backup1[1].counts
    assert twin_of(flow, backup0[0]).session is None and backup0[1].counts["misfit"] == 1


def test_a_peer_port_given_to_another_flow_replaces_the_holder() -> None:
    one_port = (61000, 61000)  # one backend, one port: the next flow takes it again
    master, backup = node(backends=1, nat_ports=one_port), node(backends=1, nat_ports=one_port)
    first = established(master[0], CLIENT1, 41000)
    sync(master, backup)
    row = first.session
    assert row is not None
    port = row.nat_port
    # The backup's copy of the first flow holds `port`; the master ends it and reuses the
    # port for another client (its END lost), the backup must follow the master.
    master[0].table.remove(row)
    master[1].journal.drain(0.0)
    second = established(master[0], CLIENT2, 42000)
    assert second.session is not None and second.session.nat_port == port
    sync(master, backup)
    assert twin_of(second, backup[0]).session is not None
    assert twin_of(first, backup[0]).session is None


# --- a property: the backup holds what the master holds -------------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["open", "fin", "rst", "remove", "sync"]), st.integers(0, 5)),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_after_each_sync_the_backup_holds_exactly_the_masters_synced_rows(
    ops: list[tuple[str, int]],
) -> None:
    master, backup = node(), node()
    flows: dict[int, Flow] = {}
    for op, n in ops:
        flow = flows.get(n)
        session = None if flow is None else flow.session
        if op == "open" and session is None:
            flows[n] = established(master[0], CLIENT1, 41000 + n)
        elif op == "fin" and session is not None and session.state is State.ESTABLISHED:
            assert flow is not None
            flow.fin_c()
        elif op == "rst" and session is not None and session.state is State.ESTABLISHED:
            assert flow is not None
            flow.rst_c()
        elif op == "remove" and session is not None:
            master[0].table.remove(session)
        elif op == "sync":
            sync(master, backup)
            assert rows_of(backup[0]) == rows_of(master[0])
    sync(master, backup)
    assert rows_of(backup[0]) == rows_of(master[0])
    assert not backup[1].journal.pending


def test_a_resync_leaves_the_backup_s_own_handshakes_alone() -> None:
    master, backup = node(), node()
    established(master[0], CLIENT1, 41000)
    backup[0].flow(CLIENT2, 42001).syn()  # to b1, on the port the master's row will claim
    own = backup[0].flow(CLIENT2, 42000)
    own.syn()  # to b2: a handshake the backup holds itself, no bulk could confirm it
    backup[1].apply(MarkStale(PEER), 1.0)
    relay(SyncRecords(0, tuple(master[1].bulk(1.0))), backup[1], 1.0)
    backup[1].apply(ResyncComplete(PEER), 1.0)
    assert own.session is not None and backup[1].counts["swept"] == 0
