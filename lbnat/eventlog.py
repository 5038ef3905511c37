"""Every line lbnat logs once it runs, and the writer that prints them.

What this module may know: engine events, health reports, requests and their outcomes, and
the two formats: the C++ original's lines (text) and one JSON object per line (`--log-format
json`, the same text as "message" plus the fields). The functions and `EventLog` are pure:
they build `LogLine` records. Only `Log` writes (to the stream it is given). The integration
tests and `make demo` compare these lines byte for byte: change them only on purpose.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TextIO

from lbnat.config import Config
from lbnat.engine import Event, FlowEnded, FlowOpened, NoBackend
from lbnat.health.checker import Report
from lbnat.linkwatch import LinkChange, LinkState
from lbnat.nat import ENDED

ENDED_NAMES = frozenset(state.name for state in ENDED)


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line: `text` in text mode; in JSON mode {"event", "message": text.strip(), **fields}.
    A `verbose` line is left out with --quiet."""

    text: str
    event: str
    verbose: bool = False
    fields: Mapping[str, object] = field(default_factory=dict)


def line(text: str, event: str, verbose: bool = False, **fields: object) -> LogLine:
    return LogLine(text, event, verbose, fields)


class Log:
    """The original's lines in text mode; one JSON object per line with --log-format json."""

    def __init__(self, out: TextIO, fmt: str = "text", quiet: bool = False) -> None:
        self.out = out
        self.json = fmt == "json"
        self.quiet = quiet
        self._lock = threading.Lock()  # several threads log

    def write(self, record: LogLine) -> None:
        if record.verbose and self.quiet:
            return
        if self.json:
            text = json.dumps({"event": record.event, "message": record.text.strip(),
                               **record.fields})  # fmt: skip
        else:
            text = record.text
        with self._lock:
            self.out.write(text + "\n")
            self.out.flush()

    def __call__(self, text: str, event: str, verbose: bool = False, **fields: object) -> None:
        self.write(LogLine(text, event, verbose, fields))


def start_lines(
    config: Config, lb_ip: str, interface: str, offload: str = "no offload"
) -> list[LogLine]:
    """What lbnat prints once it forwards: SRCIP, the data plane (and which path runs: `tc
    offload`, or why not), every configured backend."""
    c = config
    out = [
        line(
            f"srcIP : {lb_ip}",
            "start",
            interface=interface,
            workers=c.workers,
            io=io_text(c),
            offload=offload,
        )
    ]
    if c.workers > 1 or c.io != "rings" or c.offload != "off":
        out.append(
            line(
                f"data plane : {c.workers} worker{'s' if c.workers > 1 else ''}, "
                f"{'mmap rings' if c.io == 'rings' else 'one syscall per packet'}, {offload}",
                "dataplane",
                # a fallback is said even with --quiet: it is not what was asked for
                verbose=not offload.startswith("no offload ("),
            )
        )
    for service in c.services:
        name = service.service.name
        for b in service.service.backends:
            out.append(line(f"server {name} : {b.ip}:{b.port}", "backend", verbose=True,
                            service=name))  # fmt: skip
    return out


def io_text(config: Config) -> str:
    return config.io if config.io == "socket" else f"rings ({config.rx_ring})"


# --- the data plane's events ------------------------------------------------------------------


class EventLog:
    """Engine events into the original's lines. Keeps each worker's last count of open flows,
    so "Current NAT table length" is the total over every worker."""

    def __init__(self, workers: int = 1) -> None:
        self.open_flows = [0] * workers  # per worker, from its last FlowOpened or FlowEnded

    def lines(self, worker: int, events: Iterable[Event]) -> list[LogLine]:
        out: list[LogLine] = []
        for event in events:
            match event:
                case FlowEnded():
                    self.open_flows[worker] = event.open_flows
                    out += flow_ended_lines(event, sum(self.open_flows))
                case FlowOpened():
                    self.open_flows[worker] = event.open_flows
                    out.append(flow_opened_line(event))
                case NoBackend():
                    out.append(no_backend_line(event))
        return out


def flow_ended_lines(event: FlowEnded, total_open: int) -> list[LogLine]:
    ip, port = event.client
    return [
        line(
            f"\nclient <{ip},{port}> terminated ",
            "flow_ended",
            verbose=True,
            client=f"{ip}:{port}",
            backend=f"{event.backend[0]}:{event.backend[1]}",
            reason=event.reason.value,
        ),
        line(
            f"Current NAT table length : {total_open}",
            "table_length",
            verbose=True,
            length=total_open,
        ),
    ]


