"""lbnat's JSON config file, loaded and validated into frozen, typed objects.

Pure: no sockets, no clock. The only I/O is reading files: the config file itself in
`load_config`, and a control block's `secret_file` through the `read_file` function
`parse_config` is given (by default it reads the file from disk; `load_config` resolves a relative
`secret_file` against the config file's directory). Nothing here starts anything.

Every mistake raises `ConfigError`, whose text is one line naming the key path and the problem:

    services[1].backends[0].port: 70000 is not a valid port
    /etc/lbnat/lbnat.json: services[0].helth: unknown key (did you mean "health"?)

Two shapes are accepted: the native format (docs/config.schema.json, docs/config.example.json)
and the Java original's `servers.json`, `{"servers": [{"protocol": "TCP", "ipAddress": ...,
"port": ...}, ...]}`, which becomes one service per protocol present ("tcp", "udp") on
`default_port`, with default settings.

`null` stands for "not given" only where the value may be absent at run time: `lb_ip`,
`interface`, `control`, `health.check`, `health.expect`, `control.secret`,
`control.secret_file`. Anywhere else it is a type error, like any other wrong type.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NoReturn

from lbnat.backends import Backend
from lbnat.dataplane.fanout import nat_slices
from lbnat.health import PROBE_KINDS, HealthPolicy, ProbeSettings, make_probe
from lbnat.nat import Timeouts
from lbnat.scheduler import SCHEDULERS
from lbnat.service import Service

__all__ = [
    "DEFAULT_ADMIN_SOCKET",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_NAT_PORTS",
    "DEFAULT_PORT",
    "DEFAULT_TABLE_CAP",
    "DEFAULT_WINDOW",
    "IO_KINDS",
    "LOG_FORMATS",
    "MAX_WORKERS",
    "ON_DEAD",
    "RX_RINGS",
    "Config",
    "ConfigError",
    "ControlConfig",
    "FileReader",
    "ServiceConfig",
    "check_slices",
    "default_workers",
    "load_config",
    "parse_config",
]

DEFAULT_PORT: Final = 20000
DEFAULT_NAT_PORTS: Final = (61000, 65535)
DEFAULT_TABLE_CAP: Final = 1_000_000
DEFAULT_ADMIN_SOCKET: Final = "/run/lbnat/lbnat.sock"
DEFAULT_DRAIN_TIMEOUT: Final = 300.0
DEFAULT_WINDOW: Final = 30.0
IO_KINDS: Final = ("rings", "socket")
RX_RINGS: Final = ("frames", "blocks")
MAX_WORKERS: Final = 64


def default_workers() -> int:
    """One worker per core (`workers: "auto"`)."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
LOG_FORMATS: Final = ("text", "json")
ON_DEAD: Final = ("keep", "reset")
PROTOCOL_NAMES: Final = ("tcp", "udp")

FileReader = Callable[[str], bytes]
"""Reads a whole file (a control block's secret_file); raises OSError when it cannot."""

_SOCKET_PATH_MAX: Final = 107  # sun_path is 108 bytes, one of them the terminating NUL
_IFNAMSIZ: Final = 16  # interface names are at most 15 bytes
_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")


class ConfigError(ValueError):
    """A mistake in the config: `path: problem`, or `FILE: path: problem` for a file.

    `path` is the key path (`services[1].backends[0].port`), empty for the top level or for the
    file as a whole; a JSON syntax error's path is `line L, column C`.
    """

    def __init__(self, path: str, problem: str, file: str | None = None) -> None:
        self.path = path
        self.problem = problem
        self.file = file
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return ": ".join([part for part in (self.file, self.path) if part] + [self.problem])

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str, str | None]]:
        return (ConfigError, (self.path, self.problem, self.file))

    def in_file(self, file: str) -> ConfigError:
        """The same error, told as coming from `file`."""
        return ConfigError(self.path, self.problem, file)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    service: Service
    health: HealthPolicy | None = field(default_factory=HealthPolicy)  # None: not probed
    probe: ProbeSettings = field(default_factory=ProbeSettings)  # kind None: the default
    on_dead: str = "keep"  # or "reset"


