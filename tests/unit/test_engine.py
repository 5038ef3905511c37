"""Tests for lbnat.engine: verdicts, translation in both directions (complete and partial
checksums), scheduling and backend snapshots, NO_BACKEND replies, counters and events.

Every forwarded TCP/UDP packet is checked by the harness in fixtures.py: addresses and ports
translated, everything else untouched, every checksum right (scapy)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, IPOption_NOP
from scapy.layers.inet import TCP as ScapyTCP

from lbnat.backends import Backend, Health
from lbnat.drops import DropReason
from lbnat.engine import DROP, FORWARD, REPLY, Engine, FlowEnded, FlowOpened, NoBackend
from lbnat.nat import EndReason, State
from lbnat.service import Service
from tests.unit.fixtures import (
    BACKEND_IPS,
    CLIENT1,
    CLIENT2,
    DNS_PORT,
    LB,
    WEB_BACKEND_PORT,
    WEB_PORT,
    EngineHarness,
    Flow,
    check_table,
    complete_partial,
    describe_events,
    dissect,
    make_partial,
    tcp,
    udp,
    verify_checksums,
    wire,
)

B1, B2, B3 = BACKEND_IPS


def established(lab: EngineHarness, client: str, port: int) -> Flow:
    flow = lab.flow(client, port)
    assert flow.syn().forwarded
    flow.synack()
    flow.ack()
    assert flow.state == State.ESTABLISHED
    return flow


# --- translation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("partial", [False, True], ids=["complete", "partial"])
def test_a_whole_connection_is_translated_both_ways(partial: bool) -> None:
    lab = EngineHarness(partial=partial)
    flow = lab.flow(CLIENT1, 43210, isn=0xFFFFFF00)
    syn = flow.syn(options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)])
    assert syn.action == (FORWARD, int.from_bytes(bytes(map(int, B1.split("."))), "big"))
    assert syn.next_hop == B1
    flow.synack(options=[("MSS", 1460), ("WScale", 9)])
    flow.ack()
    for length in (1, 7, 1460, 0):
        assert flow.data_c(length).forwarded
        assert flow.data_s(length + 1).forwarded
    flow.fin_c()
    flow.fin_s()
    assert flow.ack().forwarded
    assert flow.state == State.TIME_WAIT
    assert all(result.forwarded for result in flow.results)


def test_translation_with_ip_options() -> None:
    lab = EngineHarness()
    flow = lab.flow()
    flow.syn()
    packet = tcp(CLIENT1, LB, flow.port, WEB_PORT, "A", flow.c_next, flow.s_next,
                 ip_options=[IPOption_NOP()] * 8, payload=b"odd")
    result = lab.send(packet)
    assert result.forwarded
    out = dissect(result.out)
    assert (out.src, out.dst, out[ScapyTCP].sport, out[ScapyTCP].dport) == (
        LB, B1, flow.nat_port, WEB_BACKEND_PORT,
    )
    assert out.ihl == 7 and bytes(out[ScapyTCP].payload) == b"odd"
    verify_checksums(result.out)


@pytest.mark.parametrize("partial", [False, True], ids=["complete", "partial"])
def test_packet_inside_a_larger_buffer_is_rewritten_in_place(partial: bool) -> None:
    lab = EngineHarness()
    raw = wire(tcp(CLIENT1, LB, 40000, WEB_PORT, "S", seq=5, payload=b"x"))
    if partial:
        raw = make_partial(raw)
    buf = bytearray(b"\xee" * 14) + raw + bytearray(b"\xdd" * 4)
    action = lab.engine.handle(buf, 14, 14 + len(raw), partial, 0.0)
    assert action[0] == FORWARD
    assert buf[:14] == b"\xee" * 14 and buf[-4:] == b"\xdd" * 4
    out = buf[14:-4]
    if partial:
        out = complete_partial(out)
    packet = dissect(out)
    assert (packet.src, packet.dst, packet[ScapyTCP].dport) == (LB, B1, WEB_BACKEND_PORT)
    verify_checksums(out, kernel_completed=partial)


# --- scheduling ------------------------------------------------------------------------------


def test_six_clients_over_three_backends_round_robin() -> None:
    """The C++ original's demo: clients (1,4) (2,5) (3,6) share a server."""
    lab = EngineHarness()
    clients = [(CLIENT1 if i < 3 else CLIENT2, 50000 + i) for i in range(6)]
    flows = [lab.flow(ip, port) for ip, port in clients]
    for flow in flows:
        assert flow.syn().forwarded
    backends = [flow.backend for flow in flows]
    assert backends == [B1, B2, B3, B1, B2, B3]
    pairs = {b: [i + 1 for i, got in enumerate(backends) if got == b] for b in BACKEND_IPS}
    assert list(pairs.values()) == [[1, 4], [2, 5], [3, 6]]
    assert describe_events(lab.events()) == ["open b1", "open b2", "open b3"] * 2


