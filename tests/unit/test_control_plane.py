"""The control plane without root, sockets or threads: requests, health verdicts, drain upkeep,
reload plans and status, driven with a fake clock; its changes applied to a real engine."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import pytest

from lbnat.backends import Backend, BackendKey, Health
from lbnat.config import Config, ServiceConfig
from lbnat.control.plane import (
    ControlPlane,
    Effect,
    SetHealthChecks,
    UpdateGuard,
)
from lbnat.control.protocol import Request
from lbnat.eventlog import WARNING, LogLine
from lbnat.health.checker import Report
from lbnat.health.probe import ProbeResult
from lbnat.health_settings import ProbeSettings
from lbnat.messages import AskActive, ResetBackend, SetBackends, SetServices
from lbnat.service import Service
from lbnat.views import answer, apply_change
from tests.unit.fixtures import LB, WEB_BACKEND_PORT, WEB_PORT, EngineHarness

B1, B2, B3, B4 = (Backend(f"198.18.0.2{i}", WEB_BACKEND_PORT) for i in range(1, 5))
PEER = "198.18.0.24"


def web(*backends: Backend, scheduler: str = "rr", probed: bool = True) -> ServiceConfig:
    service = Service("web", "tcp", WEB_PORT, scheduler, backends=tuple(backends))
    return ServiceConfig(service) if probed else ServiceConfig(service, health=None)


def config(*services: ServiceConfig, **settings: object) -> Config:
    return replace(Config(lb_ip=LB, drain_timeout=60.0, services=services), **settings)  # type: ignore[arg-type]


def plane(*services: ServiceConfig, **settings: object) -> ControlPlane:
    return ControlPlane(config(*(services or (web(B1, B2, B3),)), **settings), started=0.0)


def request(op: str, backend: Backend = B4, service: str = "web", weight: int = 1) -> Request:
    return Request(op, service, backend.ip, backend.port, weight=weight)


def states(cp: ControlPlane, service: str = "web") -> list[str]:
    """Each backend as "ip-suffix:health[,draining]", in the snapshot's order."""
    return [
        f"{b.ip[-2:]}:{b.health.value}{',draining' if b.draining else ''}"
        for b in cp.registry.snapshot(service)
    ]


def logged(effects: Sequence[Effect]) -> list[str]:
    return [e.text for e in effects if isinstance(e, LogLine)]


def pushed(effects: Sequence[Effect]) -> list[SetBackends]:
    return [e for e in effects if isinstance(e, SetBackends)]


# --- requests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "probed", "reply_state", "after", "line"),
    [
        ("register", True, "waiting for a good probe", "24:dead", "joins"),
        ("register", False, "alive", "24:alive", "joins"),
        ("backend_add", True, "waiting for a good probe", "24:dead", "joins"),
    ],
)
def test_a_new_backend_joins(
    op: str, probed: bool, reply_state: str, after: str, line: str
) -> None:
    cp = plane(web(B1, B2, B3, probed=probed))
    reply = cp.request(request(op), PEER, now=5.0)
    assert json.loads(reply.line) == {
        "ok": True,
        "op": op,
        "service": "web",
        "backend": "198.18.0.24:8080",
        "state": reply_state,
    }
    assert states(cp)[-1] == after
    assert pushed(reply.effects) == [SetBackends("web", cp.registry.snapshot("web"))]
    assert logged(reply.effects) == [
        f"{op} : backend 198.18.0.24:8080 {line} service web (from {PEER})"
    ]


@pytest.mark.parametrize(
    ("op", "reply_state", "after"),
    [
        ("unregister", "draining", ["21:alive", "22:alive", "23:alive,draining"]),
        ("backend_drain", "draining", ["21:alive", "22:alive", "23:alive,draining"]),
        ("backend_remove", "removed", ["21:alive", "22:alive"]),
    ],
)
def test_a_backend_leaves(op: str, reply_state: str, after: list[str]) -> None:
    cp = plane()
    reply = cp.request(request(op, B3), PEER, now=5.0)
    assert json.loads(reply.line)["state"] == reply_state
    assert states(cp) == after
    assert pushed(reply.effects)[0].backends == cp.registry.snapshot("web")