@dataclass(frozen=True, slots=True)
class ControlConfig:
    host: str  # listen address of the registration channel
    port: int
    secret: bytes | None = None
    allow: tuple[ipaddress.IPv4Network, ...] = ()  # empty: any source
    window: float = DEFAULT_WINDOW  # seconds a signed message's timestamp may be off


@dataclass(frozen=True, slots=True)
class Config:
    lb_ip: str | None = None  # SRCIP; may come from the command line instead
    interface: str | None = None
    nat_ports: tuple[int, int] = DEFAULT_NAT_PORTS
    table_cap: int = DEFAULT_TABLE_CAP
    timeouts: Timeouts = field(default_factory=Timeouts)
    log_format: str = "text"  # or "json"
    quiet: bool = False
    log_transitions: bool = False
    control: ControlConfig | None = None
    admin_socket: str = DEFAULT_ADMIN_SOCKET
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    services: tuple[ServiceConfig, ...] = ()
    workers: int = 1  # data-plane processes; the CLI and the file default to one per core
    io: str = "rings"  # "rings" (mmap'ed TPACKET rings) or "socket" (a syscall per packet)
    rx_ring: str = "frames"  # receive ring layout: "frames" (TPACKET_V2) or "blocks" (V3)


# --- the keys of each block (docs/config.schema.json describes the same) --------------------

TOP_KEYS: Final = (
    "lb_ip",
    "interface",
    "nat_ports",
    "table_cap",
    "timeouts",
    "log",
    "control",
    "admin_socket",
    "drain_timeout",
    "services",
    "dataplane",
)
DATAPLANE_KEYS: Final = ("workers", "io", "rx_ring")
TIMEOUT_KEYS: Final = tuple(f.name for f in dataclasses.fields(Timeouts))
LOG_KEYS: Final = ("format", "quiet", "transitions")
CONTROL_KEYS: Final = ("listen", "secret", "secret_file", "allow", "window")
SERVICE_KEYS: Final = (
    "name",
    "protocol",
    "port",
    "scheduler",
    "affinity",
    "on_dead",
    "health",
    "backends",
)
HEALTH_KEYS: Final = (
    "enabled",
    "check",
    "interval",
    "timeout",
    "fall",
    "rise",
    "send",
    "expect",
    "http_path",
    "http_status",
)
BACKEND_KEYS: Final = ("ip", "port", "weight", "name")
SERVERS_JSON_KEYS: Final = ("protocol", "ipAddress", "port")
_TIMEOUTS_MAY_BE_ZERO: Final = frozenset({"time_wait", "close"})  # the flow is over anyway


# --- public entry points ---------------------------------------------------------------------


def parse_config(
    data: object, *, default_port: int = DEFAULT_PORT, read_file: FileReader | None = None
) -> Config:
    """Validate decoded JSON (`json.load`'s result) into a `Config`; raises `ConfigError`.

    `default_port` is the port of a service that names none (and of the servers.json shape's
    services). `read_file` reads a control block's secret_file (default: from disk, a relative
    path from the current directory).
    """
    if isinstance(default_port, bool) or not isinstance(default_port, int):
        raise TypeError(f"default_port {default_port!r} is not an integer")
    if not 0 < default_port < 65536:
        raise ValueError(f"default_port {default_port} is not a valid port")
    if not isinstance(data, dict):
        _fail("", f"the top level must be a JSON object, not {_kind(data)}")
    if "servers" in data and len(data) == 1:
        return _servers_json(data, default_port)
    return _native(data, default_port, read_file or _read_from_disk)


def load_config(path: str | os.PathLike[str], *, default_port: int = DEFAULT_PORT) -> Config:
    """Read and validate the config file at `path`; raises `ConfigError` ("FILE: ...")."""
    name = os.fspath(path)
    try:
        raw = Path(name).read_bytes()
    except OSError as error:
        raise ConfigError("", f"cannot read the file: {_os_reason(error)}", name) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError("", f"not UTF-8 text (byte {error.start})", name) from None
    try:
        data = json.loads(text, object_pairs_hook=_JsonObject)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise ConfigError(where, f"invalid JSON: {error.msg}", name) from None
    except RecursionError:
        raise ConfigError("", "invalid JSON: nested too deeply", name) from None
    except ValueError as error:  # a number too long to convert
        raise ConfigError("", f"invalid JSON: {error}", name) from None
    base = Path(name).parent

    def read_relative(secret_file: str) -> bytes:
        return _read_from_disk(os.fspath(base / secret_file))  # an absolute path stays as is

    try:
        return parse_config(data, default_port=default_port, read_file=read_relative)
    except ConfigError as error:
        raise error.in_file(name) from None


