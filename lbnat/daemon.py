"""Wiring: the packet loop, the engine, the kernel guard, the backend registry, the health
thread, the control channel, the admin socket, signals and logs.

Thread model (docs/architecture.md, "Threads and why"):
- the main thread runs the packet loop and owns the engine and its session table;
- the health thread probes backends; the registration and admin servers answer requests; all
  three change backends only through the registry (one lock) and hand the resulting snapshot to
  the loop's command queue; questions about the table (status, sessions) run on the loop too;
- signal handlers only ask: stop (SIGINT, SIGTERM), dump the table (SIGUSR1), reload (SIGHUP);
  cleanup (nftables table, reserved ports, sockets) runs on the main thread on the way out.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from types import FrameType
from typing import Any, TextIO, TypeVar

from lbnat.backends import Backend, BackendKey, Health
from lbnat.config import Config, ConfigError, ServiceConfig
from lbnat.control.protocol import Authenticator, Request, ack, nack
from lbnat.control.server import AdminServer, RegistrationServer, serve_in_thread
from lbnat.dataplane.guard import GuardError, KernelGuard
from lbnat.dataplane.link import Link, LinkError, Neighbours, find_link
from lbnat.dataplane.loop import PacketLoop
from lbnat.dataplane.packet_socket import attach_filter, build_filter, open_packet_socket
from lbnat.engine import Engine, Event, FlowEnded, FlowOpened, NoBackend
from lbnat.health import HealthCheck, HealthChecker, make_probe, probe_kind
from lbnat.health.checker import Report
from lbnat.registry import Registry, RegistryError

T = TypeVar("T")


class StartError(Exception):
    """lbnat cannot start; the message is for the user, exit code 2."""


class Log:
    """The original's lines in text mode; one JSON object per line with --log-format json."""

    def __init__(self, out: TextIO, fmt: str = "text", quiet: bool = False) -> None:
        self.out = out
        self.json = fmt == "json"
        self.quiet = quiet
        self._lock = threading.Lock()  # several threads log

    def __call__(self, text: str, event: str, verbose: bool = False, **fields: object) -> None:
        if verbose and self.quiet:
            return
        if self.json:
            line = json.dumps({"event": event, "message": text.strip(), **fields})
        else:
            line = text
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


def health_check(config: ServiceConfig) -> HealthCheck | None:
    if config.health is None:
        return None
    return HealthCheck(config.health, make_probe(config.probe, config.service.proto))


