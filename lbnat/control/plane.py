"""The control plane: the backend registry and every decision about it. Pure.

What this module may know: the config, the registry, requests (already parsed and
authenticated by lbnat.control.protocol), health reports, the data plane's answers
(counters, open flows) and the time, which comes in as `now`. It opens no socket, starts no
thread, reads no clock and holds no lock: `lbnat.daemon` calls it with one lock held and
carries out what it returns.

Every call returns its effects, one small typed record per side effect, in the order they must
happen (as mitmproxy's proxy commands):

    SetBackends, SetServices, ResetBackend   a change for every engine (lbnat.messages)
    LogLine                                  a line for the log (lbnat.eventlog)
    UpdateGuard                              new VIP ports for the nftables table and BPF filter
    SetHealthChecks                          new checks for the health thread

The transitions of a backend, as the registry makes them (lbnat.registry):

    event                        before                 after
    config / reload              -                      alive
    register, backend_add        - (probed service)     dead: "waiting for a good probe"
    register, backend_add        - (unprobed service)   alive
    good probe                   dead or bad            alive (eligible)
    unregister, backend_drain    any                    draining (no new flows)
    sweep: last flow ended       draining               removed
    sweep: drain timeout         draining               removed
    backend_remove               any                    removed
    reload drops it              configured             draining
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lbnat import addresses
from lbnat.backends import Backend, BackendKey, Health
from lbnat.config import Config, ServiceConfig
from lbnat.control.protocol import Request, ack, nack
from lbnat.eventlog import (
    LogLine,
    backend_change_line,
    drained_line,
    health_line,
    io_text,
    refused_line,
    reload_applied_line,
    reload_note_line,
)
from lbnat.fields import host_port_text
from lbnat.health import HealthCheck, make_probe, probe_kind
from lbnat.health.checker import Report
from lbnat.messages import AskActive, Change, ResetBackend, SetBackends, SetServices
from lbnat.registry import Registry, RegistryError
from lbnat.service import Service


@dataclass(frozen=True, slots=True)
class UpdateGuard:
    """The service ports changed (a reload added a service): the nftables table and the
    packet sockets' filter must include these."""

    tcp_ports: tuple[int, ...]
    udp_ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SetHealthChecks:
    checks: Mapping[str, HealthCheck]


Effect = Change | LogLine | UpdateGuard | SetHealthChecks


@dataclass(frozen=True, slots=True)
class Reply:
    """A request's reply line and what it changed."""

    line: bytes
    effects: list[Effect] = field(default_factory=list)
    acked: bool = True  # False: `line` is a nack


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """A new config compared with the running one. `error` set: refused, nothing changes."""

    config: Config
    notes: list[LogLine]  # settings that take effect only at the next start
    added: tuple[ServiceConfig, ...]  # new services (their ports must be free)
    error: str | None = None


# The daemon's Log is made once, and each worker is told at its start whether to send flow
# events: the running config keeps these across a reload so that it says what is logged (and
# a worker restarted after a reload is told the same as the others).
LOG_SETTINGS = ("log_format", "quiet", "log_level")
# Settings a reload cannot change in a running lbnat.
RESTART_KEYS = ("lb_ip", "vip", "ip6", "interface", "nat_ports", "table_cap", "timeouts", "control",
                "admin_socket", "syn_proxy", "syn_proxy_threshold", "syn_proxy_mss",
                "metrics", "state_file", "sync", *LOG_SETTINGS)  # fmt: skip

# The requests that change a backend: (state in the reply, verb in the log line).
BACKEND_OPS = {
    "register": ("", "joins"),  # the state depends on the service (probed or not)
    "backend_add": ("", "joins"),
    "unregister": ("draining", "drains from"),
    "backend_drain": ("draining", "drains from"),
    "backend_remove": ("removed", "is removed from"),
}


def health_check(config: ServiceConfig) -> HealthCheck | None:
    """The service's check, or None when it is not probed. ValueError for a bad probe."""
    if config.health is None:
        return None
    return HealthCheck(config.health, make_probe(config.probe, config.service.proto))


