"""What the control plane asks of an engine, and how the answers of several engines combine.

Every data-plane worker owns an engine (its slice of the session table). The main process never
touches one: it sends a change or a question as a plain tuple, the worker that owns the engine
applies it with `apply_change()` / `answer()` here, and the main process merges the answers of
all workers with `merge_counters()`. The same functions serve a single in-process loop, so one
worker and N workers report the same way. Pure: no sockets, the time is an argument.
"""

from __future__ import annotations

from typing import Any

from lbnat.backends import Backend, BackendKey
from lbnat.engine import Engine

Change = tuple[Any, ...]
# ("backends", service, (Backend, ...))     a new snapshot of a service's backends
# ("services", (Service, ...), {names}, {name: slot})
#                                           reload: these specs; the named ones are new
# ("reset", service, (ip, port))            --on-dead reset: end the backend's flows with RSTs
Question = tuple[Any, ...]
# ("counters",)                             packets, bytes, flows, drops (engine_counters)
# ("sessions",)                             every row (session_rows)
# ("active", ((service, (ip, port)), ...))  open flows per backend, for draining


def apply_change(engine: Engine, change: Change, now: float) -> list[tuple[bytes, int]]:
    """Apply one change. Returns packets to send (RSTs of a reset), with their next hop."""
    kind = change[0]
    if kind == "backends":
        _, service, backends = change
        engine.set_backends(service, backends)
    elif kind == "services":
        specs, added = change[1], change[2]  # change[3]: round-robin cursor slots
        for spec in specs:
            if spec.name in added:
                if spec.name not in engine.services:
                    engine.add_service(spec)
            else:
                engine.reconfigure_service(spec)
                engine.set_backends(spec.name, spec.backends)
    elif kind == "reset":
        _, service, backend = change
        return engine.reset_flows(service, backend, now)
    else:
        raise ValueError(f"unknown change {kind!r}")
    return []


def answer(engine: Engine, question: Question, now: float) -> Any:
    kind = question[0]
    if kind == "counters":
        return engine_counters(engine)
    if kind == "sessions":
        return session_rows(engine, now)
    if kind == "active":
        return {
            (service, key): engine.active_flows(service, key)
            for service, key in question[1]
            if service in engine.services
        }
    raise ValueError(f"unknown question {kind!r}")


def engine_counters(engine: Engine) -> dict[str, Any]:
    """One engine's counters: rows, open flows, drops; per service and per backend."""
    services: dict[str, Any] = {}
    for name, state in engine.services.items():
        backends: dict[BackendKey, dict[str, int]] = {}
        for backend in state.backends:
            pool = engine.pool_of(name, backend.key)
            backends[backend.key] = {
                "active": engine.active_flows(name, backend.key),
                "flows": 0 if pool is None else pool.flows,
                "packets": 0 if pool is None else pool.packets,
                "bytes": 0 if pool is None else pool.bytes,
            }
        services[name] = {
            "flows": state.flows,
            "packets": state.packets,
            "bytes": state.bytes,
            "drops": {reason.label: n for reason, n in state.drops.items()},
            "backends": backends,
        }
    return {
        "rows": len(engine.table),
        "open_flows": engine.open_flows,
        "packets": engine.packets,
        "drops": {reason.label: n for reason, n in engine.drops.items()},
        "services": services,
    }


def _add(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            _add(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value


def merge_counters(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The counters of several engines as one: every number summed, key by key."""
    total: dict[str, Any] = {"rows": 0, "open_flows": 0, "packets": 0, "drops": {}, "services": {}}
    for part in parts:
        _add(total, part)
    return total


def session_rows(engine: Engine, now: float) -> list[dict[str, object]]:
    rows = []
    for row in engine.table:
        ip, port = row.client
        backend: Backend = row.backend
        rows.append(
            {
                "service": row.service.name,
                "proto": row.service.spec.proto,
                "client": f"{ip}:{port}",
                "backend": f"{backend.ip}:{backend.port}",
                "nat_port": row.nat_port,
                "state": row.state.name,
                "age": round(max(0.0, now - row.created), 0),
            }
        )
    return rows

