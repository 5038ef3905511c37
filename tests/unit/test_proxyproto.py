"""PROXY protocol v2 under full NAT (lbnat.proxyproto): the header, and the sequence shift
checked on a small simulated TCP at each end under any loss, reordering, retransmission,
SACK and window update."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP

from lbnat import proxyproto as pp
from lbnat.addresses import parse
from lbnat.packet import ACK, PSH, SYN, apply_delta
from tests.unit.fixtures import verify_checksums

M = 0xFFFFFFFF
CLIENT, VIP, LB, BACKEND = "198.18.0.10", "198.18.0.1", "198.18.1.1", "198.18.1.10"


def test_the_ipv4_header_is_the_specs() -> None:
    header = pp.header_v2(parse("203.0.113.7"), 40000, parse("198.51.100.1"), 443)
    assert header == bytes.fromhex("0d0a0d0a000d0a515549540a2111000ccb007107c63364019c4001bb")
    assert pp.parse_v2(header + b"GET /") == (28, "203.0.113.7", 40000, "198.51.100.1", 443)


def test_the_ipv6_header_is_52_bytes() -> None:
    header = pp.header_v2(parse("2001:db8::7"), 1, parse("2001:db8::1"), 80)
    assert len(header) == 52 and header[13] == pp.TCP6
    assert pp.parse_v2(header) == (52, "2001:db8::7", 1, "2001:db8::1", 80)


def test_families_do_not_mix() -> None:
    with pytest.raises(ValueError):
        pp.header_v2(parse("2001:db8::7"), 1, parse("198.51.100.1"), 80)
    with pytest.raises(ValueError):
        pp.parse_v2(b"GET / HTTP/1.1\r\n\r\n")


def segment(src: str, dst: str, seq: int, ack: int, flags: int, payload: bytes = b"",
            window: int = 1000, sack: tuple[tuple[int, int], ...] = (),
            ts: int | None = None) -> bytearray:  # fmt: skip
    options: list[tuple[str, object]] = []
    if ts is not None:
        options += [("NOP", None), ("NOP", None), ("Timestamp", (ts, 7))]
    if sack:
        options += [("NOP", None), ("NOP", None), ("SAck", tuple(e for b in sack for e in b))]
    packet = IP(src=src, dst=dst) / TCP(
        sport=61000, dport=8080, seq=seq, ack=ack, flags=flags, window=window, options=options
    )
    return bytearray(bytes(packet / payload) if payload else bytes(packet))


def fix(packet: bytearray, delta: int) -> None:
    """Apply a transport checksum delta (the engine folds it into its rewrite)."""
    check = (packet[36] << 8) | packet[37]
    check = apply_delta(check, delta)
    packet[36:38] = check.to_bytes(2, "big")


def new_row(isn: int) -> pp.ProxyProtoSession:
    row = pp.ProxyProtoSession()
    pp.start_row(row, parse(CLIENT), 40000, isn, parse(VIP), 8080)
    return row


def client_sends(row: pp.ProxyProtoSession, packet: bytearray, now: float) -> list[bytes]:
    """What lbnat sends to the backend for one client segment (already NATed)."""
    parsed = TCP(bytes(packet[20:]))
    flags, seq = int(parsed.flags), parsed.seq
    pure = pp.replaces(row, packet, 0, 20, flags, seq)
    delta, send = pp.from_client(row, packet, 20, flags, seq, now, pure)
    fix(packet, delta)
    out: list[bytes] = []
    if send:
        out.append(pp.header_packet(row, packet, 20))
        if pure:
            return out
    out.append(bytes(packet))
    return out


def backend_sends(row: pp.ProxyProtoSession, packet: bytearray) -> bytes:
    parsed = TCP(bytes(packet[20:]))
    delta, _ = pp.from_backend(row, packet, 20, len(packet), int(parsed.flags), parsed.ack)
    fix(packet, delta)
    return bytes(packet)


def test_the_handshake_ack_becomes_the_header_and_data_is_shifted() -> None:
    isn = M - 10  # the wrap, inside the header
    row = new_row(isn)
    base = (isn + 1) & M
    syn = segment(LB, BACKEND, isn, 0, SYN)
    assert client_sends(row, syn, 0.0) == [bytes(syn)]
    synack = backend_sends(row, segment(BACKEND, LB, 5000, base, SYN | ACK))
    assert IP(synack)[TCP].ack == base
    out = client_sends(row, segment(LB, BACKEND, base, 5001, ACK, ts=99), 0.01)
    assert len(out) == 1
    header = IP(out[0])
    assert header[TCP].seq == base and bytes(header[TCP].payload) == row.pp_header
    assert int(header[TCP].flags) == ACK | PSH and header[TCP].ack == 5001
    assert dict((k, v) for k, v in header[TCP].options if k == "Timestamp") == {
        "Timestamp": (99, 7)
    }
    verify_checksums(out[0])
    data = client_sends(row, segment(LB, BACKEND, base, 5001, ACK | PSH, b"GET /"), 0.02)
    assert len(data) == 1 and IP(data[0])[TCP].seq == (base + 28) & M
    verify_checksums(data[0])
    again = client_sends(row, segment(LB, BACKEND, base, 5001, ACK | PSH, b"GET /"), 0.05)
    assert len(again) == 1  # a quick retransmission: the header is not sent again
    reply = backend_sends(
        row,
        segment(BACKEND, LB, 5001, (base + 33) & M, ACK, b"200", sack=((base, (base + 28) & M),)),
    )
    parsed = IP(reply)[TCP]
    assert parsed.ack == (base + 5) & M and parsed.seq == 5001
    assert dict(parsed.options)["SAck"] == (base, base)  # in the header: empty
    verify_checksums(reply)
    assert row.pp_state == 2
    late = client_sends(row, segment(LB, BACKEND, base, 5004, ACK | PSH, b"GET /"), 5.0)
    assert len(late) == 1  # acknowledged: never again


def test_a_duplicate_ack_without_the_header_brings_it_with_the_next_segment() -> None:
    row = new_row(1000)
    client_sends(row, segment(LB, BACKEND, 1001, 1, ACK), 0.0)
    client_sends(row, segment(LB, BACKEND, 1001, 1, ACK, b"abc"), 0.01)
    backend_sends(row, segment(BACKEND, LB, 1, 1001, ACK, sack=((1029, 1032),)))
    out = client_sends(row, segment(LB, BACKEND, 1001, 1, ACK, b"abc"), 0.02)
    assert [IP(p)[TCP].seq for p in out] == [1001, 1029]
    assert bytes(IP(out[0])[TCP].payload) == row.pp_header


def test_a_pure_ack_at_the_start_while_the_header_is_unacknowledged_is_the_header_again() -> None:
    row = new_row(1000)
    assert len(client_sends(row, segment(LB, BACKEND, 1001, 1, ACK), 0.0)) == 1
    (again,) = client_sends(row, segment(LB, BACKEND, 1001, 1, ACK, window=9), 0.01)
    assert IP(again)[TCP].seq == 1001 and bytes(IP(again)[TCP].payload) == row.pp_header
    backend_sends(row, segment(BACKEND, LB, 1, 1029, ACK))
    (ack,) = client_sends(row, segment(LB, BACKEND, 1001, 1, ACK), 0.02)
    assert IP(ack)[TCP].seq == 1029 and not len(IP(ack)[TCP].payload)


def test_a_backend_segment_before_the_header_is_left_alone() -> None:
    row = new_row(1000)
    rst = segment(LB, BACKEND, 1001, 0, 0x04)
    assert client_sends(row, rst, 0.0) == [bytes(rst)]
    data = segment(BACKEND, LB, 1, 1001, ACK, b"220 hello")
    assert backend_sends(row, bytearray(data)) == bytes(data)


# --- the simulation ------------------------------------------------------------------------


@dataclass
class Sim:
    """A client sending `data` through lbnat to a backend that reassembles, acknowledges
    cumulatively with SACK blocks, and sends data of its own the other way."""

    isn: int
    data: bytes
    row: pp.ProxyProtoSession = field(init=False)
    now: float = 0.0
    sent: int = 0  # bytes of data the client has sent (offset past its ISN + 1)
    acked: int = 0  # what the client has seen acknowledged (offset)
    to_backend: list[bytes] = field(default_factory=list)
    to_client: list[bytes] = field(default_factory=list)
    got: dict[int, int] = field(default_factory=dict)  # backend: offset -> byte
    rcv_nxt: int = 0  # backend's cumulative offset (its own numbering, header included)
    backend_seq: int = 7000
    headers: int = 0

    def __post_init__(self) -> None:
        self.row = new_row(self.isn)
        self.base = (self.isn + 1) & M
        self.expected = self.row.pp_header + self.data
        self.to_backend += client_sends(self.row, segment(LB, BACKEND, self.isn, 0, SYN), 0.0)
        self.backend_receives(self.to_backend.pop())
        self.client_receives(self.to_client.pop())
        self.emit(segment(LB, BACKEND, self.base, self.backend_seq + 1, ACK, ts=1))

    def emit(self, packet: bytearray) -> None:
        for out in client_sends(self.row, packet, self.now):
            verify_checksums(out)
            if len(IP(out)[TCP].payload) and IP(out)[TCP].seq == self.base:
                self.headers += 1
            self.to_backend.append(out)

    def client_send(self, offset: int, length: int, window: int) -> None:
        offset = min(offset, self.sent)
        chunk = self.data[offset : offset + length]
        self.sent = max(self.sent, offset + len(chunk))
        seq = (self.base + offset) & M
        self.emit(segment(LB, BACKEND, seq, self.backend_seq + 1, ACK, chunk, window,
                          ts=int(self.now * 1000) + 2))  # fmt: skip

    def backend_receives(self, raw: bytes) -> None:
        packet = IP(raw)[TCP]
        if int(packet.flags) & SYN:
            synack = segment(BACKEND, LB, self.backend_seq, (packet.seq + 1) & M, SYN | ACK)
            self.to_client.append(backend_sends(self.row, synack))
            return
        offset = (packet.seq - self.base) & M
        payload = bytes(packet.payload)
        for i, byte in enumerate(payload):
            assert self.expected[offset + i] == byte, "a byte differs from the stream's"
            self.got[offset + i] = byte
        while self.rcv_nxt in self.got:
            self.rcv_nxt += 1
        blocks: list[tuple[int, int]] = []
        at = self.rcv_nxt
        top = max(self.got, default=-1)
        while at <= top and len(blocks) < 3:
            if at in self.got:
                left = at
                while at in self.got:
                    at += 1
                blocks.append(((self.base + left) & M, (self.base + at) & M))
            at += 1
        ack = (self.base + self.rcv_nxt) & M
        reply = segment(BACKEND, LB, self.backend_seq + 1, ack, ACK, b"x" * (len(payload) % 3),
                        sack=tuple(blocks))  # fmt: skip
        self.to_client.append(backend_sends(self.row, reply))

    def client_receives(self, raw: bytes) -> None:
        verify_checksums(raw)
        packet = IP(raw)[TCP]
        assert packet.seq in (self.backend_seq, self.backend_seq + 1)  # never shifted
        offset = (packet.ack - self.base) & M
        if int(packet.flags) & SYN:
            assert offset == 0
            return
        assert offset <= self.sent, "an acknowledgement of bytes never sent"
        assert all(self.got.get(len(self.row.pp_header) + i) is not None for i in range(offset))
        for name, value in packet.options:
            if name == "SAck":
                for left, right in zip(value[::2], value[1::2], strict=True):
                    lo, hi = (left - self.base) & M, (right - self.base) & M
                    assert lo <= hi <= self.sent
                    assert all(len(self.row.pp_header) + i in self.got for i in range(lo, hi))
        self.acked = max(self.acked, offset)

    def deliver(self, queue: list[bytes], index: int, drop: bool) -> None:
        if not queue:
            return
        raw = queue.pop(index % len(queue))
        if drop:
            return
        if queue is self.to_backend:
            self.backend_receives(raw)
        else:
            self.client_receives(raw)

    def finish(self) -> None:
        """No more loss: the client retransmits from what it has seen acknowledged."""
        for _ in range(50):
            self.now += 1.0
            if self.acked == len(self.data) and self.rcv_nxt == len(self.expected):
                break
            start = self.acked
            self.client_send(start, max(len(self.data) - start, 0), 1000)
            while self.to_backend or self.to_client:
                self.deliver(self.to_backend, 0, False)
                self.deliver(self.to_client, 0, False)
        assert self.rcv_nxt == len(self.expected)
        assert bytes(self.got[i] for i in range(self.rcv_nxt)) == self.expected
        assert self.acked == len(self.data)


step = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 400), st.integers(0, 120), st.integers(1, 65535)),
    st.tuples(st.just("window"), st.integers(1, 65535)),
    st.tuples(st.just("to_backend"), st.integers(0, 20), st.booleans()),
    st.tuples(st.just("to_client"), st.integers(0, 20), st.booleans()),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.05, 0.3])),
)


@settings(max_examples=60, deadline=None)
@given(
    isn=st.one_of(st.integers(0, M), st.integers(M - 40, M)),
    data=st.binary(min_size=1, max_size=400),
    steps=st.lists(step, max_size=40),
)
def test_any_interleaving_keeps_both_streams_identical(
    isn: int, data: bytes, steps: list[tuple[object, ...]]
) -> None:
    sim = Sim(isn, data)
    for op in steps:
        if op[0] == "send":
            _, offset, length, window = op
            sim.client_send(int(offset), int(length), int(window))  # type: ignore[call-overload]
        elif op[0] == "window":
            sim.emit(segment(LB, BACKEND, (sim.base + sim.sent) & M, sim.backend_seq + 1, ACK,
                             window=int(op[1])))  # type: ignore[call-overload]  # fmt: skip
        elif op[0] == "wait":
            sim.now += float(op[1])  # type: ignore[arg-type]
        else:
            queue = sim.to_backend if op[0] == "to_backend" else sim.to_client
            sim.deliver(queue, int(op[1]), bool(op[2]))  # type: ignore[call-overload]
    sim.finish()


def test_the_header_is_sent_once_without_loss() -> None:
    rng = random.Random(5)
    sim = Sim(123, bytes(rng.randrange(256) for _ in range(3000)))
    for offset in range(0, 3000, 500):
        sim.client_send(offset, 500, 1000)
        sim.client_send(offset, 500, 1000)  # an instant retransmission of each
    while sim.to_backend or sim.to_client:
        sim.deliver(sim.to_backend, 0, False)
        sim.deliver(sim.to_client, 0, False)
    sim.finish()
    assert sim.headers == 1