@pytest.mark.parametrize(
    ("req", "error"),
    [
        (request("register", B1), "backend 198.18.0.21:8080 is already in service web"),
        (request("register", service="mail"), "unknown service 'mail' (services: web)"),
        (request("unregister", B4), "backend 198.18.0.24:8080 is not in service web"),
        (request("backend_remove", B4), "backend 198.18.0.24:8080 is not in service web"),
        (Request("register"), "register needs a service, an ip and a port"),
    ],
)
def test_a_refused_request_changes_nothing(req: Request, error: str) -> None:
    cp = plane()
    before = states(cp)
    reply = cp.request(req, PEER, now=5.0)
    assert json.loads(reply.line) == {"ok": False, "error": error}
    assert reply.effects == [
        LogLine(
            f"control : refused a request from {PEER}: {error}",
            "control_refused",
            WARNING,
            {"peer": PEER, "reason": error},
        )
    ]
    assert states(cp) == before


def test_an_op_the_control_plane_does_not_own_is_refused_unlogged() -> None:
    reply = plane().request(Request("frobnicate"), PEER, now=0.0)
    assert json.loads(reply.line) == {"ok": False, "error": "unknown op 'frobnicate'"}
    assert reply.effects == []


# --- the whole life of a registered backend, against a real engine ------------------------------


