"""Tests for lbnat.nat through the Engine with scapy packets: TCP state tracking and timeouts,
RST windows, NAT ports (collisions, exhaustion, recycling), the table cap, UDP, affinity.

The TCP scenarios are a table: each row is a step (who sends what, or a wait), the verdict,
the row's state afterwards and the events it produced. Every forwarded packet is checked by the
harness in fixtures.py (addresses and ports translated, all else untouched, checksums right).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP
from scapy.layers.inet import TCP as ScapyTCP

from lbnat import nat
from lbnat.backends import Health
from lbnat.drops import DropReason
from lbnat.engine import DROP, FORWARD, REPLY
from lbnat.nat import Affinity, EndReason, Refusal, Session, SessionTable, State, Timeouts
from tests.unit.fixtures import (
    BACKEND_IPS,
    CLIENT1,
    CLIENT2,
    LB,
    WEB_BACKEND_PORT,
    EngineHarness,
    Flow,
    Result,
    UdpFlow,
    addr,
    check_table,
    describe_events,
    tcp_backends,
)

SYN_SENT = State.SYN_SENT
SYN_RECV = State.SYN_RECV
ESTABLISHED = State.ESTABLISHED
FIN_WAIT = State.FIN_WAIT
TIME_WAIT = State.TIME_WAIT
CLOSE = State.CLOSE
GONE = None
FWD = "fwd"
NONE = "-"  # a wait: no packet


def state_of(flow: Flow | UdpFlow) -> State | None:
    """The flow's row state, read through a call so type checkers do not pin it."""
    return flow.state


def verdict(result: Result | None) -> str:
    if result is None:
        return NONE
    if result.kind == FORWARD:
        return FWD
    if result.kind == DROP:
        return f"drop {DropReason(result.action[1]).name}"
    assert result.kind == REPLY
    return "reply"


def waiter(seconds: float) -> Callable[[EngineHarness, Flow], Result | None]:
    def wait(lab: EngineHarness, flow: Flow) -> None:
        lab.advance(seconds)

    return wait


STEPS: dict[str, Callable[[EngineHarness, Flow], Result | None]] = {
    "C syn": lambda lab, f: f.syn(),
    "C syn-new": lambda lab, f: f.syn(new_isn=f.c_isn + 100_000),
    "C ack": lambda lab, f: f.ack(),
    "C data": lambda lab, f: f.data_c(7),
    "C fin": lambda lab, f: f.fin_c(),
    "C rst": lambda lab, f: f.rst_c(),
    "C rst-out": lambda lab, f: f.rst_c(in_window=False),
    "S synack": lambda lab, f: f.synack(),
    "S ack": lambda lab, f: f.ack_s(),
    "S data": lambda lab, f: f.data_s(1460),
    "S fin": lambda lab, f: f.fin_s(),
    "S rst": lambda lab, f: f.rst_s(),
    "S rst-out": lambda lab, f: f.rst_s(in_window=False),
    "S refuse": lambda lab, f: f.refuse(),
    "S refuse-bad": lambda lab, f: f.refuse(ack_ok=False),
    "C fin-noflow": lambda lab, f: f.from_client("FA", 1, 1),
    "C rst-noflow": lambda lab, f: f.from_client("R", 1),
}


def step(name: str) -> Callable[[EngineHarness, Flow], Result | None]:
    if name.startswith("wait "):
        return waiter(float(name.split()[1]))
    return STEPS[name]


Step = tuple[str, str, State | None, list[str]]
HANDSHAKE: list[Step] = [
    ("C syn", FWD, SYN_SENT, ["open b1"]),
    ("S synack", FWD, SYN_RECV, []),
    ("C ack", FWD, ESTABLISHED, []),
]


@dataclass(frozen=True)
class Scenario:
    description: str
    steps: list[Step]
    rst_ignored: int = 0
    timeouts: Timeouts | None = None


