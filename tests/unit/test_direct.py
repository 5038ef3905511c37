"""Tests for direct routing (lbnat.direct, `mode: dr`): the client-side transition table row
by row, the engine's verdicts (forwarded unchanged to the backend), rows without NAT ports
through open, end, expiry, eviction and removal, the views, and the config's refusals."""

from __future__ import annotations

import json
import struct
from dataclasses import replace

import pytest
from scapy.packet import Packet

from lbnat.backends import Backend
from lbnat.checkpoint import RowCheckpoint
from lbnat.config import Config, ConfigError, Overrides, ServiceConfig, build_config, parse_config
from lbnat.control.plane import ControlPlane
from lbnat.control.protocol import Request
from lbnat.direct import transition
from lbnat.drops import DropReason
from lbnat.engine import DROP, FORWARD, SEND_FIRST, Action, Engine, FlowEnded, FlowOpened
from lbnat.fastpath import KEY, VALUE, FastPath, SimulatedMap
from lbnat.nat import UNKNOWN_ACK, DrSession, EndReason, Session, State, Timeouts
from lbnat.packet import ACK, FIN, PSH, RST, SYN
from lbnat.service import Service
from lbnat.standby import synced
from lbnat.views import session_rows
from tests.unit.fixtures import BACKEND_IPS, CLIENT1, CLIENT2, LB, addr, check_table, tcp, udp, wire

B1, B2 = BACKEND_IPS[:2]
PORT = 80
NAT_PORT = 8080  # the NAT service next to it, whose backends listen elsewhere


def dr_engine(cap: int = 1000, **timeouts: float) -> Engine:
    dr = Service("web", "tcp", PORT, "rr", 0.0, (Backend(B1, PORT), Backend(B2, PORT)), "dr")
    dns = Service("dns", "udp", 53, "rr", 0.0, (Backend(B1, 53),), "dr")
    nat = Service("nat", "tcp", NAT_PORT, "rr", 0.0, (Backend(B1, 9000),))
    return Engine(LB, [dr, dns, nat], timeouts=Timeouts(**timeouts), table_cap=cap)


def send(engine: Engine, packet: Packet, now: float = 0.0) -> tuple[Action, bytes, bytes]:
    buf = wire(packet)
    before = bytes(buf)
    action = engine.handle(buf, 0, len(buf), False, now)
    return action, before, bytes(buf)


def state_of(row: Session) -> State:
    return row.state  # (read anew: mypy would narrow row.state from one assert to the next)


def seg(flags: str, sport: int = 40000, client: str = CLIENT1, seq: int = 1000) -> Packet:
    return tcp(client, LB, sport, PORT, flags, seq, 1, payload=b"x" if "P" in flags else b"")


# --- the transition table, row by row ------------------------------------------------------------

OPEN = (State.SYN_SENT, State.ESTABLISHED)
TABLE = [
    (State.SYN_SENT, SYN, State.SYN_SENT, None),
    (State.SYN_SENT, ACK, State.ESTABLISHED, None),
    (State.SYN_SENT, ACK | PSH, State.ESTABLISHED, None),
    (State.SYN_SENT, SYN | ACK, State.SYN_SENT, None),
    (State.SYN_SENT, RST, State.CLOSE, EndReason.RST),
    (State.SYN_SENT, FIN | ACK, State.TIME_WAIT, EndReason.FIN),
    (State.ESTABLISHED, ACK, State.ESTABLISHED, None),
    (State.ESTABLISHED, ACK | PSH, State.ESTABLISHED, None),
    (State.ESTABLISHED, FIN | ACK, State.TIME_WAIT, EndReason.FIN),
    (State.ESTABLISHED, RST, State.CLOSE, EndReason.RST),
    (State.ESTABLISHED, RST | ACK, State.CLOSE, EndReason.RST),
    (State.TIME_WAIT, ACK, State.TIME_WAIT, None),
    (State.TIME_WAIT, RST, State.TIME_WAIT, None),
    (State.TIME_WAIT, FIN | ACK, State.TIME_WAIT, None),
    (State.CLOSE, ACK, State.CLOSE, None),
    (State.CLOSE, RST, State.CLOSE, None),
]


