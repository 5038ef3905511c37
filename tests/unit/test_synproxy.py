"""Tests for the SYN-cookie proxy (lbnat.synproxy) driven through the Engine with scapy packets:
the cookie SYN-ACK, the SYN to the backend, the kept ACK, then data both ways with translated
sequence numbers, SACK blocks and windows, every checksum checked by scapy (complete and
partial), the offset's wrap-around, and each way a proxied handshake can end."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP

from lbnat.checkpoint import RowCheckpoint, checkpoint_bytes, restore
from lbnat.drops import DropReason
from lbnat.engine import DROP, FORWARD, REPLIES, REPLY, FlowEnded
from lbnat.nat import EndReason, State
from lbnat.syncookie import SynProxySettings
from lbnat.synproxy import ProxiedSession
from tests.unit.fixtures import (
    BACKEND_IPS,
    CLIENT1,
    CLIENT2,
    LB,
    WEB_BACKEND_PORT,
    WEB_PORT,
    EngineHarness,
    Result,
    tcp,
    verify_checksums,
)

B1 = BACKEND_IPS[0]
SECRET = b"synproxy-tests!!"
ON = SynProxySettings(mode="on", secret=SECRET)
M = 0xFFFFFFFF
LINUX_SYN = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]


def options(packet: Any) -> dict[str, Any]:
    return {name: value for name, value in packet[TCP].options if name not in ("NOP", "EOL")}


@dataclass
class Proxied:
    """One proxied connection: the client's and the backend's sequence spaces."""

    lab: EngineHarness
    port: int = 40000
    c_isn: int = 1000
    b_isn: int = 700_000
    cookie: int = 0
    nat_port: int = 0
    replies: list[Result] = field(default_factory=list)

    def client(
        self, flags: str, seq: int, ack: int = 0, payload: bytes = b"",
        opts: Sequence[tuple[str, Any]] = (), window: int = 502,
    ) -> Result:  # fmt: skip
        seq, ack = seq & M, ack & M
        packet = tcp(CLIENT1, LB, self.port, WEB_PORT, flags, seq, ack, window, payload, opts)
        return self.lab.send(packet)

    def backend(
        self, flags: str, seq: int, ack: int = 0, payload: bytes = b"",
        opts: Sequence[tuple[str, Any]] = (), window: int = 509,
    ) -> Result:  # fmt: skip
        seq, ack = seq & M, ack & M
        packet = tcp(
            B1, LB, WEB_BACKEND_PORT, self.nat_port, flags, seq, ack, window, payload, opts
        )
        return self.lab.send(packet)

    def syn(self, opts: Sequence[tuple[str, Any]] = LINUX_SYN) -> IP:
        result = self.client("S", self.c_isn, opts=opts)
        assert result.kind == REPLY and result.next_hop == CLIENT1
        verify_checksums(result.reply)
        synack = IP(result.reply)
        assert (synack.src, synack.dst, synack[TCP].sport, synack[TCP].dport) == (
            LB, CLIENT1, WEB_PORT, self.port,
        )  # fmt: skip
        assert synack[TCP].flags == "SA" and synack[TCP].ack == (self.c_isn + 1) & M
        self.cookie = synack[TCP].seq
        return synack

    def ack(self, payload: bytes = b"") -> IP:
        result = self.client("A", self.c_isn + 1, self.cookie + 1, payload)
        assert result.kind == REPLY and result.next_hop == B1, result.action
        verify_checksums(result.reply)
        syn = IP(result.reply)
        assert syn.src == LB and syn.dst == B1 and syn[TCP].dport == WEB_BACKEND_PORT
        assert syn[TCP].flags == "S" and syn[TCP].seq == self.c_isn
        self.nat_port = syn[TCP].sport
        return syn

    def synack(self, opts: Sequence[tuple[str, Any]] = LINUX_SYN) -> IP:
        result = self.backend("SA", self.b_isn, self.c_isn + 1, opts=opts)
        assert result.kind == REPLY and result.next_hop == B1, result.action
        verify_checksums(result.reply)
        kept = IP(result.reply)
        assert (kept.src, kept.dst, kept[TCP].sport, kept[TCP].dport) == (
            LB, B1, self.nat_port, WEB_BACKEND_PORT,
        )  # fmt: skip
        assert kept[TCP].seq == (self.c_isn + 1) & M
        assert kept[TCP].ack == (self.b_isn + 1) & M
        return kept

    def handshake(self, backend_opts: Sequence[tuple[str, Any]] = LINUX_SYN) -> None:
        self.syn()
        self.ack()
        self.synack(backend_opts)
        assert self.row.state is State.ESTABLISHED

    @property
    def row(self) -> ProxiedSession:
        rows = list(self.lab.table)
        assert len(rows) == 1 and isinstance(rows[0], ProxiedSession)
        return rows[0]


def forwarded(result: Result) -> IP:
    assert result.kind == FORWARD, result.action
    verify_checksums(result.out, kernel_completed=True)
    return IP(bytes(result.out))


# --- the handshake -------------------------------------------------------------------------------


def test_the_cookie_synack_echoes_what_the_client_offered_but_timestamps() -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    synack = flow.syn()
    assert options(synack) == {"MSS": 1460, "SAckOK": b"", "WScale": ON.wscale}
    assert len(flow.lab.table) == 0  # no row, no port
    syn = flow.ack()
    assert options(syn) == {"MSS": 1460, "SAckOK": b"", "WScale": 7}
    assert flow.row.state is State.SYN_SENT
    flow.synack()
    services = flow.lab.engine.services
    assert services["web"].syn_cookies == {"sent": 1, "validated": 1, "invalid": 0}


def test_a_client_without_options_gets_none() -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    assert options(flow.syn(opts=())) == {"MSS": 1460}
    assert options(flow.ack()) == {"MSS": 536}  # RFC 879's default, the cookie's table
    flow.synack(opts=[("MSS", 1460)])
    data = forwarded(flow.backend("A", flow.b_isn + 1, flow.c_isn + 1, b"x", window=1000))
    assert data[TCP].window == 1000  # nobody scales: nothing to rescale


@pytest.mark.parametrize("partial", [False, True], ids=["complete", "partial"])
@pytest.mark.parametrize(
    "distance",  # backend ISN = cookie - distance: offsets near 0, 2**31 and 2**32
    [0, 1, 2, 100, 0x7FFFFFFF, 0x80000000, M - 1, M, M - 200],
)
def test_data_both_ways_is_translated_across_the_wrap(partial: bool, distance: int) -> None:
    lab = EngineHarness(1, syn_proxy=ON, partial=partial)
    flow = Proxied(lab, c_isn=M - 5)  # the client's own sequence wraps too
    flow.syn()
    flow.ack()
    flow.b_isn = (flow.cookie - distance) & M
    flow.synack()
    c_seq, b_seq = (flow.c_isn + 1) & M, (flow.b_isn + 1) & M
    for size in (10, 300, 0, 1200):
        out = forwarded(flow.client("PA", c_seq, (b_seq + flow.row.offset) & M, b"c" * size))
        assert (out.dst, out[TCP].dport, out[TCP].seq) == (B1, WEB_BACKEND_PORT, c_seq)
        assert out[TCP].ack == b_seq, "client -> backend: ack - offset"
        c_seq = (c_seq + size) & M
        back = forwarded(flow.backend("PA", b_seq, c_seq, b"b" * size * 2))
        assert (back.dst, back[TCP].dport, back[TCP].ack) == (CLIENT1, flow.port, c_seq)
        assert back[TCP].seq == (b_seq + flow.row.offset) & M, "backend -> client: seq + offset"
        b_seq = (b_seq + 2 * size) & M
    # FIN both ways ends the flow as for any row
    forwarded(flow.client("FA", c_seq, (b_seq + flow.row.offset) & M))
    forwarded(flow.backend("FA", b_seq, (c_seq + 1) & M))
    assert flow.row.state is State.TIME_WAIT


@settings(max_examples=60, deadline=None)
@given(b_isn=st.integers(0, M), c_isn=st.integers(0, M), steps=st.lists(st.integers(0, 3000)))
def test_any_offset_keeps_checksums_right(b_isn: int, c_isn: int, steps: list[int]) -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON), c_isn=c_isn, b_isn=b_isn)
    flow.handshake()
    c_seq, b_seq = (c_isn + 1) & M, (b_isn + 1) & M
    for step in steps:
        b_seq = (b_seq + step) & M
        back = forwarded(flow.backend("A", b_seq, c_seq))
        assert back[TCP].seq == (b_seq + flow.row.offset) & M
        out = forwarded(flow.client("A", c_seq, back[TCP].seq))
        assert out[TCP].ack == b_seq


@pytest.mark.parametrize("partial", [False, True], ids=["complete", "partial"])
def test_the_clients_sack_blocks_are_translated(partial: bool) -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON, partial=partial), b_isn=0)
    flow.syn()
    flow.ack()
    flow.b_isn = (flow.cookie + 50) & M  # blocks wrap when translated back
    flow.synack()
    offset = flow.row.offset
    edges = [(flow.b_isn + n) & M for n in (1000, 2000, 3000, 4000, 0x80000000, 0x80000010)]
    blocks = [
        ((e + offset) & M, (f + offset) & M) for e, f in zip(edges[::2], edges[1::2], strict=True)
    ]
    sack = [("NOP", None), ("NOP", None), ("SAck", tuple(x for b in blocks for x in b))]
    out = forwarded(flow.client("A", flow.c_isn + 1, (flow.b_isn + 1 + offset) & M, opts=sack))
    assert options(out)["SAck"] == tuple(edges)


@pytest.mark.parametrize(
    ("backend_wscale", "window", "client_sees"),
    [
        (7, 509, 509),  # the same as promised: untouched
        (9, 509, 509 << 2),  # the backend scales more: the field grows
        (9, 20000, 0xFFFF),  # ... capped
        (5, 509, 509 >> 2),  # less: the field shrinks, rounded down
        (0, 40000, 40000 >> 7),
    ],
)
def test_the_backends_window_is_rescaled_to_what_lbnat_promised(
    backend_wscale: int, window: int, client_sees: int
) -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    flow.handshake(backend_opts=[("MSS", 1460), ("WScale", backend_wscale)])
    back = forwarded(flow.backend("A", flow.b_isn + 1, flow.c_isn + 1, window=window))
    assert back[TCP].window == client_sees


def test_a_backend_without_window_scaling_gets_the_clients_windows_scaled() -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    flow.syn()
    flow.ack()
    kept = flow.synack(opts=[("MSS", 1460)])
    assert kept[TCP].window == 502 << 7 if 502 << 7 <= 0xFFFF else kept[TCP].window == 0xFFFF
    out = forwarded(flow.client("A", flow.c_isn + 1, flow.cookie + 1, window=100))
    assert out[TCP].window == 100 << 7
    back = forwarded(flow.backend("A", flow.b_isn + 1, flow.c_isn + 1, window=0xFFFF))
    assert back[TCP].window == 0xFFFF >> 7


# --- how a proxied handshake can end -------------------------------------------------------------


def test_the_ack_that_carries_data_delivers_it() -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    flow.syn()
    flow.ack(b"GET / HTTP/1.0\r\n\r\n")
    kept = flow.synack()
    assert bytes(kept[TCP].payload) == b"GET / HTTP/1.0\r\n\r\n"


def test_a_retransmitted_syn_gets_the_same_cookie_and_no_row() -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    first = flow.syn()[TCP].seq
    flow.lab.now += 10
    assert flow.syn()[TCP].seq == first
    assert len(flow.lab.table) == 0


def test_a_bad_cookie_is_dropped_and_counted() -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    flow.syn()
    result = flow.client("A", flow.c_isn + 1, flow.cookie + 2)
    assert result.action == (DROP, DropReason.BAD_COOKIE)
    flow.lab.now += 129  # two counters later
    assert flow.client("A", flow.c_isn + 1, flow.cookie + 1).drop_reason == DropReason.BAD_COOKIE
    assert flow.lab.engine.services["web"].syn_cookies["invalid"] == 2
    assert len(flow.lab.table) == 0


@pytest.mark.parametrize("partial", [False, True], ids=["complete", "partial"])
def test_the_first_data_before_the_backend_answers_is_kept_and_the_syn_resent(
    partial: bool,
) -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON, partial=partial))
    flow.syn()
    syn = flow.ack()
    first = flow.client("PA", flow.c_isn + 1, flow.cookie + 1, b"GET /")
    assert first.kind == REPLY and IP(first.reply) == syn  # the SYN again
    later = flow.client("PA", flow.c_isn + 6, flow.cookie + 1, b" HTTP/1.0")
    assert later.kind == REPLY and IP(later.reply) == syn
    assert flow.lab.engine.drops[DropReason.SYN_PROXY_PENDING] == 1  # only the later one
    kept = flow.synack()
    assert bytes(kept[TCP].payload) == b"GET /"  # delivered; " HTTP/1.0" is retransmitted


def test_a_client_rst_before_the_backend_answers_resets_both() -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    flow.syn()
    flow.ack()
    result = flow.client("R", flow.c_isn + 1)
    rst = IP(result.reply)
    assert (rst.dst, rst[TCP].flags, rst[TCP].seq) == (B1, "R", flow.c_isn + 1)
    assert flow.row.state is State.CLOSE
    # the backend's SYN-ACK arrives late: it is answered with a RST, not forwarded
    late = flow.backend("SA", flow.b_isn, flow.c_isn + 1)
    rst = IP(late.reply)
    assert (rst.dst, rst[TCP].flags, rst[TCP].seq) == (B1, "R", flow.c_isn + 1)


def test_a_backend_that_refuses_resets_the_client() -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    flow.syn()
    flow.ack()
    result = flow.backend("RA", 0, flow.c_isn + 1)
    rst = IP(result.reply)
    assert (rst.src, rst.dst, rst[TCP].sport, rst[TCP].dport) == (LB, CLIENT1, WEB_PORT, 40000)
    assert rst[TCP].flags == "R" and rst[TCP].seq == flow.cookie + 1  # what the client expects
    verify_checksums(result.reply)
    assert flow.row.state is State.CLOSE
    ended = [e for e in flow.lab.events() if isinstance(e, FlowEnded)]
    assert [e.reason for e in ended] == [EndReason.RST]


def test_a_forged_backend_rst_changes_nothing() -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    flow.syn()
    flow.ack()
    assert flow.backend("RA", 0, 12345).drop_reason == DropReason.SYN_PROXY_UNEXPECTED
    assert flow.row.state is State.SYN_SENT


def test_no_backend_resets_the_client_with_the_sequence_it_expects() -> None:
    lab = EngineHarness(1, syn_proxy=ON)
    flow = Proxied(lab)
    flow.syn()
    lab.engine.set_backends("web", [])
    result = flow.client("A", flow.c_isn + 1, flow.cookie + 1)
    rst = IP(result.reply)
    assert rst[TCP].flags == "R" and rst[TCP].seq == flow.cookie + 1


def test_the_established_flow_gets_its_rewritten_kept_ack_again_on_a_repeated_synack() -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    flow.syn()
    flow.ack()
    first = flow.synack()
    assert flow.synack() == first


# --- the flood -----------------------------------------------------------------------------------


def test_spoofed_syns_cost_no_row_and_no_port() -> None:
    lab = EngineHarness(1, syn_proxy=ON)
    rng = random.Random(16)
    for _ in range(2000):
        source = f"198.19.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        packet = tcp(source, LB, rng.randrange(1024, 65536), WEB_PORT, "S", rng.getrandbits(32))
        assert lab.send(packet).kind == REPLY
    assert len(lab.table) == 0 and lab.engine.table.pools == {}
    assert lab.engine.services["web"].syn_cookies["sent"] == 2000


def test_auto_mode_proxies_above_the_threshold_until_half_of_it() -> None:
    lab = EngineHarness(1, syn_proxy=SynProxySettings(mode="auto", threshold=4, secret=SECRET))
    kinds = []
    for port in range(40000, 40008):
        kinds.append(lab.send(tcp(CLIENT1, LB, port, WEB_PORT, "S", 1)).kind)
    assert kinds == [FORWARD] * 5 + [REPLY] * 3  # rows 0..4 half-open: the 6th SYN is proxied
    for row in list(lab.table)[:4]:
        lab.engine.table.remove(row)  # 1 left: below half the threshold
    assert lab.send(tcp(CLIENT1, LB, 41000, WEB_PORT, "S", 1)).kind == FORWARD


def test_off_never_answers_and_ignores_cookies() -> None:
    lab = EngineHarness(1, syn_proxy=SynProxySettings(mode="off", secret=SECRET))
    assert lab.send(tcp(CLIENT1, LB, 40000, WEB_PORT, "S", 1)).kind == FORWARD
    stray = lab.send(tcp(CLIENT1, LB, 40001, WEB_PORT, "A", 2, 5))
    assert stray.drop_reason == DropReason.NO_SESSION


def test_a_syn_on_an_ended_row_while_proxying_gets_a_cookie() -> None:
    lab = EngineHarness(1, syn_proxy=SynProxySettings(mode="auto", threshold=1, secret=SECRET))
    flow = Proxied(lab, port=40000)
    assert flow.client("S", 5).kind == FORWARD  # an ordinary row ...
    assert flow.client("R", 6).kind == FORWARD  # ... ended by the client (CLOSE)
    lab.send(tcp(CLIENT1, LB, 41000, WEB_PORT, "S", 1))
    lab.send(tcp(CLIENT1, LB, 41001, WEB_PORT, "S", 1))  # 2 half-open rows > 1
    flow.syn()  # the client reuses its port: the ended row goes, no row comes
    assert len(lab.table) == 2
    flow.ack()
    flow.synack()
    rows = [r for r in lab.table if r.client_port == 40000]
    assert len(rows) == 1 and isinstance(rows[0], ProxiedSession)
    assert rows[0].state is State.ESTABLISHED


# --- each way a proxied handshake can go, as a table --------------------------------------------

SYN_SENT, ESTABLISHED, CLOSE = State.SYN_SENT, State.ESTABLISHED, State.CLOSE
HANDSHAKE = [("C syn", "synack>C", None), ("C ack", "syn>S", SYN_SENT)]
SCENARIOS: dict[str, list[tuple[str, str, State | None]]] = {
    "the whole handshake": [*HANDSHAKE, ("S synack", "ack>S", ESTABLISHED)],
    "the ACK carries data": [
        ("C syn", "synack>C", None),
        ("C ack+data", "syn>S", SYN_SENT),
        ("S synack", "data>S", ESTABLISHED),
    ],
    "a retransmitted SYN, before and after the ACK": [
        ("C syn", "synack>C", None),
        ("C syn", "synack>C", None),
        ("C ack", "syn>S", SYN_SENT),
        ("C syn", "drop syn_proxy_pending", SYN_SENT),
        ("S synack", "ack>S", ESTABLISHED),
    ],
    "lbnat's SYN lost: the client's data brings it again": [
        *HANDSHAKE,
        ("C data", "syn>S", SYN_SENT),
        ("C data", "syn>S", SYN_SENT),
        ("S synack", "data>S", ESTABLISHED),
    ],
    "a client RST before the backend answers": [
        *HANDSHAKE,
        ("C rst", "rst>S", CLOSE),
        ("S synack", "rst>S", CLOSE),
    ],
    "the backend refuses": [
        *HANDSHAKE,
        ("S rst", "rst>C", CLOSE),
        ("C data", "drop syn_proxy_pending", CLOSE),
    ],
    "a forged backend RST": [*HANDSHAKE, ("S forged rst", "drop syn_proxy_unexpected", SYN_SENT)],
    "a bad cookie": [("C syn", "synack>C", None), ("C bad ack", "drop bad_cookie", None)],
    "data both ways, then FINs": [
        *HANDSHAKE,
        ("S synack", "ack>S", ESTABLISHED),
        ("C data", "fwd>S", ESTABLISHED),
        ("S data", "fwd>C", ESTABLISHED),
        ("C fin", "fwd>S", State.FIN_WAIT),
        ("S fin", "fwd>C", State.TIME_WAIT),
    ],
}


def describe(result: Result) -> str:
    """A verdict as the table writes it: "synack>C", "fwd>S", "drop bad_cookie", ..."""
    if result.kind == DROP:
        return f"drop {DropReason(result.action[1]).label}"
    side = "C" if result.next_hop == CLIENT1 else "S"
    if result.kind == FORWARD:
        return f"fwd>{side}"
    segment = IP(result.reply)[TCP]
    flags = str(segment.flags)
    kind = {"SA": "synack", "S": "syn", "R": "rst"}.get(flags)
    if kind is None:
        kind = "data" if len(segment.payload) else "ack"
    return f"{kind}>{side}"


def send_step(flow: Proxied, packet: str) -> Result:
    """One packet of the table, from the client (C) or the backend (S)."""
    c, b, cookie = flow.c_isn, flow.b_isn, flow.cookie
    match packet:
        case "C syn":
            return flow.client("S", c, opts=LINUX_SYN)
        case "C ack":
            return flow.client("A", c + 1, cookie + 1)
        case "C ack+data" | "C data":
            return flow.client("PA", c + 1, cookie + 1, b"hello")
        case "C bad ack":
            return flow.client("A", c + 1, cookie + 7)
        case "C rst":
            return flow.client("R", c + 1)
        case "C fin":
            return flow.client("FA", c + 6, cookie + 6)
        case "S synack":
            return flow.backend("SA", b, c + 1, opts=LINUX_SYN)
        case "S rst":
            return flow.backend("RA", 0, c + 1)
        case "S forged rst":
            return flow.backend("RA", 0, c + 99)
        case "S data":
            return flow.backend("PA", b + 1, c + 6, b"world")
        case "S fin":
            return flow.backend("FA", b + 6, c + 7)
    raise ValueError(packet)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_way_a_proxied_handshake_goes(name: str) -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    for packet, verdict, state in SCENARIOS[name]:
        result = send_step(flow, packet)
        if packet == "C syn" and result.kind == REPLY:
            flow.cookie = IP(result.reply)[TCP].seq
        if packet in ("C ack", "C ack+data") and result.kind == REPLY:
            flow.nat_port = IP(result.reply)[TCP].sport
        assert describe(result) == verdict, f"{name}: {packet}"
        if result.kind == REPLY:
            verify_checksums(result.reply)
        elif result.kind == FORWARD:
            verify_checksums(result.out)
        rows = list(flow.lab.table)
        assert (rows[0].state if rows else None) == state, f"{name}: {packet}"


TCP_OPTIONS = st.sampled_from(
    [
        [],
        [("SAck", (1, 2))],
        [("NOP", None), ("NOP", None), ("SAck", (5, 9, 1000, 2000, 0xFFFFFFF0, 3))],
        [("MSS", 1400), ("WScale", 14), ("SAckOK", b"")],
        [("Timestamp", (7, 8))],
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.booleans(),  # from the client?
            st.sampled_from(["S", "SA", "A", "PA", "FA", "R", "RA", "U", "FPA"]),
            st.integers(0, M),
            st.integers(0, M),
            TCP_OPTIONS,
            st.binary(max_size=40),
            st.booleans(),  # partial checksum?
        ),
        max_size=12,
    ),
    handshake=st.integers(0, 2),  # how far the proxied handshake got first
)
def test_any_segment_on_a_proxied_row_is_handled_without_a_traceback(
    steps: list[tuple[bool, str, int, int, list[tuple[str, Any]], bytes, bool]], handshake: int
) -> None:
    flow = Proxied(EngineHarness(1, syn_proxy=ON))
    flow.syn()
    if handshake >= 1:
        flow.ack()
    if handshake >= 2:
        flow.synack()
    for from_client, flags, seq, ack, opts, payload, partial in steps:
        if from_client:
            packet = tcp(CLIENT1, LB, flow.port, WEB_PORT, flags, seq, ack, 100, payload, opts)
        else:
            packet = tcp(B1, LB, WEB_BACKEND_PORT, flow.nat_port or 61000, flags, seq, ack, 100,
                         payload, opts)  # fmt: skip
        result = flow.lab.send(packet, partial=partial)
        if result.kind == FORWARD:
            verify_checksums(result.out, kernel_completed=partial)
        elif result.kind == REPLY:
            verify_checksums(result.reply)


# --- a worker restarted after a crash takes its proxied rows back (lbnat.checkpoint) -----------


@pytest.mark.parametrize(
    ("distance", "backend_scale"),  # backend ISN = cookie - distance; the backend's wscale
    [(100, 7), (M - 200, 7), (0x80000000, 3), (1, None)],
)
def test_a_restored_proxied_row_translates_as_the_original_did(
    distance: int, backend_scale: int | None
) -> None:
    """The offset and window shifts go into the row's record when the backend answers; a new
    engine restored from it translates the next segments both ways byte for byte as the
    original engine does."""
    buffer = memoryview(bytearray(checkpoint_bytes(8)))
    original = EngineHarness(1, syn_proxy=ON)
    assert restore(original.engine, RowCheckpoint(buffer), 0.0).rows == 0
    flow = Proxied(original)
    flow.syn()
    flow.ack()
    flow.b_isn = (flow.cookie - distance) & M
    opts = [o for o in LINUX_SYN if o[0] != "WScale"]
    flow.synack(opts if backend_scale is None else [*opts, ("WScale", backend_scale)])
    row = flow.row
    twin_lab = EngineHarness(1, syn_proxy=ON)
    report = restore(twin_lab.engine, RowCheckpoint(buffer), 5.0)
    assert (report.rows, report.open_flows, report.dropped) == (1, 1, {})
    twin = Proxied(twin_lab, cookie=flow.cookie, nat_port=flow.nat_port, b_isn=flow.b_isn)
    copy = twin.row
    assert (copy.offset, copy.seq_delta, copy.ack_delta) == (
        row.offset, row.seq_delta, row.ack_delta
    )
    assert (copy.win_to_client, copy.win_to_backend) == (row.win_to_client, row.win_to_backend)
    c_seq, b_seq = (flow.c_isn + 1) & M, (flow.b_isn + 1) & M
    for size in (10, 0, 700):
        for sender in (flow, twin):
            out = forwarded(sender.client("PA", c_seq, (b_seq + row.offset) & M, b"c" * size))
            if sender is flow:
                expected = bytes(out)
        assert bytes(out) == expected and out[TCP].ack == b_seq
        c_seq = (c_seq + size) & M
        for sender in (flow, twin):
            back = forwarded(sender.backend("PA", b_seq, c_seq, b"b" * size))
            if sender is flow:
                expected = bytes(back)
        assert bytes(back) == expected and back[TCP].seq == (b_seq + row.offset) & M
        b_seq = (b_seq + size) & M


def test_a_proxied_row_whose_backend_had_not_answered_is_not_restored() -> None:
    """Its handshake state is not kept: the client's next segment, whose ACK still carries a
    valid cookie, opens the flow again."""
    buffer = memoryview(bytearray(checkpoint_bytes(8)))
    lab = EngineHarness(1, syn_proxy=ON)
    restore(lab.engine, RowCheckpoint(buffer), 0.0)
    flow = Proxied(lab)
    flow.syn()
    flow.ack()  # lbnat's SYN is on its way to the backend
    twin_lab = EngineHarness(1, syn_proxy=ON)
    report = restore(twin_lab.engine, RowCheckpoint(buffer), 1.0)
    assert (report.rows, report.dropped) == (0, {"handshake": 1})
    twin = Proxied(twin_lab, cookie=flow.cookie)
    twin.ack()  # the client's retransmitted ACK: a new SYN to the backend


def test_a_cookie_ack_that_takes_an_evicted_rows_port_resets_it_before_the_syn() -> None:
    """The proxied flow's row takes the NAT port of the backend's oldest half-open row: the
    RST for that row goes to the backend first, then lbnat's SYN on the same port (REPLIES);
    nothing is left pending for a later flow."""
    lab = EngineHarness(
        1, nat_ports=(61000, 61000), syn_proxy=SynProxySettings(mode="off", secret=SECRET)
    )
    plain = lab.send(tcp(CLIENT2, LB, 50000, WEB_PORT, "S", 9000))
    assert plain.forwarded  # a half-open plain row on 61000, the only port
    lab.engine.syn_proxy.mode = "on"
    flow = Proxied(lab)
    flow.syn()
    result = flow.client("A", flow.c_isn + 1, flow.cookie + 1)
    assert result.kind == REPLIES, result.action
    (rst, rst_hop), (syn, syn_hop) = [(IP(p), hop) for p, hop in result.sent_first]
    assert rst_hop == syn_hop == B1
    assert rst[TCP].flags == "R" and rst[TCP].sport == 61000 and rst[TCP].seq == 9001
    assert syn[TCP].flags == "S" and syn[TCP].sport == 61000 and syn[TCP].seq == flow.c_isn
    assert lab.engine._send_first.take() == ()
    flow.nat_port = 61000
    flow.synack()
    assert flow.row.state is State.ESTABLISHED