SCENARIOS = [
    Scenario("three-way handshake -> ESTABLISHED", HANDSHAKE),
    Scenario(
        "data both ways, odd client payload, full-size backend payload",
        [*HANDSHAKE,
         ("C data", FWD, ESTABLISHED, []),
         ("S data", FWD, ESTABLISHED, []),
         ("C ack", FWD, ESTABLISHED, []),
         ("S data", FWD, ESTABLISHED, [])],
    ),
    Scenario(
        "FIN client first, then backend: TIME_WAIT, late ACK translated, gone after 120 s",
        [*HANDSHAKE,
         ("C fin", FWD, FIN_WAIT, []),
         ("S ack", FWD, FIN_WAIT, []),
         ("S fin", FWD, TIME_WAIT, ["end fin 0"]),
         ("C ack", FWD, TIME_WAIT, []),
         ("wait 119.5", NONE, TIME_WAIT, []),
         ("wait 0.5", NONE, GONE, [])],  # an ended row goes silently
    ),
    Scenario(
        "FIN backend first, then client",
        [*HANDSHAKE,
         ("S data", FWD, ESTABLISHED, []),
         ("S fin", FWD, FIN_WAIT, []),
         ("C ack", FWD, FIN_WAIT, []),
         ("C data", FWD, FIN_WAIT, []),  # half-close: the client may still send
         ("C fin", FWD, TIME_WAIT, ["end fin 0"]),
         ("S ack", FWD, TIME_WAIT, [])],
    ),
    Scenario(
        "late packets do not extend TIME_WAIT",
        [*HANDSHAKE,
         ("C fin", FWD, FIN_WAIT, []),
         ("S fin", FWD, TIME_WAIT, ["end fin 0"]),
         ("wait 100", NONE, TIME_WAIT, []),
         ("C ack", FWD, TIME_WAIT, []),
         ("S ack", FWD, TIME_WAIT, []),
         ("wait 20", NONE, GONE, [])],
    ),
    Scenario(
        "in-window RST from the client closes the row, which lingers 10 s",
        [*HANDSHAKE,
         ("S data", FWD, ESTABLISHED, []),
         ("C rst", FWD, CLOSE, ["end rst 0"]),
         ("S data", FWD, CLOSE, []),  # late packets still translated
         ("wait 9.5", NONE, CLOSE, []),
         ("wait 0.5", NONE, GONE, [])],
    ),
    Scenario(
        "in-window RST from the backend closes the row",
        [*HANDSHAKE,
         ("C data", FWD, ESTABLISHED, []),
         ("S rst", FWD, CLOSE, ["end rst 0"]),
         ("C rst", FWD, CLOSE, [])],  # a second RST on an ended row changes nothing
    ),
    Scenario(
        "out-of-window RST from the client is forwarded and changes nothing",
        [*HANDSHAKE,
         ("C rst-out", FWD, ESTABLISHED, []),
         ("C data", FWD, ESTABLISHED, []),
         ("C rst", FWD, CLOSE, ["end rst 0"])],
        rst_ignored=1,
    ),
    Scenario(
        "out-of-window RST from the backend is forwarded and changes nothing",
        [*HANDSHAKE,
         ("S rst-out", FWD, ESTABLISHED, []),
         ("C fin", FWD, FIN_WAIT, []),
         ("S rst-out", FWD, FIN_WAIT, []),
         ("S fin", FWD, TIME_WAIT, ["end fin 0"])],
        rst_ignored=2,
    ),
    Scenario(
        "out-of-window RST does not refresh the row's timeout",
        [*HANDSHAKE,
         ("wait 899", NONE, ESTABLISHED, []),
         ("S rst-out", FWD, ESTABLISHED, []),
         ("wait 1", NONE, GONE, ["end timeout 0"])],
        rst_ignored=1,
    ),
    Scenario(
        "client RST in SYN_SENT at ISN + 1 closes the row",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("C rst", FWD, CLOSE, ["end rst 0"])],
    ),
    Scenario(
        "client RST in SYN_SENT far from ISN + 1 is ignored",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("C rst-out", FWD, SYN_SENT, [])],
        rst_ignored=1,
    ),
    Scenario(
        "backend refuses the SYN: RST+ACK acking ISN + 1 closes the row",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("S refuse", FWD, CLOSE, ["end rst 0"]),
         ("wait 10", NONE, GONE, [])],
    ),
    Scenario(
        "a refusing RST+ACK with a wrong ack is forwarded but does not close",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("S refuse-bad", FWD, SYN_SENT, []),
         ("S rst-out", FWD, SYN_SENT, []),
         ("S synack", FWD, SYN_RECV, [])],
        rst_ignored=2,
    ),
    Scenario(
        "backend RST right after its SYN-ACK (seq = its ISN + 1) is in window",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("S synack", FWD, SYN_RECV, []),
         ("S rst", FWD, CLOSE, ["end rst 0"])],
    ),
    Scenario(
        "backend RST far from its ISN + 1 in SYN_RECV is ignored",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("S synack", FWD, SYN_RECV, []),
         ("S rst-out", FWD, SYN_RECV, [])],
        rst_ignored=1,
    ),
    Scenario(
        "client RST after the SYN-ACK closes the row",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("S synack", FWD, SYN_RECV, []),
         ("C rst", FWD, CLOSE, ["end rst 0"])],
    ),
    Scenario(
        "retransmitted SYN reuses its row and backend, and refreshes its timeout",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("wait 100", NONE, SYN_SENT, []),
         ("C syn", FWD, SYN_SENT, []),
         ("wait 100", NONE, SYN_SENT, []),
         ("C syn", FWD, SYN_SENT, []),
         ("S synack", FWD, SYN_RECV, [])],
    ),
    Scenario(
        "new SYN on a TIME_WAIT row is a new flow, on the same backend (and NAT port)",
        [*HANDSHAKE,
         ("C fin", FWD, FIN_WAIT, []),
         ("S fin", FWD, TIME_WAIT, ["end fin 0"]),
         ("C syn-new", FWD, SYN_SENT, ["open b1"]),
         ("S synack", FWD, SYN_RECV, []),
         ("C ack", FWD, ESTABLISHED, [])],
    ),
    Scenario(
        "new SYN on a CLOSE row is a new flow",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("S refuse", FWD, CLOSE, ["end rst 0"]),
         ("C syn-new", FWD, SYN_SENT, ["open b1"]),
         ("S refuse", FWD, CLOSE, ["end rst 0"])],
    ),
    Scenario(
        "a SYN on an ESTABLISHED row stays on that row",
        [*HANDSHAKE,
         ("C syn", FWD, ESTABLISHED, []),
         ("C data", FWD, ESTABLISHED, [])],
    ),
    Scenario(
        "SYN_SENT times out after 120 s",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("wait 119.5", NONE, SYN_SENT, []),
         ("wait 0.5", NONE, GONE, ["end timeout 0"])],
    ),
    Scenario(
        "SYN_RECV times out 60 s after the SYN-ACK",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("wait 30", NONE, SYN_SENT, []),
         ("S synack", FWD, SYN_RECV, []),
         ("wait 59.5", NONE, SYN_RECV, []),
         ("wait 0.5", NONE, GONE, ["end timeout 0"])],
    ),
    Scenario(
        "ESTABLISHED lives 900 s after the last packet",
        [*HANDSHAKE,
         ("wait 899", NONE, ESTABLISHED, []),
         ("S data", FWD, ESTABLISHED, []),
         ("wait 899.5", NONE, ESTABLISHED, []),
         ("wait 0.5", NONE, GONE, ["end timeout 0"])],
    ),
    Scenario(
        "FIN_WAIT times out after 120 s (the 900 s of ESTABLISHED no longer apply)",
        [*HANDSHAKE,
         ("wait 500", NONE, ESTABLISHED, []),
         ("C fin", FWD, FIN_WAIT, []),
         ("wait 119.5", NONE, FIN_WAIT, []),
         ("wait 0.5", NONE, GONE, ["end timeout 0"])],
    ),
    Scenario(
        "configured timeouts",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("wait 1.5", NONE, SYN_SENT, []),
         ("S synack", FWD, SYN_RECV, []),
         ("C ack", FWD, ESTABLISHED, []),
         ("wait 4.5", NONE, ESTABLISHED, []),
         ("C fin", FWD, FIN_WAIT, []),
         ("S fin", FWD, TIME_WAIT, ["end fin 0"]),
         ("wait 2.5", NONE, TIME_WAIT, []),
         ("wait 0.5", NONE, GONE, [])],
        timeouts=Timeouts(syn_sent=2, syn_recv=1, established=5, fin_wait=4, time_wait=3),
    ),
    Scenario(
        "configured established timeout expires",
        [*HANDSHAKE,
         ("wait 5", NONE, GONE, ["end timeout 0"])],
        timeouts=Timeouts(established=5),
    ),
    Scenario(
        "an ACK, a FIN or a RST without a row is NO_SESSION",
        [("C ack", "drop NO_SESSION", GONE, []),
         ("C fin-noflow", "drop NO_SESSION", GONE, []),
         ("C rst-noflow", "drop NO_SESSION", GONE, [])],
    ),
    Scenario(
        "a backend packet after its row expired is NO_SESSION",
        [("C syn", FWD, SYN_SENT, ["open b1"]),
         ("wait 120", NONE, GONE, ["end timeout 0"]),
         ("S synack", "drop NO_SESSION", GONE, [])],
    ),
]


