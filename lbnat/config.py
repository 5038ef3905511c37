"""lbnat's config: the JSON file and the command line's overrides, validated into frozen, typed
objects in one place.

Pure: no sockets, no clock. The only I/O is reading files: the config file itself in
`load_config`, the schema shipped beside this module (lbnat/config.schema.json), and a control
block's `secret_file` through the `read_file` function `parse_config` is given (by default it
reads the file from disk; `load_config` resolves a relative `secret_file` against the config
file's directory). Nothing here starts anything.

One validation path: the decoded JSON is checked against the schema with the jsonschema
library first (types, ranges, choices, unknown and missing keys), then built into the typed
objects with the checks a schema cannot express (service ports outside nat_ports, unique
service names and (protocol, port), unique backends in a service, a health check that fits the
protocol, not both secret and secret_file, finite numbers, regular expressions that compile).
Both steps share the field validators of `lbnat.fields` with the control protocol.

Every mistake raises `ConfigError`, whose text is one line naming the key path and the problem:

    services[1].backends[0].port: 70000 is not a valid port
    /etc/lbnat/lbnat.json: services[0].helth: unknown key (did you mean "health"?)

Two shapes are accepted: the native format (lbnat/config.schema.json, docs/config.example.json)
and the Java original's `servers.json`, `{"servers": [{"protocol": "TCP", "ipAddress": ...,
"port": ...}, ...]}` (the schema's `servers_json` definition), which becomes one service per
protocol present ("tcp", "udp") on `default_port`, with default settings.

`null` stands for "not given" only where the value may be absent at run time: `lb_ip`,
`interface`, `control`, `health.check`, `health.expect`, `control.secret`,
`control.secret_file`. Anywhere else it is a type error, like any other wrong type.

`lbnat run`'s options arrive as an `Overrides`; `build_config` merges them into the file's
config (or makes the whole config from them) and checks the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import jsonschema
from jsonschema.exceptions import ValidationError

from lbnat import fields
from lbnat.backends import Backend
from lbnat.health_settings import PROBE_KINDS, HealthPolicy, ProbeSettings, probe_misfit
from lbnat.nat import Timeouts
from lbnat.service import Service, dr_misfit, proxy_protocol_misfit
from lbnat.syncookie import DEFAULT_MSS, DEFAULT_THRESHOLD, SYN_PROXY_MODES

__all__ = [
    "DEFAULT_ADMIN_SOCKET",
    "DEFAULT_CONTROL_PORT",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_METRICS_PORT",
    "DEFAULT_NAT_PORTS",
    "DEFAULT_PORT",
    "DEFAULT_SYNC_PORT",
    "DEFAULT_TABLE_CAP",
    "DEFAULT_WINDOW",
    "IO_KINDS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_WORKERS",
    "OFFLOAD_MODES",
    "ON_DEAD",
    "PROBE_KINDS",
    "RX_RINGS",
    "SCHEMA_FILE",
    "SYN_PROXY_MODES",
    "Config",
    "ConfigError",
    "ControlConfig",
    "FileReader",
    "Overrides",
    "ServiceConfig",
    "SyncConfig",
    "build_config",
    "check_slices",
    "default_workers",
    "load_config",
    "parse_config",
    "parse_host_port",
    "parse_ip",
    "parse_port",
    "schema",
]

DEFAULT_PORT: Final = 20000
DEFAULT_CONTROL_PORT: Final = 7000
DEFAULT_METRICS_PORT: Final = 9120  # HAProxy's exporter is 9101, node_exporter 9100
DEFAULT_SYNC_PORT: Final = 7001  # the session sync (lbnat.syncwire.DEFAULT_PORT)
DEFAULT_NAT_PORTS: Final = (61000, 65535)
DEFAULT_TABLE_CAP: Final = 1_000_000
DEFAULT_ADMIN_SOCKET: Final = "/run/lbnat/lbnat.sock"
DEFAULT_DRAIN_TIMEOUT: Final = 300.0
DEFAULT_WINDOW: Final = 30.0
IO_KINDS: Final = ("rings", "socket")
RX_RINGS: Final = ("frames", "blocks")
OFFLOAD_MODES: Final = ("auto", "tc", "off")
MAX_WORKERS: Final = 64
LOG_FORMATS: Final = ("text", "json")
LOG_LEVELS: Final = ("info", "notice", "warning", "error")  # the least level logged
ON_DEAD: Final = ("keep", "reset")
PROTOCOL_NAMES: Final = ("tcp", "udp")
SCHEMA_FILE: Final = "config.schema.json"  # package data of lbnat, beside this module


def default_workers() -> int:
    """One worker per core (`workers: "auto"`)."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


FileReader = Callable[[str], bytes]
"""Reads a whole file (a control block's secret_file); raises OSError when it cannot."""

_T = TypeVar("_T")


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
    allow: tuple[fields.IPNetwork, ...] = ()  # empty: any source
    window: float = DEFAULT_WINDOW  # seconds a signed message's timestamp may be off


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """The session sync with the other lbnat of a pair (docs/sync-protocol.md)."""

    listen: str  # this node's own address on the sync link (never the VIP)
    port: int
    peers: tuple[tuple[str, int], ...]  # (address, port) of each peer
    secret: bytes
    # "pair": an active/backup pair keeps its peer's rows as standby rows (docs/ha.md);
    # "mesh": instances behind an ECMP router keep who owns which flow, and forward a packet
    # the router's hash moved to its owner (lbnat.owners, docs/scale-out.md)
    mode: str = "pair"


