"""Wiring: the packet loop, the engine, the kernel guard, the backend registry, the health
thread, the control channel, the admin socket, signals and logs.

Thread and process model (docs/architecture.md, "Threads, processes and why"):
- the data plane is one packet loop on the main thread (`--workers 1`) or N worker processes
  that the main thread supervises (lbnat.dataplane.workers); each loop owns its engine and
  its slice of the session table;
- the health thread probes backends; the registration and admin servers answer requests; all
  three change backends only through the registry (one lock) and hand the resulting snapshot to
  the data plane as a change; questions about the table (status, sessions) are answered by
  every engine and merged here (lbnat.views);
- signal handlers only ask: stop (SIGINT, SIGTERM), dump the table (SIGUSR1), reload (SIGHUP);
  cleanup (workers, nftables table, reserved ports, sockets) runs on the main thread on the way
  out.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from types import FrameType
from typing import Any, TextIO, TypeVar

from lbnat import privileges
from lbnat.backends import Backend, BackendKey, Health
from lbnat.config import Config, ConfigError, ServiceConfig
from lbnat.control.protocol import Authenticator, Request, ack, nack
from lbnat.control.server import AdminServer, RegistrationServer, serve_in_thread
from lbnat.dataplane.fanout import nat_slices
from lbnat.dataplane.guard import GuardError, KernelGuard
from lbnat.dataplane.link import Link, LinkError, find_link
from lbnat.dataplane.packet_socket import build_filter
from lbnat.dataplane.rings import RingSpec
from lbnat.dataplane.workers import (
    InlinePlane,
    SharedCursors,
    WorkerError,
    WorkerPool,
    WorkerSetup,
    build_loop,
    open_worker_sockets,
)
from lbnat.engine import Engine, Event, FlowEnded, FlowOpened, NoBackend
from lbnat.health import HealthCheck, HealthChecker, make_probe, probe_kind
from lbnat.health.checker import Report
from lbnat.nat import ENDED
from lbnat.registry import Registry, RegistryError
from lbnat.views import merge_counters

T = TypeVar("T")
ENDED_NAMES = frozenset(state.name for state in ENDED)


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
        self.plane: InlinePlane | WorkerPool | None = None
        self.guard: KernelGuard | None = None
        self.health: HealthChecker | None = None
        self.link: Link | None = None
        self.started = time.monotonic()
        self._open_flows: list[int] = []  # per worker, from its last FlowEnded
        self._slots: dict[str, int] = {}  # service -> its round-robin cursor in SharedCursors
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
        self._slots.setdefault(name, len(self._slots))
        self.registry.set_service(name, service.service.backends, probed=service.health is not None)

    # --- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to the first packet. On any failure, undo what was done."""
        c = self.config
        rings = self._rings()
        if lacking := privileges.missing_here():
            raise StartError(
                f"lbnat needs {' and '.join(privileges.REQUIRED)} (a packet socket and an "
                f"nftables table); this process lacks {', '.join(lacking)}: run it as root "
                "or with those capabilities (see scripts/systemd/lbnat.service)"
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
            engine = Engine(self.lb_ip, specs, c.nat_ports, c.timeouts, c.table_cap)
            slices = nat_slices(c.nat_ports, c.workers)
            checks = {
                name: check for name, s in self.services.items() if (check := health_check(s))
            }
        except ValueError as error:
            raise StartError(str(error)) from None
        self.guard = self._guard()
        try:
            self.guard.install()
            socks = open_worker_sockets(
                self.link, self._filter(), c.nat_ports, c.workers, c.io, rings
            )
            self._open_flows = [0] * c.workers
            if c.workers == 1:
                try:
                    loop = build_loop(engine, socks[0], self.link, c.io, rings, self._inline_events)
                except BaseException:
                    socks[0].close()
                    raise
                self.plane = InlinePlane(loop, socks[0])
            else:
                self.plane = WorkerPool(
                    socks,
                    lambda index: self._setup(index, slices[index]),
                    self._on_events,
                    self.log,
                    SharedCursors(),
                )
                self.plane.start()
            self._start_servers()
        except (GuardError, OSError, WorkerError) as error:
            self.close()
            raise StartError(str(error)) from None
        self.log(
            f"srcIP : {self.lb_ip}",
            "start",
            interface=self.link.interface,
            workers=c.workers,
            io=c.io if c.io == "socket" else f"rings ({c.rx_ring})",
        )
        if c.workers > 1 or c.io != "rings":
            self.log(
                f"data plane : {c.workers} worker{'s' if c.workers > 1 else ''}, "
                f"{'mmap rings' if c.io == 'rings' else 'one syscall per packet'}",
                "dataplane",
                verbose=True,
            )
        for name, service in self.services.items():
            for b in service.service.backends:
                self.log(f"server {name} : {b.ip}:{b.port}", "backend", verbose=True, service=name)
        self.health = HealthChecker(checks, self.current_backends, self._publish, self._report)
        self.health.start()

    def _setup(self, index: int, nat_ports: tuple[int, int]) -> WorkerSetup:
        """What worker `index` starts with (also when it is restarted: the backends as now)."""
        c = self.config
        assert self.link is not None
        with self._lock:
            specs = tuple(
                replace(s.service, backends=self.registry.snapshot(name))
                for name, s in self.services.items()
            )
            slots = dict(self._slots)
        return WorkerSetup(
            index=index,
            lb_ip=self.lb_ip,
            link=self.link,
            specs=specs,
            nat_ports=nat_ports,
            timeouts=c.timeouts,
            table_cap=max(1, c.table_cap // c.workers),
            io=c.io,
            rings=self._rings(),
            flow_events=not c.quiet,
            cursor_slots=slots,
        )

    def _rings(self) -> RingSpec:
        return RingSpec(rx="blocks" if self.config.rx_ring == "blocks" else "frames")

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
        assert self.plane is not None
        handlers: dict[signal.Signals, Callable[[int, FrameType | None], None]] = {
            signal.SIGINT: self._on_stop_signal,
            signal.SIGTERM: self._on_stop_signal,
            signal.SIGUSR1: self._on_dump_signal,
            signal.SIGHUP: self._on_reload_signal,
        }
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            self.plane.run(self._maintain)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()
            self.log("lbnat stopped", "stop")
        return 0

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.plane is not None:
            self.plane.stop()

    def _on_dump_signal(self, signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=self.dump_table, name="lbnat-dump", daemon=True).start()

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
        if self.plane is not None:
            self.plane.close()
            self.plane = None
        if self.guard is not None:
            self.guard.remove()
            self.guard = None

    # --- the data plane ------------------------------------------------------------------------

    def ask(self, question: tuple[Any, ...], timeout: float = 5.0) -> list[Any]:
        """Every engine's answer to `question` (lbnat.views.answer), one per live worker."""
        plane = self.plane
        if plane is None:
            raise RuntimeError("lbnat is not running")
        return plane.ask(question, timeout)

    def _push(self, service: str) -> None:
        """Hand the service's current snapshot to the data plane. Called with the lock held,
        so snapshots reach every worker in the order they were made."""
        snapshot = self.registry.snapshot(service)
        if self.plane is not None:
            self.plane.change(("backends", service, snapshot))

    def _maintain(self, now: float) -> None:
        """Upkeep between batches (one worker) or by the supervisor (N workers): remove drained
        backends whose last flow has ended in every worker."""
        with self._lock:
            if not self.registry.any_draining:
                return
            keys = tuple(
                (name, entry.backend.key)
                for name in self.registry.services()
                for entry in self.registry.entries(name)
                if entry.draining
            )
        active: Counter[tuple[str, BackendKey]] = Counter()
        try:
            for answer in self.ask(("active", keys)):
                active.update(answer)
        except (TimeoutError, RuntimeError):
            return  # asked again at the next upkeep
        with self._lock:
            removed = self.registry.sweep(now, lambda name, key: active[name, key])
            for service in {name for name, _ in removed}:
                self._push(service)
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
        """--on-dead reset: every worker ends the dead backend's flows it owns with RSTs."""
        if self.plane is not None:
            self.plane.change(("reset", service, backend))

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
                return ack(op="status", **self.status())
            if request.op == "sessions":
                return ack(op="sessions", sessions=self.sessions())
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

    def status(self) -> dict[str, object]:
        """Services, backends with state, and counters summed over every worker."""
        assert self.plane is not None
        counters = merge_counters(self.ask(("counters",)))
        now = time.monotonic()
        services = []
        with self._lock:
            for name, config in self.services.items():
                counted = counters["services"].get(name, {})
                per_backend = counted.get("backends", {})
                backends = []
                for entry in self.registry.entries(name):
                    b = entry.backend
                    count = per_backend.get(b.key, {})
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
                            "active": count.get("active", 0),
                            "flows": count.get("flows", 0),
                            "packets": count.get("packets", 0),
                            "bytes": count.get("bytes", 0),
                            "last_probe": detail,
                            "last_probe_age": round(now - at, 1) if detail else None,
                        }
                    )
                services.append(
                    {
                        "name": name,
                        "proto": config.service.proto,
                        "port": config.service.port,
                        "scheduler": config.service.scheduler,
                        "health_check": probe_kind(config.probe, config.service.proto)
                        if config.health
                        else "off",
                        "flows": counted.get("flows", 0),
                        "packets": counted.get("packets", 0),
                        "bytes": counted.get("bytes", 0),
                        "drops": counted.get("drops", {}),
                        "backends": backends,
                    }
                )
        c = self.config
        return {
            "lb_ip": self.lb_ip,
            "uptime": round(now - self.started, 1),
            "workers": self.plane.info(),
            "io": c.io if c.io == "socket" else f"rings ({c.rx_ring})",
            "rows": counters["rows"],
            "open_flows": counters["open_flows"],
            "drops": counters["drops"],
            "services": services,
        }

    def sessions(self) -> list[dict[str, object]]:
        """Every worker's rows, each marked with its worker."""
        rows: list[dict[str, object]] = []
        for worker, answer in enumerate(self.ask(("sessions",))):
            rows.extend({**row, "worker": worker} for row in answer)
        return rows

    def dump_table(self) -> None:
        """`kill -USR1`: the NAT table into the log (on a thread of its own)."""
        try:
            rows = self.sessions()
        except (TimeoutError, RuntimeError) as error:
            self.log(f"NAT table : not available ({error})", "table_error", error=str(error))
            return
        open_rows = sum(1 for row in rows if row["state"] not in ENDED_NAMES)
        self.log(
            f"NAT table : {len(rows)} rows, {open_rows} open",
            "table",
            rows=len(rows),
            open=open_rows,
        )
        for row in rows:
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

        assert self.plane is not None
        with self._lock:
            slots = dict(self._slots)
        self.plane.change(("services", tuple(specs), added_names, slots))
        if added and self.guard is not None:
            self.guard.tcp_ports, self.guard.udp_ports = self._ports("tcp"), self._ports("udp")
            self.guard.update()
            self.plane.set_filter(self._filter())
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

    def _inline_events(self, events: list[Event]) -> None:
        self._on_events(0, events)

    def _on_events(self, worker: int, events: list[Event]) -> None:
        """Events from worker `worker` (on its reader thread, or on the loop with one worker)."""
        for event in events:
            if isinstance(event, FlowEnded):
                self._open_flows[worker] = event.open_flows
                total = sum(self._open_flows)
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
                    f"Current NAT table length : {total}",
                    "table_length",
                    verbose=True,
                    length=total,
                )
            elif isinstance(event, FlowOpened):
                self._open_flows[worker] = event.open_flows
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
