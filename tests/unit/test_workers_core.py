"""The pure parts of the worker model: shared round-robin turns, merged counters, messages."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnat.backends import Backend, Health
from lbnat.checkpoint import RestoreReport, restore
from lbnat.dataplane.link import Link
from lbnat.dataplane.rings import RingSpec
from lbnat.dataplane.workers import (
    MessageReader,
    RowMemory,
    SharedCursors,
    WorkerError,
    WorkerProcess,
    map_checkpoint,
    send_message,
)
from lbnat.engine import NoBackend
from lbnat.messages import (
    Answer,
    ApplyChange,
    Ask,
    AskActive,
    AskCounters,
    Events,
    Ready,
    ResetBackend,
    SetBackends,
    Stop,
    WorkerFailed,
    WorkerSetup,
)
from lbnat.nat import Timeouts
from lbnat.scheduler import RoundRobin
from lbnat.views import answer, apply_change, merge_counters
from tests.unit.fixtures import CLIENT1, EngineHarness

B = (Backend("198.18.0.21", 9000), Backend("198.18.0.22", 9000), Backend("198.18.0.23", 9000))


class Word:
    """A SharedCursor in plain memory (the workers map a memfd)."""

    def __init__(self) -> None:
        self.value = 0

    def load(self) -> int:
        return self.value

    def store(self, value: int) -> None:
        self.value = value


def pick(scheduler: RoundRobin) -> str:
    backend = scheduler.pick(0, {})
    assert backend is not None
    return backend.ip[-2:]


@given(st.lists(st.integers(0, 2), min_size=1, max_size=30))
def test_workers_sharing_a_cursor_take_one_global_turn(workers: list[int]) -> None:
    """Whichever worker opens each new flow, the backends come round in order."""
    word = Word()
    schedulers = [RoundRobin(word) for _ in range(3)]
    for scheduler in schedulers:
        scheduler.update(B)
    picked = [pick(schedulers[w]) for w in workers]
    expected = [("21", "22", "23")[i % 3] for i in range(len(workers))]
    assert picked == expected


def test_without_a_shared_cursor_each_worker_turns_alone() -> None:
    a, b = RoundRobin(), RoundRobin()
    a.update(B)
    b.update(B)
    assert [pick(a), pick(b), pick(a), pick(b)] == ["21", "21", "22", "22"]


def test_a_shared_turn_skips_a_dead_backend_and_survives_snapshots() -> None:
    word = Word()
    a, b = RoundRobin(word), RoundRobin(word)
    for s in (a, b):
        s.update(B)
    assert pick(a) == "21"
    dead = (B[0], Backend("198.18.0.22", 9000, health=Health.DEAD), B[2])
    for s in (a, b):
        s.update(dead)
    assert pick(b) == "23"
    assert pick(a) == "21"
    for s in (a, b):
        s.update(B)
    assert pick(b) == "22"


def test_counters_of_workers_add_up_key_by_key() -> None:
    one = {
        "rows": 2, "open_flows": 1, "packets": 10, "drops": {"no_session": 1},
        "services": {"web": {"flows": 2, "drops": {}, "backends": {("b", 1): {"active": 1}}}},
    }  # fmt: skip
    two = {
        "rows": 3, "open_flows": 3, "packets": 5, "drops": {"no_session": 2, "fragment": 1},
        "services": {"web": {"flows": 3, "drops": {}, "backends": {("b", 1): {"active": 2},
                                                                   ("c", 1): {"active": 1}}}},
    }  # fmt: skip
    total = merge_counters([one, two])
    assert total["rows"] == 5 and total["open_flows"] == 4 and total["packets"] == 15
    assert total["drops"] == {"no_session": 3, "fragment": 1}
    assert total["services"]["web"]["flows"] == 5
    assert total["services"]["web"]["backends"] == {
        ("b", 1): {"active": 3},
        ("c", 1): {"active": 1},
    }
    assert merge_counters([]) == {"rows": 0, "open_flows": 0, "packets": 0, "drops": {},
                                  "services": {}}  # fmt: skip


class Pipe:
    def __init__(self) -> None:
        self.data = b""

    def sendall(self, data: bytes) -> None:
        self.data += data


@given(st.lists(st.tuples(st.text(max_size=5), st.integers()), max_size=5), st.integers(1, 7))
def test_messages_survive_any_split_of_the_stream(messages: list[object], step: int) -> None:
    pipe = Pipe()
    for message in messages:
        send_message(pipe, message)  # type: ignore[arg-type]
    reader = MessageReader()
    got: list[object] = []
    for i in range(0, len(pipe.data), step):
        got += reader.feed(pipe.data[i : i + step])
    assert got == messages


SETUP_FREE_MESSAGES: list[object] = [
    ApplyChange(SetBackends("web", B)),
    ApplyChange(ResetBackend("web", B[0].key)),
    Ask(1, AskCounters()),
    Ask(2, AskActive((("web", B[1].key),))),
    Stop(),
    Ready(1234),
    Ready(1235, RestoreReport(rows=3, open_flows=2, dropped={"no_backend": 1})),
    WorkerFailed("cannot open its rings"),
    Events([NoBackend("web", ("198.18.0.11", 40000))]),
    Answer(2, True, {("web", B[1].key): 3}),
]


def test_typed_messages_cross_the_wire_equal_and_typed() -> None:
    pipe = Pipe()
    for message in SETUP_FREE_MESSAGES:
        send_message(pipe, message)  # type: ignore[arg-type]
    got = MessageReader().feed(pipe.data)
    assert got == SETUP_FREE_MESSAGES
    assert [type(m) for m in got] == [type(m) for m in SETUP_FREE_MESSAGES]


def test_an_engine_refuses_what_is_not_a_change_or_a_question() -> None:
    harness = EngineHarness()
    with pytest.raises(ValueError, match="unknown change"):
        apply_change(harness.engine, ("backends", "web", ()), 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown question"):
        answer(harness.engine, ("counters",), 0.0)  # type: ignore[arg-type]
    assert answer(harness.engine, AskCounters(), 0.0)["rows"] == 0


def test_a_worker_that_fails_before_it_is_ready_fails_its_start() -> None:
    """A real worker process (no root: its "packet socket" is one end of a socketpair) that
    cannot build its engine says why and exits; start() raises with its reason instead of
    returning as if it were forwarding."""
    packet_end, other_end = socket.socketpair()
    cursors = SharedCursors()
    worker = WorkerProcess(0, packet_end, cursors, lambda index, events: None)
    setup = WorkerSetup(
        index=0,
        lb_ip="198.18.0.2",
        vip="198.18.0.2",
        link=Link("lo", "198.18.0.2", ipaddress.IPv4Network("198.18.0.0/24"), bytes(6)),
        specs=(),
        nat_ports=(65000, 61000),  # backwards: the engine refuses it
        timeouts=Timeouts(),
        table_cap=10,
        io="socket",
        rings=RingSpec(),
        flow_events=False,
    )
    try:
        with pytest.raises(WorkerError, match="worker 0 did not start: bad NAT port range"):
            worker.start(setup)
        assert not worker.alive
    finally:
        worker.close()
        cursors.close()
        packet_end.close()
        other_end.close()


def test_a_workers_row_memory_outlives_the_worker_but_not_lbnat() -> None:
    """Two mappings of one RowMemory stand for a worker and its restarted successor: the second
    restores the first one's rows. A new RowMemory (a restarted lbnat) holds nothing."""
    memory = RowMemory(0, rows=100)
    try:
        assert memory.records() == 0
        first = EngineHarness()
        restore(first.engine, map_checkpoint(memory.fd), 0.0)
        for port in range(40000, 40005):
            assert first.flow(CLIENT1, port).syn().forwarded
        assert memory.records() == 5
        second = EngineHarness()
        report = restore(second.engine, map_checkpoint(memory.fd), 1.0)
        assert report == RestoreReport(rows=5, open_flows=5)
        assert {r.nat_port for r in second.table} == {r.nat_port for r in first.table}
    finally:
        memory.close()
    fresh = RowMemory(0, rows=100)
    try:
        assert fresh.records() == 0
        assert restore(EngineHarness().engine, map_checkpoint(fresh.fd), 2.0) == RestoreReport()
    finally:
        fresh.close()