@dataclass(frozen=True, slots=True)
class Config:
    lb_ip: str | None = None  # SRCIP; may come from the command line instead
    # The address clients connect to, when it is not SRCIP: instances behind an ECMP router
    # share it, each sourcing its backend traffic from its own SRCIP (docs/scale-out.md)
    vip: str | None = None
    # The LB's IPv6 address (dual stack, docs/ipv6.md): clients of every service may connect to
    # it too, and it sources the traffic to IPv6 backends; None: IPv4 only
    ip6: str | None = None
    interface: str | None = None
    nat_ports: tuple[int, int] = DEFAULT_NAT_PORTS
    table_cap: int = DEFAULT_TABLE_CAP
    timeouts: Timeouts = field(default_factory=Timeouts)
    log_format: str = "text"  # or "json"
    quiet: bool = False  # no INFO lines, whatever log_level says (its meaning before levels)
    log_level: str = "info"  # one of LOG_LEVELS
    log_transitions: bool = False
    control: ControlConfig | None = None
    admin_socket: str = DEFAULT_ADMIN_SOCKET
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    services: tuple[ServiceConfig, ...] = ()
    workers: int = 1  # data-plane processes; the CLI and the file default to one per core
    io: str = "rings"  # "rings" (mmap'ed TPACKET rings) or "socket" (a syscall per packet)
    rx_ring: str = "frames"  # receive ring layout: "frames" (TPACKET_V2) or "blocks" (V3)
    # The kernel fast path (lbnat.fastpath, lbnat/bpf/fastpath.bpf.c): "tc" or nothing,
    # "auto": tc when it can load, the Python path alone (with one log line) when it cannot.
    offload: str = "auto"
    # The SYN-cookie proxy (lbnat.synproxy): one setting for the whole engine, because what a
    # flood exhausts (half-open rows, the table, NAT ports a backend's services share) is too.
    syn_proxy: str = "auto"  # "auto", "on" or "off"
    syn_proxy_threshold: int = DEFAULT_THRESHOLD  # half-open rows per worker before "auto" acts
    syn_proxy_mss: int = DEFAULT_MSS  # the MSS lbnat's cookie SYN-ACK announces
    # Prometheus exposition over HTTP (lbnat.metrics): (host, port), or None: no server
    metrics: tuple[str, int] | None = None
    # A hitless restart (lbnat.dataplane.handover): the rows kept in files next to this path,
    # and the guard left in place at exit for the next lbnat; None: neither
    state_file: str | None = None
    # The session sync with a peer lbnat (lbnat.dataplane.syncnode); None: off
    sync: SyncConfig | None = None


# --- the keys of each block (the schema's properties; a unit test keeps them equal) -------

TOP_KEYS: Final = (
    "lb_ip",
    "vip",
    "ip6",
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
    "syn_proxy",
    "metrics",
    "state_file",
    "sync",
)
DATAPLANE_KEYS: Final = ("workers", "io", "rx_ring", "offload")
SYN_PROXY_KEYS: Final = ("mode", "threshold", "mss")
METRICS_KEYS: Final = ("listen",)
SYNC_KEYS: Final = ("listen", "port", "peers", "secret_file", "mode")
SYNC_MODES: Final = ("pair", "mesh")
TIMEOUT_KEYS: Final = tuple(f.name for f in dataclasses.fields(Timeouts))
LOG_KEYS: Final = ("format", "quiet", "level", "transitions")
CONTROL_KEYS: Final = ("listen", "secret", "secret_file", "allow", "window")
SERVICE_KEYS: Final = (
    "name",
    "protocol",
    "port",
    "scheduler",
    "mode",
    "proxy_protocol",
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
    _refuse_duplicate_keys(data)
    if "servers" in data and len(data) == 1:
        _validate(data, "servers_json")
        return _servers_json(data, default_port)
    _validate(data, None)
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


@functools.cache
def schema() -> Mapping[str, Any]:
    """The config file's JSON schema (lbnat/config.schema.json), the one description of it."""
    text = resources.files("lbnat").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


# --- schema validation -----------------------------------------------------------------------


def _is_integer(_checker: object, instance: object) -> bool:
    # JSON Schema counts 20000.0 as an integer; a port or a count written 20000.0 is a mistake
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_array(_checker: object, instance: object) -> bool:
    return isinstance(instance, list | tuple)  # parse_config may be given tuples


# jsonschema's extend() has no type hints (types-jsonschema leaves it untyped)
_Validator: Final = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"integer": _is_integer, "array": _is_array}
    ),
)