class ControlPlane:
    def __init__(self, config: Config, started: float) -> None:
        self.config = config
        self.started = started  # for the uptime in status
        self.registry = Registry(drain_timeout=config.drain_timeout)
        self.services: dict[str, ServiceConfig] = {}
        self.cursor_slots: dict[str, int] = {}  # service -> its round-robin word (SharedCursors)
        self.last_probe: dict[tuple[str, BackendKey], tuple[str, float]] = {}  # detail, when
        for service in config.services:
            self._define(service)

    def _define(self, service: ServiceConfig) -> None:
        name = service.service.name
        self.services[name] = service
        self.cursor_slots.setdefault(name, len(self.cursor_slots))
        spec = service.service
        dr_port = spec.port if spec.mode == "dr" else 0
        self.registry.set_service(name, spec.backends, service.health is not None, dr_port)

    # --- what the data plane and the health thread start with --------------------------------

    def specs(self) -> tuple[Service, ...]:
        """Every service's spec with its backends as the engines must see them now."""
        return tuple(
            replace(s.service, backends=self.registry.snapshot(name))
            for name, s in self.services.items()
        )

    def backends(self) -> dict[str, tuple[Backend, ...]]:
        return {name: self.registry.snapshot(name) for name in self.registry.services()}

    def ports(self, proto: str) -> tuple[int, ...]:
        return tuple(s.service.port for s in self.services.values() if s.service.proto == proto)

    def health_checks(self) -> dict[str, HealthCheck]:
        """The checks of the probed services. ValueError for a bad probe."""
        return {name: check for name, s in self.services.items() if (check := health_check(s))}

    # --- requests -----------------------------------------------------------------------------

    def request(self, request: Request, peer: str, now: float) -> Reply:
        """A request that changes a backend: its reply, the new snapshot, the log line. A
        refused one changes nothing: a nack and the refusal in the log."""
        if request.op not in BACKEND_OPS:
            return Reply(nack(f"unknown op {request.op!r}"), acked=False)
        try:
            return self._change_backend(request, peer, now)
        except (RegistryError, ValueError) as error:
            return Reply(nack(str(error)), [refused_line(peer, str(error))], acked=False)

    def _change_backend(self, request: Request, peer: str, now: float) -> Reply:
        if request.service is None or request.ip is None or request.port is None:
            raise ValueError(f"{request.op} needs a service, an ip and a port")
        service, key = request.service, (request.ip, request.port)
        state, verb = BACKEND_OPS[request.op]
        match request.op:
            case "register" | "backend_add":
                backend = Backend(request.ip, request.port, request.weight, request.name)
                if self.config.ip6 is None and addresses.is_v6(backend.ip_int):
                    raise ValueError(
                        f"backend {addresses.with_port(backend.ip_int, backend.port)} is IPv6 "
                        "and this lbnat has no IPv6 address (ip6 in the config, or --ip6)"
                    )
                origin = "registered" if request.op == "register" else "admin"
                entry = self.registry.add(service, backend, origin)
                state = "alive" if entry.health is Health.ALIVE else "waiting for a good probe"
            case "backend_remove":
                self.registry.remove(service, key)
            case _:  # unregister, backend_drain
                self.registry.drain(service, key, now)
        address = host_port_text(request.ip, request.port)
        return Reply(
            ack(op=request.op, service=service, backend=address, state=state),
            [
                self._push(service),
                backend_change_line(request.op, service, address, verb, peer),
            ],
        )

    def refused(self, peer: str, reason: str) -> list[Effect]:
        """A request refused before it reached the registry (parse, auth, or no answer)."""
        return [refused_line(peer, reason)]

    def _push(self, service: str) -> SetBackends:
        return SetBackends(service, self.registry.snapshot(service))

    # --- health -------------------------------------------------------------------------------

    def verdicts(self, service: str, snapshot: Sequence[Backend]) -> list[Effect]:
        """The health thread's verdicts for one service: recorded, and the new snapshot."""
        for backend in snapshot:
            self.registry.set_health(service, backend.key, backend.health)
        return [self._push(service)]

    def report(self, report: Report, now: float) -> list[Effect]:
        """One probe's outcome: remembered for status; a backend that has just died has its
        flows reset (--on-dead reset); the health line."""
        backend = report.backend
        self.last_probe[(report.service, backend.key)] = (report.result.detail, now)
        service = self.services.get(report.service)
        on_dead = service.on_dead if service is not None else "keep"
        effects: list[Effect] = []
        if report.changed and report.health is Health.DEAD and on_dead == "reset":
            effects.append(ResetBackend(report.service, backend.key))
        if (health := health_line(report, self.config.log_transitions)) is not None:
            effects.append(health)
        return effects

    # --- drain upkeep -------------------------------------------------------------------------

    def draining(self) -> AskActive | None:
        """The question for the engines when backends are draining, else None."""
        if not self.registry.any_draining:
            return None
        return AskActive(
            tuple(
                (name, entry.backend.key)
                for name in self.registry.services()
                for entry in self.registry.entries(name)
                if entry.draining
            )
        )

    def sweep(
        self, now: float, answers: Sequence[Mapping[tuple[str, BackendKey], int]]
    ) -> list[Effect]:
        """Remove draining backends whose last flow has ended in every engine (`answers`: each
        engine's open flows per backend) or whose drain time is up."""
        active: Counter[tuple[str, BackendKey]] = Counter()
        for answer in answers:
            active.update(answer)
        removed = self.registry.sweep(now, lambda name, key: active[name, key])
        effects: list[Effect] = [self._push(s) for s in dict.fromkeys(name for name, _ in removed)]
        for service, entry in removed:
            b = entry.backend
            effects.append(drained_line(service, host_port_text(b.ip, b.port)))
        return effects

    # --- status -------------------------------------------------------------------------------

    def status(
        self, counters: Mapping[str, Any], workers: list[dict[str, object]], now: float
    ) -> dict[str, object]:
        """Services, backends with their state, and `counters` (every engine's, merged)."""
        c = self.config
        return {
            "lb_ip": c.lb_ip,
            "vip": c.vip or c.lb_ip,
            "ip6": c.ip6,
            "uptime": round(now - self.started, 1),
            "workers": workers,
            "io": io_text(c),
            "syn_proxy": c.syn_proxy,
            "rows": counters["rows"],
            "rows_cap": counters.get("rows_cap", c.table_cap),
            "open_flows": counters["open_flows"],
            "table": counters.get("table", {}),
            # the kernel fast path: its rows now, and what it rewrote (lbnat.fastpath)
            "offload": counters.get("offload", {}),
            "drops": counters["drops"],
            "services": [
                self._service_status(name, counters["services"].get(name, {}), now)
                for name in self.services
            ],
        }

    def _service_status(
        self, name: str, counted: Mapping[str, Any], now: float
    ) -> dict[str, object]:
        config = self.services[name]
        per_backend = counted.get("backends", {})
        backends = []
        for entry in self.registry.entries(name):
            b = entry.backend
            count = per_backend.get(b.key, {})
            detail, at = self.last_probe.get((name, b.key), ("", now))
            backends.append(
                {
                    "ip": b.ip,
                    "port": b.port,
                    "name": b.name,
                    "weight": b.weight,
                    "health": entry.health.value,
                    "draining": entry.draining,
                    "origin": entry.origin,
                    "active": count.get("active", 0),
                    "flows": count.get("flows", 0),
                    "packets": count.get("packets", 0),
                    "bytes": count.get("bytes", 0),
                    "to_backend": count.get("to_backend", {"packets": 0, "bytes": 0}),
                    "to_client": count.get("to_client", {"packets": 0, "bytes": 0}),
                    "nat_ports": count.get("nat_ports", {"in_use": 0, "size": 0}),
                    "last_probe": detail,
                    "last_probe_age": round(now - at, 1) if detail else None,
                }
            )
        return {
            "name": name,
            "proto": config.service.proto,
            "port": config.service.port,
            "scheduler": config.service.scheduler,
            "mode": config.service.mode,  # nat, or dr: direct routing (docs/dr.md)
            "proxy_protocol": config.service.proxy_protocol,  # "v2" or None (proxyproto)
            "health_check": probe_kind(config.probe, config.service.proto)
            if config.health
            else "off",
            "flows": counted.get("flows", 0),
            "ended": counted.get("ended", {}),
            "packets": counted.get("packets", 0),
            "bytes": counted.get("bytes", 0),
            "drops": counted.get("drops", {}),
            "syn_cookies": counted.get("syn_cookies", {"sent": 0, "validated": 0, "invalid": 0}),
            "backends": backends,
        }

    # --- reload -------------------------------------------------------------------------------

    def plan_reload(self, new: Config) -> ReloadPlan:
        """Compare `new` with the running config. A removed service, or one whose protocol or
        port changed, needs a restart: the plan is refused."""
        old = self.config
        notes = [reload_note_line(key) for key in RESTART_KEYS
                 if getattr(new, key) != getattr(old, key)]  # fmt: skip
        wanted = {s.service.name: s for s in new.services}
        for name, current in self.services.items():
            if name not in wanted:
                return ReloadPlan(new, notes, (), f"removing service {name} needs a restart")
            spec, was = wanted[name].service, current.service
            if (spec.proto, spec.port) != (was.proto, was.port):
                return ReloadPlan(
                    new,
                    notes,
                    (),
                    f"changing the protocol or port of service {name} needs a restart",
                )
            if spec.mode != was.mode:
                return ReloadPlan(
                    new, notes, (), f"changing the mode (nat, dr) of service {name} needs a restart"
                )
            if (mixed := self._family_change(name, spec.backends)) is not None:
                return ReloadPlan(new, notes, (), mixed)
        added = tuple(s for name, s in wanted.items() if name not in self.services)
        return ReloadPlan(new, notes, added)

    def _family_change(self, name: str, backends: Sequence[Backend]) -> str | None:
        """A service's backends are all of one family: new config backends of the other family
        than the ones it holds now (registered, or draining with their flows) are refused."""
        held = [e.backend for e in self.registry.entries(name)]
        held = [b for b in held if b.key not in {n.key for n in backends}]
        if not held or not backends:
            return None
        now_v6, new_v6 = addresses.is_v6(held[0].ip_int), addresses.is_v6(backends[0].ip_int)
        if now_v6 == new_v6:
            return None
        return (
            f"service {name} holds IPv{6 if now_v6 else 4} backends "
            f"({host_port_text(held[0].ip, held[0].port)}) and the new config gives it "
            f"IPv{6 if new_v6 else 4} ones: a service's backends are all of one family "
            "(unregister or remove the others first, or restart)"
        )

    def commit_reload(self, plan: ReloadPlan) -> list[Effect]:
        """Apply an accepted plan: the registry takes the new backends, every engine the new
        specs, the health thread the new checks. No row is touched. ValueError (a bad probe)
        before anything changes."""
        assert plan.error is None
        new = plan.config
        wanted = {s.service.name: s for s in new.services}
        checks = {name: health_check(s) for name, s in wanted.items()}
        for service in wanted.values():
            self._define(service)
        specs = tuple(
            replace(s.service, backends=self.registry.snapshot(name)) for name, s in wanted.items()
        )
        added = frozenset(s.service.name for s in plan.added)
        effects: list[Effect] = [SetServices(specs, added, dict(self.cursor_slots))]
        if added:
            effects.append(UpdateGuard(self.ports("tcp"), self.ports("udp")))
        effects.append(SetHealthChecks({n: check for n, check in checks.items() if check}))
        old = self.config
        self.config = replace(new, lb_ip=old.lb_ip, vip=old.vip, ip6=old.ip6,
                              interface=old.interface,
                              nat_ports=old.nat_ports,
                              **{key: getattr(old, key) for key in LOG_SETTINGS})  # fmt: skip
        effects.append(reload_applied_line(len(specs), len(added)))
        return effects
