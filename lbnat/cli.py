"""Command line: `lbnat run ...` and the C++ original's `loadbalancerLobin SRCIP IP PORT ...`.

Every mistake on the command line ends in one line on stderr and exit code 2, with nothing left
behind (the daemon has not touched the host yet when arguments are checked).
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Sequence
from typing import NoReturn

import click

from lbnat.backends import Backend
from lbnat.daemon import Daemon, Settings, StartError
from lbnat.health import PROBE_KINDS, HealthPolicy, ProbeSettings, make_probe
from lbnat.nat import Timeouts
from lbnat.scheduler import SCHEDULERS
from lbnat.service import Service

DEFAULT_VIP_PORT = 20000


def fail(message: str) -> NoReturn:
    click.echo(f"lbnat: {message}", err=True)
    raise SystemExit(2)


def parse_ip(text: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        fail(f"{what} {text!r} is not an IPv4 address")


def parse_port(text: str, what: str) -> int:
    try:
        port = int(text)
    except ValueError:
        fail(f"{what} {text!r} is not a port number")
    if not 0 < port < 65536:
        fail(f"{what} {port} is out of range (1-65535)")
    return port


def parse_backends(words: Sequence[str]) -> tuple[Backend, ...]:
    """IP PORT [IP PORT ...] -> backends, in order."""
    if len(words) % 2:
        fail(f"backends come in IP PORT pairs; got an odd number of words ({len(words)})")
    backends = []
    seen = set()
    for i in range(0, len(words), 2):
        ip = parse_ip(words[i], "backend address")
        port = parse_port(words[i + 1], "backend port")
        if (ip, port) in seen:
            fail(f"backend {ip}:{port} is given twice")
        seen.add((ip, port))
        backends.append(Backend(ip, port))
    return tuple(backends)


def parse_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not sep:
        fail(f"NAT port range {text!r} must look like 61000-65535")
    first = parse_port(low, "NAT port range start")
    last = parse_port(high, "NAT port range end")
    if first > last:
        fail(f"NAT port range {text!r} is empty")
    return first, last


def start(settings: Settings) -> NoReturn:
    daemon = Daemon(settings)
    try:
        code = daemon.run()
    except StartError as error:
        fail(str(error))
    raise SystemExit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lbnat")
def main() -> None:
    """lbnat: a Layer-4 NAT load balancer for Linux (run as root).

    Example: sudo lbnat run 198.18.0.2 198.18.0.21 9000 198.18.0.22 9000 --port 20000
    """


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("srcip")
@click.argument("backends", nargs=-1)
@click.option(
    "--port",
    "vip_port",
    default=str(DEFAULT_VIP_PORT),
    show_default=True,
    help="Virtual port clients connect to.",
)
@click.option("--proto", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True)
@click.option("--interface", default=None, help="Interface holding SRCIP (found automatically).")
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
@click.option("--log-transitions", is_flag=True, help="Health lines only when a state changes.")
@click.option(
    "--time-wait",
    type=click.FloatRange(min=0),
    default=120.0,
    show_default=True,
    help="TIME_WAIT linger in seconds.",
)
@click.option("--quiet", is_flag=True, help="No per-flow and per-probe lines.")
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
def run(
    srcip: str,
    backends: tuple[str, ...],
    vip_port: str,
    proto: str,
    interface: str | None,
    scheduler: str,
    nat_ports: str,
    table_cap: int,
    affinity: float,
    health_interval: float,
    health_timeout: float,
    fall: int,
    rise: int,
    no_health: bool,
    health_check: str | None,
    probe_send: str,
    probe_expect: str | None,
    http_path: str,
    http_status: int,
    on_dead: str,
    log_transitions: bool,
    time_wait: float,
    quiet: bool,
    log_format: str,
) -> None:
    """Balance SRCIP:PORT over the backends IP PORT [IP PORT ...].

    Example: sudo lbnat run 198.18.0.2 198.18.0.21 9000 198.18.0.22 9000
    """
    lb_ip = parse_ip(srcip, "SRCIP")
    port = parse_port(vip_port, "virtual port")
    parsed = parse_backends(backends)
    if not parsed:
        fail("give at least one backend: IP PORT [IP PORT ...]")
    first, last = parse_range(nat_ports)
    if first <= port <= last:
        fail(f"virtual port {port} is inside the NAT port range {first}-{last}")
    probe = ProbeSettings(health_check, probe_send, probe_expect, http_path, http_status)
    try:
        health = None if no_health else HealthPolicy(health_interval, health_timeout, fall, rise)
        service = Service(f"{proto}:{port}", proto, port, scheduler, affinity, parsed)
        if health is not None:
            make_probe(probe, proto)  # a kind that does not fit the protocol, a bad pattern
    except ValueError as error:
        fail(str(error))
    settings = Settings(
        lb_ip=lb_ip,
        services=[service],
        interface=interface,
        nat_ports=(first, last),
        timeouts=Timeouts(time_wait=time_wait),
        table_cap=table_cap,
        health=health,
        probe=probe,
        on_dead=on_dead,
        log_transitions=log_transitions,
        quiet=quiet,
        log_format=log_format,
    )
    start(settings)


def lobin_main(argv: Sequence[str] | None = None) -> NoReturn:
    """loadbalancerLobin SRCIP IP PORT [IP PORT ...]: the C++ original's arguments, port 20000."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        click.echo(
            "usage: sudo loadbalancerLobin SRCIP IP PORT [IP PORT ...]   (virtual port 20000)"
        )
        raise SystemExit(0 if args else 2)
    lb_ip = parse_ip(args[0], "SRCIP")
    backends = parse_backends(args[1:])
    if not backends:
        fail("give at least one backend: SRCIP IP PORT [IP PORT ...]")
    service = Service(f"tcp:{DEFAULT_VIP_PORT}", "tcp", DEFAULT_VIP_PORT, backends=backends)
    start(Settings(lb_ip=lb_ip, services=[service]))


if __name__ == "__main__":
    main()