@functools.cache
def _validator(definition: str | None) -> Any:
    """The whole schema's validator, or one that checks a value against one of its $defs."""
    root = schema()
    target = (
        root if definition is None else {"$defs": root["$defs"], "$ref": f"#/$defs/{definition}"}
    )
    return _Validator(target, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def _validate(data: object, definition: str | None) -> None:
    """Raise the ConfigError of the first mistake the schema finds, if any."""
    try:
        error: ValidationError | None = next(iter(_validator(definition).iter_errors(data)), None)
    except RecursionError:  # jsonschema's messages repr the value: too deep for the stack
        _fail("", "nested too deeply")
    if error is not None:
        path, problem = _explain(_most_telling(error))
        _fail(path, problem)


def _most_telling(error: ValidationError) -> ValidationError:
    """For an anyOf/oneOf mistake, the mistake within the branch the value was meant for: the
    first branch of the value's type (a string given for an address is not a null given)."""
    while error.validator in ("anyOf", "oneOf") and error.context:
        branches: dict[object, list[ValidationError]] = {}
        for inner in error.context:
            branches.setdefault(inner.relative_schema_path[0], []).append(inner)
        fitting = [
            errors
            for errors in branches.values()
            if not any(e.validator == "type" and not e.relative_path for e in errors)
        ]
        if fitting:
            error = fitting[0][0]
            continue
        if "errorMessage" in _node(error):
            return error  # no branch has the value's type: the node's own words say what fits
        typed = [errors[0] for errors in branches.values() if _argument(errors[0]) != "null"]
        return (typed or next(iter(branches.values())))[0]
    return error


def _explain(error: ValidationError) -> tuple[str, str]:
    """(key path, problem) of a schema mistake, worded as lbnat words them."""
    path = _path(error.absolute_path)
    value, keyword, node, argument = error.instance, error.validator, _node(error), _argument(error)
    if keyword == "additionalProperties" and isinstance(value, dict):
        known = list(node.get("properties", {}))
        key = next(key for key in value if key not in known)
        hint = _SERVERS_HINT if (path, key) == ("", "servers") else _unknown(key, known)
        return _at(path, key), hint
    if keyword == "required" and isinstance(value, dict):
        key = next(key for key in argument if key not in value)
        return path, f'missing the required key "{key}"'
    if keyword == "type":
        return path, f"{_show(value)} is not {_type_noun(argument)}"
    if keyword == "enum":
        choices = [choice for choice in argument if choice is not None]
        if not isinstance(value, str):
            return path, f"{_show(value)} is not a string"
        return path, _not_a_choice(value, choices)
    if keyword == "minLength":
        return path, "must not be empty"
    custom = node.get("errorMessage")
    if isinstance(custom, str):
        if "{value}" in custom:
            return path, custom.replace("{value}", str(value))
        return path, f"{_show(value)} {custom}"
    if keyword == "minimum":
        return path, f"{_show(value)} must be at least {argument}"
    if keyword == "maximum":
        return path, f"{_show(value)} must be at most {argument}"
    if keyword == "exclusiveMinimum":
        return (
            path,
            f"{_show(value)} must be {'positive' if argument == 0 else f'above {argument}'}",
        )
    return path, error.message  # a keyword the schema does not use yet: jsonschema's words


def _node(error: ValidationError) -> Mapping[str, Any]:
    """The schema object holding the keyword that failed."""
    return error.schema if isinstance(error.schema, Mapping) else {}


def _argument(error: ValidationError) -> Any:
    """The failed keyword's value in the schema (the enum's choices, the minimum, ...)."""
    return error.validator_value


_TYPE_NOUNS: Final = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


def _type_noun(expected: Any) -> str:
    kinds = [expected] if isinstance(expected, str) else list(expected)
    kinds = [kind for kind in kinds if kind != "null"] or kinds
    return _TYPE_NOUNS.get(str(kinds[0]), str(kinds[0]))


def _path(parts: Iterator[str | int] | Sequence[str | int]) -> str:
    path = ""
    for part in parts:
        path = _item(path, part) if isinstance(part, int) else _at(path, part)
    return path


def _refuse_duplicate_keys(data: object) -> None:
    """A key the file gives twice (json keeps the last one; the schema never sees the first).
    Walked with a stack, not recursion: JSON nested as deep as json.loads allows is fine."""
    stack: list[tuple[str, object]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            if isinstance(value, _JsonObject) and value.duplicates:
                _fail(_at(path, value.duplicates[0]), "is given more than once")
            for key in value:
                if not isinstance(key, str):
                    _fail(path, f"the key {_show(key)} is not a string")
            inner = [(_at(path, key), item) for key, item in value.items()]
        elif isinstance(value, list | tuple):
            inner = [(_item(path, index), item) for index, item in enumerate(value)]
        else:
            continue
        stack.extend(reversed(inner))  # the first child is looked at first


# --- the two shapes, built once the schema has passed them -----------------------------------


def _native(data: dict[str, Any], default_port: int, read_file: FileReader) -> Config:
    lb_ip = None if data.get("lb_ip") is None else _check(fields.host_ipv4, data["lb_ip"], "lb_ip")
    vip = None if data.get("vip") is None else _check(fields.host_ipv4, data["vip"], "vip")
    ip6 = None if data.get("ip6") is None else _check(fields.host_ipv6, data["ip6"], "ip6")
    interface = None
    if data.get("interface") is not None:
        interface = _check(fields.interface, data["interface"], "interface")
    nat_ports = DEFAULT_NAT_PORTS
    if "nat_ports" in data:
        nat_ports = _nat_ports(data["nat_ports"], "nat_ports")
    timeouts = Timeouts()
    if "timeouts" in data:
        timeouts = Timeouts(
            **{
                key: _seconds(item, _at("timeouts", key), zero=key in _TIMEOUTS_MAY_BE_ZERO)
                for key, item in data["timeouts"].items()
            }
        )
    log = data.get("log", {})
    admin_socket = _check(
        fields.socket_path, data.get("admin_socket", DEFAULT_ADMIN_SOCKET), "admin_socket"
    )
    drain_timeout = _seconds(
        data.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT), "drain_timeout", zero=True
    )
    services = _services(data.get("services", []), "services", default_port, nat_ports)
    dataplane = data.get("dataplane", {})
    syn_proxy = data.get("syn_proxy", {})
    workers = dataplane.get("workers", "auto")
    workers = default_workers() if workers == "auto" else workers
    _check_slices(nat_ports, workers, "dataplane.workers")
    control = None
    if data.get("control") is not None:
        control = _control(data["control"], "control", read_file)
        _check_listen_port("control.listen", control.host, control.port, (lb_ip, ip6),
                           nat_ports, services)  # fmt: skip
    metrics = None
    if data.get("metrics") is not None:
        metrics = _check(fields.host_port, data["metrics"]["listen"], "metrics.listen")
        _check_listen_port("metrics.listen", *metrics, (lb_ip, ip6), nat_ports, services)
    sync = None
    if data.get("sync") is not None:
        sync = _sync(data["sync"], "sync", read_file)
    return Config(
        lb_ip=lb_ip,
        vip=vip,
        ip6=ip6,
        interface=interface,
        nat_ports=nat_ports,
        table_cap=data.get("table_cap", DEFAULT_TABLE_CAP),
        timeouts=timeouts,
        log_format=log.get("format", "text"),
        quiet=log.get("quiet", False),
        log_level=log.get("level", "info"),
        log_transitions=log.get("transitions", False),
        control=control,
        admin_socket=admin_socket,
        drain_timeout=drain_timeout,
        services=services,
        workers=workers,
        io=dataplane.get("io", "rings"),
        rx_ring=dataplane.get("rx_ring", "frames"),
        offload=dataplane.get("offload", "auto"),
        syn_proxy=syn_proxy.get("mode", "auto"),
        syn_proxy_threshold=syn_proxy.get("threshold", DEFAULT_THRESHOLD),
        syn_proxy_mss=syn_proxy.get("mss", DEFAULT_MSS),
        metrics=metrics,
        state_file=data.get("state_file"),
        sync=sync,
    )


_SERVERS_HINT: Final = (
    'unknown key (did you mean "services"? A servers.json file has "servers" and no other key)'
)


def _servers_json(data: dict[str, Any], default_port: int) -> Config:
    """The Java original's servers.json: one service per protocol present, default settings."""
    backends: dict[str, list[Backend]] = {name: [] for name in PROTOCOL_NAMES}
    seen: dict[tuple[str, str, int], str] = {}
    for i, server in enumerate(data["servers"]):
        path = _item("servers", i)
        proto = server["protocol"].lower()
        ip = _check(fields.backend_ip, server["ipAddress"], _at(path, "ipAddress"))
        port: int = server["port"]
        if (proto, ip, port) in seen:
            also = seen[proto, ip, port]
            _fail(path, f"{proto.upper()} {_with_port(ip, port)} is listed twice (also {also})")
        if backends[proto] and _is_v6(backends[proto][0].ip) != _is_v6(ip):
            _fail(
                _at(path, "ipAddress"),
                f"{ip} is not of the family of the {proto.upper()} servers before it "
                f"({backends[proto][0].ip}): one protocol's servers form one service, whose "
                "backends are all IPv4 or all IPv6",
            )
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


def _control(block: dict[str, Any], path: str, read_file: FileReader) -> ControlConfig:
    host, port = _check(fields.host_port, block["listen"], _at(path, "listen"))
    secret = None
    given_secret = block.get("secret") is not None
    given_file = block.get("secret_file") is not None
    if given_secret and given_file:
        _fail(_at(path, "secret_file"), 'give "secret" or "secret_file", not both')
    if given_secret:
        secret = _check(fields.text, block["secret"], _at(path, "secret")).encode()
    elif given_file:
        where = _at(path, "secret_file")
        secret = _read_secret(_check(fields.text, block["secret_file"], where), where, read_file)
    allow = tuple(
        _check(fields.network, item, _item(_at(path, "allow"), i))
        for i, item in enumerate(block.get("allow", []))
    )
    window = _seconds(block.get("window", DEFAULT_WINDOW), _at(path, "window"))
    return ControlConfig(host=host, port=port, secret=secret, allow=allow, window=window)


def _sync(block: dict[str, Any], path: str, read_file: FileReader) -> SyncConfig:
    listen = _check(fields.host_ipv4, block["listen"], _at(path, "listen"))
    port = block.get("port", DEFAULT_SYNC_PORT)
    peers = tuple(
        _sync_peer(item, port, _item(_at(path, "peers"), i))
        for i, item in enumerate(block["peers"])
    )
    where = _at(path, "secret_file")
    secret = _read_secret(_check(fields.text, block["secret_file"], where), where, read_file)
    mode = block.get("mode", "pair")
    return checked_sync(SyncConfig(listen, port, peers, secret, mode), path)


def _sync_peer(text: object, default_port: int, path: str) -> tuple[str, int]:
    if not isinstance(text, str):
        _fail(path, f"must be a string, not {_show(text)}")
    try:
        return parse_host_port(text, default_port, "sync peer")
    except ConfigError as error:
        _fail(path, error.problem)


def checked_sync(sync: SyncConfig, path: str) -> SyncConfig:
    """A sync block that can work: peers, none of them this node itself."""
    if not sync.peers:
        _fail(path, "the session sync needs at least one peer")
    for host, port in sync.peers:
        if (host, port) == (sync.listen, sync.port):
            _fail(path, f"peer {host}:{port} is this node's own sync address")
    return sync


def _read_secret(secret_file: str, path: str, read_file: FileReader) -> bytes:
    """The secret in `secret_file`, surrounding whitespace stripped."""
    try:
        secret = read_file(secret_file).strip()
    except OSError as error:
        _fail(path, f"cannot read {_show(secret_file)}: {_os_reason(error)}")
    if not secret:
        _fail(path, f"{_show(secret_file)} is empty")
    return secret


def _check_listen_port(
    path: str,
    host: str,
    port: int,
    own: tuple[str | None, str | None],
    nat_ports: tuple[int, int],
    services: tuple[ServiceConfig, ...],
) -> None:
    """The guard drops packets to SRCIP and ip6 (`own`) on the service ports and the NAT
    range: a listener (the control channel, the metrics server) there would never hear a
    thing. "::" listens on every address of both families."""
    first, last = nat_ports
    if first <= port <= last:
        _fail(path, f"port {port} is inside nat_ports {first}-{last}")
    if host not in ("0.0.0.0", "::", *own):
        return
    for spec in services:
        if spec.service.port == port:
            _fail(path, f"port {port} is also the port of service {_show(spec.service.name)}")


def _services(
    items: list[Any], path: str, default_port: int, nat_ports: tuple[int, int]
) -> tuple[ServiceConfig, ...]:
    services: list[ServiceConfig] = []
    names: dict[str, str] = {}
    listeners: dict[tuple[str, int], str] = {}
    for i, item in enumerate(items):
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
    block: dict[str, Any], path: str, default_port: int, nat_ports: tuple[int, int]
) -> ServiceConfig:
    proto = block.get("protocol", "tcp").lower()
    port = block.get("port", default_port)
    first, last = nat_ports
    if first <= port <= last:
        _fail(_at(path, "port"), f"{port} is inside nat_ports {first}-{last}")
    name = f"{proto}:{port}"
    if "name" in block:
        name = _check(fields.word, block["name"], _at(path, "name"))
    affinity = _seconds(block.get("affinity", 0), _at(path, "affinity"), zero=True)
    health, probe = _health(block.get("health", {}), _at(path, "health"), proto)
    backends = _backends(block.get("backends", []), _at(path, "backends"))
    mixed = family_misfit(name, backends)
    if mixed:
        _fail(_at(path, "backends"), mixed)
    mode = block.get("mode", "nat")
    on_dead = block.get("on_dead", "keep")
    proxy = block.get("proxy_protocol")
    misfit = proxy_protocol_misfit(proxy, proto, mode)
    if misfit:
        _fail(_at(path, "proxy_protocol"), misfit)
    if mode == "dr":
        misfit = dr_misfit(name, port, backends) or _dr_misfit_more(proto, on_dead)
        if misfit:
            _fail(_at(path, "mode"), misfit)
    try:
        service = Service(
            name, proto, port, block.get("scheduler", "rr"), affinity, backends, mode, proxy
        )
    except ValueError as error:  # everything was checked above; kept as a safety net
        _fail(path, str(error))
    return ServiceConfig(service, health, probe, on_dead)