# --- the two shapes --------------------------------------------------------------------------


def _native(data: dict[str, object], default_port: int, read_file: FileReader) -> Config:
    top = _object(data, "", TOP_KEYS, hints={"servers": _SERVERS_HINT})
    lb_ip = None if top.get("lb_ip") is None else _ipv4(top["lb_ip"], "lb_ip", host=True)
    interface = None
    if top.get("interface") is not None:
        interface = _interface(top["interface"], "interface")
    nat_ports = DEFAULT_NAT_PORTS
    if "nat_ports" in top:
        nat_ports = _nat_ports(top["nat_ports"], "nat_ports")
    table_cap = _int(top.get("table_cap", DEFAULT_TABLE_CAP), "table_cap", minimum=1)
    timeouts = _timeouts(top["timeouts"], "timeouts") if "timeouts" in top else Timeouts()
    log = _object(top.get("log", {}), "log", LOG_KEYS)
    log_format = _choice(log.get("format", "text"), "log.format", LOG_FORMATS)
    quiet = _bool(log.get("quiet", False), "log.quiet")
    transitions = _bool(log.get("transitions", False), "log.transitions")
    admin_socket = _socket_path(top.get("admin_socket", DEFAULT_ADMIN_SOCKET), "admin_socket")
    drain_timeout = _seconds(
        top.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT), "drain_timeout", zero=True
    )
    services = _services(top.get("services", []), "services", default_port, nat_ports)
    dataplane = _object(top.get("dataplane", {}), "dataplane", DATAPLANE_KEYS)
    workers = _workers(dataplane.get("workers", "auto"), "dataplane.workers")
    io = _choice(dataplane.get("io", "rings"), "dataplane.io", IO_KINDS)
    rx_ring = _choice(dataplane.get("rx_ring", "frames"), "dataplane.rx_ring", RX_RINGS)
    _check_slices(nat_ports, workers, "dataplane.workers")
    control = None
    if top.get("control") is not None:
        control = _control(top["control"], "control", read_file)
        _check_control_port(control, lb_ip, nat_ports, services)
    return Config(
        lb_ip=lb_ip,
        interface=interface,
        nat_ports=nat_ports,
        table_cap=table_cap,
        timeouts=timeouts,
        log_format=log_format,
        quiet=quiet,
        log_transitions=transitions,
        control=control,
        admin_socket=admin_socket,
        drain_timeout=drain_timeout,
        services=services,
        workers=workers,
        io=io,
        rx_ring=rx_ring,
    )


_SERVERS_HINT: Final = (
    'unknown key (did you mean "services"? A servers.json file has "servers" and no other key)'
)


def _servers_json(data: dict[str, object], default_port: int) -> Config:
    """The Java original's servers.json: one service per protocol present, default settings."""
    _object(data, "", ("servers",))  # a key the file gives twice
    backends: dict[str, list[Backend]] = {name: [] for name in PROTOCOL_NAMES}
    seen: dict[tuple[str, str, int], str] = {}
    for i, item in enumerate(_array(data["servers"], "servers")):
        path = _item("servers", i)
        server = _object(item, path, SERVERS_JSON_KEYS, required=SERVERS_JSON_KEYS)
        proto = _choice(server["protocol"], _at(path, "protocol"), ("TCP", "UDP"), fold=True)
        proto = proto.lower()
        ip = _ipv4(server["ipAddress"], _at(path, "ipAddress"), host=True)
        port = _port(server["port"], _at(path, "port"))
        if (proto, ip, port) in seen:
            also = seen[proto, ip, port]
            _fail(path, f"{proto.upper()} {ip}:{port} is listed twice (also {also})")
        seen[proto, ip, port] = path
        backends[proto].append(Backend(ip, port))
    first, last = DEFAULT_NAT_PORTS
    present = [proto for proto in PROTOCOL_NAMES if backends[proto]]
    if present and first <= default_port <= last:
        _fail("servers", f"the virtual port {default_port} is inside nat_ports {first}-{last}")
    services = tuple(
        ServiceConfig(Service(proto, proto, default_port, backends=tuple(backends[proto])))
        for proto in present
    )
    return Config(services=services, workers=default_workers())


