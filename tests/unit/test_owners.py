"""Flows that change instance (lbnat.owners, docs/scale-out.md): an instance behind ECMP keeps
the other instances' flows from their sync records, and forwards a packet of such a flow to its
owner unchanged but for the TTL, instead of dropping it. New flows stay here; a flow of its own
is never forwarded; a TTL that runs out ends a loop.

    lb1 (owner, 198.18.1.11) ── ROW ──► lb2's FlowOwners
    client ─(ECMP rehash)─► lb2: ACK, no row ──► FORWARD to 198.18.1.11, TTL - 1
"""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet import TCP as ScapyTCP

from lbnat.backends import Backend
from lbnat.checkpoint import RowRecord
from lbnat.drops import DropReason
from lbnat.engine import DROP, FORWARD, Engine, ip_int, ip_text
from lbnat.nat import State, Timeouts
from lbnat.owners import GRACE, FlowOwners
from lbnat.service import Service
from lbnat.standby import Standby
from lbnat.syncwire import (
    EndRows,
    InstallRows,
    MarkStale,
    RefreshRows,
    ResyncComplete,
    RowEnd,
    RowKey,
    RowRefresh,
    RowUpdate,
)
from tests.unit.fixtures import tcp, udp, verify_checksums, wire

OWN = "198.18.1.12"  # this instance, lb2
OWNER = ip_int("198.18.1.11")  # lb1
OTHER = ip_int("198.18.1.13")  # lb3
VIP = "198.18.100.1"
CLIENT = "198.18.2.11"
BACKEND = "198.18.1.21"
TCP, UDP = 6, 17


def record(port: int = 40000, state: State = State.ESTABLISHED, proto: int = TCP,
           nat_port: int = 62000, service_port: int = 80) -> RowUpdate:  # fmt: skip
    row = RowRecord(proto, state, 0, service_port, ip_int(CLIENT), port, ip_int(BACKEND), 8080,
                    nat_port, 0, 0)  # fmt: skip
    return RowUpdate(row, 0, 0)


def key_of(update: RowUpdate) -> RowKey:
    r = update.row
    return RowKey(r.proto, r.service_port, r.client_ip, r.client_port, r.nat_port)


def lb2() -> tuple[Engine, Standby]:
    engine = Engine(
        OWN,
        [
            Service("web", "tcp", 80, "maglev", 0.0, (Backend(BACKEND, 8080),)),
            Service("dns", "udp", 53, "maglev", 0.0, (Backend(BACKEND, 5353),)),
        ],
        vip=VIP,
    )
    engine.owners = FlowOwners(Timeouts())
    standby = Standby(engine, 0)
    engine.standby = standby
    return engine, standby


def send(engine: Engine, packet: object, now: float = 1.0) -> tuple[tuple[object, ...], bytearray]:
    buf = wire(packet)  # type: ignore[arg-type]
    return engine.handle(buf, 0, len(buf), False, now), buf


# --- the packet path -----------------------------------------------------------------------


def test_a_packet_of_another_instances_flow_goes_to_its_owner_unchanged_but_for_the_ttl() -> None:
    engine, standby = lb2()
    standby.apply(InstallRows(OWNER, (record(),), 0), 0.0)
    packet = tcp(CLIENT, VIP, 40000, 80, "PA", 1001, 5001, payload=b"hello")
    packet[IP].ttl = 63
    action, out = send(engine, packet)
    assert action == (FORWARD, OWNER)
    forwarded = IP(bytes(out))
    assert forwarded.ttl == 62
    assert (forwarded.src, forwarded.dst, forwarded[ScapyTCP].dport) == (CLIENT, VIP, 80)
    assert bytes(out)[12:] == bytes(wire(packet))[12:]  # addresses, ports, payload: untouched
    verify_checksums(out)
    assert engine.table.forward == {}  # no row here: the owner's row serves it
    assert engine.owners is not None and engine.owners.forwarded == 1


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (tcp(CLIENT, VIP, 40000, 80, "A", 1001, 5001), "owner"),
        (tcp(CLIENT, VIP, 40000, 80, "FA", 1001, 5001), "owner"),
        (tcp(CLIENT, VIP, 40000, 80, "R", 1001), "owner"),
        (tcp(CLIENT, VIP, 40000, 80, "S", 999), "here"),  # a new flow on a reused port
        (tcp(CLIENT, VIP, 40001, 80, "A", 1001, 5001), "no_session"),  # nobody's flow
        (udp(CLIENT, VIP, 40000, 53, b"q"), "owner"),
        (udp(CLIENT, VIP, 40001, 53, b"q"), "here"),
    ],
    ids=["ack", "fin", "rst", "syn", "unknown-ack", "udp-owned", "udp-new"],
)
def test_what_goes_to_the_owner(packet: object, expected: str) -> None:
    engine, standby = lb2()
    standby.apply(InstallRows(OWNER, (record(), record(proto=UDP, service_port=53)), 0), 0.0)
    action, _ = send(engine, packet)
    if expected == "owner":
        assert action == (FORWARD, OWNER)
    elif expected == "here":
        assert action[0] == FORWARD and ip_text(action[1]) == BACKEND  # type: ignore[arg-type]
    else:
        assert action == (DROP, DropReason.NO_SESSION)