def _dr_misfit_more(proto: str, on_dead: str) -> str | None:
    """What a direct-routing service cannot do besides its backends' ports (docs/dr.md)."""
    if on_dead == "reset":
        return (
            "on_dead reset needs the backend's side of each flow, which a direct-routed flow "
            "never shows lbnat: use on_dead keep with mode dr"
        )
    return None


def _health(
    block: dict[str, Any], path: str, proto: str
) -> tuple[HealthPolicy | None, ProbeSettings]:
    policy = HealthPolicy(
        interval=_seconds(block.get("interval", 5.0), _at(path, "interval")),
        timeout=_seconds(block.get("timeout", 2.0), _at(path, "timeout")),
        fall=block.get("fall", 3),
        rise=block.get("rise", 1),
    )
    expect = None
    if block.get("expect") is not None:
        expect = _check(fields.pattern, block["expect"], _at(path, "expect"))
    probe = ProbeSettings(
        kind=block.get("check"),
        send=_check(fields.text, block.get("send", "HealthCheck"), _at(path, "send")),
        expect=expect,
        http_path=_check(fields.http_path, block.get("http_path", "/"), _at(path, "http_path")),
        http_status=block.get("http_status", 200),
    )
    misfit = probe_misfit(probe, proto)
    if misfit:
        _fail(_at(path, "check"), misfit)
    return (policy if block.get("enabled", True) else None), probe