class Engines:
    """The data plane as the control plane sees it: one engine (fixtures.EngineHarness) that
    applies every change and answers every question, as a worker does (lbnat.views)."""

    def __init__(self) -> None:
        self.harness = EngineHarness(backends=3)

    def carry_out(self, effects: Sequence[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, SetBackends | SetServices | ResetBackend):
                apply_change(self.harness.engine, effect, self.harness.now)

    def active(self, question: AskActive | None) -> list[dict[tuple[str, BackendKey], int]]:
        return [] if question is None else [answer(self.harness.engine, question, self.harness.now)]


def test_register_probe_unregister_drain_remove() -> None:
    cp = plane()
    engines = Engines()
    flows = [engines.harness.flow(port=40000 + i) for i in range(7)]

    engines.carry_out(cp.request(request("register"), PEER, now=0.0).effects)
    for flow in flows[:3]:
        flow.syn()
    assert [f.backend for f in flows[:3]] == [B1.ip, B2.ip, B3.ip]  # b4 waits for a probe

    good = replace(B4, health=Health.ALIVE)
    engines.carry_out(cp.verdicts("web", (*cp.registry.snapshot("web")[:3], good)))
    assert states(cp)[-1] == "24:alive"
    for flow in flows[3:5]:
        flow.syn()
    assert [f.backend for f in flows[3:5]] == [B4.ip, B1.ip]  # eligible after one good probe

    engines.carry_out(cp.request(request("unregister"), PEER, now=10.0).effects)
    assert states(cp)[-1] == "24:alive,draining"
    for flow in flows[5:7]:
        flow.syn()
    assert B4.ip not in {f.backend for f in flows[5:7]}  # no new flows while draining

    b4_flow = flows[3]
    b4_flow.synack()
    b4_flow.ack()
    question = cp.draining()
    assert question == AskActive((("web", B4.key),))
    assert cp.sweep(11.0, engines.active(question)) == []  # its flow is still open

    b4_flow.fin_c()
    b4_flow.fin_s()
    effects = cp.sweep(12.0, engines.active(cp.draining()))
    engines.carry_out(effects)
    assert logged(effects) == ["backend 198.18.0.24:8080 removed from service web (drained)"]
    assert states(cp) == ["21:alive", "22:alive", "23:alive"]
    web = engines.harness.engine.services["web"]
    assert [b.key for b in web.backends] == [B1.key, B2.key, B3.key]
    assert cp.draining() is None


@pytest.mark.parametrize(
    ("sweeps", "removed_at"),
    [
        ([(69.0, 5), (70.0, 5)], 70.0),  # the drain timeout (60 s) passes with flows left
        ([(30.0, 1), (31.0, 0)], 31.0),  # the last flow ends first
        ([(69.9, 1), (200.0, 1)], 200.0),
    ],
)
def test_drain_ends_at_the_last_flow_or_the_timeout(
    sweeps: list[tuple[float, int]], removed_at: float
) -> None:
    cp = plane()
    cp.request(request("backend_drain", B2), PEER, now=10.0)
    for now, active in sweeps:
        question = cp.draining()
        assert question is not None
        effects = cp.sweep(now, [{key: active for key in question.backends}])
        assert bool(effects) == (now == removed_at)
    assert states(cp) == ["21:alive", "23:alive"]


def test_open_flows_of_every_worker_are_added_up() -> None:
    cp = plane()
    cp.request(request("unregister", B2), PEER, now=0.0)
    key = ("web", B2.key)
    assert cp.sweep(1.0, [{key: 0}, {key: 1}]) == []
    assert len(pushed(cp.sweep(2.0, [{key: 0}, {key: 0}]))) == 1


# --- health ---------------------------------------------------------------------------------------


def report(health: Health, changed: bool, backend: Backend = B2) -> Report:
    return Report("web", backend, health, changed, ProbeResult(health is Health.ALIVE, "refused"))


@pytest.mark.parametrize(
    ("on_dead", "transitions_only", "health", "changed", "expected"),
    [
        ("keep", False, Health.DEAD, True, ["log"]),
        ("reset", False, Health.DEAD, True, ["reset", "log"]),
        ("reset", False, Health.DEAD, False, ["verbose log"]),  # still dead: reset once only
        ("reset", False, Health.BAD, True, ["log"]),
        ("keep", True, Health.BAD, False, []),  # --log-transitions: repeats are not logged
        ("keep", True, Health.ALIVE, True, ["log"]),
    ],
)
def test_a_probe_report(
    on_dead: str, transitions_only: bool, health: Health, changed: bool, expected: list[str]
) -> None:
    service = replace(web(B1, B2, B3), on_dead=on_dead)
    cp = plane(service, log_transitions=transitions_only)
    effects = cp.report(report(health, changed), now=7.0)
    kinds = [
        "reset" if isinstance(e, ResetBackend) else "verbose log" if e.verbose else "log"  # type: ignore[union-attr]
        for e in effects
    ]
    assert kinds == expected
    if "reset" in expected:
        assert effects[0] == ResetBackend("web", B2.key)
    for line in logged(effects):
        assert line == f"IP : 198.18.0.22, Port : 8080 Server is {health.value}"
    assert cp.last_probe[("web", B2.key)] == ("refused", 7.0)


def test_a_verdict_for_a_removed_backend_changes_nothing_else() -> None:
    cp = plane()
    cp.request(request("backend_remove", B2), PEER, now=0.0)
    effects = cp.verdicts("web", (replace(B1, health=Health.BAD), replace(B2, health=Health.DEAD)))
    assert states(cp) == ["21:bad", "23:alive"]
    assert pushed(effects) == [SetBackends("web", cp.registry.snapshot("web"))]


# --- reload ---------------------------------------------------------------------------------------


def dns() -> ServiceConfig:
    return ServiceConfig(
        Service("dns", "udp", 53, backends=(Backend("198.18.0.21", 5353),)),
        probe=ProbeSettings(kind="udp"),
    )


@pytest.mark.parametrize(
    ("new", "error"),
    [
        (config(dns()), "removing service web needs a restart"),
        (
            config(replace(web(B1), service=Service("web", "tcp", 81, backends=(B1,)))),
            "changing the protocol or port of service web needs a restart",
        ),
        (
            config(replace(web(B1), service=Service("web", "udp", WEB_PORT, backends=(B1,)))),
            "changing the protocol or port of service web needs a restart",
        ),
    ],
)
def test_a_reload_that_needs_a_restart_is_refused(new: Config, error: str) -> None:
    cp = plane()
    plan = cp.plan_reload(new)
    assert plan.error == error
    assert cp.config.services == (web(B1, B2, B3),) and states(cp) == [
        "21:alive",
        "22:alive",
        "23:alive",
    ]


def test_a_reload_notes_settings_that_wait_for_a_restart() -> None:
    cp = plane()
    plan = cp.plan_reload(config(web(B1, B2, B3), nat_ports=(50000, 50999), table_cap=10))
    assert plan.error is None
    assert [n.text for n in plan.notes] == [
        "reload : nat_ports changed; it takes effect at the next start",
        "reload : table_cap changed; it takes effect at the next start",
    ]
    cp.commit_reload(plan)
    assert cp.config.nat_ports != (50000, 50999)  # the running range stays
    assert cp.config.table_cap == 10


def test_a_reload_keeps_the_running_log_settings_and_says_so() -> None:
    """The Log and the workers' flow events are set at start: the running config must not
    claim another level or format."""
    cp = plane()
    new = config(web(B1, B2, B3), log_level="warning", quiet=True, log_format="json")
    plan = cp.plan_reload(new)
    assert [(n.text, n.level) for n in plan.notes] == [
        (f"reload : {key} changed; it takes effect at the next start", WARNING)
        for key in ("log_format", "quiet", "log_level")
    ]
    cp.commit_reload(plan)
    assert (cp.config.log_format, cp.config.quiet, cp.config.log_level) == ("text", False, "info")


@pytest.mark.parametrize(
    ("services", "after", "scheduler", "added", "guard"),
    [
        # a backend added, one dropped from the config (it drains), the others keep their health
        (
            (web(B1, B2, B4),),
            ["21:alive", "22:bad", "23:alive,draining", "24:alive"],
            "rr",
            frozenset(),
            None,
        ),
        # a changed weight and a changed scheduler reach the engines as a new spec
        (
            (web(B1, replace(B2, weight=5), B3, scheduler="wrr"),),
            ["21:alive", "22:bad", "23:alive"],
            "wrr",
            frozenset(),
            None,
        ),
        # a new service: its port joins the guard and the filter
        (
            (web(B1, B2, B3), dns()),
            ["21:alive", "22:bad", "23:alive"],
            "rr",
            frozenset({"dns"}),
            UpdateGuard((WEB_PORT,), (53,)),
        ),
    ],
)
def test_a_reload_applies_the_diff(
    services: tuple[ServiceConfig, ...],
    after: list[str],
    scheduler: str,
    added: frozenset[str],
    guard: UpdateGuard | None,
) -> None:
    cp = plane()
    cp.verdicts("web", (B1, replace(B2, health=Health.BAD), B3))
    plan = cp.plan_reload(config(*services))
    assert plan.error is None and [s.service.name for s in plan.added] == sorted(added)
    effects = cp.commit_reload(plan)
    assert states(cp) == after
    change = effects[0]
    assert isinstance(change, SetServices)
    assert change.added == added
    assert change.cursor_slots == {"web": 0, **({"dns": 1} if added else {})}
    spec = change.specs[0]
    assert spec.scheduler == scheduler and spec.backends == cp.registry.snapshot("web")
    weights = {b.key: b.weight for b in spec.backends}
    assert weights[B2.key] == services[0].service.backends[1].weight
    assert [e for e in effects if isinstance(e, UpdateGuard)] == ([guard] if guard else [])
    checks = [e for e in effects if isinstance(e, SetHealthChecks)]
    assert len(checks) == 1 and sorted(checks[0].checks) == sorted(s.service.name for s in services)
    assert logged(effects) == [f"reload : applied ({len(services)} services, {len(added)} new)"]


def test_a_reload_with_a_bad_probe_changes_nothing() -> None:
    cp = plane()
    bad = replace(web(B1), probe=ProbeSettings(kind="udp"))  # a udp probe on a tcp service
    plan = cp.plan_reload(config(bad))
    with pytest.raises(ValueError, match="a udp health check cannot probe a tcp service"):
        cp.commit_reload(plan)
    assert states(cp) == ["21:alive", "22:alive", "23:alive"]


# --- status ---------------------------------------------------------------------------------------


def test_status_is_built_from_the_given_counters() -> None:
    cp = plane(web(B1, B2))
    cp.request(request("register"), PEER, now=1.0)
    cp.request(request("unregister", B2), PEER, now=2.0)
    cp.report(report(Health.ALIVE, True, B1), now=3.0)
    counters = {
        "rows": 4,
        "rows_cap": 500_000,
        "open_flows": 3,
        "table": {"half_open": 1, "evicted": 7, "ports_reclaimed": 5, "pressure_spells": 1},
        "offload": {
            "rows": 2,
            "offloaded": 3,
            "withdrawn": 1,
            "refused": 0,
            "packets": 70,
            "bytes": 7000,
        },
        "packets": 99,
        "drops": {"no_session": 2},
        "services": {
            "web": {
                "flows": 5,
                "packets": 90,
                "bytes": 9000,
                "drops": {"no_backend": 1},
                "ended": {"fin": 2, "rst": 1},
                "backends": {
                    B1.key: {
                        "active": 2,
                        "flows": 4,
                        "packets": 80,
                        "bytes": 8000,
                        "to_backend": {"packets": 50, "bytes": 3000},
                        "to_client": {"packets": 30, "bytes": 5000},
                        "nat_ports": {"in_use": 3, "size": 4535},
                    }
                },
            }
        },
    }
    workers: list[dict[str, object]] = [{"index": 0, "pid": 1, "alive": True, "restarts": 0}]
    status = cp.status(counters, workers, now=10.5)
    b1, b2, b4 = status.pop("services")[0].pop("backends")  # type: ignore[index]
    assert status == {
        "lb_ip": LB,
        "vip": LB,
        "ip6": None,
        "uptime": 10.5,
        "workers": workers,
        "io": "rings (frames)",
        "syn_proxy": "auto",
        "rows": 4,
        "rows_cap": 500_000,
        "open_flows": 3,
        "table": {"half_open": 1, "evicted": 7, "ports_reclaimed": 5, "pressure_spells": 1},
        "offload": {
            "rows": 2,
            "offloaded": 3,
            "withdrawn": 1,
            "refused": 0,
            "packets": 70,
            "bytes": 7000,
        },
        "drops": {"no_session": 2},
    }
    assert b1 == {
        "ip": B1.ip,
        "port": 8080,
        "name": B1.name,
        "weight": 1,
        "health": "alive",
        "draining": False,
        "origin": "config",
        "active": 2,
        "flows": 4,
        "packets": 80,
        "bytes": 8000,
        "to_backend": {"packets": 50, "bytes": 3000},
        "to_client": {"packets": 30, "bytes": 5000},
        "nat_ports": {"in_use": 3, "size": 4535},
        "last_probe": "refused",
        "last_probe_age": 7.5,
    }
    assert (b2["draining"], b2["active"], b2["last_probe"], b2["last_probe_age"]) == (
        True,
        0,
        "",
        None,
    )
    assert (b4["health"], b4["origin"]) == ("dead", "registered")


def test_status_of_a_service() -> None:
    cp = plane(web(B1), dns())
    counters = {
        "rows": 0,
        "open_flows": 0,
        "drops": {},
        "services": {"web": {"flows": 5, "packets": 90, "bytes": 9000, "drops": {}}},
    }
    services = cp.status(counters, [], now=0.0)["services"]
    assert isinstance(services, list)
    assert [{k: v for k, v in s.items() if k != "backends"} for s in services] == [
        {
            "name": "web",
            "proto": "tcp",
            "port": 80,
            "scheduler": "rr",
            "mode": "nat",
            "proxy_protocol": None,
            "health_check": "syn",
            "flows": 5,
            "ended": {},
            "packets": 90,
            "bytes": 9000,
            "drops": {},
            "syn_cookies": {"sent": 0, "validated": 0, "invalid": 0},
        },
        {
            "name": "dns",
            "proto": "udp",
            "port": 53,
            "scheduler": "rr",
            "mode": "nat",
            "proxy_protocol": None,
            "health_check": "udp",
            "flows": 0,
            "ended": {},
            "packets": 0,
            "bytes": 0,
            "drops": {},
            "syn_cookies": {"sent": 0, "validated": 0, "invalid": 0},
        },
    ]


# --- IPv6 backends (issue 21) --------------------------------------------------------------------

V6 = Backend("2001:db8::24", WEB_BACKEND_PORT)


def test_an_ipv6_backend_registers_when_lbnat_has_ip6() -> None:
    cp = plane(web(), ip6="2001:db8::2")
    reply = cp.request(request("register", V6), "2001:db8::24", now=5.0)
    assert json.loads(reply.line) == {
        "ok": True,
        "op": "register",
        "service": "web",
        "backend": "[2001:db8::24]:8080",
        "state": "waiting for a good probe",
    }
    assert "[2001:db8::24]:8080" in logged(reply.effects)[0]
    assert (
        cp.status({"rows": 0, "open_flows": 0, "drops": {}, "services": {}}, [], 6.0)["ip6"]
        == "2001:db8::2"
    )


@pytest.mark.parametrize(
    ("settings", "backends", "error"),
    [
        (
            {},
            (),
            "backend [2001:db8::24]:8080 is IPv6 and this lbnat has no IPv6 address (ip6 in "
            "the config, or --ip6)",
        ),
        (
            {"ip6": "2001:db8::2"},
            (B1,),
            "backend [2001:db8::24]:8080 is IPv6 and service web has IPv4 backends "
            "(198.18.0.21:8080): a service's backends are all of one family",
        ),
    ],
)
def test_an_ipv6_backend_is_refused(
    settings: dict[str, object], backends: tuple[Backend, ...], error: str
) -> None:
    cp = plane(web(*backends), **settings)
    reply = cp.request(request("register", V6), PEER, now=5.0)
    assert json.loads(reply.line) == {"ok": False, "error": error}


def test_an_ipv4_backend_is_refused_by_a_service_of_ipv6_backends() -> None:
    cp = plane(web(V6), ip6="2001:db8::2")
    reply = cp.request(request("register", B1), PEER, now=5.0)
    assert json.loads(reply.line)["error"] == (
        "backend 198.18.0.21:8080 is IPv4 and service web has IPv6 backends "
        "([2001:db8::24]:8080): a service's backends are all of one family"
    )


def test_a_reload_that_changes_a_services_family_is_refused() -> None:
    cp = plane(web(B1, B2), ip6="2001:db8::2")
    plan = cp.plan_reload(config(web(V6), ip6="2001:db8::2"))
    assert plan.error == (
        "service web holds IPv4 backends (198.18.0.21:8080) and the new config gives it IPv6 "
        "ones: a service's backends are all of one family (unregister or remove the others "
        "first, or restart)"
    )
    assert cp.plan_reload(config(web(B2, B3), ip6="2001:db8::2")).error is None
    empty = plane(web(), ip6="2001:db8::2")
    assert empty.plan_reload(config(web(V6), ip6="2001:db8::2")).error is None
