"""lbnat.fastpath for IPv6 rows (issue 21), with `SimulatedMap`s for the kernel's two maps.

The rows are made as the contract says (tests/unit/rows6.py) and given to FastPath the way the
session table does (`changed` on a change of state, `settle` on the tick, `refresh` before a
FIN, RST or expiry, `removed`), until the engine makes IPv6 rows itself. The program runs the
same entries in tests/unit/test_tcbpf6.py."""

from __future__ import annotations

import pytest

from lbnat import addresses
from lbnat.fastpath import (
    KERNEL_PART,
    KERNEL_PART_AT,
    KERNEL_PART_AT6,
    KEY,
    KEY6,
    OFFLOAD_AFTER,
    VALUE,
    VALUE6,
    FastPath,
    SimulatedMap,
    family,
    flow_entries,
    port_delta,
)
from lbnat.nat import Session, State
from lbnat.packet import PORT_PAIR, rewrite_deltas
from tests.unit import rows6 as r6

IFINDEX = 7
OUR_MAC = bytes.fromhex("02aa00000002")


def mac_of(ip: int) -> bytes:
    return bytes.fromhex("02bb") + addresses.packed(ip)[-4:]


def ethernet(ip: int) -> bytes | None:
    """Every next hop resolved, to a MAC made of its address (ethertype by family)."""
    return mac_of(ip) + OUR_MAC + (b"\x86\xdd" if addresses.is_v6(ip) else b"\x08\x00")


def fastpath_with(
    capacity: int = 1 << 16, capacity6: int = 1 << 16, resolve: bool = True, v6: bool = True
) -> tuple[FastPath, SimulatedMap, SimulatedMap]:
    kernel, kernel6 = SimulatedMap(capacity), SimulatedMap(capacity6)
    fastpath = FastPath(
        kernel, ethernet if resolve else (lambda ip: None), IFINDEX, kernel6 if v6 else None
    )
    return fastpath, kernel, kernel6


def offload(fastpath: FastPath, row: Session) -> None:
    """What the table does: the row became established (replied) at row.seen, then ticks."""
    fastpath.changed(row)
    fastpath.settle(row.seen + OFFLOAD_AFTER)


def fwd_key(row: Session) -> bytes:
    return KEY6.pack(r6.packed(r6.CLIENT6), r6.packed(r6.VIP6), r6.CPORT, r6.SPORT, row.proto)


def rev_key(row: Session) -> bytes:
    return KEY6.pack(r6.packed(r6.BACKEND6), r6.packed(r6.VIP6), r6.BPORT, r6.NAT_PORT, row.proto)


def v4_row(seen: float = 1.0) -> Session:
    return r6.make_row(client=r6.CLIENT4, vip=r6.LB4, lb=r6.LB4, backend=r6.BACKEND4, seen=seen)


# --- the entries ----------------------------------------------------------------------------


@pytest.mark.parametrize("proto", [6, 17], ids=["tcp", "udp"])
def test_an_ipv6_row_s_entries_hold_its_own_rewrites(proto: int) -> None:
    row = r6.make_row(proto=proto)
    entries = flow_entries(row, ethernet, IFINDEX)
    assert entries is not None
    (fk, fv), (rk, rv) = entries
    assert KEY6.unpack(fk) == (
        r6.packed(r6.CLIENT6), r6.packed(r6.VIP6), r6.CPORT, r6.SPORT, proto,
    )  # fmt: skip
    assert KEY6.unpack(rk) == (
        r6.packed(r6.BACKEND6), r6.packed(r6.VIP6), r6.BPORT, r6.NAT_PORT, proto,
    )  # fmt: skip
    assert len(fk) == 40 and len(fv) == len(rv) == 88
    old_fwd = r6.packed(r6.CLIENT6) + r6.packed(r6.VIP6)
    new_fwd = r6.packed(r6.VIP6) + r6.packed(r6.BACKEND6)
    old_rev = r6.packed(r6.BACKEND6) + r6.packed(r6.VIP6)
    new_rev = r6.packed(r6.VIP6) + r6.packed(r6.CLIENT6)
    for value, old, new, old_ports, new_ports, hop in (
        (fv, old_fwd, new_fwd, (r6.CPORT, r6.SPORT), (r6.NAT_PORT, r6.BPORT), r6.BACKEND6),
        (rv, old_rev, new_rev, (r6.BPORT, r6.NAT_PORT), (r6.SPORT, r6.CPORT), r6.CLIENT6),
    ):
        new_addresses, ports, ip_d, port_d, eth, ifindex, *counts = VALUE6.unpack(value)
        assert new_addresses == new
        assert ports == PORT_PAIR.pack(*new_ports)
        # the deltas: of the address change (32 bytes) and of the port change alone
        old_p, new_p = PORT_PAIR.pack(*old_ports), PORT_PAIR.pack(*new_ports)
        assert ip_d == rewrite_deltas(old, new, old_p, old_p)[0]
        assert port_d == rewrite_deltas(old, old, old_p, new_p)[1]
        assert port_d == port_delta(*rewrite_deltas(old, new, old_p, new_p))
        assert eth == mac_of(addresses.parse(hop)) + OUR_MAC
        assert ifindex == IFINDEX and counts == [0, 0, 0, 0, 0, 0]