@pytest.mark.parametrize("partial", [False, True], ids=["complete", "partial"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.description for s in SCENARIOS])
def test_tcp_scenario(scenario: Scenario, partial: bool) -> None:
    lab = EngineHarness(timeouts=scenario.timeouts, partial=partial)
    flow = lab.flow()
    for number, (name, expect_verdict, expect_state, expect_events) in enumerate(scenario.steps):
        before = flow.session
        result = step(name)(lab, flow)
        events = describe_events(lab.events())
        got = (verdict(result), flow.state, events)
        assert got == (expect_verdict, expect_state, expect_events), f"step {number}: {name}"
        after = flow.session
        opened = any(e.startswith("open") for e in events)
        if before is not None and after is not None and not opened:
            assert after is before, f"step {number}: {name} replaced the row"
        check_table(lab.table)
    assert lab.table.rst_ignored == scenario.rst_ignored


# --- windows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_scale", "server_scale", "offset", "closes"),
    [
        (7, 7, 100_000, True),  # 1000 << 7 = 128000: inside
        (7, 7, 200_000, False),
        (7, None, 100_000, False),  # scaling needs both sides: the window is 1000
        (None, 7, 100_000, False),
        (None, None, 1000, True),  # the window's right edge
        (None, None, 1001, False),
        (7, 7, -1, True),  # one behind the ACK is tolerated
        (7, 7, -2, False),
    ],
)
def test_client_rst_window_uses_the_negotiated_scale(
    client_scale: int | None, server_scale: int | None, offset: int, closes: bool
) -> None:
    lab = EngineHarness()
    flow = lab.flow()
    flow.syn(options=[("WScale", client_scale)] if client_scale is not None else [])
    flow.synack(options=[("WScale", server_scale)] if server_scale is not None else [])
    flow.ack()
    # The backend acknowledges data and advertises a window of 1000 (scaled if negotiated).
    flow.from_server("A", flow.s_next, flow.c_next, window=1000)
    flow.server_acked = flow.c_next
    result = flow.from_client("R", (flow.c_next + offset) & 0xFFFFFFFF)
    assert result.forwarded
    assert flow.state == (CLOSE if closes else ESTABLISHED)
    assert lab.table.rst_ignored == (0 if closes else 1)