def test_all_backends_dead_tcp_syn_gets_a_rst_and_udp_is_dropped() -> None:
    lab = EngineHarness()
    for index in range(3):
        lab.set_health(index, Health.DEAD)
    syn = tcp(CLIENT1, LB, 40000, WEB_PORT, "S", seq=0xFFFFFFFF)
    result = lab.send(syn)
    assert result.kind == REPLY
    assert result.next_hop == CLIENT1
    rst = result.reply
    verify_checksums(rst)
    packet = IP(rst)
    assert (packet.src, packet.dst) == (LB, CLIENT1)
    assert (packet[ScapyTCP].sport, packet[ScapyTCP].dport) == (WEB_PORT, 40000)
    assert packet[ScapyTCP].flags == "RA"
    assert packet[ScapyTCP].ack == 0  # ISN + 1, wrapped
    assert packet[ScapyTCP].seq == 0
    assert len(lab.table) == 0
    events = lab.events()
    assert events == [NoBackend("web", (CLIENT1, 40000))]

    dropped = lab.udp_flow(CLIENT2, 5000).request()
    assert dropped.action == (DROP, DropReason.NO_BACKEND)
    assert lab.events() == [NoBackend("dns", (CLIENT2, 5000))]
    assert lab.engine.services["web"].drops == {DropReason.NO_BACKEND: 1}
    assert lab.engine.services["dns"].drops == {DropReason.NO_BACKEND: 1}
    assert lab.engine.drops == {DropReason.NO_BACKEND: 2}
    assert len(lab.table) == 0

    # A non-SYN still has no session: no RST for it.
    ack = lab.send(tcp(CLIENT1, LB, 40000, WEB_PORT, "A", 1, 1))
    assert ack.drop_reason == DropReason.NO_SESSION


def test_ack_of_the_no_backend_rst_acknowledges_the_syn() -> None:
    lab = EngineHarness(backends=1)
    lab.set_health(0, Health.DEAD)
    result = lab.send(tcp(CLIENT2, LB, 1234, WEB_PORT, "S", seq=123456))
    packet = IP(result.reply)
    assert packet[ScapyTCP].ack == 123457
    assert (packet.dst, packet[ScapyTCP].dport) == (CLIENT2, 1234)


def test_all_backends_draining_is_no_backend_too() -> None:
    lab = EngineHarness(backends=2)
    lab.set_health(0, Health.ALIVE, draining=True)
    lab.set_health(1, Health.BAD, draining=True)
    assert lab.flow().syn().kind == REPLY


def test_bad_backends_still_take_new_flows() -> None:
    lab = EngineHarness(backends=2)
    lab.set_health(0, Health.BAD)
    flows = [lab.flow(CLIENT1, port) for port in (1, 2)]
    for flow in flows:
        flow.syn()
    assert [f.backend for f in flows] == [B1, B2]


def test_draining_backend_gets_no_new_flows_but_keeps_its_flows() -> None:
    lab = EngineHarness()
    old = established(lab, CLIENT1, 1000)
    assert old.backend == B1
    lab.set_health(0, Health.ALIVE, draining=True)
    new = [lab.flow(CLIENT2, port) for port in range(2000, 2004)]
    for flow in new:
        flow.syn()
    assert [f.backend for f in new] == [B2, B3, B2, B3]
    assert old.data_c().forwarded and old.data_s().forwarded
    assert old.backend == B1 and old.state == State.ESTABLISHED
    old.fin_c()
    old.fin_s()
    assert describe_events(lab.events())[-1] == "end fin 4"