class Daemon:
    def __init__(
        self,
        config: Config,
        out: TextIO = sys.stdout,
        reload_config: Callable[[], Config] | None = None,
    ) -> None:
        if config.lb_ip is None:
            raise StartError("no SRCIP: give it on the command line or as lb_ip in the config")
        self.config = config
        self.lb_ip: str = config.lb_ip
        self.reload_config = reload_config
        self.log = Log(out, config.log_format, config.quiet)
        self.engine: Engine | None = None
        self.loop: PacketLoop | None = None
        self.guard: KernelGuard | None = None
        self.health: HealthChecker | None = None
        self.link: Link | None = None
        self.started = time.monotonic()
        self._sock: socket.socket | None = None
        self._neighbours: Neighbours | None = None
        self._servers: list[RegistrationServer | AdminServer] = []
        self._lock = threading.Lock()  # the registry, service configs and probe reports
        self.registry = Registry(drain_timeout=config.drain_timeout)
        self.services: dict[str, ServiceConfig] = {}
        self._last_probe: dict[tuple[str, BackendKey], tuple[str, float]] = {}
        for service in config.services:
            self._define(service)

    def _define(self, service: ServiceConfig) -> None:
        name = service.service.name
        self.services[name] = service
        self.registry.set_service(name, service.service.backends, probed=service.health is not None)

    # --- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to the first packet. On any failure, undo what was done."""
        c = self.config
        if os.geteuid() != 0:
            raise StartError(
                "lbnat must run as root (it opens a packet socket and installs nftables rules)"
            )
        if not c.services:
            raise StartError(
                "no service: give backends on the command line or services in the config"
            )
        try:
            self.link = find_link(self.lb_ip, c.interface)
        except LinkError as error:
            raise StartError(str(error)) from None
        for service in self.services.values():
            check_port_free(self.lb_ip, service.service.port, service.service.proto)
        try:
            specs = [
                replace(s.service, backends=self.registry.snapshot(name))
                for name, s in self.services.items()
            ]
            self.engine = Engine(self.lb_ip, specs, c.nat_ports, c.timeouts, c.table_cap)
            checks = {
                name: check for name, s in self.services.items() if (check := health_check(s))
            }
        except ValueError as error:
            raise StartError(str(error)) from None
        self.guard = self._guard()
        try:
            self.guard.install()
            self._sock = open_packet_socket(self.link.interface, self._filter())
            self._neighbours = Neighbours(self.link)
            self._start_servers()
        except (GuardError, OSError) as error:
            self.close()
            raise StartError(str(error)) from None
        self.loop = PacketLoop(
            self.engine, self._sock, self._neighbours, self._on_events, on_tick=self._maintain
        )
        self.log(f"srcIP : {self.lb_ip}", "start", interface=self.link.interface)
        for name, service in self.services.items():
            for b in service.service.backends:
                self.log(f"server {name} : {b.ip}:{b.port}", "backend", verbose=True, service=name)
        self.health = HealthChecker(checks, self.current_backends, self._publish, self._report)
        self.health.start()

    def _ports(self, proto: str) -> list[int]:
        return [s.service.port for s in self.services.values() if s.service.proto == proto]

    def _guard(self) -> KernelGuard:
        return KernelGuard(
            self.lb_ip, self._ports("tcp"), self._ports("udp"), self.config.nat_ports
        )

    def _filter(self) -> bytes:
        assert self.link is not None
        return build_filter(
            self.link.ip_int, self._ports("tcp"), self._ports("udp"), self.config.nat_ports
        )

    def _start_servers(self) -> None:
        control = self.config.control
        if control is not None:
            if control.secret is None and not ipaddress.IPv4Address(control.host).is_loopback:
                raise OSError(
                    f"the control channel on {control.host} needs a secret; without one it "
                    "listens on loopback only"
                )
            auth = Authenticator(control.secret, control.window, control.allow)
            server = RegistrationServer(control.host, control.port, auth, self.apply, self._refused)
            self._servers.append(server)
            serve_in_thread(server, "lbnat-control")
        if self.config.admin_socket:
            admin = AdminServer(self.config.admin_socket, self.apply, self._refused)
            self._servers.append(admin)
            serve_in_thread(admin, "lbnat-admin")

    def run(self) -> int:
        """Start, forward until SIGINT/SIGTERM, clean up. Returns the exit code."""
        self.start()
        assert self.loop is not None
        handlers: dict[signal.Signals, Callable[[int, FrameType | None], None]] = {
            signal.SIGINT: self._on_stop_signal,
            signal.SIGTERM: self._on_stop_signal,
            signal.SIGUSR1: self._on_dump_signal,
            signal.SIGHUP: self._on_reload_signal,
        }
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            self.loop.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()
            self.log("lbnat stopped", "stop")
        return 0

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.loop is not None:
            self.loop.stop()

    def _on_dump_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.loop is not None:
            self.loop.submit(self.dump_table)

    def _on_reload_signal(self, signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=self.reload, name="lbnat-reload", daemon=True).start()

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []
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

    # --- the loop's thread -------------------------------------------------------------------

    def on_loop(self, question: Callable[[Engine], T], timeout: float = 5.0) -> T:
        """Run `question` on the packet loop's thread (it owns the engine) and wait for it."""
        loop = self.loop
        if loop is None:
            raise RuntimeError("lbnat is not running")
        done = threading.Event()
        box: list[Any] = []

        def command(engine: Engine) -> None:
            try:
                box.append((True, question(engine)))
            except Exception as error:  # handed to the asking thread
                box.append((False, error))
            finally:
                done.set()

        loop.submit(command)
        if not done.wait(timeout):
            raise TimeoutError("the packet loop did not answer in time")
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def _push(self, service: str) -> None:
        """Hand the service's current snapshot to the loop. Called with the lock held, so
        snapshots reach the loop in the order they were made."""
        snapshot = self.registry.snapshot(service)
        if self.loop is not None:
            self.loop.submit(lambda engine: engine.set_backends(service, snapshot))

    def _maintain(self, engine: Engine, now: float) -> None:
        """Every tick, on the loop: remove drained backends whose last flow has ended."""
        with self._lock:
            if not self.registry.any_draining:
                return
            removed = self.registry.sweep(now, engine.active_flows)
            for service in {name for name, _ in removed}:
                engine.set_backends(service, self.registry.snapshot(service))
        for service, entry in removed:
            b = entry.backend
            self.log(
                f"backend {b.ip}:{b.port} removed from service {service} (drained)",
                "backend_removed",
                service=service,
                backend=f"{b.ip}:{b.port}",
            )

    # --- backends and health -----------------------------------------------------------------

    def current_backends(self) -> Mapping[str, Sequence[Backend]]:
        with self._lock:
            return {name: self.registry.snapshot(name) for name in self.registry.services()}

    def _publish(self, service: str, snapshot: tuple[Backend, ...]) -> None:
        with self._lock:
            for backend in snapshot:
                self.registry.set_health(service, backend.key, backend.health)
            self._push(service)

    def _report(self, report: Report) -> None:
        backend = report.backend
        with self._lock:
            self._last_probe[(report.service, backend.key)] = (
                report.result.detail,
                time.monotonic(),
            )
            on_dead = (
                self.services[report.service].on_dead if report.service in self.services else "keep"
            )
        if report.changed and report.health is Health.DEAD and on_dead == "reset":
            self._submit_reset(report.service, backend.key)
        if self.config.log_transitions and not report.changed:
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

    # --- requests from the control channel and the admin socket ------------------------------

    def _refused(self, peer: str, reason: str) -> None:
        self.log(
            f"control : refused a request from {peer}: {reason}",
            "control_refused",
            peer=peer,
            reason=reason,
        )

    def apply(self, request: Request, peer: str) -> bytes:
        """One request, one reply line. Runs on a server thread."""
        try:
            if request.op in (
                "register",
                "backend_add",
                "unregister",
                "backend_drain",
                "backend_remove",
            ):
                return self._change_backend(request, peer)
            if request.op == "status":
                return ack(op="status", **self.on_loop(self.status))
            if request.op == "sessions":
                return ack(op="sessions", sessions=self.on_loop(self.sessions))
            if request.op == "reload":
                error = self.reload()
                return nack(error) if error else ack(op="reload")
        except (RegistryError, ValueError, TimeoutError, RuntimeError) as error:
            self._refused(peer, str(error))
            return nack(str(error))
        return nack(f"unknown op {request.op!r}")

    def _change_backend(self, request: Request, peer: str) -> bytes:
        assert request.service is not None and request.ip is not None and request.port is not None
        service, key = request.service, (request.ip, request.port)
        now = time.monotonic()
        with self._lock:
            if request.op in ("register", "backend_add"):
                backend = Backend(request.ip, request.port, request.weight, request.name)
                origin = "registered" if request.op == "register" else "admin"
                entry = self.registry.add(service, backend, origin)
                state = "alive" if entry.health is Health.ALIVE else "waiting for a good probe"
                verb = "joins"
            elif request.op == "backend_remove":
                self.registry.remove(service, key)
                state, verb = "removed", "is removed from"
            else:  # unregister, backend_drain
                self.registry.drain(service, key, now)
                state, verb = "draining", "drains from"
            self._push(service)
        self.log(
            f"{request.op} : backend {request.ip}:{request.port} {verb} service {service} "
            f"(from {peer})",
            request.op,
            service=service,
            backend=f"{request.ip}:{request.port}",
            peer=peer,
        )
        return ack(
            op=request.op, service=service, backend=f"{request.ip}:{request.port}", state=state
        )

    def status(self, engine: Engine) -> dict[str, object]:
        """Services, backends with state and counters. Runs on the loop's thread."""
        now = time.monotonic()
        services = []
        with self._lock:
            for name, config in self.services.items():
                state = engine.services[name]
                backends = []
                for entry in self.registry.entries(name):
                    b = entry.backend
                    pool = engine.pool_of(name, b.key)
                    detail, at = self._last_probe.get((name, b.key), ("", now))
                    backends.append(
                        {
                            "ip": b.ip,
                            "port": b.port,
                            "name": b.name,
                            "weight": b.weight,
                            "health": entry.health.value,
                            "draining": entry.draining,
                            "origin": entry.origin,
                            "active": engine.active_flows(name, b.key),
                            "flows": 0 if pool is None else pool.flows,
                            "packets": 0 if pool is None else pool.packets,
                            "bytes": 0 if pool is None else pool.bytes,
                            "last_probe": detail,
                            "last_probe_age": round(now - at, 1) if detail else None,
                        }
                    )
                services.append(
                    {
                        "name": name,
                        "proto": config.service.proto,
                        "port": config.service.port,
                        "scheduler": state.spec.scheduler,
                        "health_check": probe_kind(config.probe, config.service.proto)
                        if config.health
                        else "off",
                        "flows": state.flows,
                        "packets": state.packets,
                        "bytes": state.bytes,
                        "drops": {reason.label: n for reason, n in state.drops.items()},
                        "backends": backends,
                    }
                )
        return {
            "lb_ip": self.lb_ip,
            "uptime": round(now - self.started, 1),
            "rows": len(engine.table),
            "open_flows": engine.open_flows,
            "drops": {reason.label: n for reason, n in engine.drops.items()},
            "services": services,
        }

    @staticmethod
    def sessions(engine: Engine) -> list[dict[str, object]]:
        now = time.monotonic()
        rows = []
        for row in engine.table:
            ip, port = row.client
            backend = row.backend
            rows.append(
                {
                    "service": row.service.name,
                    "proto": row.service.spec.proto,
                    "client": f"{ip}:{port}",
                    "backend": f"{backend.ip}:{backend.port}",
                    "nat_port": row.nat_port,
                    "state": row.state.name,
                    "age": round(max(0.0, now - row.created), 0),
                }
            )
        return rows

    def dump_table(self, engine: Engine) -> None:
        """`kill -USR1`: the NAT table into the log (runs on the packet loop's thread)."""
        table = engine.table
        self.log(
            f"NAT table : {len(table)} rows, {table.open_flows} open",
            "table",
            rows=len(table),
            open=table.open_flows,
        )
        for row in self.sessions(engine):
            self.log(
                f"  {row['proto']} client {row['client']} <-> server {row['backend']} "
                f"NAT port {row['nat_port']} {row['state']} age {row['age']:.1f}s",
                "session",
                client=row["client"],
                backend=row["backend"],
                nat_port=row["nat_port"],
                state=row["state"],
            )

    # --- reload ------------------------------------------------------------------------------

    def reload(self) -> str | None:
        """Re-read the config and apply it without losing a session. Returns the error (the
        running config stays) or None."""
        if self.reload_config is None:
            return self._reload_failed("lbnat was started without a config file")
        try:
            new = self.reload_config()
            return self._apply_config(new)
        except (ConfigError, ValueError, OSError, GuardError) as error:
            return self._reload_failed(str(error))

    def _reload_failed(self, error: str) -> str:
        self.log(
            f"reload : rejected, the running config stays: {error}", "reload_rejected", error=error
        )
        return error

    def _apply_config(self, new: Config) -> str | None:
        old = self.config
        for key in (
            "lb_ip",
            "interface",
            "nat_ports",
            "table_cap",
            "timeouts",
            "control",
            "admin_socket",
        ):
            if getattr(new, key) != getattr(old, key):
                self.log(
                    f"reload : {key} changed; it takes effect at the next start",
                    "reload_note",
                    key=key,
                )
        wanted = {s.service.name: s for s in new.services}
        for name, current in self.services.items():
            if name not in wanted:
                return self._reload_failed(f"removing service {name} needs a restart")
            spec, was = wanted[name].service, current.service
            if (spec.proto, spec.port) != (was.proto, was.port):
                return self._reload_failed(
                    f"changing the protocol or port of service {name} needs a restart"
                )
        added = [s for name, s in wanted.items() if name not in self.services]
        for service in added:
            check_port_free(self.lb_ip, service.service.port, service.service.proto)
        checks = {name: health_check(s) for name, s in wanted.items()}  # may raise ValueError

        with self._lock:
            for service in wanted.values():
                self._define(service)
            specs = [
                replace(wanted[name].service, backends=self.registry.snapshot(name))
                for name in wanted
            ]
        added_names = {s.service.name for s in added}

        def apply(engine: Engine) -> None:
            for spec in specs:
                if spec.name in added_names:
                    engine.add_service(spec)
                else:
                    engine.reconfigure_service(spec)
                    engine.set_backends(spec.name, spec.backends)

        self.on_loop(apply)
        if added and self.guard is not None and self._sock is not None:
            self.guard.tcp_ports, self.guard.udp_ports = self._ports("tcp"), self._ports("udp")
            self.guard.update()
            attach_filter(self._sock, self._filter())
        if self.health is not None:
            self.health.set_checks({name: check for name, check in checks.items() if check})
        self.config = replace(
            new, lb_ip=old.lb_ip, interface=old.interface, nat_ports=old.nat_ports
        )
        self.log(
            f"reload : applied ({len(wanted)} services, {len(added)} new)",
            "reload",
            services=len(wanted),
            added=len(added),
        )
        return None

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
