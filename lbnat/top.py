"""`lbnat top`: rates from two status snapshots, and the view drawn from them. Pure.

What this module may know: two status replies of the admin socket (the dicts `lbnat status
--json` prints, lbnat.control.plane.ControlPlane.status) and the seconds between them; out come
rows of numbers (`Frame`), and from a frame a `rich` renderable. It opens no socket, reads no
clock and touches no terminal: lbnat.topterm fetches the snapshots, times them and draws.

Counters in a snapshot only grow, with one exception: a restarted worker's counters start over
(and all of them when lbnat itself restarted). A counter that went down is taken as reset and
its rate is counted from its new value alone, as is a counter that was not there before (a
backend added, a drop reason seen for the first time): a rate is never negative. With several
workers, one restart makes the merged counters of that second wrong either way (too low, or
the whole new value at once), so the frame says so (`Frame.restarted`). A key missing from a
snapshot (an lbnat older than this one) reads as zero: the view shows what it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, JustifyMethod, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from lbnat.fields import host_port_text

Status = Mapping[str, Any]  # one reply of {"op": "status"}

HEALTH_STYLES = {"alive": "green", "bad": "yellow", "dead": "bold red"}
DRAINING_STYLE = "magenta"


# --- numbers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Traffic:
    """One direction's rates."""

    packets: float  # per second
    bits: float  # per second

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.packets + other.packets, self.bits + other.bits)


NO_TRAFFIC = Traffic(0.0, 0.0)


@dataclass(frozen=True, slots=True)
class BackendRow:
    address: str  # ip:port
    name: str
    health: str  # alive, bad, dead
    draining: bool
    weight: int
    active: int  # open flows now
    new_flows: float  # per second
    to_backend: Traffic
    to_client: Traffic
    nat_ports_in_use: int
    nat_ports: int  # the size of its NAT port pool


@dataclass(frozen=True, slots=True)
class ServiceRow:
    name: str
    proto: str
    port: int
    scheduler: str
    active: int  # its backends' open flows
    new_flows: float  # per second
    to_backend: Traffic  # its backends' together
    to_client: Traffic
    drops: float  # per second, every reason
    backends: tuple[BackendRow, ...]

    @property
    def alive(self) -> int:
        return sum(b.health == "alive" for b in self.backends)


@dataclass(frozen=True, slots=True)
class Frame:
    """What one refresh of `lbnat top` shows: the newer snapshot's state, rates since the older."""

    lb_ip: str
    uptime: float  # seconds
    seconds: float  # between the two snapshots
    rows: int
    rows_cap: int
    open_flows: int
    offload_rows: int  # rows the kernel fast path rewrites now
    offload_packets: float  # per second, rewritten in the kernel
    workers: int
    workers_running: int
    restarts: int  # every worker's, ever
    restarted: bool  # a worker restarted between the snapshots (see the module's docstring)
    drops: float  # per second, engine-wide
    drop_reasons: tuple[tuple[str, float], ...]  # reasons with a rate, the highest first
    services: tuple[ServiceRow, ...]


def rate(new: float, old: float | None, seconds: float) -> float:
    """Per second, from two readings of a counter `seconds` apart. A counter that went down
    was reset and one that was not there (None) starts from zero: both count from `new`."""
    if seconds <= 0:
        raise ValueError(f"snapshots {seconds} s apart: the second must come later")
    if old is None or new < old:
        return max(new, 0) / seconds
    return (new - old) / seconds


def _traffic(new: Mapping[str, Any], old: Mapping[str, Any] | None, seconds: float) -> Traffic:
    def counter(which: Mapping[str, Any] | None, key: str) -> float | None:
        return None if which is None else float(which.get(key, 0))

    return Traffic(
        rate(float(new.get("packets", 0)), counter(old, "packets"), seconds),
        8 * rate(float(new.get("bytes", 0)), counter(old, "bytes"), seconds),
    )


def _reasons(
    new: Mapping[str, int], old: Mapping[str, int] | None, seconds: float
) -> dict[str, float]:
    before = old or {}
    return {reason: rate(n, before.get(reason), seconds) for reason, n in new.items()}


def _backend_key(b: Mapping[str, Any]) -> tuple[str, int]:
    return (str(b["ip"]), int(b["port"]))


def _backend(new: Mapping[str, Any], old: Mapping[str, Any] | None, seconds: float) -> BackendRow:
    ports = new.get("nat_ports", {})
    address = host_port_text(str(new["ip"]), int(new["port"]))
    return BackendRow(
        address=address,
        name=str(new.get("name") or address),
        health=str(new.get("health", "?")),
        draining=bool(new.get("draining", False)),
        weight=int(new.get("weight", 0)),
        active=int(new.get("active", 0)),
        new_flows=rate(new.get("flows", 0), None if old is None else old.get("flows", 0), seconds),
        to_backend=_traffic(
            new.get("to_backend", {}), None if old is None else old.get("to_backend"), seconds
        ),
        to_client=_traffic(
            new.get("to_client", {}), None if old is None else old.get("to_client"), seconds
        ),
        nat_ports_in_use=int(ports.get("in_use", 0)),
        nat_ports=int(ports.get("size", 0)),
    )