@pytest.mark.parametrize(("state", "flags", "after", "reason"), TABLE)
def test_transition(state: State, flags: int, after: State, reason: EndReason | None) -> None:
    assert transition(state, flags) == (after, reason)


# --- the packet path ---------------------------------------------------------------------------


def test_a_dr_flow_is_forwarded_unchanged_to_its_backend_and_ends_on_the_clients_fin() -> None:
    engine = dr_engine(time_wait=5.0)
    action, before, after = send(engine, seg("S"))
    assert action == (FORWARD, addr(B1))
    assert after == before  # not one byte rewritten: dst is still the VIP
    (row,) = engine.table
    assert row.__class__ is DrSession and row.nat_port == 0
    assert (row.ack_c, row.ack_s) == (UNKNOWN_ACK, UNKNOWN_ACK)
    assert state_of(row) is State.SYN_SENT and engine.open_flows == 1
    pool = row.pool
    assert pool.rows_held == 0 and pool.ports_in_use == 0 and pool.active == 1 and pool.flows == 1
    for flags in ("A", "PA", "A"):
        action, before, after = send(engine, seg(flags), 1.0)
        assert action == (FORWARD, addr(B1)) and after == before
    assert state_of(row) is State.ESTABLISHED
    check_table(engine.table)
    assert send(engine, seg("FA"), 2.0)[0] == (FORWARD, addr(B1))
    assert state_of(row) is State.TIME_WAIT and engine.open_flows == 0 and pool.active == 0
    ends = [e for e in engine.take_events() if isinstance(e, FlowEnded)]
    assert [e.reason for e in ends] == [EndReason.FIN]
    assert send(engine, seg("A"), 3.0)[0] == (FORWARD, addr(B1))  # a late ACK still goes
    check_table(engine.table)
    engine.tick(7.0)
    assert engine.table.forward.get(row.key) is row  # refreshed at 3.0: lingers to 8.0
    engine.tick(9.0)
    assert len(engine.table) == 0
    check_table(engine.table)
    assert pool.to_backend_packets == 6 and pool.to_client_packets == 0


def test_rr_spreads_dr_flows_and_a_rst_ends_one() -> None:
    engine = dr_engine()
    hops = [send(engine, seg("S", sport))[0] for sport in (40000, 40001, 40002, 40003)]
    assert hops == [(FORWARD, addr(B1)), (FORWARD, addr(B2))] * 2
    send(engine, seg("R", 40001))
    row = engine.table.forward[next(k for k, s in engine.table.forward.items()
                                    if s.client_port == 40001)]  # fmt: skip
    assert state_of(row) is State.CLOSE
    opened = [e for e in engine.take_events() if isinstance(e, FlowOpened)]
    assert len(opened) == 4 and {e.nat_port for e in opened} == {0}
    assert engine.active_flows("web", (B2, PORT)) == 1
    assert engine.active_flows("web", (B1, PORT)) == 2
    # A NAT service's flows to the same backend socket share its pool, not its count.
    engine.services.add(Service("nat80", "tcp", 81, backends=(Backend(B1, PORT),)))
    send(engine, tcp(CLIENT2, LB, 41000, 81, "S", 7))
    assert engine.pool_of("nat80", (B1, PORT)) is engine.pool_of("web", (B1, PORT))
    assert engine.active_flows("web", (B1, PORT)) == 2
    assert engine.active_flows("nat80", (B1, PORT)) == 1
    check_table(engine.table)


def test_a_non_syn_without_a_row_is_dropped_and_a_new_syn_on_an_ended_row_reopens() -> None:
    engine = dr_engine()
    assert send(engine, seg("A"))[0][0] == DROP
    assert engine.drops[DropReason.NO_SESSION] == 1
    send(engine, seg("S"))
    send(engine, seg("R"))
    (old,) = engine.table
    assert send(engine, seg("S", seq=5000))[0] == (FORWARD, addr(B1))  # the same backend again
    (new,) = engine.table
    assert new is not old and state_of(new) is State.SYN_SENT and old.bucket < 0
    check_table(engine.table)