def test_dead_backend_keeps_its_existing_flows() -> None:
    """Health decides new flows only: an existing row is never re-scheduled."""
    lab = EngineHarness()
    old = established(lab, CLIENT1, 1000)
    lab.set_health(0, Health.DEAD)
    assert old.data_c().forwarded and old.data_s().forwarded
    fresh = lab.flow(CLIENT2, 2000)
    fresh.syn()
    assert fresh.backend == B2
    lab.set_health(0, Health.ALIVE)
    fresh_again = [lab.flow(CLIENT2, port) for port in (2001, 2002)]
    for flow in fresh_again:
        flow.syn()
    assert [f.backend for f in fresh_again] == [B3, B1]  # b1 is back in its old place


def closed(flow: Flow) -> None:
    """The backend closes first, as an HTTP server with "Connection: close" does: the backend
    end is the one left in TIME_WAIT, on (LB:nat_port, backend:port)."""
    flow.fin_s()
    flow.fin_c()
    assert flow.ack_s().forwarded
    assert flow.state == State.TIME_WAIT


def test_a_reused_client_port_reopens_its_ended_row_on_the_same_backend_and_nat_port() -> None:
    """Like conntrack: only the same client socket's ISN and timestamps are sure to be newer
    than the ones the backend's TIME_WAIT remembers for that NAT port, so the new flow keeps
    them; round-robin does not move on for it."""
    lab = EngineHarness()
    first = established(lab, CLIENT1, 1000)
    closed(first)
    backend, nat_port = first.backend, first.nat_port
    assert first.syn(new_isn=90_000).forwarded
    assert (first.backend, first.nat_port) == (backend, nat_port)
    assert first.state == State.SYN_SENT
    first.synack()
    assert first.ack().forwarded and first.data_c().forwarded and first.data_s().forwarded
    other = lab.flow(CLIENT2, 2000)
    other.syn()
    assert other.backend == B2  # the reopened flow did not take b2's turn
    assert describe_events(lab.events())[-2:] == ["open b1", "open b2"]


@pytest.mark.parametrize("health", [Health.DEAD, "draining"])
def test_a_reused_client_port_is_rescheduled_when_its_backend_takes_no_new_flows(
    health: Health | str,
) -> None:
    lab = EngineHarness()
    first = established(lab, CLIENT1, 1000)
    closed(first)
    if health == "draining":
        lab.set_health(0, Health.ALIVE, draining=True)
    else:
        lab.set_health(0, Health.DEAD)
    assert first.syn(new_isn=90_000).forwarded
    assert first.backend == B2
    check_table(lab.table)


def test_backend_added_while_flows_exist() -> None:
    lab = EngineHarness(backends=2)
    one = established(lab, CLIENT1, 1)
    two = established(lab, CLIENT1, 2)
    lab.add_backend()
    for flow in (one, two):
        assert flow.data_c().forwarded and flow.data_s().forwarded
    assert (one.backend, two.backend) == (B1, B2)
    new = [lab.flow(CLIENT2, port) for port in (3, 4)]
    for flow in new:
        flow.syn()
    assert [f.backend for f in new] == [B3, B1]


def test_backend_removed_from_the_snapshot_keeps_its_flows() -> None:
    lab = EngineHarness(backends=2)
    one = established(lab, CLIENT1, 1)
    lab.engine.set_backends("web", lab.tcp_backends[1:])
    assert one.data_c().forwarded and one.data_s().forwarded
    new = lab.flow(CLIENT2, 3)
    new.syn()
    assert new.backend == B2


# --- counters and events -------------------------------------------------------------------------


