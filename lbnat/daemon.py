"""Wiring: the packet loop, the engine, the kernel guard, the health thread, signals and logs.

Thread model (docs/architecture.md, "Threads and why"):
- the main thread runs the packet loop and owns the engine and its session table;
- the health thread probes backends and publishes snapshots through the loop's command queue;
- signal handlers only ask the loop to stop; cleanup (nftables table, reserved ports, socket)
  runs on the main thread on the way out, whatever the reason.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TextIO

from lbnat.backends import Backend, BackendKey, Health
from lbnat.dataplane.guard import GuardError, KernelGuard
from lbnat.dataplane.link import Link, LinkError, Neighbours, find_link
from lbnat.dataplane.loop import PacketLoop
from lbnat.dataplane.packet_socket import build_filter, open_packet_socket
from lbnat.engine import Engine, Event, FlowEnded, FlowOpened, NoBackend
from lbnat.health import HealthCheck, HealthChecker, HealthPolicy, ProbeSettings, make_probe
from lbnat.health.checker import Report
from lbnat.nat import Timeouts
from lbnat.service import Service


class StartError(Exception):
    """lbnat cannot start; the message is for the user, exit code 2."""


@dataclass
class Settings:
    lb_ip: str
    services: list[Service]
    interface: str | None = None
    nat_ports: tuple[int, int] = (61000, 65535)
    timeouts: Timeouts = field(default_factory=Timeouts)
    table_cap: int = 1_000_000
    health: HealthPolicy | None = field(default_factory=HealthPolicy)  # None: no probes
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    on_dead: str = "keep"  # or "reset": RST both ends of a dead backend's flows
    log_transitions: bool = False  # health lines only on change (default: every round)
    quiet: bool = False
    log_format: str = "text"  # or "json"


class Log:
    """The original's lines in text mode; one JSON object per line with --log-format json."""

    def __init__(self, out: TextIO, fmt: str = "text", quiet: bool = False) -> None:
        self.out = out
        self.json = fmt == "json"
        self.quiet = quiet
        self._lock = threading.Lock()  # the health thread logs too

    def __call__(self, text: str, event: str, verbose: bool = False, **fields: object) -> None:
        if verbose and self.quiet:
            return
        line = (
            json.dumps({"event": event, "message": text.strip(), **fields}) if self.json else text
        )
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()


