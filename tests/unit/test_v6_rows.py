"""Rows of IPv6 clients (issue 21) outside the packet path: a worker's checkpoint restores them,
the session sync copies them to a peer, and the views show their addresses. Each row is made by
the engine itself (lbnat.engine6) from scapy packets, and after a restore or a sync the new row
must translate the flow's next packet byte for byte as the original did.

    client6 2001:db8::11 ── LB 198.18.0.2 / 2001:db8::2 ── backend6 2001:db8:1::21 :8080 (web6)
                                                         └─ backend4 198.18.0.21   :8080 (web4)
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw

from lbnat.checkpoint import (
    RestoreReport,
    RowCheckpoint,
    checkpoint_bytes,
    record_of,
    restore,
)
from lbnat.engine import Engine
from lbnat.nat import Nat64Session, Session, State
from lbnat.standby import GRACE, Standby
from lbnat.syncwire import (
    BulkChunk,
    BulkDone,
    InstallRows,
    Message,
    MessageType,
    RequestId,
    apply_records,
    decode,
    encode,
)
from lbnat.views import session_rows
from tests.unit.fixtures import check_table
from tests.unit.test_engine6 import B6, CLIENT6, LB6, Sent, engine, send, syn6

SECRET = b"pair"
PEER = 0x01020304
WEB6, WEB4 = 80, 81  # service ports: IPv6 backend, IPv4 backend (NAT64)


def open_flow(e: Engine, sport: int, dport: int) -> tuple[Session, int]:
    """An established flow of client6 to the service on `dport`: its row and NAT port."""
    out = send(e, syn6(sport, dport))
    nat = _nat_port(out)
    reply = _reply_to(out, nat)
    send(e, reply)
    ack = IPv6(src=CLIENT6, dst=LB6) / TCP(sport=sport, dport=dport, flags="A", seq=1001, ack=5001)
    send(e, ack)
    row = next(s for s in e.table if s.client_port == sport)
    assert row.state is State.ESTABLISHED
    return row, nat


def _nat_port(out: Sent) -> int:
    """The NAT port of the SYN lbnat sent the backend (IPv6, or IPv4 after NAT64)."""
    raw = out.packet
    return int((IPv6(raw) if raw[0] >> 4 == 6 else IP(raw))[TCP].sport)


def _reply_to(out: Sent, nat: int) -> Packet:
    """The backend's SYN-ACK to the SYN lbnat sent it."""
    raw = out.packet
    sent = IPv6(raw) if raw[0] >> 4 == 6 else IP(raw)
    header = IPv6 if raw[0] >> 4 == 6 else IP
    tcp = TCP(sport=8080, dport=nat, flags="SA", seq=5000, ack=1001)
    return header(src=sent.dst, dst=sent.src) / tcp


def data(sport: int, dport: int) -> Packet:
    return IPv6(src=CLIENT6, dst=LB6) / TCP(
        sport=sport, dport=dport, flags="PA", seq=1001, ack=5001
    ) / Raw(b"hello")  # fmt: skip


@pytest.mark.parametrize(
    ("dport", "row_class"), [(WEB6, Session), (WEB4, Nat64Session)], ids=["v6-v6", "nat64"]
)
def test_a_restored_ipv6_row_forwards_the_next_packet_as_the_original_did(
    dport: int, row_class: type[Session]
) -> None:
    original = engine()
    buffer = memoryview(bytearray(checkpoint_bytes(16)))
    checkpoint = RowCheckpoint(buffer)
    assert restore(original, checkpoint, 0.0) == RestoreReport()
    row, nat = open_flow(original, 40000, dport)
    assert type(row) is row_class
    record = checkpoint.record(row.slot)
    assert record == record_of(row)
    assert record is not None and record.client_ip == row.client_ip
    fresh = engine()
    report = restore(fresh, RowCheckpoint(buffer), 0.0)
    assert report == RestoreReport(1, 1, {})
    check_table(fresh.table)
    (again,) = list(fresh.table)
    assert type(again) is row_class
    assert (again.key, again.nat_port, again.state, again.backend, again.wscale) == (
        row.key, nat, row.state, row.backend, row.wscale,
    )  # fmt: skip
    mine, theirs = send(original, data(40000, dport)), send(fresh, data(40000, dport))
    assert (theirs.action, theirs.packet) == (mine.action, mine.packet)


@pytest.mark.parametrize("dport", [WEB6, WEB4], ids=["v6-v6", "nat64"])
def test_an_ipv6_row_reaches_the_peer_over_the_wire_and_forwards_there(dport: int) -> None:
    master, backup = engine(), engine()
    journal = Standby(master, 0).journal
    standby = Standby(backup, 0)
    row, nat = open_flow(master, 40001, dport)
    records = journal.drain(0.0)
    assert records.records
    for datagram in encode(
        MessageType.UPDATE, records.records, sender=PEER, epoch=1, seq=0, clock=0, secret=SECRET
    ):
        message = decode(datagram, SECRET, {PEER})
        assert isinstance(message, Message)
        for effect in apply_records(message):
            assert isinstance(effect, InstallRows)
            standby.apply(effect, 0.0)
    check_table(backup.table, GRACE)
    assert standby.counts["installed"] == 1
    (again,) = list(backup.table)
    assert (again.key, again.nat_port, type(again)) == (row.key, nat, type(row))
    mine, theirs = send(master, data(40001, dport)), send(backup, data(40001, dport))
    assert (theirs.action, theirs.packet) == (mine.action, mine.packet)
    # a resync's bulk carries it too
    (update,) = Standby(master, 0).bulk(0.0)
    request = RequestId(7, 1)
    (datagram,) = encode(
        MessageType.BULK, [BulkChunk(request), update, BulkDone(request, 1)], sender=PEER,
        epoch=1, seq=1, clock=0, secret=SECRET,
    )  # fmt: skip
    message = decode(datagram, SECRET, {PEER})
    assert isinstance(message, Message) and message.records[1] == update


def test_the_sessions_view_shows_ipv6_addresses_with_brackets() -> None:
    e = engine()
    open_flow(e, 40002, WEB6)
    open_flow(e, 40003, WEB4)
    rows = {r["client"]: r["backend"] for r in session_rows(e, 1.0)}
    assert rows == {
        f"[{CLIENT6}]:40002": f"[{B6}]:8080",
        f"[{CLIENT6}]:40003": "198.18.0.21:8080",
    }


def test_a_slot_an_ipv6_row_left_is_clean_for_the_ipv4_row_that_takes_it() -> None:
    e = engine()
    checkpoint = RowCheckpoint(memoryview(bytearray(checkpoint_bytes(4))))
    restore(e, checkpoint, 0.0)
    row6, _ = open_flow(e, 40004, WEB6)
    slot = row6.slot
    e.table.remove(row6)
    syn4 = IP(src="198.18.0.11", dst="198.18.0.2") / TCP(sport=40005, dport=WEB4, flags="S")
    send(e, syn4)
    (row4,) = list(e.table)
    assert row4.slot == slot
    assert checkpoint.record(slot) == record_of(row4)