def _backends(items: list[Any], path: str) -> tuple[Backend, ...]:
    backends: list[Backend] = []
    keys: dict[tuple[str, int], str] = {}
    names: dict[str, str] = {}
    for i, block in enumerate(items):
        where = _item(path, i)
        ip = _check(fields.backend_ip, block["ip"], _at(where, "ip"))
        port: int = block["port"]
        name = ""
        if block.get("name", "") != "":
            name = _check(fields.word, block["name"], _at(where, "name"))
        if (ip, port) in keys:
            shown = _with_port(ip, port)
            _fail(where, f"backend {shown} is listed twice (also {keys[ip, port]})")
        backend = Backend(ip, port, block.get("weight", 1), name)
        if backend.name in names:
            _fail(
                _at(where, "name"),
                f"{_show(backend.name)} is already the name of {names[backend.name]}",
            )
        keys[ip, port] = names[backend.name] = where
        backends.append(backend)
    return tuple(backends)


_with_port: Final = fields.host_port_text


def _is_v6(ip: str) -> bool:
    return ":" in ip


def family_misfit(service: str, backends: Sequence[Backend]) -> str | None:
    """A service's backends are all IPv4 or all IPv6 (its pool has one source address and
    one row form): the problem, naming the service, or None."""
    families = {_is_v6(b.ip) for b in backends}
    if len(families) < 2:
        return None
    v4 = next(b for b in backends if not _is_v6(b.ip))
    v6 = next(b for b in backends if _is_v6(b.ip))
    return (
        f"service {_show(service)} mixes IPv4 and IPv6 backends ({_with_port(v4.ip, v4.port)} "
        f"and {_with_port(v6.ip, v6.port)}): a service's backends are all of one family"
    )


def ip6_misfit(config: Config) -> str | None:
    """IPv6 backends are reached from the LB's IPv6 address: without ip6 there is none. The
    problem, naming the first such service and backend, or None."""
    if config.ip6 is not None:
        return None
    for spec in config.services:
        for backend in spec.service.backends:
            if _is_v6(backend.ip):
                return (
                    f"service {_show(spec.service.name)} has the IPv6 backend "
                    f"{_with_port(backend.ip, backend.port)}, which needs the LB's IPv6 "
                    "address: give ip6 in the config or --ip6"
                )
    return None


def _nat_ports(value: str | Sequence[int], path: str) -> tuple[int, int]:
    if isinstance(value, str):
        return _check(fields.port_range, value, path)
    first, last = value
    return _check(lambda _: fields.ordered_range(first, last), value, path)


def check_slices(nat_ports: tuple[int, int], workers: int) -> str | None:
    """Each worker needs NAT ports of its own (lbnat.dataplane.fanout.nat_slices gives each an
    equal share): the problem, or None."""
    first, last = nat_ports
    if (last - first + 1) // workers < 1:
        return f"nat_ports {first}-{last} is too small for {workers} workers"
    return None


def _check_slices(nat_ports: tuple[int, int], workers: int, path: str) -> None:
    problem = check_slices(nat_ports, workers)
    if problem:
        _fail(path, problem)


# --- values ----------------------------------------------------------------------------------


def _check(check: Callable[[Any], _T], value: object, path: str) -> _T:
    """`check(value)`, its FieldError told as a ConfigError at `path`."""
    try:
        return check(value)
    except fields.FieldError as error:
        _fail(path, f"{_show(value)} {error.problem}" if error.follows_value else error.problem)


def _seconds(value: object, path: str, *, zero: bool = False) -> float:
    return _check(functools.partial(fields.seconds, zero=zero), value, path)


def _not_a_choice(value: str, choices: Sequence[str]) -> str:
    problem = f"{_show(value)} is not {_one_of(choices)}"
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    if close:
        problem += f' (did you mean "{close[0]}"?)'
    return problem


