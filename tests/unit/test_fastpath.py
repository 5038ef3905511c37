"""lbnat.fastpath: which rows the kernel rewrites, with what, and how the engine keeps them in
step. The kernel is `SimulatedMap` here (the program's bookkeeping per packet, no BPF); the
program itself is run on the same entries with BPF_PROG_TEST_RUN in test_tcbpf.py.

Each test reads as the sequence of one flow: packets through Engine.handle (the Python path),
packets carried by the kernel (`carry`), and what the engine then decides."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP

from lbnat.engine import ip_int
from lbnat.fastpath import (
    KERNEL_PART,
    KERNEL_PART_AT,
    KEY,
    OFFLOAD_AFTER,
    VALUE,
    FastPath,
    SimulatedMap,
    flow_entries,
    port_delta,
)
from lbnat.messages import AskCounters, AskSessions
from lbnat.nat import EndReason, State
from lbnat.packet import ADDRESS, PORT_PAIR, rewrite_deltas
from lbnat.syncookie import SynProxySettings
from lbnat.synproxy import ProxiedSession
from lbnat.views import answer
from tests.unit.fixtures import (
    CLIENT1,
    DNS_BACKEND_PORT,
    DNS_PORT,
    LB,
    WEB_BACKEND_PORT,
    WEB_PORT,
    EngineHarness,
    Flow,
    dissect,
)
from tests.unit.test_synproxy import SECRET, Proxied

IFINDEX = 7
OUR_MAC = bytes.fromhex("02aa00000002")


def mac_of(ip: int) -> bytes:
    return bytes.fromhex("02bb") + ADDRESS.pack(ip)


def ethernet(ip: int) -> bytes | None:
    """Every next hop resolved, to a MAC made of its address."""
    return mac_of(ip) + OUR_MAC + b"\x08\x00"


def lab_with_kernel(
    capacity: int = 1 << 16, resolve: bool = True, **options: object
) -> tuple[EngineHarness, FastPath, SimulatedMap]:
    lab = EngineHarness(**options)  # type: ignore[arg-type]
    kernel = SimulatedMap(capacity)
    fastpath = FastPath(kernel, ethernet if resolve else (lambda ip: None), IFINDEX)
    lab.table.kernel = fastpath
    return lab, fastpath, kernel


def established(lab: EngineHarness, port: int = 40000) -> Flow:
    flow = lab.flow(CLIENT1, port)
    assert flow.syn().forwarded
    flow.synack()
    flow.ack()
    assert flow.state is State.ESTABLISHED
    lab.advance(OFFLOAD_AFTER)  # the next tick after it: into the kernel
    return flow


def fwd_key(flow: Flow) -> bytes:
    return KEY.pack(ip_int(CLIENT1), ip_int(LB), flow.port, WEB_PORT, 6)


def rev_key(flow: Flow) -> bytes:
    assert flow.backend is not None and flow.nat_port is not None
    return KEY.pack(ip_int(flow.backend), ip_int(LB), WEB_BACKEND_PORT, flow.nat_port, 6)


def kernel_part(kernel: SimulatedMap, key: bytes) -> tuple[int, ...]:
    value = kernel.entries[key]
    return tuple(KERNEL_PART.unpack_from(value, KERNEL_PART_AT))


# --- when a row enters and leaves the kernel ----------------------------------------------------


def test_a_tcp_row_enters_the_kernel_once_established_not_before() -> None:
    lab, fastpath, kernel = lab_with_kernel()
    flow = lab.flow(CLIENT1, 40000)
    flow.syn()
    assert kernel.entries == {}  # SYN_SENT
    flow.synack()
    assert kernel.entries == {}  # SYN_RECV
    flow.ack()
    assert kernel.entries == {}  # ESTABLISHED, for less than OFFLOAD_AFTER
    lab.advance(OFFLOAD_AFTER / 2)
    assert kernel.entries == {}
    lab.advance(OFFLOAD_AFTER / 2)
    assert set(kernel.entries) == {fwd_key(flow), rev_key(flow)}
    assert flow.session in fastpath and fastpath.offloaded == 1


class CountingMap(SimulatedMap):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def put(self, key: bytes, value: bytes) -> bool:
        self.calls += 1
        return super().put(key, value)

    def get(self, key: bytes) -> bytes | None:
        self.calls += 1
        return super().get(key)

    def delete(self, key: bytes) -> None:
        self.calls += 1
        super().delete(key)


def test_a_short_flow_never_touches_the_kernel() -> None:
    """An HTTP request with Connection: close, over within OFFLOAD_AFTER: no map call at all
    (what offloading it would cost is more than its Python path)."""
    lab = EngineHarness()
    kernel = CountingMap()
    fastpath = FastPath(kernel, ethernet, IFINDEX)
    lab.table.kernel = fastpath
    flow = lab.flow(CLIENT1, 40000)
    flow.syn()
    flow.synack()
    flow.ack()
    lab.advance(OFFLOAD_AFTER / 10)
    flow.data_c(80)
    flow.data_s(500)
    flow.fin_s()
    flow.fin_c()
    lab.advance(OFFLOAD_AFTER)
    assert flow.state is State.TIME_WAIT
    assert kernel.calls == 0 and fastpath.offloaded == 0 and not fastpath.waiting


def test_leaving_the_kernel_reads_it_once() -> None:
    """A FIN: the tracker reads the row's two entries, the withdrawal deletes them without
    reading them again (two lookups, two deletes)."""
    lab = EngineHarness()
    kernel = CountingMap()
    lab.table.kernel = FastPath(kernel, ethernet, IFINDEX)
    flow = established(lab)
    kernel.calls = 0
    flow.fin_c()
    assert kernel.calls == 4 and kernel.entries == {}


ON = SynProxySettings(mode="on", secret=SECRET)


def test_the_entries_rewrite_as_the_engine_does() -> None:
    """Each entry holds exactly the bytes Engine.handle writes for that direction of the flow:
    compare with the packets the Python path forwarded."""
    lab, _, kernel = lab_with_kernel()
    flow = established(lab)
    to_backend = dissect(flow.data_c(100).out)
    to_client = dissect(flow.data_s(100).out)
    for key, out, hop in ((fwd_key(flow), to_backend, flow.backend), (rev_key(flow), to_client,
                                                                      CLIENT1)):  # fmt: skip
        addresses, ports, ip_d, port_d, eth, ifindex, *counts = VALUE.unpack(kernel.entries[key])
        assert addresses == ADDRESS.pack(ip_int(out[IP].src)) + ADDRESS.pack(ip_int(out[IP].dst))
        assert ports == PORT_PAIR.pack(out[TCP].sport, out[TCP].dport)
        assert eth == mac_of(ip_int(str(hop))) + OUR_MAC
        assert ifindex == IFINDEX and counts == [0, 0, 0, 0, 0, 0]
    # the deltas are the ones of the address change and of the port change alone
    _, _, ip_d, port_d, *_ = VALUE.unpack(kernel.entries[fwd_key(flow)])
    assert flow.nat_port is not None and flow.backend is not None
    old_addresses = ADDRESS.pack(ip_int(CLIENT1)) + ADDRESS.pack(ip_int(LB))
    new_addresses = ADDRESS.pack(ip_int(LB)) + ADDRESS.pack(ip_int(flow.backend))
    old_ports = PORT_PAIR.pack(flow.port, WEB_PORT)
    new_ports = PORT_PAIR.pack(flow.nat_port, WEB_BACKEND_PORT)
    assert (ip_d, port_d) == (
        rewrite_deltas(old_addresses, new_addresses, old_ports, old_ports)[0],
        rewrite_deltas(old_addresses, old_addresses, old_ports, new_ports)[1],
    )


@pytest.mark.parametrize(
    ("ending", "state", "reason"),
    [
        ("client FIN", State.FIN_WAIT, None),
        ("backend FIN", State.FIN_WAIT, None),
        ("client RST", State.CLOSE, EndReason.RST),
        ("backend RST", State.CLOSE, EndReason.RST),
    ],
)
def test_a_fin_or_rst_takes_the_row_out_of_the_kernel(
    ending: str, state: State, reason: EndReason | None
) -> None:
    lab, fastpath, kernel = lab_with_kernel()
    flow = established(lab)
    lab.events()
    {
        "client FIN": flow.fin_c,
        "backend FIN": flow.fin_s,
        "client RST": flow.rst_c,
        "backend RST": flow.rst_s,
    }[ending]()
    assert flow.state is state
    assert kernel.entries == {} and fastpath.rows == {} and fastpath.withdrawn == 1


def test_a_rst_is_judged_with_the_acks_the_kernel_carried() -> None:
    """100 kB went client -> backend in the kernel: the backend's ACK moved on there. A client
    RST at the new sequence is in the window only by the kernel's ACK, and it closes the row."""
    lab, _, kernel = lab_with_kernel()
    flow = established(lab)
    sent = 100_000
    lab.now += 1.0
    assert kernel.carry(fwd_key(flow), 40 + sent, int(lab.now * 1e9), flow.s_next, 500)
    acked = (flow.c_next + sent) & 0xFFFFFFFF
    assert kernel.carry(rev_key(flow), 40, int(lab.now * 1e9), acked, 1000)
    flow.c_next = flow.server_acked = acked
    result = flow.rst_c()
    assert result.forwarded and flow.state is State.CLOSE
    assert lab.table.rst_ignored == 0