# --- blocks ----------------------------------------------------------------------------------


def _timeouts(value: object, path: str) -> Timeouts:
    block = _object(value, path, TIMEOUT_KEYS)
    seconds = {
        key: _seconds(item, _at(path, key), zero=key in _TIMEOUTS_MAY_BE_ZERO)
        for key, item in block.items()
    }
    return Timeouts(**seconds)


def _control(value: object, path: str, read_file: FileReader) -> ControlConfig:
    block = _object(value, path, CONTROL_KEYS, required=("listen",))
    host, port = _listen(block["listen"], _at(path, "listen"))
    secret = None
    given_secret = block.get("secret") is not None
    given_file = block.get("secret_file") is not None
    if given_secret and given_file:
        _fail(_at(path, "secret_file"), 'give "secret" or "secret_file", not both')
    if given_secret:
        secret = _string(block["secret"], _at(path, "secret"), empty=False).encode()
    elif given_file:
        where = _at(path, "secret_file")
        secret_file = _string(block["secret_file"], where, empty=False)
        try:
            secret = read_file(secret_file).strip()
        except OSError as error:
            _fail(where, f"cannot read {_show(secret_file)}: {_os_reason(error)}")
        if not secret:
            _fail(where, f"{_show(secret_file)} is empty")
    allow = tuple(
        _network(item, _item(_at(path, "allow"), i))
        for i, item in enumerate(_array(block.get("allow", []), _at(path, "allow")))
    )
    window = _seconds(block.get("window", DEFAULT_WINDOW), _at(path, "window"))
    return ControlConfig(host=host, port=port, secret=secret, allow=allow, window=window)


def _check_control_port(
    control: ControlConfig,
    lb_ip: str | None,
    nat_ports: tuple[int, int],
    services: tuple[ServiceConfig, ...],
) -> None:
    """The guard drops packets to SRCIP on the service ports and the NAT range."""
    first, last = nat_ports
    if first <= control.port <= last:
        _fail("control.listen", f"port {control.port} is inside nat_ports {first}-{last}")
    if control.host not in ("0.0.0.0", lb_ip):
        return
    for spec in services:
        if spec.service.port == control.port:
            _fail(
                "control.listen",
                f"port {control.port} is also the port of service {_show(spec.service.name)}",
            )


def _services(
    value: object, path: str, default_port: int, nat_ports: tuple[int, int]
) -> tuple[ServiceConfig, ...]:
    services: list[ServiceConfig] = []
    names: dict[str, str] = {}
    listeners: dict[tuple[str, int], str] = {}
    for i, item in enumerate(_array(value, path)):
        where = _item(path, i)
        spec = _service(item, where, default_port, nat_ports)
        service = spec.service
        listener = (service.proto, service.port)
        if listener in listeners:
            _fail(
                _at(where, "port"),
                f"{service.proto} port {service.port} is already used by {listeners[listener]}",
            )
        if service.name in names:
            _fail(
                _at(where, "name"),
                f"{_show(service.name)} is already the name of {names[service.name]}",
            )
        listeners[listener] = names[service.name] = where
        services.append(spec)
    return tuple(services)