def test_a_flow_of_its_own_is_never_forwarded() -> None:
    engine, standby = lb2()
    action, _ = send(engine, tcp(CLIENT, VIP, 40000, 80, "S", 1000))
    assert action[0] == FORWARD
    standby.apply(InstallRows(OWNER, (record(),), 0), 0.0)  # a stale claim from a peer
    action, _ = send(engine, tcp(CLIENT, VIP, 40000, 80, "A", 1001, 5001))
    assert ip_text(action[1]) == BACKEND  # type: ignore[arg-type]


def test_a_ttl_that_runs_out_between_instances_is_a_counted_drop() -> None:
    engine, standby = lb2()
    standby.apply(InstallRows(OWNER, (record(),), 0), 0.0)
    packet = tcp(CLIENT, VIP, 40000, 80, "A", 1001, 5001)
    packet[IP].ttl = 1
    action, _ = send(engine, packet)
    assert action == (DROP, DropReason.OWNER_LOOP)
    assert engine.drops == {DropReason.OWNER_LOOP: 1}


@given(ttl=st.integers(2, 255), check=st.integers(0, 0xFFFF), rest=st.binary(min_size=8,
       max_size=8))  # fmt: skip
def test_the_ttl_update_keeps_the_header_checksum_right(ttl: int, check: int, rest: bytes) -> None:
    """RFC 1624: the incremental update equals a full recompute, whatever the header held."""
    header = bytearray(b"\x45\x00\x00\x28\x12\x34\x40\x00" + bytes([ttl, 6]) + b"\x00\x00" + rest)
    struct.pack_into("!H", header, 10, _checksum(header))
    FlowOwners().pass_on(header, 0)
    assert header[8] == ttl - 1
    assert _fold(header) == 0xFFFF  # a valid header sums to all ones (either zero)


def _fold(data: bytes | bytearray) -> int:
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", bytes(data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _checksum(header: bytearray) -> int:
    copy = bytearray(header)
    struct.pack_into("!H", copy, 10, 0)
    return ~_fold(copy) & 0xFFFF


# --- the records ---------------------------------------------------------------------------


def test_an_end_removes_the_record_of_that_row_only() -> None:
    owners = FlowOwners()
    first = record()
    owners.install(OWNER, [first], 0.0)
    owners.end(OWNER, [key_of(record(nat_port=62001))])  # another row of a reused socket
    owners.end(OTHER, [key_of(first)])  # not that instance's
    assert len(owners.flows) == 1
    owners.end(OWNER, [key_of(first)])
    assert owners.flows == {}


def test_records_live_as_the_owners_row_would_and_refreshes_extend_them() -> None:
    timeouts = Timeouts()
    owners = FlowOwners(timeouts)
    update = record()
    owners.install(OWNER, [update], 100.0)
    key = next(iter(owners.flows))
    deadline = 100.0 + timeouts.by_state()[State.ESTABLISHED] + GRACE
    assert owners.owner_of(key, deadline - 1) == OWNER
    owners.refresh(OWNER, [RowRefresh(key_of(update), 0)], deadline - 1)
    assert owners.owner_of(key, deadline + 10) == OWNER
    assert owners.owner_of(key, deadline * 3) is None
    assert owners.flows == {}


