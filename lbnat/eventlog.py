"""Every line lbnat logs once it runs, and the writer that prints them.

What this module may know: engine events, health reports, requests and their outcomes, their
levels, and the two formats: the C++ original's lines (text) and one JSON object per line
(`--log-format json`, the same text as "message" plus the level, the time and the fields). The
functions and `EventLog` are pure: they build `LogLine` records. Only `Log` writes, through a
`logging.Logger` of its own onto the stream it is given. The integration tests and `make demo`
compare these lines byte for byte: change them only on purpose.

Levels are the stdlib's plus NOTICE (25) so that each maps onto one syslog priority:
INFO (6) the per-flow lines and repeated health verdicts (what --quiet leaves out), NOTICE (5)
ordinary events, WARNING (4) problems, ERROR (3) lbnat losing a part of itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, TextIO

from lbnat.backends import Health
from lbnat.config import Config
from lbnat.engine import Event, FlowEnded, FlowOpened, NoBackend
from lbnat.fields import host_port_text
from lbnat.health.checker import Report
from lbnat.linkwatch import LinkChange, LinkState
from lbnat.nat import ENDED

ENDED_NAMES = frozenset(state.name for state in ENDED)

INFO: Final = logging.INFO
NOTICE: Final = 25  # between INFO and WARNING, as syslog's priorities are
WARNING: Final = logging.WARNING
ERROR: Final = logging.ERROR
logging.addLevelName(NOTICE, "NOTICE")

# --log-level's words (lbnat.config.LOG_LEVELS) and the levels they name
LEVELS: Final = {"info": INFO, "notice": NOTICE, "warning": WARNING, "error": ERROR}

# syslog's priorities (RFC 5424), which journald reads from a `<N>` prefix
SYSLOG_PRIORITY: Final = {
    logging.DEBUG: 7,
    INFO: 6,
    NOTICE: 5,
    WARNING: 4,
    ERROR: 3,
    logging.CRITICAL: 2,
}

JOURNAL_STREAM = "JOURNAL_STREAM"  # set by systemd: "DEVICE:INODE" of the journal's stream


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line: `text` in text mode; in JSON mode {"time", "level", "event", "message":
    text.strip(), **fields}. INFO lines are the verbose ones, left out with --quiet."""

    text: str
    event: str
    level: int = NOTICE
    fields: Mapping[str, object] = field(default_factory=dict)

    @property
    def verbose(self) -> bool:
        return self.level < NOTICE


def line(
    text: str, event: str, verbose: bool = False, level: int | None = None, **fields: object
) -> LogLine:
    """A line at `level`; without one, INFO when `verbose`, else NOTICE."""
    if level is None:
        level = INFO if verbose else NOTICE
    return LogLine(text, event, level, fields)


def threshold(log_level: str = "info", quiet: bool = False) -> int:
    """The least level logged: --log-level's, raised to NOTICE by --quiet (which has always
    meant: no per-flow and per-probe lines)."""
    level = LEVELS[log_level]
    return max(level, NOTICE) if quiet else level


def on_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `stream` is systemd's journal stream: JOURNAL_STREAM names its device and inode
    (systemd.exec(5)). The variable alone is not enough: it is inherited by children whose
    output goes elsewhere (a pipe, a file)."""
    value = environ.get(JOURNAL_STREAM, "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # io.UnsupportedOperation is both: no file descriptor
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class EventRecord(logging.LogRecord):
    """A LogRecord that carries its line's event and fields (the JSON format's keys). No
    args: the text is never %-formatted, whatever it holds."""

    def __init__(self, name: str, line: LogLine) -> None:
        super().__init__(name, line.level, "", 0, line.text, (), None)
        self.event = line.event
        self.fields = line.fields


class _LineFormatter(logging.Formatter):
    """Shared by both formats: on the journal, each physical line starts with its syslog
    priority, which journald strips and files (SyslogLevelPrefix=, on by default)."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def prefixed(self, text: str, levelno: int) -> str:
        if not self.journal:
            return text
        prefix = f"<{SYSLOG_PRIORITY.get(levelno, 6)}>"
        # journald reads the prefix per line: a line of its own ("\nclient ... terminated")
        # must carry it too
        return "\n".join(prefix + part for part in text.split("\n"))


class TextFormatter(_LineFormatter):
    """The original's lines as they are: no time (there never was one), no level."""

    def format(self, record: logging.LogRecord) -> str:
        return self.prefixed(record.getMessage(), record.levelno)