def test_counters_per_service_and_per_backend() -> None:
    lab = EngineHarness(backends=2)
    one = lab.flow(CLIENT1, 1)
    two = lab.flow(CLIENT2, 1)
    sizes: dict[str, int] = {B1: 0, B2: 0}
    packets: dict[str, int] = {B1: 0, B2: 0}
    # per backend and direction: (packets, bytes) to the backend and to the client
    ways: dict[tuple[str, int], list[int]] = {(b, up): [0, 0] for b in (B1, B2) for up in (1, 0)}
    for flow in (one, two):
        for send, up in ((flow.syn, 1), (flow.synack, 0), (flow.ack, 1), (flow.data_c, 1),
                         (flow.data_s, 0)):  # fmt: skip
            result = send()
            assert flow.backend is not None
            sizes[flow.backend] += len(result.out)
            packets[flow.backend] += 1
            ways[flow.backend, up][0] += 1
            ways[flow.backend, up][1] += len(result.out)
    two.fin_c()
    two.fin_s()
    sizes[B2] += 2 * 40
    packets[B2] += 2
    for up in (1, 0):
        ways[B2, up][0] += 1
        ways[B2, up][1] += 40
    lab.udp_flow(CLIENT1, 9).request(b"12345")
    lab.send(tcp(CLIENT1, LB, 7, WEB_PORT, "A", 1, 1))  # NO_SESSION
    lab.send(tcp(CLIENT1, LB, 7, 81, "S"))  # NOT_FOR_US

    web = lab.engine.services["web"]
    assert web.flows == 2
    assert web.packets == packets[B1] + packets[B2] == 12
    assert web.bytes == sizes[B1] + sizes[B2]
    # A segment to the service port without a row counts against the service; a packet to no
    # service's port only engine-wide.
    assert web.drops == {DropReason.NO_SESSION: 1}
    dns = lab.engine.services["dns"]
    assert (dns.flows, dns.packets, dns.bytes) == (1, 1, 20 + 8 + 5)
    pools = {pool.backend.key: pool for pool in lab.table.pools.values()}
    p1, p2 = pools[(B1, WEB_BACKEND_PORT)], pools[(B2, WEB_BACKEND_PORT)]
    for pool, backend, active in ((p1, B1, 1), (p2, B2, 0)):
        assert (pool.flows, pool.active) == (1, active)
        assert [pool.to_backend_packets, pool.to_backend_bytes] == ways[backend, 1]
        assert [pool.to_client_packets, pool.to_client_bytes] == ways[backend, 0]
        assert pool.to_backend_packets + pool.to_client_packets == packets[backend]
        assert pool.to_backend_bytes + pool.to_client_bytes == sizes[backend]
        assert pool.ports_in_use == 1  # two's row lingers in TIME_WAIT and keeps its port
    assert web.ended == {"fin": 1} and dns.ended == {}
    assert lab.engine.packets == 12 + 1 + 2
    assert lab.engine.drops == {DropReason.NO_SESSION: 1, DropReason.NOT_FOR_US: 1}
    assert lab.engine.open_flows == 2  # one TCP, one UDP
    check_table(lab.table)


def test_events_are_taken_once() -> None:
    lab = EngineHarness()
    flow = lab.flow()
    flow.syn()
    assert lab.engine.events == [
        FlowOpened("web", (CLIENT1, 40000), (B1, WEB_BACKEND_PORT), flow.nat_port or 0, 1)
    ]
    assert len(lab.engine.take_events()) == 1
    assert lab.engine.take_events() == []
    assert lab.engine.events == []


def test_flow_ended_counts_only_open_flows() -> None:
    lab = EngineHarness()
    flows = [established(lab, CLIENT1, port) for port in range(1, 5)]
    lab.events()
    flows[0].fin_c()
    flows[0].fin_s()
    flows[1].rst_c()
    events = lab.events()
    assert events == [
        FlowEnded("web", (CLIENT1, 1), (B1, WEB_BACKEND_PORT), EndReason.FIN, 3),
        FlowEnded("web", (CLIENT1, 2), (B2, WEB_BACKEND_PORT), EndReason.RST, 2),
    ]
    assert len(lab.table) == 4  # the ended rows linger, but are not counted as open
    assert lab.engine.open_flows == 2


# --- drops --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DropCase:
    description: str
    packet: bytes
    reason: DropReason