def test_without_the_kernels_acks_the_same_rst_would_be_ignored() -> None:
    """The counterpart: the Python path alone, with the ACKs it saw, refuses it (the reason
    the tracker asks the kernel first)."""
    lab = EngineHarness()
    flow = established(lab)
    flow.server_acked = (flow.c_next + 100_000) & 0xFFFFFFFF
    flow.rst_c()
    assert flow.state is State.ESTABLISHED and lab.table.rst_ignored == 1


def test_a_dead_backends_resets_carry_the_kernels_acks() -> None:
    lab, fastpath, kernel = lab_with_kernel()
    flow = established(lab)
    lab.now += 1.0
    kernel.carry(fwd_key(flow), 1000, int(lab.now * 1e9), 0x11111111, 500)
    kernel.carry(rev_key(flow), 1000, int(lab.now * 1e9), 0x22222222, 500)
    assert flow.backend is not None
    packets = lab.engine.reset_flows("web", (flow.backend, WEB_BACKEND_PORT), lab.now)
    seqs = {dissect(packet)[IP].dst: dissect(packet)[TCP].seq for packet, _ in packets}
    assert seqs == {CLIENT1: 0x11111111, flow.backend: 0x22222222}
    assert kernel.entries == {} and fastpath.rows == {}


def test_a_udp_row_enters_the_kernel_on_its_first_reply() -> None:
    lab, _fastpath, kernel = lab_with_kernel()
    flow = lab.udp_flow(CLIENT1, 5000)
    flow.request()
    assert kernel.entries == {}
    flow.reply()
    assert kernel.entries == {}
    lab.advance(OFFLOAD_AFTER)
    assert flow.state is State.UDP_REPLIED and len(kernel.entries) == 2
    assert flow.backend is not None and flow.nat_port is not None
    assert KEY.pack(ip_int(CLIENT1), ip_int(LB), 5000, DNS_PORT, 17) in kernel.entries
    back = KEY.pack(ip_int(flow.backend), ip_int(LB), DNS_BACKEND_PORT, flow.nat_port, 17)
    assert back in kernel.entries