def test_a_resync_sweeps_what_the_owner_no_longer_has() -> None:
    engine, standby = lb2()
    kept, gone, others = record(40000), record(40001), record(40002)
    standby.apply(InstallRows(OWNER, (kept, gone), 0), 0.0)
    standby.apply(InstallRows(OTHER, (others,), 0), 0.0)
    standby.apply(MarkStale(OWNER), 1.0)
    standby.apply(InstallRows(OWNER, (kept,), 0), 1.0)
    standby.apply(ResyncComplete(OWNER), 1.0)
    assert engine.owners is not None
    assert sorted(o.owner for o in engine.owners.flows.values()) == [OWNER, OTHER]
    assert standby.counts["swept"] == 1
    assert engine.owners.by_owner() == {OWNER: 1, OTHER: 1}


def test_mesh_records_never_become_rows_and_an_end_or_refresh_goes_to_the_owners() -> None:
    engine, standby = lb2()
    update = record()
    standby.apply(InstallRows(OWNER, (update,), 0), 0.0)
    standby.apply(RefreshRows(OWNER, (RowRefresh(key_of(update), 3),)), 1.0)
    assert engine.table.forward == {}
    standby.apply(EndRows(OWNER, (key_of(update),)), 2.0)
    assert engine.owners is not None and engine.owners.flows == {}


def test_its_own_rows_still_go_to_the_peers() -> None:
    engine, standby = lb2()
    send(engine, tcp(CLIENT, VIP, 40000, 80, "S", 1000))
    row = next(iter(engine.table.forward.values()))
    send(engine, tcp(BACKEND, OWN, 8080, row.nat_port, "SA", 5000, 1001))
    send(engine, tcp(CLIENT, VIP, 40000, 80, "A", 1001, 5001))
    records = standby.journal.drain(3.0).records
    assert any(isinstance(r, RowUpdate) and r.row.state is State.ESTABLISHED for r in records)
    assert not any(isinstance(r, RowEnd) for r in records)


def test_an_ended_flow_of_another_instance_is_not_forwarded_and_its_socket_is_free() -> None:
    """A SYN-proxy cookie ACK (or any segment) of a client that reused the socket of a flow
    that ended on lb1 is not lb1's: lb1's TIME_WAIT record must not take it."""
    engine, standby = lb2()
    standby.apply(InstallRows(OWNER, (record(state=State.TIME_WAIT),), 0), 0.0)
    action, _ = send(engine, tcp(CLIENT, VIP, 40000, 80, "A", 1001, 5001))
    assert action == (DROP, DropReason.NO_SESSION)


def test_a_live_flow_elsewhere_wins_over_an_ended_row_here() -> None:
    engine, standby = lb2()
    send(engine, tcp(CLIENT, VIP, 40000, 80, "S", 1000))
    row = next(iter(engine.table.forward.values()))
    send(engine, tcp(CLIENT, VIP, 40000, 80, "R", 1001))  # ended here (CLOSE)
    assert row.ended
    standby.apply(InstallRows(OWNER, (record(),), 0), 0.0)  # the socket's new flow, on lb1
    action, _ = send(engine, tcp(CLIENT, VIP, 40000, 80, "A", 1001, 5001))
    assert action == (FORWARD, OWNER)


def test_a_late_end_from_one_owner_never_hides_a_live_flow_of_another() -> None:
    owners = FlowOwners()
    owners.install(OTHER, [record()], 0.0)  # lb3's live flow of the socket
    owners.install(OWNER, [record(state=State.TIME_WAIT)], 0.1)  # lb1's old one, in a bulk
    assert owners.owner_of(next(iter(owners.flows)), 1.0) == OTHER


def test_an_ipv6_clients_records_are_skipped_and_counted() -> None:
    """The mesh is IPv4: a peer's rows of IPv6 clients are no ownership to keep here."""
    from lbnat import addresses

    owners = FlowOwners(Timeouts())
    v4 = record()
    row6 = dataclasses.replace(v4.row, client_ip=addresses.parse("2001:db8::11"))
    v6 = RowUpdate(row6, 0, 0)
    owners.install(OWNER, [v6, v4], now=1.0)
    owners.refresh(OWNER, [RowRefresh(key_of(v6), 0)], now=2.0)
    owners.end(OWNER, [key_of(v6)])
    assert len(owners.flows) == 1 and owners.ipv6_skipped == 3