class JsonFormatter(_LineFormatter):
    """One object per line: time (ISO-8601 UTC, milliseconds; left out on the journal, which
    stamps every line itself), level, event, message, then the line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {}
        if not self.journal:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            out["time"] = f"{stamp}.{int(record.msecs):03d}Z"
        out["level"] = record.levelname.lower()
        out["event"] = getattr(record, "event", "")
        out["message"] = record.getMessage().strip()
        out.update(getattr(record, "fields", {}))
        return self.prefixed(json.dumps(out), record.levelno)


class Log:
    """The writer: `LogLine`s into a `logging.Logger` of this Log's own with one handler on
    `out`, the original's lines (text) or one JSON object per line (json).

    The logger is made directly, not through logging.getLogger: it is in no hierarchy, so
    nothing reaches the root logger or another Log (tests and a daemon make several), and it
    is freed with its Log. The handler's lock keeps lines whole across threads; StreamHandler
    flushes after every record."""

    def __init__(
        self,
        out: TextIO,
        fmt: str = "text",
        quiet: bool = False,
        level: str = "info",
        journal: bool | None = None,
    ) -> None:
        self.journal = on_journal(out) if journal is None else journal
        handler = logging.StreamHandler(out)
        handler.setFormatter(
            JsonFormatter(self.journal) if fmt == "json" else TextFormatter(self.journal)
        )
        self.logger = logging.Logger("lbnat.events")
        self.logger.propagate = False
        self.logger.addHandler(handler)
        self.logger.setLevel(threshold(level, quiet))

    def write(self, record: LogLine) -> None:
        # The record is made here, not by Logger.log, which looks up the caller's file and line
        # in the stack (findCaller): about half of a line's cost, for a location no format
        # prints (each line says what it is).
        if self.logger.isEnabledFor(record.level):
            self.logger.handle(EventRecord(self.logger.name, record))

    def __call__(
        self,
        text: str,
        event: str,
        verbose: bool = False,
        level: int | None = None,
        **fields: object,
    ) -> None:
        self.write(line(text, event, verbose, level, **fields))


def start_lines(
    config: Config, lb_ip: str, interface: str, offload: str = "no offload"
) -> list[LogLine]:
    """What lbnat prints once it forwards: SRCIP, the data plane (and which path runs: `tc
    offload`, or why not), every configured backend."""
    c = config
    first = f"srcIP : {lb_ip}" if c.vip is None else f"srcIP : {lb_ip}  VIP : {c.vip}"
    if c.ip6 is not None:
        first += f"  IPv6 : {c.ip6}"
    out = [
        line(
            first,
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
                level=WARNING if offload.startswith("no offload (") else INFO,
            )
        )
    for service in c.services:
        name = service.service.name
        for b in service.service.backends:
            shown = host_port_text(b.ip, b.port)
            out.append(line(f"server {name} : {shown}", "backend", level=INFO, service=name))
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
            level=INFO,
            client=host_port_text(ip, port),
            backend=host_port_text(*event.backend),
            reason=event.reason.value,
        ),
        line(
            f"Current NAT table length : {total_open}",
            "table_length",
            level=INFO,
            length=total_open,
        ),
    ]


def flow_opened_line(event: FlowOpened) -> LogLine:
    ip, port = event.client
    return line(
        f"new client <{ip},{port}> -> server {host_port_text(*event.backend)} "
        + (f"(NAT port {event.nat_port})" if event.nat_port else "(direct routing)"),
        "flow_opened",
        level=INFO,
        client=host_port_text(ip, port),
        backend=host_port_text(*event.backend),
        nat_port=event.nat_port,
    )


def no_backend_line(event: NoBackend) -> LogLine:
    ip, port = event.client
    return line(
        f"no backend available for client <{ip},{port}> (service {event.service})",
        "no_backend",
        level=WARNING,
        client=host_port_text(ip, port),
        service=event.service,
    )


# --- health -----------------------------------------------------------------------------------


def health_line(report: Report, transitions_only: bool) -> LogLine | None:
    """The original's "IP : a, Port : p Server is x"; a repeat verdict is verbose (INFO), and
    left out altogether with --log-transitions. A backend turning bad or dead is a WARNING."""
    if transitions_only and not report.changed:
        return None
    backend = report.backend
    level = NOTICE if report.health is Health.ALIVE else WARNING
    if not report.changed:
        level = INFO  # the same verdict again
    return line(
        f"IP : {backend.ip}, Port : {backend.port} Server is {report.health.value}",
        "health",
        level=level,
        service=report.service,
        backend=host_port_text(backend.ip, backend.port),
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
        level=WARNING,
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
    """A WARNING: the running lbnat is not what the file says until someone restarts it."""
    return line(
        f"reload : {key} changed; it takes effect at the next start",
        "reload_note",
        level=WARNING,
        key=key,
    )


def reload_rejected_line(error: str) -> LogLine:
    return line(
        f"reload : rejected, the running config stays: {error}",
        "reload_rejected",
        level=WARNING,
        error=error,
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
            return line(text, "link_down", level=WARNING, interface=interface, flows=flows)
        case LinkState.UP:
            seconds = round(change.seconds, 1)
            text = f"link {interface} up again after {seconds:.1f} s: {held} flows kept"
            return line(text, "link_up", interface=interface, flows=flows, down_seconds=seconds)
        case LinkState.GONE:
            text = f"interface {interface} is gone: stopping"
            return line(text, "interface_gone", level=ERROR, interface=interface, flows=flows)


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
    return line(f"NAT table : not available ({error})", "table_error", level=WARNING,
                error=error)  # fmt: skip