def test_backend_rst_window_uses_the_client_window() -> None:
    lab = EngineHarness()
    flow = lab.flow()
    flow.syn(options=[("WScale", 2)])
    flow.synack(options=[("WScale", 0)])
    flow.from_client("A", flow.c_next, flow.s_next, window=500)  # 500 << 2 = 2000
    outside = flow.from_server("R", (flow.s_next + 2001) & 0xFFFFFFFF)
    assert outside.forwarded and flow.state == ESTABLISHED
    inside = flow.from_server("R", (flow.s_next + 2000) & 0xFFFFFFFF)
    assert inside.forwarded and flow.state == CLOSE


def test_sequence_numbers_wrap() -> None:
    lab = EngineHarness()
    flow = lab.flow(isn=0xFFFFFFFF)  # ISN + 1 wraps to 0
    flow.s_isn, flow.s_next = 0xFFFFFFF0, 0xFFFFFFF1
    flow.syn()
    flow.synack()
    flow.ack()
    flow.data_s(40)  # the backend's sequence wraps too
    flow.ack()
    assert flow.c_next == 0 and flow.s_next == 0x19
    flow.rst_s()
    assert flow.state == CLOSE


# --- NAT ports ----------------------------------------------------------------------------------


def test_two_clients_with_the_same_source_port_never_collide() -> None:
    lab = EngineHarness(backends=1)
    one = lab.flow(CLIENT1, 40000, isn=111)
    two = lab.flow(CLIENT2, 40000, isn=222)
    for flow in (one, two):
        assert flow.syn().forwarded
    assert one.backend == two.backend == BACKEND_IPS[0]
    assert one.nat_port != two.nat_port
    # Replies reach the right client (the harness checks the destination of each).
    for flow in (two, one):
        assert flow.synack().next_hop == flow.client
        flow.ack()
        flow.data_s(33)
        flow.data_c(5)
        assert flow.state == ESTABLISHED
    check_table(lab.table)


def test_nat_ports_never_used_first_then_oldest_freed() -> None:
    lab = EngineHarness(backends=1, nat_ports=(61000, 61003))
    a, b, c = (lab.flow(CLIENT1, 1000 + i) for i in range(3))
    for flow in (a, b, c):
        flow.syn()
    assert [f.nat_port for f in (a, b, c)] == [61000, 61001, 61002]
    lab.advance(1)
    b.rst_c()  # CLOSE until t=11
    lab.advance(1)
    a.rst_c()  # CLOSE until t=12
    lab.advance(11)  # b's row goes, then a's: 61001 is freed before 61000
    assert a.session is None and b.session is None and c.state == SYN_SENT
    d, e, f = (lab.flow(CLIENT2, 2000 + i) for i in range(3))
    for flow in (d, e, f):
        flow.syn()
    assert [flow.nat_port for flow in (d, e, f)] == [61003, 61001, 61000]
    check_table(lab.table)


def test_nat_port_exhaustion_refuses_and_counts_then_recycles_an_ended_row() -> None:
    lab = EngineHarness(backends=1, nat_ports=(61000, 61001))
    first, second, third = (lab.flow(CLIENT1, 1000 + i, isn=10 * i) for i in range(3))
    for flow in (first, second):
        flow.syn()
        flow.synack()
        flow.ack()
    assert (first.nat_port, second.nat_port) == (61000, 61001)
    lab.events()

    refused = third.syn()
    assert refused.drop_reason == DropReason.NAT_PORTS_EXHAUSTED
    assert third.session is None
    assert lab.table.refused[Refusal.NAT_PORTS_EXHAUSTED] == 1
    web = lab.engine.services["web"]
    assert web.drops == {DropReason.NAT_PORTS_EXHAUSTED: 1}
    assert lab.engine.drops[DropReason.NAT_PORTS_EXHAUSTED] == 1
    assert describe_events(lab.events()) == []
    assert web.flows == 2

    # The first flow ends (its row lingers in TIME_WAIT); its port is recycled for the new flow.
    first.fin_c()
    first.fin_s()
    assert describe_events(lab.events()) == ["end fin 1"]
    assert third.syn().forwarded
    assert third.nat_port == 61000
    assert first.session is None  # the ended row made room, silently
    assert describe_events(lab.events()) == ["open b1"]
    assert second.state == ESTABLISHED
    third.synack()
    third.ack()
    assert third.state == ESTABLISHED
    assert web.flows == 3
    check_table(lab.table)


def test_nat_ports_are_per_backend() -> None:
    """A full pool of one backend does not stop flows to another."""
    lab = EngineHarness(backends=2, nat_ports=(61000, 61000))
    one, two, three = (lab.flow(CLIENT1, 1000 + i) for i in range(3))
    for flow in (one, two):  # established: they keep their ports
        assert flow.syn().forwarded
        flow.synack()
        flow.ack()
    assert (one.backend, two.backend) == BACKEND_IPS[:2]
    assert one.nat_port == two.nat_port == 61000  # (backend, NAT port) is what is unique
    assert three.syn().drop_reason == DropReason.NAT_PORTS_EXHAUSTED  # b1 again, full