def test_idle_expiry_reads_the_kernels_last_seen_time() -> None:
    """A UDP flow whose packets all went through the kernel is not idle; once the kernel stops
    seeing it, it expires, and its entries go."""
    lab, fastpath, kernel = lab_with_kernel()
    flow = lab.udp_flow(CLIENT1, 5000)
    flow.request()
    flow.reply()
    lab.advance(OFFLOAD_AFTER)
    assert flow.backend is not None and flow.nat_port is not None
    key = KEY.pack(ip_int(CLIENT1), ip_int(LB), 5000, DNS_PORT, 17)
    timeout = lab.table.timeouts.udp_replied
    for _ in range(3):
        lab.now += timeout * 0.9
        assert kernel.carry(key, 60, int(lab.now * 1e9), None, 0)
        lab.advance(timeout * 0.2)
        assert flow.state is State.UDP_REPLIED, "a flow alive in the kernel expired"
    lab.advance(timeout + 1)
    assert flow.session is None and kernel.entries == {} and fastpath.rows == {}


def test_counters_include_what_the_kernel_rewrote() -> None:
    lab, _fastpath, kernel = lab_with_kernel()
    flow = established(lab)
    before = answer(lab.engine, AskCounters(), lab.now)["services"]["web"]
    for _ in range(10):
        kernel.carry(fwd_key(flow), 1500, 0, flow.s_next, 500)
        kernel.carry(rev_key(flow), 52, 0, flow.c_next, 500)
    after = answer(lab.engine, AskCounters(), lab.now)
    web = after["services"]["web"]
    assert web["packets"] - before["packets"] == 20
    assert web["bytes"] - before["bytes"] == 10 * (1500 + 52)
    assert after["offload"]["rows"] == 1 and after["offload"]["packets"] == 20
    # counted once: asking again adds nothing
    again = answer(lab.engine, AskCounters(), lab.now)["services"]["web"]
    assert again["packets"] == web["packets"]
    # and the last counts are folded in when the row leaves the kernel
    kernel.carry(fwd_key(flow), 100, 0, flow.s_next, 500)
    flow.fin_c()
    final = answer(lab.engine, AskCounters(), lab.now)["services"]["web"]
    assert final["packets"] == web["packets"] + 2  # the kernel's one and the FIN
    sessions = answer(lab.engine, AskSessions(), lab.now)
    assert [row["path"] for row in sessions] == ["python"]