def _service(
    value: object, path: str, default_port: int, nat_ports: tuple[int, int]
) -> ServiceConfig:
    block = _object(value, path, SERVICE_KEYS)
    proto = _choice(block.get("protocol", "tcp"), _at(path, "protocol"), PROTOCOL_NAMES, fold=True)
    port = _port(block.get("port", default_port), _at(path, "port"))
    first, last = nat_ports
    if first <= port <= last:
        _fail(_at(path, "port"), f"{port} is inside nat_ports {first}-{last}")
    name = f"{proto}:{port}"
    if "name" in block:
        name = _name(block["name"], _at(path, "name"))
    scheduler = _choice(block.get("scheduler", "rr"), _at(path, "scheduler"), tuple(SCHEDULERS))
    affinity = _seconds(block.get("affinity", 0), _at(path, "affinity"), zero=True)
    on_dead = _choice(block.get("on_dead", "keep"), _at(path, "on_dead"), ON_DEAD)
    health, probe = _health(block.get("health", {}), _at(path, "health"), proto)
    backends = _backends(block.get("backends", []), _at(path, "backends"))
    try:
        service = Service(name, proto, port, scheduler, affinity, backends)
    except ValueError as error:  # everything was checked above; kept as a safety net
        _fail(path, str(error))
    return ServiceConfig(service=service, health=health, probe=probe, on_dead=on_dead)


def _health(value: object, path: str, proto: str) -> tuple[HealthPolicy | None, ProbeSettings]:
    block = _object(value, path, HEALTH_KEYS)
    enabled = _bool(block.get("enabled", True), _at(path, "enabled"))
    kind = None
    if block.get("check") is not None:
        kind = _choice(block["check"], _at(path, "check"), PROBE_KINDS)
    policy = HealthPolicy(
        interval=_seconds(block.get("interval", 5.0), _at(path, "interval")),
        timeout=_seconds(block.get("timeout", 2.0), _at(path, "timeout")),
        fall=_int(block.get("fall", 3), _at(path, "fall"), minimum=1),
        rise=_int(block.get("rise", 1), _at(path, "rise"), minimum=1),
    )
    send = _string(block.get("send", "HealthCheck"), _at(path, "send"))
    expect = None
    if block.get("expect") is not None:
        expect = _pattern(block["expect"], _at(path, "expect"))
    http_path = _http_path(block.get("http_path", "/"), _at(path, "http_path"))
    http_status = _int(
        block.get("http_status", 200), _at(path, "http_status"), minimum=100, maximum=599
    )
    probe = ProbeSettings(kind, send, expect, http_path, http_status)
    try:
        make_probe(probe, proto)  # a kind that does not fit the protocol
    except ValueError as error:
        _fail(_at(path, "check"), str(error))
    return (policy if enabled else None), probe


def _backends(value: object, path: str) -> tuple[Backend, ...]:
    backends: list[Backend] = []
    keys: dict[tuple[str, int], str] = {}
    names: dict[str, str] = {}
    for i, item in enumerate(_array(value, path)):
        where = _item(path, i)
        block = _object(item, where, BACKEND_KEYS, required=("ip", "port"))
        ip = _ipv4(block["ip"], _at(where, "ip"), host=True)
        port = _port(block["port"], _at(where, "port"))
        weight = _int(block.get("weight", 1), _at(where, "weight"), minimum=0)
        name = ""
        if block.get("name", "") != "":
            name = _name(block["name"], _at(where, "name"))
        if (ip, port) in keys:
            _fail(where, f"backend {ip}:{port} is listed twice (also {keys[ip, port]})")
        backend = Backend(ip, port, weight, name)
        if backend.name in names:
            _fail(
                _at(where, "name"),
                f"{_show(backend.name)} is already the name of {names[backend.name]}",
            )
        keys[ip, port] = names[backend.name] = where
        backends.append(backend)
    return tuple(backends)


# --- values ----------------------------------------------------------------------------------


def _int(
    value: object, path: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, f"{_show(value)} is not an integer")
    if minimum is not None and value < minimum:
        _fail(path, f"{_show(value)} must be at least {minimum}")
    if maximum is not None and value > maximum:
        _fail(path, f"{_show(value)} must be at most {maximum}")
    return value


def _workers(value: object, path: str) -> int:
    """A worker count, or "auto": one per core."""
    if value == "auto":
        return default_workers()
    if isinstance(value, str):
        _fail(path, f'{_show(value)} is not a number of workers or "auto"')
    return _int(value, path, minimum=1, maximum=MAX_WORKERS)