def test_udp_nat_port_exhaustion() -> None:
    lab = EngineHarness(backends=1, nat_ports=(61000, 61000))
    one = lab.udp_flow(CLIENT1, 5000)
    two = lab.udp_flow(CLIENT2, 5000)
    assert one.request().forwarded
    one.reply()  # answered: no longer half-open, it keeps its port
    assert two.request().drop_reason == DropReason.NAT_PORTS_EXHAUSTED
    assert lab.engine.services["dns"].drops == {DropReason.NAT_PORTS_EXHAUSTED: 1}


# --- the table cap -------------------------------------------------------------------------------


def established(lab: EngineHarness, client: str, port: int) -> Flow:
    flow = lab.flow(client, port)
    flow.syn()
    flow.synack()
    flow.ack()
    assert flow.state == ESTABLISHED
    return flow


def test_cap_evicts_an_ended_row_first() -> None:
    lab = EngineHarness(cap=2)
    keep = established(lab, CLIENT1, 1)
    ended = established(lab, CLIENT1, 2)
    ended.rst_c()
    assert ended.state == CLOSE
    lab.events()
    new = lab.flow(CLIENT2, 3)
    assert new.syn().forwarded
    assert ended.session is None and keep.state == ESTABLISHED and new.state == SYN_SENT
    assert describe_events(lab.events()) == ["open b3"]  # an ended row goes silently
    assert lab.table.evicted == 1
    check_table(lab.table)


def test_cap_evicts_an_ended_row_before_a_half_open_one() -> None:
    lab = EngineHarness(cap=2)
    half = lab.flow(CLIENT1, 1)
    half.syn()
    ended = established(lab, CLIENT1, 2)
    ended.fin_c()
    ended.fin_s()
    assert ended.state == TIME_WAIT
    lab.events()
    new = lab.flow(CLIENT2, 3)
    assert new.syn().forwarded
    assert ended.session is None and half.state == SYN_SENT


def test_cap_of_two_evicts_a_half_open_row_never_the_established_one() -> None:
    lab = EngineHarness(cap=2)
    keep = established(lab, CLIENT1, 1)
    half = lab.flow(CLIENT1, 2)
    half.syn()
    lab.events()
    new = lab.flow(CLIENT2, 3)
    assert new.syn().forwarded
    assert half.session is None and keep.state == ESTABLISHED and new.state == SYN_SENT
    assert describe_events(lab.events()) == ["end evicted 1", "open b3"]
    new.synack()
    new.ack()
    assert lab.flow(CLIENT2, 4).syn().drop_reason == DropReason.TABLE_FULL
    assert (keep.state, new.state) == (ESTABLISHED, ESTABLISHED)
    check_table(lab.table)


def test_cap_evicts_the_oldest_half_open_row_but_never_an_established_one() -> None:
    lab = EngineHarness(cap=3)
    keep = established(lab, CLIENT1, 1)
    old_half = lab.flow(CLIENT1, 2)
    old_half.syn()
    young_half = lab.flow(CLIENT1, 3)
    young_half.syn()
    young_half.synack()  # SYN_RECV is half-open too
    lab.events()
    new = lab.flow(CLIENT2, 4)
    assert new.syn().forwarded
    assert old_half.session is None
    assert describe_events(lab.events()) == ["end evicted 2", "open b1"]
    newer = lab.flow(CLIENT2, 5)
    assert newer.syn().forwarded
    assert young_half.session is None and keep.state == ESTABLISHED
    assert describe_events(lab.events()) == ["end evicted 2", "open b2"]
    assert lab.table.evicted == 2
    check_table(lab.table)


def test_cap_refuses_when_every_row_is_established() -> None:
    lab = EngineHarness(cap=2)
    one = established(lab, CLIENT1, 1)
    two = established(lab, CLIENT1, 2)
    two.fin_c()  # FIN_WAIT is not evictable either: the flow is still open
    lab.events()
    refused = lab.flow(CLIENT2, 3).syn()
    assert refused.drop_reason == DropReason.TABLE_FULL
    assert lab.table.refused[Refusal.TABLE_FULL] == 1
    assert lab.engine.services["web"].drops == {DropReason.TABLE_FULL: 1}
    assert lab.engine.drops == {DropReason.TABLE_FULL: 1}
    assert (one.state, two.state) == (ESTABLISHED, FIN_WAIT)
    assert describe_events(lab.events()) == []
    assert len(lab.table) == 2
    # Once a flow ends its row can make room.
    one.rst_c()
    assert lab.flow(CLIENT2, 3).syn().forwarded
    check_table(lab.table)


