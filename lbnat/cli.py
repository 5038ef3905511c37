"""Command line: `lbnat run ...`, the C++ original's `loadbalancerLobin SRCIP IP PORT ...`, and
the commands that talk to a running lbnat (register, unregister, status, sessions, backend,
reload) or check a config file.

Every mistake on the command line ends in one line on stderr and exit code 2, with nothing left
behind (the daemon has not touched the host yet when arguments are checked). A command that
reaches a running lbnat which says no prints its reason and exits 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from lbnat import config as config_module
from lbnat import hatool, privileges
from lbnat.config import (
    DEFAULT_ADMIN_SOCKET,
    DEFAULT_CONTROL_PORT,
    DEFAULT_SYNC_PORT,
    IO_KINDS,
    LOG_LEVELS,
    OFFLOAD_MODES,
    PROBE_KINDS,
    RX_RINGS,
    SYN_PROXY_MODES,
    Config,
    ConfigError,
    Overrides,
    build_config,
    load_config,
)
from lbnat.control.client import HA_ROLES
from lbnat.control.protocol import sign
from lbnat.control.server import AdminError, ask_lbnat
from lbnat.daemon import Daemon, StartError
from lbnat.dataplane import handover
from lbnat.scheduler import SCHEDULERS
from lbnat.syncookie import DEFAULT_THRESHOLD

DEFAULT_VIP_PORT = config_module.DEFAULT_PORT
ADMIN_SOCKET_ENV = "LBNAT_ADMIN_SOCKET"  # overrides the default, for the server and the clients
WORKERS_ENV = "LBNAT_WORKERS"
OFFLOAD_ENV = "LBNAT_OFFLOAD"
METRICS_ENV = "LBNAT_METRICS"
LOG_LEVEL_ENV = "LBNAT_LOG_LEVEL"
STATE_FILE_ENV = "LBNAT_STATE_FILE"

_T = TypeVar("_T")


def fail(message: str) -> NoReturn:
    click.echo(f"lbnat: {message}", err=True)
    raise SystemExit(2)


def checked(parse: Callable[..., _T], *args: Any) -> _T:
    """`parse(*args)` (one of lbnat.config's parsers); its ConfigError ends the command."""
    try:
        return parse(*args)
    except ConfigError as error:
        fail(str(error))


def run_daemon(config: Config, reload_config: Callable[[], Config] | None = None) -> NoReturn:
    try:
        daemon = Daemon(config, reload_config=reload_config)
        code = daemon.run()
    except StartError as error:
        fail(str(error))
    raise SystemExit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lbnat")
def main() -> None:
    """lbnat: a Layer-4 NAT load balancer for Linux (root, or CAP_NET_RAW + CAP_NET_ADMIN).

    Example: sudo lbnat run 198.18.0.2 198.18.0.21 9000 198.18.0.22 9000 --port 20000
    """


# --- lbnat run ----------------------------------------------------------------------------------


@main.command()
@click.argument("words", nargs=-1, metavar="[SRCIP] [IP PORT]...")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="JSON config file.")
@click.option(
    "--port",
    "vip_port",
    default=str(DEFAULT_VIP_PORT),
    show_default=True,
    help="Virtual port clients connect to.",
)
@click.option("--proto", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True)
@click.option("--interface", default=None, help="Interface holding SRCIP (found automatically).")
@click.option(
    "--vip",
    default=None,
    metavar="ADDRESS",
    help="The virtual IP clients connect to, when it is not SRCIP: instances behind an ECMP "
    "router share it, each sourcing backend traffic from its own SRCIP (docs/scale-out.md).",
)
@click.option(
    "--ip6",
    default=None,
    metavar="ADDRESS",
    help="The LB's IPv6 address (dual stack): every service is offered on it too, to IPv6 "
    "backends or, NAT64, to IPv4 ones (docs/ipv6.md).",
)
@click.option("--scheduler", type=click.Choice(sorted(SCHEDULERS)), default="rr", show_default=True)
@click.option(
    "--nat-ports",
    default="61000-65535",
    show_default=True,
    help="Source ports lbnat uses towards backends.",
)
@click.option("--table-cap", type=click.IntRange(min=1), default=1_000_000, show_default=True)
@click.option(
    "--affinity",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Client-IP affinity timeout in seconds (0: off).",
)
@click.option("--health-interval", type=click.FloatRange(min=0.05), default=5.0, show_default=True)
@click.option("--health-timeout", type=click.FloatRange(min=0.05), default=2.0, show_default=True)
@click.option(
    "--fall",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Failed probes before dead.",
)
@click.option(
    "--rise",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Good probes before alive again.",
)
@click.option("--no-health", is_flag=True, help="Do not probe backends (all are taken as alive).")
@click.option(
    "--health-check",
    type=click.Choice(PROBE_KINDS),
    default=None,
    help="Probe kind (default: syn for tcp, udp for udp).",
)
@click.option(
    "--probe-send", default="HealthCheck", show_default=True, help="hello/udp: what to send."
)
@click.option("--probe-expect", default=None, help="hello/udp: regex the reply must match.")
@click.option("--http-path", default="/", show_default=True, help="http: the path to GET.")
@click.option("--http-status", type=click.IntRange(100, 599), default=200, show_default=True)
@click.option(
    "--on-dead",
    type=click.Choice(["keep", "reset"]),
    default="keep",
    show_default=True,
    help="Flows of a backend that dies: keep them, or RST both ends.",
)
@click.option(
    "--mode",
    type=click.Choice(["nat", "dr"]),
    default="nat",
    show_default=True,
    help="The command line's service: full NAT, or direct routing (backends hold the VIP on "
    "lo and answer clients directly; IPv4, backends on the service's port; docs/dr.md).",
)
@click.option(
    "--proxy-protocol",
    type=click.Choice(["v2"]),
    default=None,
    help="The command line's service (TCP, NAT): send each backend the PROXY protocol v2 header "
    "(the real client's address and port) before the client's bytes; docs/proxy-protocol.md.",
)
@click.option("--log-transitions", is_flag=True, help="Health lines only when a state changes.")
@click.option(
    "--time-wait",
    type=click.FloatRange(min=0),
    default=120.0,
    show_default=True,
    help="TIME_WAIT linger in seconds.",
)
@click.option(
    "--udp-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Idle seconds before a UDP flow ends.",
)
@click.option(
    "--udp-replied-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    help="The same, once the backend has replied.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds a draining backend keeps its flows.",
)
@click.option(
    "--control",
    "control_listen",
    default=None,
    help="Listen for backend registrations on HOST:PORT.",
)
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Shared secret for signed registrations.",
)
@click.option(
    "--allow", multiple=True, help="Network allowed to register (repeatable; default any)."
)
@click.option(
    "--admin-socket",
    default=DEFAULT_ADMIN_SOCKET,
    envvar=ADMIN_SOCKET_ENV,
    show_default=True,
    help="Unix socket of lbnat status/sessions/backend/reload ('' to disable).",
)
@click.option(
    "--metrics",
    default=None,
    envvar=METRICS_ENV,
    metavar="HOST[:PORT]",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (port 9120 if none; off if "
    "not given), e.g. 127.0.0.1:9120.",
)
@click.option(
    "--workers",
    default="auto",
    envvar=WORKERS_ENV,
    show_default=True,
    help="Data-plane processes sharing the interface (PACKET_FANOUT); auto: one per core.",
)
@click.option(
    "--io",
    type=click.Choice(IO_KINDS),
    default="rings",
    show_default=True,
    help="rings: mmap'ed TPACKET rings; socket: the simple path, a syscall per packet.",
)
@click.option(
    "--rx-ring",
    type=click.Choice(RX_RINGS),
    default="frames",
    show_default=True,
    help="Receive ring: frames (per-frame hand-over) or blocks (TPACKET_V3, adds latency).",
)
@click.option(
    "--offload",
    type=click.Choice(OFFLOAD_MODES),
    default="auto",
    envvar=OFFLOAD_ENV,
    show_default=True,
    help="Kernel fast path: tc (a tc eBPF program rewrites established flows), off, or auto.",
)
@click.option(
    "--syn-proxy",
    type=click.Choice(SYN_PROXY_MODES),
    default="auto",
    show_default=True,
    help="Answer SYNs with SYN cookies: auto (above the threshold), on (always) or off.",
)
@click.option(
    "--syn-proxy-threshold",
    type=click.IntRange(min=1),
    default=DEFAULT_THRESHOLD,
    show_default=True,
    help="Half-open rows per worker above which --syn-proxy auto answers SYNs itself.",
)
@click.option(
    "--state-file",
    default=None,
    envvar=STATE_FILE_ENV,
    metavar="PATH",
    help="Hitless restart: keep the rows in files next to PATH and, at SIGTERM, leave the "
    "guard for the next lbnat, which restores them (off if not given).",
)
@click.option(
    "--sync-listen",
    default=None,
    metavar="ADDRESS",
    help="Session sync with a peer lbnat (an active/backup pair): this node's own address on "
    "the sync link (not the VIP). With --sync-peer and --sync-secret-file.",
)
@click.option(
    "--sync-peer",
    "sync_peers",
    multiple=True,
    metavar="ADDRESS[:PORT]",
    help="The peer's sync address (repeatable).",
)
@click.option(
    "--sync-port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_SYNC_PORT,
    show_default=True,
    help="UDP port of the session sync.",
)
@click.option(
    "--sync-mode",
    type=click.Choice(["pair", "mesh"]),
    default="pair",
    show_default=True,
    help="pair: an active/backup pair (standby rows, docs/ha.md); mesh: instances sharing "
    "--vip behind an ECMP router, each forwarding packets of another's flows to it "
    "(docs/scale-out.md).",
)
@click.option(
    "--sync-secret-file",
    default=None,
    metavar="PATH",
    help="The pair's shared sync secret (HMAC-SHA256; not the control channel's).",
)
@click.option("--quiet", is_flag=True, help="No per-flow and per-probe lines (--log-level notice).")
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    envvar=LOG_LEVEL_ENV,
    show_default=True,
    help="The least level logged: info (every flow), notice, warning or error.",
)
@click.pass_context
def run(
    ctx: click.Context, /, words: tuple[str, ...], config_file: str | None, **options: Any
) -> None:
    """Balance SRCIP:PORT over the backends IP PORT [IP PORT ...] (and/or a --config file).

    Example: sudo lbnat run 198.18.0.2 198.18.0.21 9000 198.18.0.22 9000
    """
    given = {
        name for name in options if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    if ctx.get_parameter_source("workers") is ParameterSource.ENVIRONMENT:
        given.add("workers")  # LBNAT_WORKERS overrides the file's workers too
    if ctx.get_parameter_source("offload") is ParameterSource.ENVIRONMENT:
        given.add("offload")  # and LBNAT_OFFLOAD its offload
    if ctx.get_parameter_source("metrics") is ParameterSource.ENVIRONMENT:
        given.add("metrics")
    if ctx.get_parameter_source("state_file") is ParameterSource.ENVIRONMENT:
        given.add("state_file")
    if ctx.get_parameter_source("log_level") is ParameterSource.ENVIRONMENT:
        given.add("log_level")  # and LBNAT_LOG_LEVEL its log level
    overrides = Overrides(words=words, config_file=config_file, given=frozenset(given), **options)

    def build() -> Config:
        return build_config(overrides)

    config = checked(build)
    run_daemon(config, build if config_file else None)


def lobin_main(argv: Sequence[str] | None = None) -> NoReturn:
    """loadbalancerLobin SRCIP IP PORT [IP PORT ...]: the C++ original's arguments, port 20000."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        click.echo(
            "usage: sudo loadbalancerLobin SRCIP IP PORT [IP PORT ...]   (virtual port 20000)\n"
            "Example: sudo loadbalancerLobin 198.18.0.2 198.18.0.21 9000 198.18.0.22 9000"
        )
        raise SystemExit(0 if args else 2)
    overrides = Overrides(
        words=tuple(args),
        admin_socket=os.environ.get(ADMIN_SOCKET_ENV, DEFAULT_ADMIN_SOCKET),
        workers=os.environ.get(WORKERS_ENV, "auto"),
    )
    run_daemon(checked(build_config, overrides))


# --- lbnat check-config -------------------------------------------------------------------------


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--port",
    "vip_port",
    default=str(DEFAULT_VIP_PORT),
    help="Virtual port for a servers.json file.",
)
def check_config(file: str, vip_port: str) -> None:
    """Validate a config file without starting anything.

    Example: lbnat check-config /etc/lbnat/config.json
    """
    default_port = checked(config_module.parse_port, vip_port, "virtual port")
    config = checked(lambda: load_config(file, default_port=default_port))
    backends = sum(len(s.service.backends) for s in config.services)
    names = ", ".join(
        f"{s.service.name} ({s.service.proto}/{s.service.port})" for s in config.services
    )
    click.echo(
        f"{file}: ok: {len(config.services)} services: {names or 'none'}; {backends} backends"
    )
    if (problem := config_module.ip6_misfit(config)) is not None:  # unless --ip6 gives it
        click.echo(f"{file}: note: {problem}")


# --- lbnat cleanup -------------------------------------------------------------------------------


@main.command()
@click.option(
    "--state-file",
    required=True,
    envvar=STATE_FILE_ENV,
    metavar="PATH",
    help="The state file the stopped lbnat was run with.",
)
def cleanup(state_file: str) -> None:
    """Remove what an lbnat stopped with --state-file left for its successor (its nftables
    table, reserved NAT ports and tc filter) when none is coming, and the state files.

    Example: sudo lbnat cleanup --state-file /run/lbnat/state.json
    """
    if "CAP_NET_ADMIN" in privileges.missing_here():
        # without it nft cannot even list the table, and the files would go with it left
        fail("lbnat cleanup needs CAP_NET_ADMIN (the nftables table, the reserved ports, the tc "
             "filter): run it as root")  # fmt: skip
    try:
        done = handover.cleanup(state_file)
    except handover.HandoverError as error:
        fail(str(error))
    for line in done:
        click.echo(f"cleanup: {line}")


# --- talking to a running lbnat -------------------------------------------------------------------


def talk(target: str | tuple[str, int], message: dict[str, object]) -> dict[str, Any]:
    """Send one request, return the reply; unreachable lbnat -> exit 1 with a clear line."""
    try:
        return ask_lbnat(target, message)
    except AdminError as error:
        click.echo(f"lbnat: {error}", err=True)
        raise SystemExit(1) from None


def registration(op: str, lb: str, service: str, ip: str, port: str, weight: int, name: str,
                 secret: str | None, secret_file: str | None) -> None:  # fmt: skip
    host, control_port = checked(
        lambda: config_module.parse_host_port(lb, DEFAULT_CONTROL_PORT, "--lb", ipv6=True)
    )
    message: dict[str, object] = {
        "op": op,
        "service": service,
        "ip": checked(config_module.parse_backend_ip, ip),
        "port": checked(config_module.parse_port, port, "backend port"),
    }
    if op == "register":
        message["weight"] = weight
        if name:
            message["name"] = name
    key = secret.encode() if secret else None
    if secret_file:
        try:
            key = Path(secret_file).read_bytes().strip()
        except OSError as error:
            fail(f"cannot read the secret file: {error.strerror}")
    if key:
        message = sign(message, key, time.time())
    reply = talk((host, control_port), message)
    click.echo(
        f"{op}: {reply.get('backend')} in service {reply.get('service')}: {reply.get('state')}"
    )


def registration_command(op: str) -> click.Command:
    @click.command(op)
    @click.option("--lb", required=True, help="The load balancer's control channel, HOST[:PORT].")
    @click.option("--service", required=True, help="Service name.")
    @click.argument("ip")
    @click.argument("port")
    @click.option("--weight", type=click.IntRange(0, 65535), default=1, show_default=True)
    @click.option("--name", default="", help="A name for the backend.")
    @click.option("--secret", default=None, help="Shared secret (prefer --secret-file).")
    @click.option("--secret-file", type=click.Path(dir_okay=False), default=None)
    def command(lb: str, service: str, ip: str, port: str, weight: int, name: str,
                secret: str | None, secret_file: str | None) -> None:  # fmt: skip
        registration(op, lb, service, ip, port, weight, name, secret, secret_file)

    command.help = (
        f"{op.capitalize()} backend IP PORT "
        f"{'with' if op == 'register' else 'from'} a running lbnat.\n\n"
        f"Example: lbnat {op} --lb 198.18.0.2:7000 --service chat 198.18.0.24 9000"
    )
    return command


main.add_command(registration_command("register"))
main.add_command(registration_command("unregister"))

admin_socket_option = click.option(
    "--admin-socket",
    default=DEFAULT_ADMIN_SOCKET,
    envvar=ADMIN_SOCKET_ENV,
    show_default=True,
    help="lbnat's admin socket.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


@main.command()
@admin_socket_option
@json_option
def status(admin_socket: str, as_json: bool) -> None:
    """Services and backends: health, weight, flows, traffic, last probe.

    Example: sudo lbnat status
    """
    reply = talk(admin_socket, {"op": "status"})
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    workers = reply.get("workers", [])
    click.echo(
        f"lbnat {reply['lb_ip']}{' ' + reply['ip6'] if reply.get('ip6') else ''}  "
        f"up {reply['uptime']} s  rows {reply['rows']}  "
        f"open flows {reply['open_flows']}  workers {len(workers)}  io {reply.get('io', '?')}"
    )
    table = reply.get("table", {})
    if table.get("evicted") or table.get("under_pressure") or table.get("pressure_spells"):
        click.echo(
            f"  half-open {table['half_open']}  evicted {table['evicted']}  ports reclaimed "
            f"{table['ports_reclaimed']}  pressure spells {table['pressure_spells']}"
            + ("  UNDER PRESSURE" if table["under_pressure"] else "")
        )
    offload = reply.get("offload", {})
    if offload.get("offloaded"):
        click.echo(
            f"  kernel fast path: rows {offload['rows']}  packets {offload['packets']}  "
            f"bytes {human_bytes(offload['bytes'])}  rows refused {offload['refused']}"
        )
    link = reply.get("link")
    if link and link["state"] != "up":
        click.echo(f"  link {link['interface']} {link['state']} for {link['since']} s")
    bgp = reply.get("bgp")
    if bgp:  # behind an ECMP router (--vip): what the speaker should say
        verb = "announce" if bgp["announce"] else "withdraw"
        click.echo(f"  VIP {reply.get('vip')}: {verb} ({bgp['why']}; {bgp['phase']})")
    if len(workers) > 1:
        for w in workers:
            state = "running" if w["alive"] else "restarting"
            click.echo(f"  worker {w['index']}  pid {w['pid']}  {state}  restarts {w['restarts']}")
    for s in reply["services"]:
        drops = " ".join(f"{k} {v}" for k, v in s["drops"].items())
        cookies = s.get("syn_cookies", {})
        proxy = (
            f"  syn cookies sent {cookies['sent']} validated {cookies['validated']} "
            f"invalid {cookies['invalid']}"
            if any(cookies.values())
            else ""
        )
        click.echo(
            f"service {s['name']}  {s['proto']} :{s['port']}  {s['scheduler']}  "
            + ("direct routing  " if s.get("mode") == "dr" else "")
            + ("proxy protocol v2  " if s.get("proxy_protocol") == "v2" else "")
            + f"check {s['health_check']}  flows {s['flows']}  packets {s['packets']}  "
            f"bytes {human_bytes(s['bytes'])}" + (f"  drops {drops}" if drops else "") + proxy
        )
        for b in s["backends"]:
            state = b["health"] + (" draining" if b["draining"] else "")
            probe = (
                f"  probe {b['last_probe']} {b['last_probe_age']} s ago" if b["last_probe"] else ""
            )
            click.echo(
                f"  {_bracketed(b['ip'])}:{b['port']:<5}  {b['name']:<16}  {state:<14}  "
                f"weight {b['weight']}  "
                f"active {b['active']}  flows {b['flows']}  packets {b['packets']}  "
                f"bytes {human_bytes(b['bytes'])}{probe}"
            )


def _bracketed(ip: str) -> str:
    """An IPv6 address before a ":port" goes in brackets."""
    return f"[{ip}]" if ":" in ip else ip


@main.command()
@admin_socket_option
@json_option
def sessions(admin_socket: str, as_json: bool) -> None:
    """The NAT table: client <-> backend, NAT port, state, age.

    Example: sudo lbnat sessions
    """
    reply = talk(admin_socket, {"op": "sessions"})
    rows = reply["sessions"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    # 22 columns fit "255.255.255.255:65535 "; an IPv6 address widens its column
    cw = max([22, *(len(str(r["client"])) + 1 for r in rows)])
    bw = max([22, *(len(str(r["backend"])) + 1 for r in rows)])
    click.echo(
        f"{'proto':<6}{'client':<{cw}}{'backend':<{bw}}{'NAT port':<10}{'state':<14}"
        f"{'worker':<8}age"
    )
    for r in rows:
        click.echo(
            f"{r['proto']:<6}{r['client']:<{cw}}{r['backend']:<{bw}}{r['nat_port']:<10}"
            f"{r['state']:<14}{r.get('worker', 0):<8}{r['age']:.0f} s"
            + (f"  PROXY v2 header {r['proxy_header']}" if "proxy_header" in r else "")
        )
    click.echo(f"{len(rows)} rows")


@main.command()
@admin_socket_option
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes (and the span each rate is measured over).",
)
@click.option("--once", is_flag=True, help="Print one frame (two snapshots --interval apart).")
def top(admin_socket: str, interval: float, once: bool) -> None:
    """A live view: per service and backend, health, flows and rates (q quits).

    Example: sudo lbnat top
    """
    from lbnat import topterm  # rich loads here only: `lbnat run` starts without it

    try:
        code = topterm.run(admin_socket, interval, once)
    except topterm.TopError as error:
        click.echo(f"lbnat: {error}", err=True)
        raise SystemExit(1) from None
    raise SystemExit(code)


@main.command()
@click.argument("action", type=click.Choice(["add", "remove", "drain"]))
@click.argument("service")
@click.argument("ip")
@click.argument("port")
@click.option("--weight", type=click.IntRange(0, 65535), default=1, show_default=True)
@click.option("--name", default="")
@admin_socket_option
@json_option
def backend(action: str, service: str, ip: str, port: str, weight: int, name: str,
            admin_socket: str, as_json: bool) -> None:  # fmt: skip
    """Add, remove or drain a backend of a running lbnat.

    Example: sudo lbnat backend drain chat 198.18.0.22 9000
    """
    message: dict[str, object] = {
        "op": f"backend_{action}",
        "service": service,
        "ip": checked(config_module.parse_backend_ip, ip),
        "port": checked(config_module.parse_port, port, "backend port"),
    }
    if action == "add":
        message["weight"] = weight
        if name:
            message["name"] = name
    reply = talk(admin_socket, message)
    if as_json:
        click.echo(json.dumps(reply, indent=2))
    else:
        click.echo(
            f"{action}: {reply.get('backend')} in service {reply.get('service')}: "
            f"{reply.get('state')}"
        )


@main.command("ha-role")
@click.argument("role", type=click.Choice(HA_ROLES, case_sensitive=False))
@admin_socket_option
def ha_role(role: str, admin_socket: str) -> None:
    """Tell a running lbnat its VRRP role (keepalived's notify script runs `lbnat-ha role`,
    the same on the standard library alone).

    A master ignores its peer's rows; a node that becomes backup asks the master for its flows
    again.

    Example: lbnat ha-role MASTER
    """
    try:
        reply = hatool.tell_role(admin_socket, role)
    except hatool.HaError as error:
        click.echo(f"lbnat: {error}", err=True)
        raise SystemExit(1) from None
    ready = "ready" if reply.get("ready") else "not ready"
    click.echo(f"ha-role: {reply.get('role')} (sync {ready})")


@main.command("ha-check")
@admin_socket_option
def ha_check(admin_socket: str) -> None:
    """Exit 0 when lbnat runs and holds its peer's flows (keepalived's vrrp_script runs
    `lbnat-ha check`, the same on the standard library alone).

    A node that has just started, or come back, is ready once its first resync from the peer
    is complete (or the peer stayed silent for 3 s): until then it should not take the VIP.

    Example: lbnat ha-check || echo not ready
    """
    try:
        problem = hatool.check(admin_socket)
    except hatool.HaError as error:
        problem = str(error)
    if problem:
        click.echo(f"lbnat: {problem}", err=True)
        raise SystemExit(1)


@main.command("bgp-status")
@admin_socket_option
@json_option
def bgp_status(admin_socket: str, as_json: bool) -> None:
    """Whether a running lbnat wants its VIP announced to the router, and why (what lbnat-bgp,
    the ExaBGP process, asks every half second; docs/scale-out.md). Exits 1 when withdrawn.

    Example: lbnat bgp-status
    """
    reply = talk(admin_socket, {"op": "bgp_status"})
    if as_json:
        click.echo(json.dumps(reply, indent=2))
    else:
        verb = "announce" if reply.get("announce") else "withdraw"
        click.echo(f"{verb} {reply.get('vip')}/32: {reply.get('why')} ({reply.get('phase')})")
    if not reply.get("announce"):
        raise SystemExit(1)


@main.command("drain-node")
@admin_socket_option
def drain_node(admin_socket: str) -> None:
    """Take this instance out of the ECMP group without breaking a flow: withdraw the VIP,
    serve the open flows until they end (at most the drain timeout), then stop
    (docs/scale-out.md).

    Example: sudo lbnat drain-node
    """
    reply = talk(admin_socket, {"op": "drain_node"})
    click.echo(f"drain-node: {reply.get('phase')}; {reply.get('flows')} flows open, lbnat stops "
               f"when they have ended (at most {reply.get('timeout')} s)")  # fmt: skip


@main.command()
@admin_socket_option
def reload(admin_socket: str) -> None:
    """Re-read the config file of a running lbnat (as kill -HUP does), keeping every session.

    Example: sudo lbnat reload
    """
    talk(admin_socket, {"op": "reload"})
    click.echo("reload: applied")


if __name__ == "__main__":
    main()