def test_a_dr_udp_flow_is_forwarded_unchanged_and_not_half_open() -> None:
    engine = dr_engine()
    action, before, after = send(engine, udp(CLIENT1, LB, 5000, 53, b"q"))
    assert action == (FORWARD, addr(B1)) and after == before
    (row,) = engine.table
    assert state_of(row) is State.UDP_REPLIED and engine.table.half_open_count == 0
    check_table(engine.table)


def test_nat_services_next_to_dr_ones_are_translated_as_before() -> None:
    engine = dr_engine()
    action, before, after = send(engine, tcp(CLIENT1, LB, 40000, NAT_PORT, "S", 7))
    assert action == (FORWARD, addr(B1)) and after != before
    (row,) = engine.table
    assert row.__class__ is Session and row.nat_port >= 61000
    send(engine, seg("S", 40000))  # the same client socket on the DR service: another row
    assert len(engine.table) == 2
    check_table(engine.table)


def test_a_full_table_evicts_for_a_dr_flow_and_a_dr_row_never_gets_a_backend_reset() -> None:
    engine = dr_engine(cap=2)
    send(engine, seg("S", 40000))  # a half-open DR row
    send(engine, tcp(CLIENT2, LB, 41000, NAT_PORT, "S", 7))  # a half-open NAT row
    action = send(engine, tcp(CLIENT2, LB, 41001, NAT_PORT, "S", 9))[0]
    assert action[0] == FORWARD  # the DR row went first (oldest): no RST for its backend
    assert engine.table.evicted == 1
    action = send(engine, seg("S", 40001))[0]
    assert action[0] == SEND_FIRST  # the NAT row evicted for it: its backend is told
    (resets,) = action[2]
    assert resets[1] == addr(B1)
    check_table(engine.table)


def test_dr_rows_stay_out_of_the_checkpoint_and_the_sync_and_show_no_nat_port() -> None:
    engine = dr_engine()
    checkpoint = RowCheckpoint(memoryview(bytearray(1 << 16)))
    engine.table.checkpoint = checkpoint
    send(engine, seg("S"))
    send(engine, seg("A"))
    (row,) = engine.table
    assert row.slot == -1 and checkpoint.high_water == 0
    assert not synced(row)
    (shown,) = session_rows(engine, 1.0)
    assert shown["nat_port"] == "-" and shown["backend"] == f"{B1}:{PORT}"


# --- what DR cannot do -------------------------------------------------------------------------


def test_a_dr_backend_on_another_port_is_refused() -> None:
    with pytest.raises(ValueError, match="must listen on the service's port 80"):
        Service("web", "tcp", 80, backends=(Backend(B1, 8080),), mode="dr")
    with pytest.raises(ConfigError, match=r"services\[0\]\.mode: .*must listen on the service's"):
        parse_config({"services": [{"port": 80, "mode": "dr",
                                    "backends": [{"ip": B1, "port": 8080}]}]})  # fmt: skip
    state = dr_engine().services["web"]
    with pytest.raises(ValueError, match="must listen"):
        state.publish((Backend(B1, 81),))  # a registration on the wrong port


def test_dr_refuses_ipv6_backends_on_dead_reset_and_a_live_mode_change() -> None:
    with pytest.raises(ValueError, match="IPv4 only"):
        Service("web", "tcp", 80, backends=(Backend("2001:db8::1", 80),), mode="dr")
    with pytest.raises(ConfigError, match="on_dead reset"):
        parse_config({"services": [{"port": 80, "mode": "dr", "on_dead": "reset"}]})
    with pytest.raises(ConfigError, match="mode"):
        parse_config({"services": [{"mode": "direct"}]})
    engine = dr_engine()
    with pytest.raises(ValueError, match="mode"):
        engine.services.reconfigure(Service("web", "tcp", PORT, mode="nat"))