def test_the_next_hops_asked_for_are_ipv6_addresses() -> None:
    asked: list[int] = []

    def recording(ip: int) -> bytes | None:
        asked.append(ip)
        return ethernet(ip)

    assert flow_entries(r6.make_row(), recording, IFINDEX) is not None
    assert asked == [addresses.parse(r6.BACKEND6), addresses.parse(r6.CLIENT6)]
    assert flow_entries(r6.make_row(), lambda ip: None, IFINDEX) is None


def test_family_is_read_from_the_address_blocks() -> None:
    assert family(v4_row()) == 4
    assert family(r6.make_row()) == 6
    assert family(r6.nat64_row()) == 0
    assert family(r6.nat64_row(cls=Session)) == 0
    with pytest.raises(ValueError, match="NAT64"):
        flow_entries(r6.nat64_row(cls=Session), ethernet, IFINDEX)


# --- which map ------------------------------------------------------------------------------


def test_ipv6_rows_go_into_the_ipv6_map_and_ipv4_rows_into_the_ipv4_map() -> None:
    fastpath, kernel, kernel6 = fastpath_with()
    row6, row4 = r6.make_row(seen=1.0), v4_row(seen=1.0)
    fastpath.changed(row6)
    fastpath.changed(row4)
    fastpath.settle(1.0 + OFFLOAD_AFTER / 2)
    assert kernel.entries == {} and kernel6.entries == {}, "before OFFLOAD_AFTER"
    fastpath.settle(1.0 + OFFLOAD_AFTER)
    assert set(kernel6.entries) == {fwd_key(row6), rev_key(row6)}
    assert len(kernel.entries) == 2
    assert all(len(key) == KEY.size and len(value) == VALUE.size
               for key, value in kernel.entries.items())  # fmt: skip
    assert row6 in fastpath and row4 in fastpath
    assert fastpath.counters()["rows"] == 2 and fastpath.offloaded == 2


def test_without_an_ipv6_map_ipv6_rows_stay_in_python() -> None:
    fastpath, kernel, kernel6 = fastpath_with(v6=False)
    row6, row4 = r6.make_row(seen=1.0), v4_row(seen=1.0)
    offload(fastpath, row6)
    offload(fastpath, row4)
    assert row6 not in fastpath and row4 in fastpath
    assert not fastpath.waiting and fastpath.refused == 0 and kernel6.entries == {}
    assert len(kernel.entries) == 2


@pytest.mark.parametrize("cls", [r6.Nat64Session, Session], ids=["Nat64Session", "Session"])
def test_a_nat64_row_never_waits_for_the_kernel(cls: type[Session]) -> None:
    """Kept out by its class (Nat64Session, as the SYN proxy's rows), and by its address
    blocks' lengths even as a plain Session."""
    fastpath, kernel, kernel6 = fastpath_with()
    row = r6.nat64_row(cls=cls, seen=1.0)
    offload(fastpath, row)
    row.state = State.UDP_REPLIED
    offload(fastpath, row)
    assert row not in fastpath and not fastpath.waiting
    assert kernel.entries == {} and kernel6.entries == {}
    assert fastpath.offloaded == fastpath.refused == 0
    fastpath.removed(row)  # and nothing to take out
    assert fastpath.withdrawn == 0


def test_a_udp_row_enters_once_replied() -> None:
    fastpath, _, kernel6 = fastpath_with()
    row = r6.make_row(proto=17, state=State.UDP_UNREPLIED, seen=1.0)
    offload(fastpath, row)
    assert kernel6.entries == {}
    row.state = State.UDP_REPLIED
    offload(fastpath, row)
    assert set(kernel6.entries) == {fwd_key(row), rev_key(row)}
    assert all(KEY6.unpack(key)[4] == 17 for key in kernel6.entries)


@pytest.mark.parametrize(
    ("capacity6", "resolve"), [(1, True), (0, True), (1 << 16, False)],
    ids=["room for one entry", "map full", "next hop unresolved"],
)  # fmt: skip
def test_an_ipv6_row_the_kernel_cannot_take_stays_in_python(capacity6: int, resolve: bool) -> None:
    fastpath, kernel, kernel6 = fastpath_with(capacity6=capacity6, resolve=resolve)
    row = r6.make_row(seen=1.0)
    offload(fastpath, row)
    assert row not in fastpath and kernel6.entries == {} and fastpath.refused == 1
    if resolve:  # the IPv4 map has room of its own
        row4 = v4_row()
        offload(fastpath, row4)
        assert row4 in fastpath and len(kernel.entries) == 2