# --- the command line's overrides ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Overrides:
    """`lbnat run`'s words and options, as the command line gave them (numbers already typed
    by click, addresses and ports still text: they are checked here).

    `given` names the options given explicitly (on the command line, or through LBNAT_WORKERS,
    LBNAT_OFFLOAD, LBNAT_LOG_LEVEL): with a config file only those override the file's settings.
    """

    words: tuple[str, ...] = ()  # [SRCIP] [IP PORT]...
    config_file: str | None = None
    vip: str | None = None  # --vip: clients' address when it is not SRCIP
    ip6: str | None = None  # --ip6: the LB's IPv6 address (dual stack)
    given: frozenset[str] = frozenset()
    vip_port: str = str(DEFAULT_PORT)
    proto: str = "tcp"
    interface: str | None = None
    scheduler: str = "rr"
    nat_ports: str = "61000-65535"
    table_cap: int = DEFAULT_TABLE_CAP
    affinity: float = 0.0
    health_interval: float = 5.0
    health_timeout: float = 2.0
    fall: int = 3
    rise: int = 1
    no_health: bool = False
    health_check: str | None = None
    probe_send: str = "HealthCheck"
    probe_expect: str | None = None
    http_path: str = "/"
    http_status: int = 200
    on_dead: str = "keep"
    mode: str = "nat"  # the command line's service: nat or dr (direct routing)
    proxy_protocol: str | None = None  # the command line's service: "v2" (lbnat.proxyproto)
    log_transitions: bool = False
    time_wait: float = 120.0
    udp_timeout: float = 30.0
    udp_replied_timeout: float = 120.0
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    control_listen: str | None = None
    secret_file: str | None = None
    allow: tuple[str, ...] = ()
    admin_socket: str = DEFAULT_ADMIN_SOCKET
    workers: str = "auto"
    io: str = "rings"
    rx_ring: str = "frames"
    offload: str = "auto"
    syn_proxy: str = "auto"
    syn_proxy_threshold: int = DEFAULT_THRESHOLD
    quiet: bool = False
    log_format: str = "text"
    metrics: str | None = None  # HOST[:PORT] of the Prometheus exposition
    log_level: str = "info"
    state_file: str | None = None  # --state-file (LBNAT_STATE_FILE): a hitless restart
    sync_listen: str | None = None  # --sync-listen: the session sync on this own address
    sync_peers: tuple[str, ...] = ()  # --sync-peer ADDRESS[:PORT], repeatable
    sync_port: int = DEFAULT_SYNC_PORT
    sync_secret_file: str | None = None
    sync_mode: str = "pair"  # --sync-mode: "pair" (HA) or "mesh" (ECMP instances)


# option -> the Config field it sets; with a config file only when given
_GLOBAL_OVERRIDES: Final = (
    "interface",
    "table_cap",
    "quiet",
    "log_format",
    "log_level",
    "log_transitions",
    "drain_timeout",
    "io",
    "rx_ring",
    "offload",
    "admin_socket",
    "syn_proxy",
    "syn_proxy_threshold",
    "state_file",
)
_TIMEOUT_OVERRIDES: Final = (
    ("time_wait", "time_wait"),
    ("udp_timeout", "udp"),
    ("udp_replied_timeout", "udp_replied"),
)