def check_slices(nat_ports: tuple[int, int], workers: int) -> str | None:
    """Each worker needs NAT ports of its own (lbnat.dataplane.fanout.nat_slices): the problem,
    or None."""
    try:
        nat_slices(nat_ports, workers)
    except ValueError as error:
        return str(error)
    return None


def _check_slices(nat_ports: tuple[int, int], workers: int, path: str) -> None:
    problem = check_slices(nat_ports, workers)
    if problem:
        _fail(path, problem)


def _port(value: object, path: str) -> int:
    port = _int(value, path)
    if not 0 < port < 65536:
        _fail(path, f"{_show(port)} is not a valid port")
    return port


def _seconds(value: object, path: str, *, zero: bool = False) -> float:
    """A duration in seconds: positive, or at least 0 when `zero`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(path, f"{_show(value)} is not a number")
    try:
        seconds = float(value)
    except OverflowError:
        _fail(path, f"{_show(value)} is too large")
    if not math.isfinite(seconds):
        _fail(path, f"{_show(value)} is not a finite number")
    if seconds < 0 or (seconds == 0 and not zero):
        _fail(path, f"{_show(value)} must be {'at least 0' if zero else 'positive'}")
    return seconds


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        _fail(path, f"{_show(value)} is not true or false")
    return value


def _string(value: object, path: str, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        _fail(path, f"{_show(value)} is not a string")
    if not empty and not value:
        _fail(path, "must not be empty")
    if not _encodable(value):
        _fail(path, f"{_show(value)} is not valid Unicode text")
    return value


def _name(value: object, path: str) -> str:
    """A service or backend name: it appears in log lines and admin commands, so one word."""
    name = _string(value, path, empty=False)
    if any(char.isspace() or not char.isprintable() for char in name):
        _fail(path, f"{_show(name)} must not contain spaces or control characters")
    return name


def _choice(value: object, path: str, choices: Sequence[str], *, fold: bool = False) -> str:
    """One of `choices` (compared case-insensitively when `fold`); returns the choice."""
    if not isinstance(value, str):
        _fail(path, f"{_show(value)} is not a string")
    for choice in choices:
        if value == choice or (fold and value.lower() == choice.lower()):
            return choice
    problem = f"{_show(value)} is not {_one_of(choices)}"
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    if close:
        problem += f' (did you mean "{close[0]}"?)'
    _fail(path, problem)


def _ipv4(value: object, path: str, *, host: bool = False) -> str:
    """Dotted IPv4 text, normalised; `host`: one a packet may be sent to or from."""
    text = _string(value, path)
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        _fail(path, f"{_show(text)} is not an IPv4 address")
    if host and (address.is_unspecified or address.is_multicast or address == _BROADCAST):
        _fail(path, f"{address} is not a host address")
    return str(address)


def _network(value: object, path: str) -> ipaddress.IPv4Network:
    text = _string(value, path)
    try:
        return ipaddress.IPv4Network(text)
    except ValueError:
        pass
    try:
        loose = ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        _fail(path, f'{_show(text)} is not an IPv4 network like "198.18.0.0/24"')
    _fail(path, f'{_show(text)} has host bits set (did you mean "{loose}"?)')


def _listen(value: object, path: str) -> tuple[str, int]:
    text = _string(value, path)
    host, colon, port_text = text.rpartition(":")
    if not colon or not host or not re.fullmatch(r"[0-9]{1,5}", port_text):
        _fail(path, f'{_show(text)} is not HOST:PORT like "127.0.0.1:7000"')
    return _ipv4(host, path), _port(int(port_text), path)


def _nat_ports(value: object, path: str) -> tuple[int, int]:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]{1,5})\s*-\s*([0-9]{1,5})\s*", value)
        if match is None:
            _fail(path, f'{_show(value)} is not a port range like "61000-65535"')
        first, last = _port(int(match[1]), path), _port(int(match[2]), path)
    elif isinstance(value, list | tuple):
        if len(value) != 2:
            _fail(path, f"{_show(value)} is not a port range like [61000, 65535]")
        first, last = _port(value[0], _item(path, 0)), _port(value[1], _item(path, 1))
    else:
        _fail(path, f'{_show(value)} is not a port range like "61000-65535" or [61000, 65535]')
    if first > last:
        _fail(path, f"{first}-{last} is empty (its first port is above its last)")
    return first, last


def _interface(value: object, path: str) -> str:
    name = _string(value, path, empty=False)
    if len(name.encode()) >= _IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        _fail(path, f"{_show(name)} is not an interface name")
    return name


def _socket_path(value: object, path: str) -> str:
    socket_path = _string(value, path, empty=False)
    if "\0" in socket_path:
        _fail(path, "must not contain a NUL character")
    if len(socket_path.encode()) > _SOCKET_PATH_MAX:
        _fail(path, f"is longer than a Unix socket path may be ({_SOCKET_PATH_MAX} bytes)")
    return socket_path


def _pattern(value: object, path: str) -> str:
    """A regular expression, compiled as the probes compile it (over bytes)."""
    text = _string(value, path)
    try:
        re.compile(text.encode())
    except re.error as error:
        _fail(path, f"{_show(text)} is not a valid regular expression: {error}")
    return text


def _http_path(value: object, path: str) -> str:
    text = _string(value, path)
    if not text.startswith("/"):
        _fail(path, f"{_show(text)} must start with /")
    if any(char.isspace() or not char.isprintable() for char in text):
        _fail(path, f"{_show(text)} must not contain spaces or control characters")
    return text


# --- structure -------------------------------------------------------------------------------


class _JsonObject(dict[str, object]):
    """A JSON object that remembers the keys the file gave more than once (json keeps the last)."""

    __slots__ = ("duplicates",)

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__()
        self.duplicates: list[str] = []
        for key, value in pairs:
            if key in self and key not in self.duplicates:
                self.duplicates.append(key)
            self[key] = value


def _object(
    value: object,
    path: str,
    known: Sequence[str],
    *,
    required: Sequence[str] = (),
    hints: dict[str, str] | None = None,
) -> dict[str, object]:
    if not isinstance(value, dict):
        _fail(path, f"{_show(value)} is not an object")
    for key in value:
        if not isinstance(key, str):
            _fail(path, f"the key {_show(key)} is not a string")
    if isinstance(value, _JsonObject) and value.duplicates:
        _fail(_at(path, value.duplicates[0]), "is given more than once")
    for key in value:
        if key not in known:
            _fail(_at(path, key), (hints or {}).get(key) or _unknown(key, known))
    for key in required:
        if key not in value:
            _fail(path, f'missing the required key "{key}"')
    return value


def _array(value: object, path: str) -> list[object] | tuple[object, ...]:
    if not isinstance(value, list | tuple):
        _fail(path, f"{_show(value)} is not an array")
    return value


def _unknown(key: str, known: Sequence[str]) -> str:
    close = [name for name in known if name.lower() == key.lower()]
    close = close or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f'unknown key (did you mean "{close[0]}"?)'
    return f"unknown key (known keys: {', '.join(_show(name) for name in known)})"


_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _at(path: str, key: str) -> str:
    """`path.key`, or `path["odd key"]` for a key that is not an identifier."""
    if _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{_show(key)}]"


def _item(path: str, index: int) -> str:
    return f"{path}[{index}]"


def _show(value: object, limit: int = 60) -> str:
    """A value as the file spells it (JSON), cut short if long."""
    try:
        text = json.dumps(value, ensure_ascii=False)
        if not text.isprintable() or not _encodable(text):
            text = json.dumps(value)  # \uXXXX escapes: the message stays one printable line
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(value)
        except (ValueError, RecursionError):  # an int too long to print
            text = "a number too long to show" if isinstance(value, int) else "?"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__


def _one_of(choices: Sequence[str]) -> str:
    quoted = [f'"{choice}"' for choice in choices]
    if len(quoted) == 2:
        return f"{quoted[0]} or {quoted[1]}"
    return f"one of {', '.join(quoted)}"


def _os_reason(error: OSError) -> str:
    return error.strerror or str(error)


def _read_from_disk(path: str) -> bytes:
    return Path(path).read_bytes()


def _fail(path: str, problem: str) -> NoReturn:
    raise ConfigError(path, problem)