def test_cap_treats_unreplied_udp_as_half_open_and_replied_udp_as_open() -> None:
    lab = EngineHarness(cap=2)
    replied = lab.udp_flow(CLIENT1, 1)
    replied.request()
    replied.reply()
    unreplied = lab.udp_flow(CLIENT1, 2)
    unreplied.request()
    lab.events()
    assert lab.udp_flow(CLIENT2, 3).request().forwarded
    assert unreplied.session is None and replied.state == State.UDP_REPLIED
    assert describe_events(lab.events()) == ["end evicted 1", "open u3"]
    assert lab.udp_flow(CLIENT2, 4).request().forwarded  # evicts the other unreplied one
    third = lab.udp_flow(CLIENT2, 3)
    assert third.session is None
    check_table(lab.table)


# --- UDP ----------------------------------------------------------------------------------------


def test_udp_flow_reply_and_timeouts() -> None:
    lab = EngineHarness()
    flow = lab.udp_flow(CLIENT1, 5353)
    assert flow.request().forwarded
    assert state_of(flow) == State.UDP_UNREPLIED
    assert describe_events(lab.events()) == ["open u1"]
    lab.advance(20)
    assert flow.request(b"again").forwarded  # the same row, refreshed to 30 s
    assert describe_events(lab.events()) == []
    lab.advance(29)
    assert state_of(flow) == State.UDP_UNREPLIED
    assert flow.reply().forwarded
    assert state_of(flow) == State.UDP_REPLIED
    lab.advance(119)
    assert state_of(flow) == State.UDP_REPLIED
    assert flow.request().forwarded  # either direction refreshes to 120 s
    lab.advance(119)
    assert flow.reply().forwarded
    lab.advance(119.5)
    assert state_of(flow) == State.UDP_REPLIED
    lab.advance(0.5)
    assert flow.session is None
    assert describe_events(lab.events()) == ["end timeout 0"]
    assert flow.reply().drop_reason == DropReason.NO_SESSION


def test_udp_unreplied_flow_expires_after_30_s() -> None:
    lab = EngineHarness()
    flow = lab.udp_flow()
    flow.request()
    lab.advance(29.5)
    assert flow.state == State.UDP_UNREPLIED
    lab.advance(0.5)
    assert flow.session is None
    assert describe_events(lab.events()) == ["open u1", "end timeout 0"]


@pytest.mark.parametrize("partial", [False, True])
def test_udp_checksums_through_the_engine(partial: bool) -> None:
    lab = EngineHarness(partial=partial)
    flow = lab.udp_flow()
    assert flow.request(b"odd").forwarded
    assert flow.reply(b"an answer of even length!!").forwarded


def test_udp_checksum_zero_stays_zero_both_ways() -> None:
    lab = EngineHarness()
    flow = lab.udp_flow()
    assert flow.request(b"q", chksum=0).forwarded  # the harness requires 0 in the output
    assert flow.reply(b"a", chksum=0).forwarded


# --- affinity ----------------------------------------------------------------------------------


def test_affinity_keeps_a_client_on_its_backend_while_the_record_lives() -> None:
    lab = EngineHarness(affinity=30)
    first = lab.flow(CLIENT1, 1000)
    first.syn()
    other = lab.flow(CLIENT2, 1000)
    other.syn()
    assert (first.backend, other.backend) == BACKEND_IPS[:2]
    lab.advance(10)
    again = lab.flow(CLIENT1, 1001)
    again.syn()
    assert again.backend == first.backend  # the record lives (and is refreshed to t=40)
    lab.advance(29.5)
    third = lab.flow(CLIENT1, 1002)
    third.syn()
    assert third.backend == first.backend  # refreshed at t=39.5 until t=69.5
    lab.advance(30)
    later = lab.flow(CLIENT1, 1003)
    later.syn()
    assert later.backend == BACKEND_IPS[2]  # expired: round-robin's next
    assert len(lab.engine.services.affinity["web"]) == 1  # client 2's record expired too


def test_affinity_skips_a_backend_that_is_no_longer_eligible() -> None:
    lab = EngineHarness(affinity=300)
    first = lab.flow(CLIENT1, 1000)
    first.syn()
    lab.set_health(0, Health.DEAD)
    again = lab.flow(CLIENT1, 1001)
    again.syn()
    assert again.backend == BACKEND_IPS[1]
    lab.set_health(0, Health.ALIVE, draining=True)
    third = lab.flow(CLIENT1, 1002)
    assert third.syn().forwarded
    assert third.backend == BACKEND_IPS[1]  # the record now names b2, still eligible


def test_affinity_is_per_service_and_per_client() -> None:
    lab = EngineHarness(affinity=300)
    tcp_flow = lab.flow(CLIENT1, 1000)
    tcp_flow.syn()  # b1
    udp_flow = lab.udp_flow(CLIENT2, 1000)
    udp_flow.request()  # u1: the dns service has its own rotation and records
    other = lab.flow(CLIENT2, 1000)
    other.syn()
    assert other.backend == BACKEND_IPS[1]
    assert udp_flow.backend == BACKEND_IPS[0]


def test_affinity_record_unit() -> None:
    affinity = Affinity(10)
    affinity.remember(80, 1, ("198.18.0.21", 8080), now=0)
    affinity.remember(80, 2, ("198.18.0.22", 8080), now=5)
    assert affinity.get(80, 1, 9.9) == ("198.18.0.21", 8080)
    assert affinity.get(81, 1, 1) is None
    assert affinity.get(80, 1, 10) is None  # the deadline itself is past
    affinity.expire(10)
    assert len(affinity) == 1
    affinity.remember(80, 2, ("198.18.0.23", 8080), now=12)
    affinity.expire(16)
    assert affinity.get(80, 2, 16) == ("198.18.0.23", 8080)
    affinity.expire(22)
    assert len(affinity) == 0