def build_config(overrides: Overrides, *, read_file: FileReader | None = None) -> Config:
    """The command line alone, or merged into its config file: SRCIP and the options given
    explicitly win; the command line's backends join the file's service of the same protocol
    and port (or form a new service). Raises ConfigError (the file's errors name the file).

    `read_file` reads --secret-file (default: from disk).
    """
    read = read_file or _read_from_disk
    base = None
    if overrides.config_file:
        vip_port = parse_port(overrides.vip_port, "virtual port")
        base = load_config(overrides.config_file, default_port=vip_port)
    words = overrides.words
    if base is None and not words:
        _fail("", "give SRCIP and at least one backend: SRCIP IP PORT [IP PORT ...]")
    # Without a file the first word is SRCIP; with one, an odd count means SRCIP comes first.
    has_srcip = base is None or len(words) % 2 == 1
    lb_ip = parse_ip(words[0], "SRCIP") if has_srcip else None
    vip = None if overrides.vip is None else parse_ip(overrides.vip, "--vip")
    ip6 = None if overrides.ip6 is None else _check(fields.host_ipv6, overrides.ip6, "--ip6")
    backends = _parse_backends(words[1:] if has_srcip else words)
    nat_ports = _parse_nat_ports(overrides.nat_ports)
    ours = _command_line_service(
        overrides, parse_port(overrides.vip_port, "virtual port"), backends
    )
    control = _command_line_control(overrides, read)
    sync = _command_line_sync(overrides, read)
    metrics = None
    if overrides.metrics:
        metrics = parse_host_port(
            overrides.metrics, DEFAULT_METRICS_PORT, "metrics address", ipv6=True
        )
    given = overrides.given
    if base is None:
        if not backends:
            _fail("", "give at least one backend: IP PORT [IP PORT ...]")
        config = Config(
            lb_ip=lb_ip,
            vip=vip,
            ip6=ip6,
            nat_ports=nat_ports,
            timeouts=Timeouts(
                **{field: getattr(overrides, option) for option, field in _TIMEOUT_OVERRIDES}
            ),
            control=control,
            metrics=metrics,
            sync=sync,
            services=(ours,),
            workers=_parse_workers(overrides.workers),
            **{option: getattr(overrides, option) for option in _GLOBAL_OVERRIDES},
        )
    else:
        changes: dict[str, Any] = {
            option: getattr(overrides, option) for option in _GLOBAL_OVERRIDES if option in given
        }
        if "nat_ports" in given:
            changes["nat_ports"] = nat_ports
        if "workers" in given:
            changes["workers"] = _parse_workers(overrides.workers)
        timeouts = {
            field: getattr(overrides, option)
            for option, field in _TIMEOUT_OVERRIDES
            if option in given
        }
        if timeouts:
            changes["timeouts"] = dataclasses.replace(base.timeouts, **timeouts)
        if control is not None:
            changes["control"] = control
        if metrics is not None:
            changes["metrics"] = metrics
        if sync is not None:
            changes["sync"] = sync
        if vip is not None:
            changes["vip"] = vip
        if ip6 is not None:
            changes["ip6"] = ip6
        config = dataclasses.replace(
            base,
            lb_ip=lb_ip or base.lb_ip,
            services=_merge_services(base.services, ours, given),
            **changes,
        )
    if config.lb_ip is None:
        _fail("", "no SRCIP: give it first on the command line or as lb_ip in the config")
    if config.vip == config.lb_ip:
        config = dataclasses.replace(config, vip=None)  # the same as no --vip
    direct = [s.service.name for s in config.services if s.service.mode == "dr"]
    if direct and config.vip is None:
        _fail("", f"service {direct[0]} is in mode dr: give it a VIP apart from SRCIP (--vip, or "
                  "vip in the config): its backends hold the VIP on lo, so SRCIP must stay an "
                  "address they can reach (ARP, health probes; docs/dr.md)")  # fmt: skip
    if overrides.sync_mode != "pair" and sync is None:  # --sync-mode mesh: the file's sync
        if config.sync is None:
            _fail("", "--sync-mode mesh needs the session sync: --sync-listen, --sync-peer and "
                      "--sync-secret-file (or a config file's sync block)")  # fmt: skip
        config = dataclasses.replace(
            config, sync=dataclasses.replace(config.sync, mode=overrides.sync_mode)
        )
    if config.sync is not None and config.sync.mode == "mesh" and config.vip is None:
        _fail("", "the sync's mesh mode is for instances sharing a VIP: give --vip (each "
                  "instance's SRCIP is its own address)")  # fmt: skip
    if metrics is not None:
        own = (config.lb_ip, config.ip6)
        _check_listen_port("--metrics", *metrics, own, config.nat_ports, config.services)
    if control is not None:
        own = (config.lb_ip, config.ip6)
        _check_listen_port("--control", control.host, control.port, own, config.nat_ports,
                           config.services)  # fmt: skip
    for spec in config.services:
        mixed = family_misfit(spec.service.name, spec.service.backends)
        if mixed:
            _fail("", mixed)
    problem = ip6_misfit(config)
    if problem:
        _fail("", problem)
    problem = check_slices(config.nat_ports, config.workers)
    if problem:
        _fail("", problem)
    first, last = config.nat_ports
    for spec in config.services:
        if first <= spec.service.port <= last:
            _fail(
                "",
                f"virtual port {spec.service.port} is inside the NAT port range {first}-{last}",
            )
    return config


def _command_line_sync(overrides: Overrides, read_file: FileReader) -> SyncConfig | None:
    """--sync-listen, --sync-peer, --sync-port, --sync-secret-file: all or none."""
    given = [
        name for name, value in (
            ("--sync-listen", overrides.sync_listen), ("--sync-peer", overrides.sync_peers),
            ("--sync-secret-file", overrides.sync_secret_file),
        ) if value
    ]  # fmt: skip
    if not given:
        return None
    if len(given) < 3:
        _fail("", "the session sync needs --sync-listen, --sync-peer and --sync-secret-file "
                  f"(given: {', '.join(given)})")  # fmt: skip
    assert overrides.sync_listen is not None and overrides.sync_secret_file is not None
    listen = parse_ip(overrides.sync_listen, "sync address")
    peers = tuple(
        parse_host_port(peer, overrides.sync_port, "sync peer") for peer in overrides.sync_peers
    )
    secret = _read_secret(overrides.sync_secret_file, "--sync-secret-file", read_file)
    return checked_sync(
        SyncConfig(listen, overrides.sync_port, peers, secret, overrides.sync_mode), "--sync-peer"
    )


def _command_line_service(
    overrides: Overrides, port: int, backends: tuple[Backend, ...]
) -> ServiceConfig:
    proto = overrides.proto
    probe = ProbeSettings(
        overrides.health_check,
        overrides.probe_send,
        overrides.probe_expect,
        overrides.http_path,
        overrides.http_status,
    )
    health = None
    if not overrides.no_health:
        health = HealthPolicy(
            overrides.health_interval, overrides.health_timeout, overrides.fall, overrides.rise
        )
        misfit = probe_misfit(probe, proto)
        if misfit:
            _fail("", misfit)
        if probe.expect is not None:
            try:
                fields.pattern(probe.expect)
            except fields.FieldError as error:
                _fail("", f"the expected-reply pattern {probe.expect!r} {error.problem}")
    if overrides.mode == "dr" and backends:
        misfit = dr_misfit(f"{proto}:{port}", port, backends) or _dr_misfit_more(
            proto, overrides.on_dead
        )
        if misfit:
            _fail("", f"--mode dr: {misfit}")
    misfit = proxy_protocol_misfit(overrides.proxy_protocol, proto, overrides.mode)
    if misfit:
        _fail("", f"--proxy-protocol: {misfit}")
    service = Service(
        f"{proto}:{port}", proto, port, overrides.scheduler, overrides.affinity, backends,
        overrides.mode, overrides.proxy_protocol,
    )  # fmt: skip
    return ServiceConfig(service, health, probe, overrides.on_dead)


def _command_line_control(overrides: Overrides, read_file: FileReader) -> ControlConfig | None:
    if not overrides.control_listen:
        return None
    host, port = parse_host_port(
        overrides.control_listen, DEFAULT_CONTROL_PORT, "control address", ipv6=True
    )
    secret = None
    if overrides.secret_file:
        try:
            secret = read_file(overrides.secret_file).strip()
        except OSError as error:
            _fail("", f"cannot read the secret file: {error.strerror}")
    try:
        allow = tuple(ipaddress.ip_network(net, strict=False) for net in overrides.allow)
    except ValueError as error:
        _fail("", f"--allow: {error}")
    return ControlConfig(host, port, secret, allow, DEFAULT_WINDOW)