def check_port_free(ip: str, port: int, proto: str) -> None:
    """A VIP port another program of this host already listens on cannot be balanced."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind((ip, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise StartError(
                    f"{proto} port {port} on {ip} is already used by another program"
                ) from None
            raise StartError(
                f"cannot check {proto} port {port} on {ip}: {error.strerror}"
            ) from None


def health_checks(settings: Settings) -> dict[str, HealthCheck]:
    """One check per service (its probe fits its protocol); none with --no-health."""
    if settings.health is None:
        return {}
    return {
        service.name: HealthCheck(settings.health, make_probe(settings.probe, service.proto))
        for service in settings.services
    }


class Daemon:
    def __init__(self, settings: Settings, out: TextIO = sys.stdout) -> None:
        self.settings = settings
        self.log = Log(out, settings.log_format, settings.quiet)
        self.engine: Engine | None = None
        self.loop: PacketLoop | None = None
        self.guard: KernelGuard | None = None
        self.health: HealthChecker | None = None
        self.link: Link | None = None
        self._sock: socket.socket | None = None
        self._neighbours: Neighbours | None = None
        self._backends_lock = threading.Lock()
        self._backends: dict[str, tuple[Backend, ...]] = {
            s.name: s.backends for s in settings.services
        }

    # --- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to the first packet. On any failure, undo what was done."""
        s = self.settings
        if os.geteuid() != 0:
            raise StartError(
                "lbnat must run as root (it opens a packet socket and installs nftables rules)"
            )
        try:
            self.link = find_link(s.lb_ip, s.interface)
        except LinkError as error:
            raise StartError(str(error)) from None
        for service in s.services:
            check_port_free(s.lb_ip, service.port, service.proto)
        try:
            self.engine = Engine(s.lb_ip, s.services, s.nat_ports, s.timeouts, s.table_cap)
            checks = health_checks(s)
        except ValueError as error:
            raise StartError(str(error)) from None
        tcp_ports = [sv.port for sv in s.services if sv.proto == "tcp"]
        udp_ports = [sv.port for sv in s.services if sv.proto == "udp"]
        self.guard = KernelGuard(s.lb_ip, tcp_ports, udp_ports, s.nat_ports)
        try:
            self.guard.install()
            program = build_filter(self.link.ip_int, tcp_ports, udp_ports, s.nat_ports)
            self._sock = open_packet_socket(self.link.interface, program)
            self._neighbours = Neighbours(self.link)
        except (GuardError, OSError) as error:
            self.close()
            raise StartError(str(error)) from None
        self.loop = PacketLoop(self.engine, self._sock, self._neighbours, self._on_events)
        self.log(f"srcIP : {s.lb_ip}", "start", interface=self.link.interface)
        for service in s.services:
            for b in service.backends:
                self.log(
                    f"server {service.name} : {b.ip}:{b.port}",
                    "backend",
                    verbose=True,
                    service=service.name,
                )
        if checks:
            self.health = HealthChecker(checks, self.current_backends, self._publish, self._report)
            self.health.start()

    def run(self) -> int:
        """Start, forward until SIGINT/SIGTERM, clean up. Returns the exit code."""
        self.start()
        assert self.loop is not None
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_dump_signal)
        try:
            self.loop.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()
            self.log("lbnat stopped", "stop")
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.loop is not None:
            self.loop.stop()

    def _on_dump_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.loop is not None:
            self.loop.submit(self.dump_table)

    def dump_table(self, engine: Engine) -> None:
        """`kill -USR1`: the NAT table into the log (runs on the packet loop's thread)."""
        table = engine.table
        now = time.monotonic()
        self.log(
            f"NAT table : {len(table)} rows, {table.open_flows} open",
            "table",
            rows=len(table),
            open=table.open_flows,
        )
        for row in table:
            ip, port = row.client
            backend = row.backend
            self.log(
                f"  {row.service.spec.proto} client {ip}:{port} <-> "
                f"server {backend.ip}:{backend.port} NAT port {row.nat_port} "
                f"{row.state.name} age {now - row.created:.1f}s",
                "session",
                client=f"{ip}:{port}",
                backend=f"{backend.ip}:{backend.port}",
                nat_port=row.nat_port,
                state=row.state.name,
            )

    def close(self) -> None:
        if self.health is not None:
            self.health.stop()
            self.health = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._neighbours is not None:
            self._neighbours.close()
            self._neighbours = None
        if self.guard is not None:
            self.guard.remove()
            self.guard = None

    # --- backends and health -----------------------------------------------------------------

    def current_backends(self) -> Mapping[str, Sequence[Backend]]:
        with self._backends_lock:
            return dict(self._backends)

    def _publish(self, service: str, snapshot: tuple[Backend, ...]) -> None:
        with self._backends_lock:
            self._backends[service] = snapshot
        if self.loop is not None:
            self.loop.submit(lambda engine: engine.set_backends(service, snapshot))

    def _report(self, report: Report) -> None:
        backend = report.backend
        if report.changed and report.health is Health.DEAD and self.settings.on_dead == "reset":
            self._submit_reset(report.service, backend.key)
        if self.settings.log_transitions and not report.changed:
            return
        self.log(
            f"IP : {backend.ip}, Port : {backend.port} Server is {report.health.value}",
            "health",
            verbose=not report.changed,
            service=report.service,
            backend=f"{backend.ip}:{backend.port}",
            health=report.health.value,
            changed=report.changed,
            probe=report.result.detail,
        )

    def _submit_reset(self, service: str, backend: BackendKey) -> None:
        """--on-dead reset: on the loop's thread, end the dead backend's flows with RSTs."""
        loop = self.loop
        if loop is None:
            return

        def reset(engine: Engine) -> None:
            now = time.monotonic()
            for packet, destination in engine.reset_flows(service, backend, now):
                loop.send_packet(packet, destination, now)

        loop.submit(reset)

    # --- events from the packet loop ---------------------------------------------------------

    def _on_events(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, FlowEnded):
                ip, port = event.client
                self.log(
                    f"\nclient <{ip},{port}> terminated ",
                    "flow_ended",
                    verbose=True,
                    client=f"{ip}:{port}",
                    backend=f"{event.backend[0]}:{event.backend[1]}",
                    reason=event.reason.value,
                )
                self.log(
                    f"Current NAT table length : {event.open_flows}",
                    "table_length",
                    verbose=True,
                    length=event.open_flows,
                )
            elif isinstance(event, FlowOpened):
                ip, port = event.client
                self.log(
                    f"new client <{ip},{port}> -> server {event.backend[0]}:{event.backend[1]} "
                    f"(NAT port {event.nat_port})",
                    "flow_opened",
                    verbose=True,
                    client=f"{ip}:{port}",
                    backend=f"{event.backend[0]}:{event.backend[1]}",
                    nat_port=event.nat_port,
                )
            elif isinstance(event, NoBackend):
                ip, port = event.client
                self.log(
                    f"no backend available for client <{ip},{port}> (service {event.service})",
                    "no_backend",
                    client=f"{ip}:{port}",
                    service=event.service,
                )
