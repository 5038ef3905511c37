"""What the control plane asks of an engine, and how the answers of several engines combine.

Every data-plane worker owns an engine (its slice of the session table). The main process never
touches one: it sends a change or a question (lbnat.messages), the worker that owns the engine
applies it with `apply_change()` / `answer()` here, and the main process merges the answers of
all workers with `merge_counters()`. The same functions serve a single in-process loop, so one
worker and N workers report the same way. Pure: no sockets, the time is an argument.
"""

from __future__ import annotations

from typing import Any

from lbnat.backends import Backend, BackendKey
from lbnat.engine import Engine
from lbnat.fastpath import FastPath
from lbnat.fields import host_port_text
from lbnat.messages import (
    AskActive,
    AskCounters,
    AskSessions,
    AskSyncRows,
    Change,
    Question,
    ResetBackend,
    SetBackends,
    SetServices,
    StandbyChange,
)
from lbnat.nat import PortPool
from lbnat.proxyproto import ProxyProtoSession


def apply_change(engine: Engine, change: Change, now: float) -> list[tuple[bytes, int]]:
    """Apply one change. Returns packets to send (RSTs of a reset), with their next hop."""
    match change:
        case SetBackends(service, backends):
            engine.set_backends(service, backends)
        case SetServices(specs, added):  # the cursor slots are the worker's business
            for spec in specs:
                if spec.name in added:
                    if spec.name not in engine.services:
                        engine.services.add(spec)
                else:
                    engine.services.reconfigure(spec)
                    engine.set_backends(spec.name, spec.backends)
        case ResetBackend(service, backend):
            return engine.reset_flows(service, backend, now)
        case StandbyChange(effect):
            if engine.standby is None:
                raise ValueError("the session sync is off in this engine")
            engine.standby.apply(effect, now)
        case _:
            raise ValueError(f"unknown change {change!r}")
    return []


def answer(engine: Engine, question: Question, now: float) -> Any:
    kernel = engine.table.kernel
    reads_rows = isinstance(question, AskCounters | AskSessions | AskSyncRows)
    if isinstance(kernel, FastPath) and reads_rows:
        kernel.sync()  # the kernel's packets, bytes and last-seen times into the rows first
    match question:
        case AskCounters():
            return engine_counters(engine)
        case AskSessions():
            return session_rows(engine, now)
        case AskSyncRows():
            return [] if engine.standby is None else engine.standby.bulk(now)
        case AskActive(backends):
            return {
                (service, key): engine.active_flows(service, key)
                for service, key in backends
                if service in engine.services
            }
        case _:
            raise ValueError(f"unknown question {question!r}")


def engine_counters(engine: Engine) -> dict[str, Any]:
    """One engine's counters: rows, open flows, drops; per service and per backend."""
    services: dict[str, Any] = {}
    for name, state in engine.services.items():
        backends: dict[BackendKey, dict[str, int]] = {}
        for backend in state.backends:
            pool = engine.pool_of(name, backend.key)
            backends[backend.key] = pool_counters(
                pool, engine.active_flows(name, backend.key), engine.nat_last - engine.nat_first + 1
            )
        services[name] = {
            "flows": state.flows,
            "ended": dict(state.ended),  # flows ended, by reason
            "packets": state.packets,
            "bytes": state.bytes,
            "drops": {reason.label: n for reason, n in state.drops.items()},
            "syn_cookies": dict(state.syn_cookies),
            "backends": backends,
        }
    table = engine.table
    kernel = table.kernel
    return {
        "rows": len(table),
        "rows_cap": table.cap,
        "open_flows": engine.open_flows,
        "table": {  # how the table fares under a flood (lbnat.nat: eviction, pressure)
            "half_open": table.half_open_count,
            "evicted": table.evicted,
            "ports_reclaimed": table.ports_reclaimed,
            "pressure_spells": table.pressure_spells,
            "under_pressure": int(table.under_pressure),  # summed: workers under pressure
        },
        "packets": engine.packets,
        "drops": {reason.label: n for reason, n in engine.drops.items()},
        "services": services,
        # rows the tc program rewrites, and what it rewrote (lbnat.fastpath); zeros without it
        "offload": kernel.counters() if isinstance(kernel, FastPath) else dict(FastPath.ZEROS),
        # a peer's rows applied here (lbnat.standby: installed, updated, ended, ...); {} off
        "standby": {} if engine.standby is None else dict(engine.standby.counts),
        # other instances' flows known here (each worker holds them all) and packets sent on
        # to their owner (lbnat.owners, --sync-mode mesh); {} off
        "owners": {}
        if engine.owners is None
        else {
            "records": len(engine.owners.flows),
            "forwarded": engine.owners.forwarded,
            "ipv6_skipped": engine.owners.ipv6_skipped,  # a peer's IPv6 rows: no mesh flows
        },
    }


def pool_counters(pool: PortPool | None, active: int, ports: int) -> dict[str, Any]:
    """One backend's counters in one engine: flows open now and ever, what was forwarded
    each way, and its NAT ports (held now, and the `ports` of this engine's slice, whether
    or not a flow has made the backend's pool yet)."""
    if pool is None:
        return {
            "active": active, "flows": 0, "packets": 0, "bytes": 0,
            "to_backend": {"packets": 0, "bytes": 0}, "to_client": {"packets": 0, "bytes": 0},
            "nat_ports": {"in_use": 0, "size": ports},
        }  # fmt: skip
    return {
        "active": active,
        "flows": pool.flows,
        "packets": pool.to_backend_packets + pool.to_client_packets,
        "bytes": pool.to_backend_bytes + pool.to_client_bytes,
        "to_backend": {"packets": pool.to_backend_packets, "bytes": pool.to_backend_bytes},
        "to_client": {"packets": pool.to_client_packets, "bytes": pool.to_client_bytes},
        "nat_ports": {"in_use": pool.ports_in_use, "size": pool.last - pool.first + 1},
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


PROXY_HEADER_STATES = ("not sent", "sent", "acknowledged")  # ProxyProtoSession.pp_state


def session_rows(engine: Engine, now: float) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    kernel = engine.table.kernel
    in_kernel = kernel.rows if isinstance(kernel, FastPath) else {}
    for row in engine.table:
        ip, port = row.client
        backend: Backend = row.backend
        rows.append(
            {
                "service": row.service.name,
                "proto": row.service.spec.proto,
                "client": host_port_text(ip, port),
                "backend": host_port_text(backend.ip, backend.port),
                "nat_port": row.nat_port or "-",  # "-": a direct-routed row holds none
                "state": row.state.name,
                "path": "kernel" if row in in_kernel else "python",
                "age": round(max(0.0, now - row.created), 0),
            }
        )
        if row.__class__ is ProxyProtoSession:  # its PROXY header: lbnat.proxyproto
            rows[-1]["proxy_header"] = PROXY_HEADER_STATES[row.pp_state]
    return rows