def _service(new: Mapping[str, Any], old: Mapping[str, Any] | None, seconds: float) -> ServiceRow:
    before = {_backend_key(b): b for b in (old or {}).get("backends", [])}
    backends = tuple(
        _backend(b, before.get(_backend_key(b)), seconds) for b in new.get("backends", [])
    )
    drops = _reasons(new.get("drops", {}), None if old is None else old.get("drops"), seconds)
    return ServiceRow(
        name=str(new["name"]),
        proto=str(new.get("proto", "?")),
        port=int(new.get("port", 0)),
        scheduler=str(new.get("scheduler", "?")),
        active=sum(b.active for b in backends),
        new_flows=rate(new.get("flows", 0), None if old is None else old.get("flows", 0), seconds),
        to_backend=sum((b.to_backend for b in backends), NO_TRAFFIC),
        to_client=sum((b.to_client for b in backends), NO_TRAFFIC),
        drops=sum(drops.values()),
        backends=backends,
    )


def _restarts(status: Status) -> int:
    return sum(int(w.get("restarts", 0)) for w in status.get("workers", []))


def compute(before: Status, after: Status, seconds: float) -> Frame:
    """The frame for snapshot `after`, taken `seconds` after `before`."""
    if seconds <= 0:
        raise ValueError(f"snapshots {seconds} s apart: the second must come later")
    services_before = {s["name"]: s for s in before.get("services", [])}
    offload, offload_before = after.get("offload", {}), before.get("offload", {})
    drops = _reasons(after.get("drops", {}), before.get("drops", {}), seconds)
    workers = after.get("workers", [])
    return Frame(
        lb_ip=" ".join(str(a) for a in (after.get("lb_ip", "?"), after.get("ip6")) if a),
        uptime=float(after.get("uptime", 0.0)),
        seconds=seconds,
        rows=int(after.get("rows", 0)),
        rows_cap=int(after.get("rows_cap", 0)),
        open_flows=int(after.get("open_flows", 0)),
        offload_rows=int(offload.get("rows", 0)),
        offload_packets=rate(offload.get("packets", 0), offload_before.get("packets", 0), seconds),
        workers=len(workers),
        workers_running=sum(bool(w.get("alive", True)) for w in workers),
        restarts=_restarts(after),
        # a whole new lbnat (uptime went back) restarted every counter: rates are exact then
        restarted=_restarts(after) > _restarts(before)
        and float(after.get("uptime", 0)) >= float(before.get("uptime", 0)),
        drops=sum(drops.values()),
        drop_reasons=tuple(
            sorted(((r, v) for r, v in drops.items() if v > 0), key=lambda rv: (-rv[1], rv[0]))
        ),
        services=tuple(
            _service(s, services_before.get(s["name"]), seconds) for s in after.get("services", [])
        ),
    )


# --- units --------------------------------------------------------------------------------------

PREFIXES = ("", "k", "M", "G", "T", "P")