def _drop_cases() -> list[DropCase]:
    syn = bytes(tcp(CLIENT1, LB, 40000, WEB_PORT, "S"))
    return [
        DropCase("to another address", bytes(tcp(CLIENT1, "198.18.0.3", 1, WEB_PORT, "S")),
                 DropReason.NOT_FOR_US),
        DropCase("to a port lbnat does not own", bytes(tcp(CLIENT1, LB, 1, 81, "S")),
                 DropReason.NOT_FOR_US),
        DropCase("UDP to the TCP service's port", bytes(udp(CLIENT1, LB, 1, WEB_PORT, b"x")),
                 DropReason.NOT_FOR_US),
        DropCase("TCP to the UDP service's port", bytes(tcp(CLIENT1, LB, 1, DNS_PORT, "S")),
                 DropReason.NOT_FOR_US),
        DropCase("an ACK with no row", bytes(tcp(CLIENT1, LB, 1, WEB_PORT, "A")),
                 DropReason.NO_SESSION),
        DropCase("a SYN-ACK from a client", bytes(tcp(CLIENT1, LB, 1, WEB_PORT, "SA")),
                 DropReason.NO_SESSION),
        DropCase("a backend packet to an unused NAT port",
                 bytes(tcp(B1, LB, WEB_BACKEND_PORT, 61000, "SA")), DropReason.NO_SESSION),
        DropCase("a UDP reply to an unused NAT port",
                 bytes(udp(B1, LB, 5353, 65535, b"x")), DropReason.NO_SESSION),
        DropCase("a fragment", bytes(tcp(CLIENT1, LB, 1, WEB_PORT, "S", ip_flags="MF")),
                 DropReason.FRAGMENT),
        DropCase("truncated", syn[:30], DropReason.BAD_TOTAL_LENGTH),
        DropCase("SYN+FIN", syn[:33] + bytes([0x03]) + syn[34:], DropReason.BAD_TCP_FLAGS),
        DropCase("not IPv4", bytes([0x60]) + syn[1:], DropReason.NOT_IPV4),
    ]


DROP_CASES = _drop_cases()


@pytest.mark.parametrize("case", DROP_CASES, ids=[c.description for c in DROP_CASES])
def test_drops(case: DropCase) -> None:
    lab = EngineHarness()
    buf = bytearray(case.packet)
    before = bytes(buf)
    action = lab.engine.handle(buf, 0, len(buf), False, 0.0)
    assert action == (DROP, int(case.reason))
    assert bytes(buf) == before, "a dropped packet was modified"
    assert lab.engine.drops == {case.reason: 1}
    assert lab.events() == [] and len(lab.table) == 0


def test_replies_from_the_wrong_source_are_no_session() -> None:
    lab = EngineHarness()
    flow = established(lab, CLIENT1, 1000)
    assert flow.nat_port is not None
    wrong = [
        tcp(B2, LB, WEB_BACKEND_PORT, flow.nat_port, "A", 1, 1),  # another backend
        tcp(B1, LB, WEB_BACKEND_PORT + 1, flow.nat_port, "A", 1, 1),  # another port
        tcp(CLIENT2, LB, WEB_BACKEND_PORT, flow.nat_port, "A", 1, 1),
        udp(B1, LB, WEB_BACKEND_PORT, flow.nat_port, b"x"),  # another protocol
    ]
    for packet in wrong:
        assert lab.send(packet).drop_reason == DropReason.NO_SESSION
    assert flow.state == State.ESTABLISHED


def test_malformed_truncations_never_raise_in_the_engine() -> None:
    lab = EngineHarness()
    flow = established(lab, CLIENT1, 1000)
    assert flow.nat_port is not None
    packets = [
        bytes(tcp(CLIENT1, LB, 1000, WEB_PORT, "PA", flow.c_next, flow.s_next, payload=b"abc")),
        bytes(tcp(B1, LB, WEB_BACKEND_PORT, flow.nat_port, "PA", flow.s_next, flow.c_next,
                  payload=b"abcd")),
        bytes(udp(CLIENT2, LB, 5, DNS_PORT, b"xyz")),
    ]
    for raw in packets:
        for cut in range(len(raw)):
            buf = bytearray(raw[:cut])
            action = lab.engine.handle(buf, 0, cut, False, 1.0)
            assert action[0] == DROP