def test_sessions_say_which_path_carries_each_row() -> None:
    lab, _, _ = lab_with_kernel()
    established(lab, 40000)
    lab.flow(CLIENT1, 40001).syn()
    paths = {row["client"]: row["path"] for row in answer(lab.engine, AskSessions(), lab.now)}
    assert paths == {f"{CLIENT1}:40000": "kernel", f"{CLIENT1}:40001": "python"}


# --- when the kernel cannot take a row: it stays in Python, and works -------------------------


@pytest.mark.parametrize(
    ("capacity", "resolve"), [(1, True), (0, True), (1 << 16, False)],
    ids=["room for one entry", "map full", "next hop unresolved"],
)  # fmt: skip
def test_a_row_the_kernel_cannot_take_stays_in_python(capacity: int, resolve: bool) -> None:
    lab, fastpath, kernel = lab_with_kernel(capacity, resolve)
    flow = established(lab)
    assert kernel.entries == {} and fastpath.rows == {} and fastpath.refused == 1
    assert flow.data_c().forwarded and flow.data_s().forwarded
    flow.fin_c()
    flow.fin_s()
    assert flow.state is State.TIME_WAIT


def test_syn_proxied_rows_stay_in_python() -> None:
    """Their sequence numbers are shifted on every packet, which the program does not do."""
    lab, fastpath, kernel = lab_with_kernel(backends=1, syn_proxy=ON)
    flow = Proxied(lab)
    flow.syn()
    flow.ack()
    flow.synack()
    lab.advance(OFFLOAD_AFTER)
    row = next(iter(lab.table))
    assert isinstance(row, ProxiedSession) and row.state is State.ESTABLISHED
    assert kernel.entries == {} and fastpath.offloaded == 0 and fastpath.refused == 0


def test_restored_established_rows_go_back_to_the_kernel() -> None:
    lab, fastpath, kernel = lab_with_kernel()
    flow = established(lab)
    row = flow.session
    assert row is not None
    lab.table.remove(row)
    assert kernel.entries == {}
    assert flow.backend is not None and flow.nat_port is not None
    backend = next(b for b in lab.tcp_backends if b.ip == flow.backend)
    adopted = lab.table.adopt(
        lab.now, row.service, 6, ip_int(CLIENT1), flow.port, ip_int(LB), backend, flow.nat_port,
        State.ESTABLISHED,
    )  # fmt: skip
    assert adopted is not None and adopted not in fastpath
    lab.advance(OFFLOAD_AFTER)
    assert adopted in fastpath
    assert set(kernel.entries) == {fwd_key(flow), rev_key(flow)}


def test_port_delta_is_the_transport_delta_less_the_address_part() -> None:
    addresses = ADDRESS.pack(ip_int("198.18.0.11")) + ADDRESS.pack(ip_int(LB))
    new = ADDRESS.pack(ip_int(LB)) + ADDRESS.pack(ip_int("198.18.0.21"))
    ports, new_ports = PORT_PAIR.pack(40000, 80), PORT_PAIR.pack(61000, 8080)
    ip_d, l4_d = rewrite_deltas(addresses, new, ports, new_ports)
    assert port_delta(ip_d, l4_d) == rewrite_deltas(addresses, addresses, ports, new_ports)[1]


def test_flow_entries_need_both_next_hops() -> None:
    lab, _, _ = lab_with_kernel()
    row = established(lab).session
    assert row is not None
    assert flow_entries(row, lambda ip: None, IFINDEX) is None
    assert flow_entries(row, ethernet, IFINDEX) is not None


def test_udp_entries_are_udp() -> None:
    lab, _, kernel = lab_with_kernel()
    flow = lab.udp_flow(CLIENT1, 5000)
    flow.request()
    flow.reply()
    lab.advance(OFFLOAD_AFTER)
    assert kernel.entries and all(KEY.unpack(key)[4] == 17 for key in kernel.entries)