def test_the_command_line_mode() -> None:
    words = (LB, B1, "80", B2, "80")
    mode = frozenset({"mode"})
    with pytest.raises(ConfigError, match="give it a VIP apart from SRCIP"):
        build_config(Overrides(words=words, vip_port="80", mode="dr", given=mode))
    config = build_config(
        Overrides(words=words, vip="198.18.0.100", vip_port="80", mode="dr", given=mode)
    )
    (spec,) = config.services
    assert spec.service.mode == "dr" and config.vip == "198.18.0.100"
    with pytest.raises(ConfigError, match=r"--mode dr: .*must listen on the service's port 20000"):
        build_config(Overrides(words=words, mode="dr", given=mode))
    with pytest.raises(ConfigError, match="on_dead reset"):
        build_config(Overrides(words=words, vip_port="80", mode="dr", on_dead="reset"))


# --- registration and reload ---------------------------------------------------------------------


def test_a_dr_service_registers_backends_on_its_port_and_a_reload_keeps_its_mode() -> None:
    web = Service("web", "tcp", PORT, backends=(Backend(B1, PORT),), mode="dr")
    cp = ControlPlane(Config(lb_ip=LB, services=(ServiceConfig(web, health=None),)), started=0.0)
    reply = cp.request(Request("register", "web", B2, 8080), "198.18.0.9", now=1.0)
    assert json.loads(reply.line)["ok"] is False
    assert "must listen on the service's port 80" in json.loads(reply.line)["error"]
    reply = cp.request(Request("register", "web", B2, PORT), "198.18.0.9", now=1.0)
    assert json.loads(reply.line)["ok"] is True
    assert [b.key for b in cp.registry.snapshot("web")] == [(B1, PORT), (B2, PORT)]
    nat = ServiceConfig(replace(web, mode="nat"), health=None)
    plan = cp.plan_reload(Config(lb_ip=LB, services=(nat,)))
    assert plan.error == "changing the mode (nat, dr) of service web needs a restart"
    same = cp.plan_reload(Config(lb_ip=LB, services=(ServiceConfig(web, health=None),)))
    assert same.error is None


# --- the kernel fast path ----------------------------------------------------------------------


def test_an_established_dr_row_enters_the_kernel_as_one_identity_entry_and_leaves_on_fin() -> None:
    engine = dr_engine()
    kernel = SimulatedMap()
    mac = bytes.fromhex("02000000aa0102000000bb02")
    fastpath = FastPath(kernel, lambda ip: mac + b"\x08\x00", 7)
    engine.table.kernel = fastpath
    send(engine, seg("S"), 0.0)
    send(engine, seg("A"), 0.1)
    engine.tick(0.2)  # established for OFFLOAD_AFTER: into the kernel
    (row,) = engine.table
    assert row in fastpath and len(kernel.entries) == 1  # no reverse entry: replies bypass
    ((key, value),) = kernel.entries.items()
    assert key == KEY.pack(addr(CLIENT1), addr(LB), 40000, PORT, 6)
    fields = VALUE.unpack(value)
    assert fields[:6] == (wire(seg("A"))[12:20], struct.pack("!HH", 40000, PORT), 0, 0, mac, 7)
    assert kernel.carry(key, 1000, 5, ack=77, window=3)  # a packet the kernel forwarded
    assert send(engine, seg("FA"), 0.5)[0] == (FORWARD, addr(B1))  # a FIN comes up: it leaves
    assert row not in fastpath and not kernel.entries
    assert state_of(row) is State.TIME_WAIT
    assert row.pool.to_backend_packets == 4 and row.ack_c == 77 and row.ack_s == UNKNOWN_ACK
    check_table(engine.table)


def test_a_dr_flow_s_log_line_says_direct_routing() -> None:
    from lbnat.eventlog import flow_opened_line

    engine = dr_engine()
    send(engine, seg("S"))
    (opened,) = [e for e in engine.take_events() if isinstance(e, FlowOpened)]
    assert flow_opened_line(opened).text == (
        f"new client <{CLIENT1},40000> -> server {B1}:{PORT} (direct routing)"
    )