def si(value: float) -> str:
    """A rate in at most four characters: 0, 0.5, 9.9, 42, 999, 1.00k, 12.3k, 456M, 1.20G."""
    if value < 0:
        raise ValueError(f"a rate is never negative: {value}")
    if value == 0:
        return "0"
    scaled = value
    for prefix in PREFIXES:
        if prefix:
            digits = 2 if scaled < 9.995 else 1 if scaled < 99.95 else 0
        else:  # below 1000 a unit is whole: a tenth only while there is little to show
            digits = 1 if scaled < 9.95 else 0
        text = f"{scaled:.{digits}f}"
        if float(text) < 1000 or prefix == PREFIXES[-1]:
            return text + prefix
        scaled /= 1000
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """An uptime as a person reads it: 42s, 3m07s, 2h03m, 4d02h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# --- the view -----------------------------------------------------------------------------------

# (header, justify) of the full table, and of the compact one a narrow terminal gets: the
# directions as ipvsadm --rate names them (in: client to backend, out: backend to client), no
# NAT ports
COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("service / backend", "left"),
    ("health", "left"),
    ("weight", "right"),
    ("active", "right"),
    ("new/s", "right"),
    ("to backend\npkt/s", "right"),
    ("to backend\nbit/s", "right"),
    ("to client\npkt/s", "right"),
    ("to client\nbit/s", "right"),
    ("drops/s", "right"),
    ("NAT ports", "right"),
)
COMPACT_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    *COLUMNS[:2],
    ("wt", "right"),
    *COLUMNS[3:5],
    ("in\npkt/s", "right"),
    ("in\nbit/s", "right"),
    ("out\npkt/s", "right"),
    ("out\nbit/s", "right"),
    COLUMNS[9],
)
COMPACT_LEGEND = "in: client to backend, out: backend to client"
FULL_WIDTH = 128  # the full table with service and backend names of up to 22 characters


def health_text(health: str, draining: bool) -> Text:
    text = Text(health, style=HEALTH_STYLES.get(health, ""))
    if draining:
        text.append(" draining", style=DRAINING_STYLE)
    return text


def _service_health(service: ServiceRow) -> Text:
    total, alive = len(service.backends), service.alive
    style = "green" if alive == total and total else "bold red" if alive == 0 else "yellow"
    return Text(f"{alive}/{total} alive", style=style)


def _rates(row: ServiceRow | BackendRow) -> list[str]:
    return [
        si(row.new_flows),
        si(row.to_backend.packets),
        si(row.to_backend.bits),
        si(row.to_client.packets),
        si(row.to_client.bits),
    ]


def table(frame: Frame, compact: bool = False) -> Table:
    """One table: a row per service, under it a row per backend."""
    columns = COMPACT_COLUMNS if compact else COLUMNS
    grid = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        header_style="bold",
        caption=COMPACT_LEGEND if compact else None,
        caption_justify="left",
        caption_style="dim",
    )
    # Should even the compact table not fit, the names fold onto a second line, not the numbers.
    grid.add_column(columns[0][0], justify=columns[0][1], overflow="fold", min_width=16)
    for head, justify in columns[1:]:
        grid.add_column(head, justify=justify, no_wrap=True)
    for n, service in enumerate(frame.services):
        if n:
            grid.add_section()
        title = Text(service.name, style="bold cyan")
        title.append(f" {service.proto}/{service.port} {service.scheduler}", style="cyan")
        drops = Text(si(service.drops), style="bold red" if service.drops else "")
        row: list[RenderableType] = [
            title, _service_health(service), "", str(service.active), *_rates(service), drops,
        ]  # fmt: skip
        grid.add_row(*row, *([] if compact else [""]), style="bold")
        for b in service.backends:
            label = f"  {b.address}" if b.name == b.address else f"  {b.name} {b.address}"
            row = [label, health_text(b.health, b.draining), str(b.weight), str(b.active),
                   *_rates(b), ""]  # fmt: skip
            grid.add_row(*row, *([] if compact else [f"{b.nat_ports_in_use}/{b.nat_ports}"]))
    return grid


@dataclass(frozen=True, slots=True)
class Services:
    """The table, full or compact as the terminal's width allows (known at drawing time)."""

    frame: Frame

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield table(self.frame, compact=options.max_width < FULL_WIDTH)


def header(frame: Frame) -> Text:
    text = Text()
    text.append(f"lbnat {frame.lb_ip}", style="bold")
    text.append(f"  up {duration(frame.uptime)}")
    text.append(f"  rows {frame.rows:,}/{frame.rows_cap:,}")
    text.append(f"  open flows {frame.open_flows:,}")
    text.append(f"  offload rows {frame.offload_rows:,} ({si(frame.offload_packets)} pkt/s)")
    workers = Text(f"  workers {frame.workers_running}/{frame.workers}")
    if frame.workers_running < frame.workers:
        workers.stylize("bold yellow")
    text.append_text(workers)
    text.append(f" restarts {frame.restarts}", style="bold yellow" if frame.restarts else "")
    text.append("  drops ")
    text.append(f"{si(frame.drops)}/s", style="bold red" if frame.drops else "")
    return text


def render(
    frame: Frame | None, *, source: str, interval: float, error: str | None = None
) -> RenderableType:
    """The whole view: the header, the table, the drop reasons, the status line. Without a
    frame yet (one snapshot only), the status line alone; `error` (the admin socket stopped
    answering) is shown above the last good frame."""
    parts: list[RenderableType] = []
    if frame is not None:
        parts += [header(frame), Text(), Services(frame)]
        if frame.drop_reasons:
            reasons = "  ".join(f"{r} {si(v)}" for r, v in frame.drop_reasons)
            parts += [Text(), Text(f"drops/s: {reasons}", style="red")]
        if frame.restarted:
            restarted = "a worker restarted: its counters started over, this frame's rates are off"
            parts.append(Text(restarted, style="yellow"))
    parts.append(Text())
    if error is not None:
        parts.append(Text(f"{error}: retrying every {interval:g} s", style="bold red"))
    elif frame is None:
        parts.append(Text(f"{source}: first snapshot taken, rates in {interval:g} s"))
    status = f"{source}  every {interval:g} s  q quits"
    parts.append(Text(status, style="dim"))
    return Group(*parts)