def test_engine_rejects_bad_services() -> None:
    backends = (Backend(B1, 8080),)
    with pytest.raises(ValueError, match="NAT port range"):
        Engine(LB, [Service("x", "tcp", 61000, backends=backends)])
    with pytest.raises(ValueError, match="already used"):
        Engine(LB, [Service("x", "tcp", 80, backends=backends),
                    Service("y", "tcp", 80, backends=backends)])
    with pytest.raises(ValueError, match="twice"):
        Engine(LB, [Service("x", "tcp", 80, backends=backends),
                    Service("x", "udp", 80, backends=backends)])
    # The same port for TCP and UDP is two services.
    Engine(LB, [Service("x", "tcp", 80, backends=backends),
                Service("y", "udp", 80, backends=backends)])


def test_two_services_share_a_backend_without_mixing_flows() -> None:
    """Pools are per (proto, backend): two services with the same backend share its NAT ports,
    and each reply is rewritten back to its own service's port."""
    backend = Backend(B1, 8080)
    engine = Engine(LB, [Service("a", "tcp", 80, backends=(backend,)),
                         Service("b", "tcp", 81, backends=(backend,))])
    nat_ports = []
    for client_port, service_port in ((5555, 80), (5556, 81)):
        buf = wire(tcp(CLIENT1, LB, client_port, service_port, "S", seq=1))
        assert engine.handle(buf, 0, len(buf), False, 0.0)[0] == FORWARD
        nat_ports.append(dissect(buf)[ScapyTCP].sport)
    assert nat_ports[0] != nat_ports[1]
    pairs = ((5555, 80), (5556, 81))
    for nat_port, (client_port, service_port) in zip(nat_ports, pairs, strict=True):
        buf = wire(tcp(B1, LB, 8080, nat_port, "SA", seq=9, ack=2))
        assert engine.handle(buf, 0, len(buf), False, 0.0)[0] == FORWARD
        reply = dissect(buf)
        assert (reply.dst, reply[ScapyTCP].sport, reply[ScapyTCP].dport) == (
            CLIENT1, service_port, client_port,
        )
        verify_checksums(buf)


def test_one_client_port_towards_two_services_makes_two_flows() -> None:
    """Linux lets one source port talk to two destinations: the service port is in the key."""
    lb_ip = "198.18.0.2"
    engine = Engine(
        lb_ip,
        [
            Service("a", "tcp", 80, backends=(Backend("198.18.0.21", 8080),)),
            Service("b", "tcp", 81, backends=(Backend("198.18.0.22", 8081),)),
        ],
    )
    outputs = []
    for port in (80, 81):
        buf = wire(tcp(CLIENT1, lb_ip, 40000, port, "S", seq=7))
        action = engine.handle(buf, 0, len(buf), False, 0.0)
        assert action[0] == FORWARD
        outputs.append(IP(bytes(buf)))
    assert len(engine.table) == 2
    assert [(p.dst, p[ScapyTCP].dport) for p in outputs] == [
        ("198.18.0.21", 8080),
        ("198.18.0.22", 8081),
    ]


def test_no_backend_rst_acknowledges_syn_data() -> None:
    """RFC 793: the RST's ACK is SEG.SEQ + SEG.LEN, the SYN counting one (TCP Fast Open SYN)."""
    lab = EngineHarness(backends=1)
    lab.set_health(0, Health.DEAD)
    result = lab.send(tcp(CLIENT1, LB, 40000, WEB_PORT, "S", seq=100, payload=b"hello"))
    assert result.kind == REPLY
    assert IP(result.reply)[ScapyTCP].ack == 100 + 1 + 5


def test_a_full_table_evicts_nothing_for_a_flow_refused_for_lack_of_ports() -> None:
    """Eviction happens only once the new flow has a NAT port: a refused flow ends nobody."""
    lab = EngineHarness(backends=1, nat_ports=(61000, 61001), cap=2)
    for port in (40001, 40002):  # two established rows: the table is full, the ports are gone
        flow = lab.flow(CLIENT1, port)
        flow.syn()
        flow.synack()
        flow.ack()
    lab.events()
    result = lab.flow(CLIENT2, 40003).syn()
    assert result.drop_reason == DropReason.NAT_PORTS_EXHAUSTED
    assert len(lab.table) == 2 and lab.table.evicted == 0
    assert lab.events() == []
