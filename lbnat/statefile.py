"""The state file of a hitless restart (`lbnat run --state-file PATH`, issue 19): what a later
lbnat reads to decide whether the rows an earlier one left fit it.

PATH holds a small JSON header; each worker's rows are in a file of their own next to it,
`PATH.rows-<i>` (lbnat.checkpoint's layout: the same bytes a worker kept in an anonymous memfd
before, now in a file that outlives the process). One file per worker rather than one file with
regions: a worker maps its whole file from offset 0 exactly as it mapped its memfd, so the
worker side does not change, and a file's size follows its own worker's table cap.

The header says who wrote the rows (format, lb_ip, ip6, interface, NAT range, worker count,
the services), when, and whether that lbnat stopped cleanly (`saved`, with how many rows it left)
or is still running or was killed (`saved` false: it is written so at start). The rows fit a
new lbnat when the addresses (lb_ip, and ip6: an IPv6 client's row holds its VIP, and an IPv6
backend's row its source), the NAT range and the worker count are the same: a row's NAT port
decides which worker the fanout program hands the backend's replies to (its worker's slice of
the range), so a row restored under another range or another worker count would be in the
wrong worker or outside every slice. Services may differ: `checkpoint.restore` drops (and
counts) the rows of a service or backend that is gone, as it does after a reload.

`ip6` joined the header with IPv6 (issue 21) without a new format: a header without it was
written by an lbnat that had no IPv6 address (null), and an lbnat before IPv6 reads past it.

Pure: encodes, decodes and decides; the files are lbnat.dataplane.handover's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

FORMAT = 1


@dataclass(frozen=True, slots=True)
class StateHeader:
    lb_ip: str
    interface: str
    nat_ports: tuple[int, int]
    workers: int
    services: tuple[tuple[str, str, int], ...] = ()  # (name, protocol, port)
    written: float = 0.0  # wall-clock seconds (time.time()) when this header was written
    saved: bool = False  # the writer stopped cleanly and left its guard for the next lbnat
    rows: int = 0  # rows left (when saved)
    offload_kept: bool = False  # a tc filter was left attached (cleanup removes it)
    pid: int = 0  # the writer's (cleanup leaves a running lbnat alone)
    format: int = field(default=FORMAT)
    ip6: str | None = None  # the writer's IPv6 address (config ip6), None: IPv4 only


def row_file(path: str, worker: int) -> str:
    """Where worker `worker`'s rows are kept."""
    return f"{path}.rows-{worker}"


def encode(header: StateHeader) -> bytes:
    data = {
        "format": header.format,
        "lb_ip": header.lb_ip,
        "ip6": header.ip6,
        "interface": header.interface,
        "nat_ports": list(header.nat_ports),
        "workers": header.workers,
        "services": [list(service) for service in header.services],
        "written": header.written,
        "saved": header.saved,
        "rows": header.rows,
        "offload_kept": header.offload_kept,
        "pid": header.pid,
    }
    return (json.dumps(data, indent=1) + "\n").encode()


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"its {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def decode(raw: bytes) -> StateHeader:
    """The header in `raw`; ValueError saying what is wrong with it."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"it is not JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError("it is not a JSON object")
    form = _field(data, "format", int)
    if form != FORMAT:
        raise ValueError(f"its format is {form}, this lbnat reads format {FORMAT}")
    ports = _field(data, "nat_ports", list)
    if len(ports) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) for p in ports):
        raise ValueError("its 'nat_ports' is not [first, last]")
    services = []
    for service in _field(data, "services", list):
        if not (
            isinstance(service, list)
            and len(service) == 3
            and isinstance(service[0], str)
            and isinstance(service[1], str)
            and isinstance(service[2], int)
        ):
            raise ValueError(f"its service {service!r} is not [name, protocol, port]")
        services.append((service[0], service[1], service[2]))
    ip6 = data.get("ip6")
    if ip6 is not None and not isinstance(ip6, str):
        raise ValueError("its 'ip6' is not a string or null")
    return StateHeader(
        ip6=ip6,
        lb_ip=_field(data, "lb_ip", str),
        interface=_field(data, "interface", str),
        nat_ports=(ports[0], ports[1]),
        workers=_field(data, "workers", int),
        services=tuple(services),
        written=float(_field(data, "written", (int, float))),
        saved=_field(data, "saved", bool),
        rows=_field(data, "rows", int),
        offload_kept=_field(data, "offload_kept", bool),
        pid=_field(data, "pid", int),
    )


def misfit(saved: StateHeader, wanted: StateHeader) -> str | None:
    """Why the rows `saved` describes cannot be restored by the lbnat `wanted` describes, or
    None when they fit (see the module: address, NAT range and worker count)."""
    if saved.lb_ip != wanted.lb_ip:
        return f"it is for address {saved.lb_ip}, this lbnat balances {wanted.lb_ip}"
    if saved.ip6 != wanted.ip6:
        return (
            f"it is for IPv6 address {saved.ip6 or 'none'}, this lbnat's is "
            f"{wanted.ip6 or 'none'} (an IPv6 client's row holds it)"
        )
    if saved.nat_ports != wanted.nat_ports:
        (a, b), (c, d) = saved.nat_ports, wanted.nat_ports
        return f"its NAT ports are {a}-{b}, this lbnat's are {c}-{d}"
    if saved.workers != wanted.workers:
        return (
            f"it was written by {saved.workers} worker{'s' * (saved.workers != 1)}, this "
            f"lbnat has {wanted.workers} (a row's NAT port decides its worker)"
        )
    return None