def _merge_services(
    services: tuple[ServiceConfig, ...], ours: ServiceConfig, given: frozenset[str]
) -> tuple[ServiceConfig, ...]:
    """The file's services with the command line's: its backends join the file's service of
    the same protocol and port, which takes the options given explicitly."""
    spec = ours.service
    for index, file in enumerate(services):
        if (file.service.proto, file.service.port) == (spec.proto, spec.port):
            merged = _merge_service(file, ours, given)
            return (*services[:index], merged, *services[index + 1 :])
    return (*services, ours) if spec.backends else services


def _merge_service(
    file: ServiceConfig, ours: ServiceConfig, given: frozenset[str]
) -> ServiceConfig:
    """The file's service with the command line's backends added and its explicit options."""
    keys = {b.key for b in file.service.backends}
    for backend in ours.service.backends:
        if backend.key in keys:
            _fail(
                f"services[{file.service.name}].backends",
                f"{_with_port(backend.ip, backend.port)} is both in the config and on the "
                "command line",
            )
    backends = file.service.backends + ours.service.backends
    mode = ours.service.mode if "mode" in given else file.service.mode
    on_dead = ours.on_dead if "on_dead" in given else file.on_dead
    if mode == "dr":
        misfit = dr_misfit(file.service.name, file.service.port, backends) or _dr_misfit_more(
            file.service.proto, on_dead
        )
        if misfit:
            _fail(f"services[{file.service.name}]", misfit)
    proxy = (
        ours.service.proxy_protocol if "proxy_protocol" in given else file.service.proxy_protocol
    )
    misfit = proxy_protocol_misfit(proxy, file.service.proto, mode)
    if misfit:
        _fail(f"services[{file.service.name}]", misfit)
    service = dataclasses.replace(file.service, backends=backends, mode=mode, proxy_protocol=proxy)
    if "scheduler" in given:
        service = dataclasses.replace(service, scheduler=ours.service.scheduler)
    if "affinity" in given:
        service = dataclasses.replace(service, affinity_timeout=ours.service.affinity_timeout)
    health, probe, on_dead = file.health, file.probe, file.on_dead
    if "no_health" in given:
        health = None
    elif given & {"health_interval", "health_timeout", "fall", "rise"}:
        health = ours.health
    if given & {"health_check", "probe_send", "probe_expect", "http_path", "http_status"}:
        probe = ours.probe
    if "on_dead" in given:
        on_dead = ours.on_dead
    return ServiceConfig(service, health, probe, on_dead)


def parse_ip(text: str, what: str) -> str:
    """A command-line IPv4 address; ConfigError naming `what`."""
    try:
        return str(fields.ipv4(text))
    except fields.FieldError:
        _fail("", f"{what} {text!r} is not an IPv4 address")


def parse_backend_ip(text: str) -> str:
    """A command-line backend address: IPv4, or IPv6 as plain text or in brackets."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if ":" not in bare:
        return parse_ip(text, "backend address")
    try:
        return fields.backend_ip(bare)
    except fields.FieldError as error:
        problem = error.problem if not error.follows_value else f"{text!r} {error.problem}"
        _fail("", f"backend address {problem}")


def parse_port(text: str, what: str) -> int:
    """A command-line port; ConfigError naming `what`."""
    try:
        number = int(text)
    except ValueError:
        _fail("", f"{what} {text!r} is not a port number")
    try:
        return fields.port(number)
    except fields.FieldError:
        _fail("", f"{what} {number} is out of range (1-65535)")


def parse_host_port(
    text: str, default_port: int, what: str, *, ipv6: bool = False
) -> tuple[str, int]:
    """HOST[:PORT] on the command line; with `ipv6`, HOST may be an IPv6 address: in brackets
    with a port ("[::]:7000"), or bare without one ("::")."""
    if ipv6 and (text.startswith("[") or text.count(":") > 1):
        host, close, port = text[1:].partition("]") if text.startswith("[") else (text, "", "")
        if text.startswith("[") and (not close or (port and not port.startswith(":"))):
            _fail("", f"{what} {text!r} is not [IPv6]:PORT")
        try:
            address = str(ipaddress.IPv6Address(host))
        except ValueError:
            _fail("", f"{what} {host!r} is not an IPv6 address")
        return address, parse_port(port[1:], f"{what} port") if port else default_port
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = text, str(default_port)
    return parse_ip(host, what), parse_port(port, f"{what} port")


def _parse_backends(words: Sequence[str]) -> tuple[Backend, ...]:
    """IP PORT [IP PORT ...] -> backends, in order."""
    if len(words) % 2:
        _fail("", f"backends come in IP PORT pairs; got an odd number of words ({len(words)})")
    backends: list[Backend] = []
    seen: set[tuple[str, int]] = set()
    for i in range(0, len(words), 2):
        ip = parse_backend_ip(words[i])
        port = parse_port(words[i + 1], "backend port")
        if (ip, port) in seen:
            _fail("", f"backend {_with_port(ip, port)} is given twice")
        seen.add((ip, port))
        backends.append(Backend(ip, port))
    return tuple(backends)


def _parse_nat_ports(text: str) -> tuple[int, int]:
    low, dash, high = text.partition("-")
    if not dash:
        _fail("", f"NAT port range {text!r} must look like 61000-65535")
    first = parse_port(low, "NAT port range start")
    last = parse_port(high, "NAT port range end")
    if first > last:
        _fail("", f"NAT port range {text!r} is empty")
    return first, last


def _parse_workers(text: str) -> int:
    """--workers: a count or "auto" (one per core)."""
    if text == "auto":
        return default_workers()
    try:
        workers = int(text)
    except ValueError:
        _fail("", f'--workers: {text!r} is not a number of workers or "auto"')
    if not 1 <= workers <= MAX_WORKERS:
        _fail("", f"--workers: {workers} is not between 1 and {MAX_WORKERS}")
    return workers


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