# --- the kernel's counts, ACKs and last-seen ------------------------------------------------


def test_the_kernel_s_counts_and_acks_come_back_into_the_row() -> None:
    fastpath, kernel, kernel6 = fastpath_with()
    row = r6.make_row(seen=1.0)
    offload(fastpath, row)
    pool, service = row.pool, row.service
    for _ in range(10):
        assert kernel6.carry(fwd_key(row), 1440, 7_000_000_000, 5000, 501)
        assert kernel6.carry(rev_key(row), 60, 8_000_000_000, 9000, 65535)
    fastpath.refresh(row)
    assert (pool.to_backend_packets, pool.to_backend_bytes) == (10, 14400)
    assert (pool.to_client_packets, pool.to_client_bytes) == (10, 600)
    assert (service.packets, service.bytes) == (20, 15000)
    assert (row.ack_c, row.win_c, row.ack_s, row.win_s) == (5000, 501, 9000, 65535)
    assert row.seen == 8.0
    assert fastpath.counters()["packets"] == 20 and fastpath.counters()["bytes"] == 15000
    fastpath.sync()  # counted once
    assert service.packets == 20
    # the last counts are folded in as the row leaves; the IPv4 map is not touched
    assert kernel6.carry(fwd_key(row), 100, 9_000_000_000, None, 0)
    kernel.entries[b"other"] = b"\0" * VALUE.size
    row.state = State.FIN_WAIT
    fastpath.changed(row)
    assert service.packets == 21 and row.ack_c == 5000
    assert kernel6.entries == {} and list(kernel.entries) == [b"other"]
    assert row not in fastpath and fastpath.withdrawn == 1


def test_a_segment_without_ack_leaves_the_row_s_acks() -> None:
    fastpath, _, kernel6 = fastpath_with()
    row = r6.make_row(seen=1.0)
    row.ack_c, row.win_c = 11, 12
    offload(fastpath, row)
    assert kernel6.carry(fwd_key(row), 100, 2_000_000_000, None, 0)
    fastpath.refresh(row)
    assert (row.ack_c, row.win_c) == (11, 12) and row.pool.to_backend_packets == 1


def test_removal_takes_the_row_out_of_the_ipv6_map() -> None:
    fastpath, _, kernel6 = fastpath_with()
    row = r6.make_row(seen=1.0)
    offload(fastpath, row)
    assert kernel6.carry(rev_key(row), 80, 3_000_000_000, 1, 1)
    fastpath.removed(row)
    assert kernel6.entries == {} and row.pool.to_client_bytes == 80 and row.seen == 3.0


def test_the_simulated_map_carries_either_layout() -> None:
    kernel = SimulatedMap()
    four, six = b"k4", b"k6"
    kernel.put(four, b"\x01" * KERNEL_PART_AT + bytes(VALUE.size - KERNEL_PART_AT))
    kernel.put(six, b"\x02" * KERNEL_PART_AT6 + bytes(VALUE6.size - KERNEL_PART_AT6))
    assert kernel.carry(four, 10, 5, 7, 8) and kernel.carry(six, 20, 6, 9, 10)
    assert kernel.carry(six, 20, 7, None, 0)
    v4, v6 = kernel.entries[four], kernel.entries[six]
    assert len(v4) == VALUE.size and len(v6) == VALUE6.size
    assert v4[:KERNEL_PART_AT] == b"\x01" * KERNEL_PART_AT
    assert v6[:KERNEL_PART_AT6] == b"\x02" * KERNEL_PART_AT6
    assert KERNEL_PART.unpack_from(v4, KERNEL_PART_AT) == (1, 10, 5, 7, 8, 1)
    assert KERNEL_PART.unpack_from(v6, KERNEL_PART_AT6) == (2, 40, 7, 9, 10, 1)
    assert not kernel.carry(b"absent", 1, 1, None, 0)


@pytest.mark.parametrize(
    ("release", "takes"),
    [("6.18.0-1-amd64", True), ("6.16.0", True), ("6.15.9-arch1", False), ("5.10.0", False),
     ("7.0.1", True), ("garbage", False), ("6", False)],
)  # fmt: skip
def test_the_ipv6_fast_path_needs_a_kernel_that_takes_bpf_f_ipv6(release: str, takes: bool) -> None:
    from lbnat.dataplane.offload import kernel_takes_ipv6_csum_flag

    assert kernel_takes_ipv6_csum_flag(release) is takes
