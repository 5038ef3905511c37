"""A hypothesis state machine over the Engine with a fake clock.

Clients from a small pool open TCP and UDP flows, backends answer, both sides send data, FINs
and RSTs (in and out of window), the clock jumps and the table is swept, backends die, drain,
revive and get added. After every step:

- the table is structurally sound (fixtures.check_table): forward and reverse maps mirror each
  other, ports are unique per backend, counters match the rows, len(table) <= cap;
- every event is consistent: a new flow only ever went to a backend that was eligible in the
  snapshot of that moment, and each FlowEnded's open_flows is the number of flows then open;
- an out-of-window RST never closes or removes a row, nor refreshes it; an in-window one on an
  open row always closes it;
- no open row (ESTABLISHED, FIN_WAIT, UDP_REPLIED) is ever removed except by its timeout;
- a row lives at least its state's timeout after entering that state and at most its state's
  timeout after the last packet it saw; after tick(now) no row is overdue by a full second,
  and no row is removed by tick before its deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lbnat.backends import BackendKey, Health
from lbnat.drops import DropReason
from lbnat.engine import DROP, FORWARD, REPLY, SEND_FIRST, FlowEnded, FlowOpened, NoBackend
from lbnat.nat import ENDED, HALF_OPEN, Session, State, Timeouts, forward_key
from lbnat.packet import TCP, UDP, parse
from tests.unit.fixtures import (
    CLIENT1,
    CLIENT2,
    DNS_BACKEND_PORT,
    DNS_PORT,
    LB,
    WEB_BACKEND_PORT,
    WEB_PORT,
    EngineHarness,
    addr,
    check_table,
    checksums_ok,
    ip_text,
    tcp,
    udp,
)

TCP_CLIENTS = [(CLIENT1, 1000), (CLIENT1, 1001), (CLIENT1, 1002), (CLIENT2, 1000), (CLIENT2, 1001)]
UDP_CLIENTS = [(CLIENT1, 2000), (CLIENT2, 2000)]
CAP = 4
NAT_PORTS = (61000, 61002)
TIMEOUTS = Timeouts(
    syn_sent=12,
    syn_recv=6,
    established=90,
    fin_wait=12,
    time_wait=12,
    close=1,
    udp=3,
    udp_replied=12,
)
TIMEOUT_OF = TIMEOUTS.by_state()
HALF = 0x80000000
MASK = 0xFFFFFFFF


@dataclass
class Conn:
    """The two TCP endpoints of one connection, as far as the model knows them."""

    c_isn: int
    c_next: int
    s_isn: int | None = None
    s_next: int = 0
    client_acked: int | None = None  # the last ACK the client sent (what the backend's RST needs)
    server_acked: int | None = None  # the last ACK the backend sent


clients = st.integers(0, len(TCP_CLIENTS) - 1)
udp_clients = st.integers(0, len(UDP_CLIENTS) - 1)
picks = st.integers(0, 255)
seq_numbers = st.integers(0, MASK)
lengths = st.integers(0, 40)
delays = st.one_of(
    st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0, 6.0, 12.0, 13.0]),
    st.floats(0.0, 15.0, allow_nan=False, allow_infinity=False),
    st.sampled_from([89.5, 90.0, 91.0]),
)


class NatMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.lab = EngineHarness(
            backends=2, nat_ports=NAT_PORTS, cap=CAP, timeouts=TIMEOUTS, affinity=5.0
        )
        self.conns: dict[int, Conn] = {}
        self.entered: dict[Session, float] = {}  # when the row entered its current state
        self.state_of: dict[Session, State] = {}
        self.touched: dict[Session, float] = {}  # the last packet the row saw

    # --- helpers --------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.lab.now

    def row(self, proto: int, client: tuple[str, int]) -> Session | None:
        service_port = WEB_PORT if proto == TCP else DNS_PORT
        return self.lab.table.forward.get(
            forward_key(proto, addr(client[0]), client[1], service_port)
        )

    def eligible(self) -> dict[str, set[BackendKey]]:
        return {
            "web": {b.key for b in self.lab.tcp_backends if b.eligible},
            "dns": {b.key for b in self.lab.udp_backends if b.eligible},
        }

    def send(self, raw: bytes, target: Session | None) -> tuple[tuple[int, ...], bytearray]:
        """Hand a packet to the engine and check everything that must hold around it.
        `target` is the row the packet is for, if it has one before the packet."""
        table = self.lab.table
        rows_before = set(table.forward.values())
        open_before = table.open_flows
        eligible = self.eligible()
        buf = bytearray(raw)
        action = self.lab.engine.handle(buf, 0, len(buf), False, self.now)
        self.check_events(open_before, eligible)
        rows_after = set(table.forward.values())
        for gone in rows_before - rows_after:
            # Eviction, port recycling or a new SYN on an ended row: never an open flow.
            assert gone.state in ENDED or gone.state in HALF_OPEN, gone.state
            event(f"removed by a packet: {gone.state.name}")
            self.forget(gone)
        if target is None or target not in rows_after:
            parsed = parse(raw, 0, len(raw))
            assert isinstance(parsed, tuple)
            key = forward_key(parsed[0], parsed[2], parsed[4], parsed[5])
            target = table.forward.get(key)
        if target is not None and target in rows_after:
            self.touched[target] = self.now
        for s in rows_after:
            if s not in self.state_of or self.state_of[s] != s.state:
                self.entered[s] = self.now
                self.state_of[s] = s.state
                self.touched.setdefault(s, self.now)
        if action[0] == SEND_FIRST:
            # A new flow evicted half-open TCP rows: each backend gets a RST for its old one
            # first; then the packet is forwarded as any other.
            for packet, hop in action[2]:
                assert checksums_ok(packet), "a RST for an evicted row has a wrong checksum"
                rst = parse(packet, 0, len(packet))
                assert isinstance(rst, tuple) and rst[6] == 0x04  # RST alone
                assert (rst[2], rst[3]) == (addr(LB), hop)
            event(f"sent {len(action[2])} RST(s) first")
            action = (FORWARD, action[1])
        if action[0] == FORWARD:
            assert checksums_ok(buf), "a forwarded packet has a wrong checksum"
            event("forwarded")
        else:
            event(f"verdict {action[0]} {DropReason(action[1]).name if action[0] == DROP else ''}")
        return action, buf

    def forget(self, s: Session) -> None:
        self.entered.pop(s, None)
        self.state_of.pop(s, None)
        self.touched.pop(s, None)

    def check_events(self, open_before: int, eligible: dict[str, set[BackendKey]]) -> None:
        open_flows = open_before
        for happened in self.lab.engine.take_events():
            if isinstance(happened, FlowOpened):
                assert happened.backend in eligible[happened.service], "ineligible backend"
                open_flows += 1
            elif isinstance(happened, FlowEnded):
                open_flows -= 1
                assert happened.open_flows == open_flows
            else:
                assert isinstance(happened, NoBackend)
                assert not eligible[happened.service]
        assert open_flows == self.lab.table.open_flows

    def check_translated_forward(self, buf: bytearray, s: Session, client: tuple[str, int]) -> None:
        parsed = parse(buf, 0, len(buf))
        assert isinstance(parsed, tuple)
        assert (parsed[2], parsed[3]) == (addr(LB), s.backend.ip_int)
        assert (parsed[4], parsed[5]) == (s.nat_port, s.backend.port)
        assert s.client == client

    def check_translated_reply(self, buf: bytearray, client: tuple[str, int], port: int) -> None:
        parsed = parse(buf, 0, len(buf))
        assert isinstance(parsed, tuple)
        assert (ip_text(parsed[2]), ip_text(parsed[3])) == (LB, client[0])
        assert (parsed[4], parsed[5]) == (port, client[1])

    # --- TCP ------------------------------------------------------------------------------------

    @rule(index=clients, isn=seq_numbers)
    def client_syn(self, index: int, isn: int) -> None:
        client = TCP_CLIENTS[index]
        before = self.row(TCP, client)
        conn = self.conns.get(index)
        if before is None or before.ended or conn is None:
            conn = self.conns[index] = Conn(isn, (isn + 1) & MASK)
        table = self.lab.table
        full_before = len(table) >= CAP and not table.closed and not table.half_open
        no_backend = not self.eligible()["web"]
        raw = bytes(tcp(client[0], LB, client[1], WEB_PORT, "S", conn.c_isn))
        action, buf = self.send(raw, before)
        after = self.row(TCP, client)
        if action[0] == FORWARD:
            assert after is not None and not after.ended
            if before is not None and not before.ended:
                assert after is before, "a retransmitted SYN got a new row"
            self.check_translated_forward(buf, after, client)
        elif action[0] == REPLY:
            assert no_backend and (before is None or before.ended)
            reply = action[1]
            assert isinstance(reply, bytes) and checksums_ok(reply)
            parsed = parse(reply, 0, len(reply))
            assert isinstance(parsed, tuple)
            assert parsed[6] == 0x14 and parsed[8] == (conn.c_isn + 1) & MASK  # RST+ACK
            assert (parsed[3], parsed[4], parsed[5]) == (addr(client[0]), WEB_PORT, client[1])
            assert after is None
        else:
            assert action[0] == DROP
            assert action[1] in (DropReason.NAT_PORTS_EXHAUSTED, DropReason.TABLE_FULL)
            if action[1] == DropReason.TABLE_FULL:
                assert full_before, "TABLE_FULL although a row could have been evicted"
            assert after is None

    @rule(index=clients, isn=seq_numbers, server_isn=seq_numbers)
    def handshake(self, index: int, isn: int, server_isn: int) -> None:
        """SYN, SYN-ACK, ACK in one step, so that established flows are common."""
        self.client_syn(index, isn)
        s = self.row(TCP, TCP_CLIENTS[index])
        if s is not None and s.state == State.SYN_SENT:
            self._synack(index, server_isn)
            self._client_data(index, 0, False)
            after = self.row(TCP, TCP_CLIENTS[index])
            assert after is s and after.state == State.ESTABLISHED

    def with_rows(self) -> list[int]:
        """The TCP clients whose connection has a row."""
        return [i for i in self.conns if self.row(TCP, TCP_CLIENTS[i]) is not None]

    def choose(self, candidates: list[int], pick: int) -> int | None:
        return sorted(candidates)[pick % len(candidates)] if candidates else None

    @precondition(lambda self: bool(self.with_rows()))
    @rule(pick=picks, isn=seq_numbers)
    def backend_synack(self, pick: int, isn: int) -> None:
        index = self.choose(self.with_rows(), pick)
        assert index is not None
        self._synack(index, isn)

    def _synack(self, index: int, isn: int) -> None:
        s = self.row(TCP, TCP_CLIENTS[index])
        conn = self.conns.get(index)
        if s is None or conn is None or s.state in (State.ESTABLISHED, State.FIN_WAIT):
            return  # a backend does not send a SYN-ACK once the connection is up
        if conn.s_isn is None:
            conn.s_isn, conn.s_next = isn, (isn + 1) & MASK
        ack = (conn.c_isn + 1) & MASK
        raw = bytes(tcp(s.backend.ip, LB, s.backend.port, s.nat_port, "SA", conn.s_isn, ack))
        action, buf = self.send(raw, s)
        assert action[0] == FORWARD
        conn.server_acked = ack
        self.check_translated_reply(buf, TCP_CLIENTS[index], WEB_PORT)

    @precondition(lambda self: bool(self.conns))
    @rule(pick=picks, length=lengths, fin=st.booleans())
    def client_data(self, pick: int, length: int, fin: bool) -> None:
        index = self.choose(list(self.conns), pick)  # rows may be gone: NO_SESSION then
        assert index is not None
        self._client_data(index, length, fin)

    def _client_data(self, index: int, length: int, fin: bool) -> None:
        conn = self.conns.get(index)
        if conn is None or conn.s_isn is None:
            return
        client = TCP_CLIENTS[index]
        before = self.row(TCP, client)
        flags = ("F" if fin else "") + ("PA" if length else "A")
        raw = bytes(
            tcp(
                client[0],
                LB,
                client[1],
                WEB_PORT,
                flags,
                conn.c_next,
                conn.s_next,
                payload=b"c" * length,
            )
        )
        action, buf = self.send(raw, before)
        conn.client_acked = conn.s_next
        conn.c_next = (conn.c_next + length + fin) & MASK
        if before is None:
            assert action == (DROP, DropReason.NO_SESSION)
        else:
            assert action[0] == FORWARD
            self.check_translated_forward(buf, before, client)

    @precondition(lambda self: bool(self.with_rows()))
    @rule(pick=picks, length=lengths, fin=st.booleans())
    def backend_data(self, pick: int, length: int, fin: bool) -> None:
        index = self.choose(self.with_rows(), pick)
        assert index is not None
        s = self.row(TCP, TCP_CLIENTS[index])
        conn = self.conns.get(index)
        if s is None or conn is None or conn.s_isn is None:
            return
        flags = ("F" if fin else "") + ("PA" if length else "A")
        raw = bytes(
            tcp(
                s.backend.ip,
                LB,
                s.backend.port,
                s.nat_port,
                flags,
                conn.s_next,
                conn.c_next,
                payload=b"s" * length,
            )
        )
        action, buf = self.send(raw, s)
        assert action[0] == FORWARD
        conn.server_acked = conn.c_next
        conn.s_next = (conn.s_next + length + fin) & MASK
        self.check_translated_reply(buf, TCP_CLIENTS[index], WEB_PORT)

    @precondition(lambda self: bool(self.with_rows()))
    @rule(pick=picks, from_backend=st.booleans(), in_window=st.booleans())
    def rst(self, pick: int, from_backend: bool, in_window: bool) -> None:
        index = self.choose(self.with_rows(), pick)
        assert index is not None
        client = TCP_CLIENTS[index]
        s = self.row(TCP, client)
        conn = self.conns.get(index)
        if s is None or conn is None:
            return
        off = 0 if in_window else HALF
        if not from_backend:
            expected = conn.server_acked if conn.server_acked is not None else conn.c_isn + 1
            raw = bytes(tcp(client[0], LB, client[1], WEB_PORT, "R", (expected + off) & MASK))
        elif conn.s_isn is None:  # refusing the SYN: RST+ACK acknowledging ISN + 1
            ack = (conn.c_isn + 1 + off) & MASK
            raw = bytes(tcp(s.backend.ip, LB, s.backend.port, s.nat_port, "RA", off, ack))
        else:
            expected = conn.client_acked if conn.client_acked is not None else conn.s_isn + 1
            raw = bytes(
                tcp(s.backend.ip, LB, s.backend.port, s.nat_port, "R", (expected + off) & MASK)
            )
        was_open, state, expires = not s.ended, s.state, s.expires
        side = "backend" if from_backend else "client"
        event(f"rst {'in' if in_window else 'out'} {side} {state.name}")
        ignored = self.lab.table.rst_ignored
        action, _ = self.send(raw, s)
        assert action[0] == FORWARD, "a RST on a row is always forwarded"
        assert self.row(TCP, client) is s, "a RST removed a row"
        if not was_open:
            assert (s.state, s.expires) == (state, expires)
            assert self.lab.table.rst_ignored == ignored
        elif in_window:
            assert s.state == State.CLOSE, f"an in-window RST did not close a {state.name} row"
        else:
            assert (s.state, s.expires) == (state, expires), "an out-of-window RST changed the row"
            assert self.lab.table.rst_ignored == ignored + 1

    # --- UDP ------------------------------------------------------------------------------------

    @rule(index=udp_clients, length=lengths, zero=st.booleans())
    def udp_request(self, index: int, length: int, zero: bool) -> None:
        client = UDP_CLIENTS[index]
        before = self.row(UDP, client)
        raw = bytes(udp(client[0], LB, client[1], DNS_PORT, b"q" * length, 0 if zero else None))
        action, buf = self.send(raw, before)
        after = self.row(UDP, client)
        if action[0] == FORWARD:
            assert after is not None
            if before is not None:
                assert after is before
            self.check_translated_forward(buf, after, client)
            if zero:
                assert buf[26:28] == b"\0\0"
        else:
            assert action[0] == DROP and after is None
            assert action[1] in (
                DropReason.NO_BACKEND,
                DropReason.NAT_PORTS_EXHAUSTED,
                DropReason.TABLE_FULL,
            )

    @rule(index=udp_clients, length=lengths)
    def udp_reply(self, index: int, length: int) -> None:
        client = UDP_CLIENTS[index]
        s = self.row(UDP, client)
        if s is None:
            return
        raw = bytes(udp(s.backend.ip, LB, s.backend.port, s.nat_port, b"a" * length))
        action, buf = self.send(raw, s)
        assert action[0] == FORWARD
        assert s.state == State.UDP_REPLIED
        self.check_translated_reply(buf, client, DNS_PORT)

    # --- time and backends ----------------------------------------------------------------------

    @rule(seconds=delays)
    def advance(self, seconds: float) -> None:
        table = self.lab.table
        rows_before = set(table.forward.values())
        open_before = table.open_flows
        self.lab.now += seconds
        now = self.now
        self.lab.engine.tick(now)
        self.check_events(open_before, self.eligible())
        rows_after = set(table.forward.values())
        for gone in rows_before - rows_after:
            event(f"expired {gone.state.name}")
            assert gone.expires <= now, "a row was removed before its deadline"
            self.forget(gone)
        for s in rows_after:
            assert math.ceil(s.expires) > now, "a row outlived its deadline by a second or more"

    @rule(
        index=st.integers(0, 2),
        health=st.sampled_from([Health.ALIVE, Health.ALIVE, Health.BAD, Health.DEAD]),
        draining=st.sampled_from([False, False, False, True]),
    )
    def set_backend(self, index: int, health: Health, draining: bool) -> None:
        if index < len(self.lab.tcp_backends):
            self.lab.set_health(index, health, draining)

    @precondition(lambda self: len(self.lab.tcp_backends) < 3)
    @rule()
    def add_backend(self) -> None:
        self.lab.add_backend()

    # --- invariants -----------------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        assert len(self.lab.table) == 0

    @invariant()
    def table_is_sound(self) -> None:
        check_table(self.lab.table)

    @invariant()
    def rows_live_exactly_their_timeouts(self) -> None:
        for s in self.lab.table.forward.values():
            timeout = TIMEOUT_OF[s.state]
            assert s.state == self.state_of[s]
            assert s.expires >= self.entered[s] + timeout, "a row would expire before its timeout"
            assert s.expires <= self.touched[s] + timeout, "a row outlives its timeout"

    @invariant()
    def open_rows_are_tcp_or_udp_states(self) -> None:
        for s in self.lab.table.forward.values():
            if s.proto == TCP:
                assert s.state <= State.CLOSE
            else:
                assert s.state in (State.UDP_UNREPLIED, State.UDP_REPLIED)
            assert s.backend.port == (WEB_BACKEND_PORT if s.proto == TCP else DNS_BACKEND_PORT)


NatMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestNatModel = NatMachine.TestCase