def flow_opened_line(event: FlowOpened) -> LogLine:
    ip, port = event.client
    return line(
        f"new client <{ip},{port}> -> server {event.backend[0]}:{event.backend[1]} "
        f"(NAT port {event.nat_port})",
        "flow_opened",
        verbose=True,
        client=f"{ip}:{port}",
        backend=f"{event.backend[0]}:{event.backend[1]}",
        nat_port=event.nat_port,
    )


def no_backend_line(event: NoBackend) -> LogLine:
    ip, port = event.client
    return line(
        f"no backend available for client <{ip},{port}> (service {event.service})",
        "no_backend",
        client=f"{ip}:{port}",
        service=event.service,
    )


# --- health -----------------------------------------------------------------------------------


def health_line(report: Report, transitions_only: bool) -> LogLine | None:
    """The original's "IP : a, Port : p Server is x"; a repeat verdict is verbose, and left out
    altogether with --log-transitions."""
    if transitions_only and not report.changed:
        return None
    backend = report.backend
    return line(
        f"IP : {backend.ip}, Port : {backend.port} Server is {report.health.value}",
        "health",
        verbose=not report.changed,
        service=report.service,
        backend=f"{backend.ip}:{backend.port}",
        health=report.health.value,
        changed=report.changed,
        probe=report.result.detail,
    )


# --- the control channel, draining and reload -------------------------------------------------


def backend_change_line(op: str, service: str, backend: str, verb: str, peer: str) -> LogLine:
    return line(
        f"{op} : backend {backend} {verb} service {service} (from {peer})",
        op,
        service=service,
        backend=backend,
        peer=peer,
    )


def refused_line(peer: str, reason: str) -> LogLine:
    return line(
        f"control : refused a request from {peer}: {reason}",
        "control_refused",
        peer=peer,
        reason=reason,
    )


def drained_line(service: str, backend: str) -> LogLine:
    return line(
        f"backend {backend} removed from service {service} (drained)",
        "backend_removed",
        service=service,
        backend=backend,
    )


def reload_note_line(key: str) -> LogLine:
    return line(
        f"reload : {key} changed; it takes effect at the next start", "reload_note", key=key
    )


def reload_rejected_line(error: str) -> LogLine:
    return line(
        f"reload : rejected, the running config stays: {error}", "reload_rejected", error=error
    )


def reload_applied_line(services: int, added: int) -> LogLine:
    return line(
        f"reload : applied ({services} services, {added} new)",
        "reload",
        services=services,
        added=added,
    )


# --- the interface ----------------------------------------------------------------------------


def link_line(interface: str, change: LinkChange, flows: int | None) -> LogLine:
    """One line per transition of lbnat's interface; `flows`: the open flows summed over every
    worker (None when they could not be asked)."""
    held = "its" if flows is None else str(flows)
    match change.state:
        case LinkState.DOWN:
            text = f"link {interface} down: holding {held} flows until it comes back"
            return line(text, "link_down", interface=interface, flows=flows)
        case LinkState.UP:
            seconds = round(change.seconds, 1)
            text = f"link {interface} up again after {seconds:.1f} s: {held} flows kept"
            return line(text, "link_up", interface=interface, flows=flows, down_seconds=seconds)
        case LinkState.GONE:
            text = f"interface {interface} is gone: stopping"
            return line(text, "interface_gone", interface=interface, flows=flows)


# --- kill -USR1: the NAT table ----------------------------------------------------------------


def table_lines(rows: list[dict[str, object]]) -> list[LogLine]:
    open_rows = sum(1 for row in rows if row["state"] not in ENDED_NAMES)
    out = [line(f"NAT table : {len(rows)} rows, {open_rows} open", "table", rows=len(rows),
                open=open_rows)]  # fmt: skip
    for row in rows:
        out.append(
            line(
                f"  {row['proto']} client {row['client']} <-> server {row['backend']} "
                f"NAT port {row['nat_port']} {row['state']} age {row['age']:.1f}s",
                "session",
                client=row["client"],
                backend=row["backend"],
                nat_port=row["nat_port"],
                state=row["state"],
            )
        )
    return out


def table_error_line(error: str) -> LogLine:
    return line(f"NAT table : not available ({error})", "table_error", error=error)