# --- the table itself ---------------------------------------------------------------------------


def test_timeouts_by_state_follow_the_state_numbers() -> None:
    timeouts = Timeouts(1, 2, 3, 4, 5, 6, 7, 8)
    by_state = timeouts.by_state()
    assert by_state[State.SYN_SENT] == 1 and by_state[State.SYN_RECV] == 2
    assert by_state[State.ESTABLISHED] == 3 and by_state[State.FIN_WAIT] == 4
    assert by_state[State.TIME_WAIT] == 5 and by_state[State.CLOSE] == 6
    assert by_state[State.UDP_UNREPLIED] == 7 and by_state[State.UDP_REPLIED] == 8
    default = Timeouts()
    assert (default.syn_sent, default.syn_recv, default.established) == (120, 60, 900)
    assert (default.fin_wait, default.time_wait, default.close) == (120, 120, 10)
    assert (default.udp, default.udp_replied) == (30, 120)


@pytest.mark.parametrize("port_range", [(0, 10), (10, 9), (61000, 65536)])
def test_bad_nat_port_ranges(port_range: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        SessionTable(addr("198.18.0.2"), port_range)


def test_bad_cap() -> None:
    with pytest.raises(ValueError):
        SessionTable(addr("198.18.0.2"), cap=0)


def test_expiry_visits_only_due_rows() -> None:
    """Expiry is O(due rows): a sweep before anything is due touches no row, and a sweep that
    expires k rows visits those k rows, not the long-lived ones."""
    lab = EngineHarness(backends=1)
    long_lived = [established(lab, CLIENT1, port) for port in range(1000, 1200)]
    short = [lab.udp_flow(CLIENT2, port) for port in range(2000, 2010)]
    for flow in short:
        flow.request()
    table = lab.table
    rescheduled: list[Session] = []
    removed: list[Session] = []
    schedule, remove = table.expiry.file, table.remove

    def counting_schedule(s: Session, deadline: float) -> None:
        rescheduled.append(s)
        schedule(s, deadline)

    def counting_remove(s: Session) -> None:
        removed.append(s)
        remove(s)

    table.expiry.file = counting_schedule  # type: ignore[method-assign]
    table.remove = counting_remove  # type: ignore[method-assign]
    lab.advance(29)
    assert rescheduled == [] and removed == []
    lab.advance(1)
    assert len(removed) == 10 and rescheduled == []
    assert all(flow.session is None for flow in short)
    # The established rows still sit in the SYN_RECV bucket (t=60): the sweep then moves each
    # to its real deadline once, lazily, and never touches them again before it.
    assert table.next_deadline() == 60
    lab.advance(30)
    assert len(rescheduled) == 200 and len(removed) == 10
    lab.advance(60)  # their old SYN_SENT bucket (t=120) is stale now: nobody is visited
    assert len(rescheduled) == 200 and len(removed) == 10
    assert table.next_deadline() == 900
    lab.advance(779)
    assert len(rescheduled) == 200 and len(removed) == 10
    assert all(flow.state == ESTABLISHED for flow in long_lived)
    check_table(table)


def test_ended_event_reports_end_reason_and_open_flows() -> None:
    lab = EngineHarness()
    flows = [established(lab, CLIENT1, port) for port in (1, 2, 3, 4)]
    lab.events()
    flows[0].fin_c()
    flows[0].fin_s()
    flows[1].rst_s()
    lab.advance(900)
    events = lab.events()
    assert describe_events(events) == ["end fin 3", "end rst 2", "end timeout 1", "end timeout 0"]
    reasons = [e.reason for e in events]  # type: ignore[union-attr]
    assert reasons == [EndReason.FIN, EndReason.RST, EndReason.TIMEOUT, EndReason.TIMEOUT]
    assert lab.engine.open_flows == 0


def test_backends_of_the_lab() -> None:
    assert [b.name for b in tcp_backends()] == ["b1", "b2", "b3"]


def test_lookups_and_row_views() -> None:
    lab = EngineHarness()
    flow = established(lab, CLIENT2, 4321)
    table = lab.table
    s = flow.session
    assert s is not None and flow.nat_port is not None
    backend = lab.tcp_backends[0]
    assert table.reverse(6, backend.ip_int, backend.port, flow.nat_port) is s
    assert table.reverse(17, backend.ip_int, backend.port, flow.nat_port) is None
    assert table.reverse(6, backend.ip_int, backend.port, flow.nat_port + 1) is None
    assert table.reverse(6, backend.ip_int, backend.port, 1) is None  # outside the range
    assert s.pool.lookup(flow.nat_port) is s and s.pool.lookup(70000) is None
    assert s.pool.rows_held == 1
    assert s.client == (CLIENT2, 4321) and s.proto == 6
    assert s.client_ip == addr(CLIENT2) and s.client_port == 4321
    assert s.backend.key == backend.key
    assert list(table) == [s]


# --- SYN floods: a full port pool takes back half-open ports; pressure cuts their timeout -------


def test_a_full_pool_takes_the_port_of_its_oldest_half_open_row_and_resets_the_backend() -> None:
    """A flood of SYNs that nobody completes must not lock a backend out until the rows time
    out: the next flow takes the oldest half-open row's NAT port, and the backend first gets
    a RST (at the client's ISN + 1) so that it forgets its half-open connection on that port."""
    lab = EngineHarness(backends=1, nat_ports=(61000, 61001))
    spoofed = [lab.flow(CLIENT2, 7000 + i, isn=5000 + i) for i in range(2)]
    for flow in spoofed:
        assert flow.syn().forwarded
    spoofed[1].synack()  # SYN_RECV is half-open too
    lab.events()
    real = lab.flow(CLIENT1, 40000, isn=100)
    result = real.syn()
    assert result.forwarded and result.next_hop == BACKEND_IPS[0]
    assert real.nat_port == 61000 and spoofed[0].session is None
    [(packet, hop)] = result.sent_first
    rst = IP(packet)
    assert hop == BACKEND_IPS[0] and rst[ScapyTCP].flags == "R"
    assert (rst.src, rst.dst, rst[ScapyTCP].sport, rst[ScapyTCP].dport) == (
        LB, BACKEND_IPS[0], 61000, WEB_BACKEND_PORT
    )
    assert rst[ScapyTCP].seq == 5000 + 1
    assert describe_events(lab.events()) == ["end evicted 1", "open b1"]
    assert lab.table.ports_reclaimed == 1 and lab.table.evicted == 1
    real.synack()
    real.ack()
    assert real.state == ESTABLISHED
    check_table(lab.table)


def test_established_flows_never_give_up_their_ports() -> None:
    lab = EngineHarness(backends=1, nat_ports=(61000, 61001))
    keep = [established(lab, CLIENT1, 1000 + i) for i in range(2)]
    assert lab.flow(CLIENT2, 3000).syn().drop_reason == DropReason.NAT_PORTS_EXHAUSTED
    assert all(flow.state == ESTABLISHED for flow in keep)
    assert lab.table.ports_reclaimed == 0
    check_table(lab.table)


def test_udp_unanswered_rows_give_up_their_ports_without_a_packet() -> None:
    lab = EngineHarness(backends=1, nat_ports=(61000, 61000))
    old = lab.udp_flow(CLIENT1, 5000)
    assert old.request().forwarded
    new = lab.udp_flow(CLIENT2, 5000)
    result = new.request()
    assert result.kind == FORWARD and old.session is None
    assert lab.table.ports_reclaimed == 1
    check_table(lab.table)


def test_half_open_rows_time_out_early_while_the_table_is_under_pressure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above PRESSURE_HALF_OPEN half-open rows, their timeout is cut (rows already filed move
    to their earlier deadline); established rows keep theirs; under half of it, back to
    normal."""
    monkeypatch.setattr(nat, "PRESSURE_HALF_OPEN", 8)
    lab = EngineHarness(backends=1, timeouts=Timeouts(syn_sent=120, half_open_under_pressure=5))
    keep = established(lab, CLIENT1, 1)
    flood = [lab.flow(CLIENT2, 2000 + i) for i in range(8)]
    for flow in flood:
        flow.syn()
    assert not lab.table.under_pressure  # 8 is not above 8
    lab.advance(2)
    late = lab.flow(CLIENT2, 3000)
    late.syn()
    assert lab.table.under_pressure and lab.table.pressure_spells == 1
    check_table(lab.table)
    lab.advance(3.5)  # 5.5 s after the first 8: gone; 3.5 s after the late one: still there
    assert all(flow.session is None for flow in flood)
    assert late.state == SYN_SENT and keep.state == ESTABLISHED
    assert not lab.table.under_pressure  # 1 half-open row left: under half of 8
    lab.advance(60)
    assert late.state == SYN_SENT  # filed at 5 s but back to 120 s: re-filed by the sweep
    assert keep.state == ESTABLISHED
    check_table(lab.table)


def test_a_flood_of_evicted_rows_leaves_no_growing_trail_in_the_expiry_buckets() -> None:
    """Removed rows stay in their expiry bucket until it comes due; under a flood whose rows
    are evicted by the thousand, those stale entries are compacted away (memory bounded by the
    rows held, not by the flood)."""
    lab = EngineHarness(backends=1, nat_ports=(61000, 61009))
    slack = nat.ExpiryBuckets.COMPACT_SLACK
    for i in range(3 * slack):
        assert lab.flow(CLIENT2, 1000 + i % 60000, isn=i).syn().forwarded
        assert lab.table.expiry.entries <= 2 * len(lab.table) + slack + 1
    assert len(lab.table) == 10 and lab.table.ports_reclaimed == 3 * slack - 10
    check_table(lab.table)
    lab.advance(200)  # every bucket comes due: nothing stale is yielded, the rows expire
    assert len(lab.table) == 0 and lab.table.expiry.entries == 0
