"""The thin daemon: lifecycle and signals. It wires the packet loop, the kernel guard, the
health thread and the control channel to the control plane, holds the one lock the control
plane is called under, and carries out the effects it returns.

Thread and process model (docs/architecture.md, "Threads, processes and why"):
- the data plane is one packet loop on the main thread (`--workers 1`) or N worker processes
  that the main thread supervises (lbnat.dataplane.workers); each loop owns its engine and
  its slice of the session table;
- the health thread probes backends; the registration and admin servers answer requests; all
  three change backends only through the control plane (lbnat.control.plane, under one lock)
  and the resulting snapshot reaches the data plane as a change, still under that lock, so
  snapshots arrive in the order they were made; questions about the table (status, sessions,
  open flows of draining backends) are asked without the lock (the loop's own upkeep takes
  it), answered by every engine and merged (lbnat.views);
- signal handlers only ask: stop (SIGINT, SIGTERM), dump the table (SIGUSR1), reload (SIGHUP);
  cleanup (workers, nftables table, reserved ports, sockets) runs on the main thread on the way
  out;
- systemd hears READY=1 at the main loop's first upkeep, WATCHDOG=1 from its upkeep,
  RELOADING=1 and READY=1 around a reload, STOPPING=1 on the way out (lbnat.sdnotify.Lifecycle).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from types import FrameType
from typing import TextIO

from lbnat import addresses, privileges
from lbnat.backends import Backend
from lbnat.config import Config, ConfigError, ServiceConfig
from lbnat.control.metrics_server import MetricsError, MetricsServer
from lbnat.control.plane import (
    ControlPlane,
    Effect,
    SetHealthChecks,
    UpdateGuard,
)
from lbnat.control.protocol import Request, ack, nack
from lbnat.control.server import AdminServer, RegistrationServer, start_servers
from lbnat.daemon_scaleout import ScaleOut, mesh_misfit
from lbnat.daemon_sync import SyncGlue
from lbnat.dataplane.fanout import nat_slices
from lbnat.dataplane.guard import GuardError, KernelGuard
from lbnat.dataplane.handover import Handover, HandoverError
from lbnat.dataplane.link import (
    Link,
    LinkError,
    LinkProbe,
    find_link,
    link_mtu,
    receive_buffer_max,
)
from lbnat.dataplane.loop import PacketLoop
from lbnat.dataplane.offload import KernelPath, OffloadError, attach_fast_path, start_offload
from lbnat.dataplane.packet_socket import build_filter, build_filter6
from lbnat.dataplane.rings import RingSpec
from lbnat.dataplane.syncnode import SyncNode
from lbnat.dataplane.workers import (
    WorkerError,
    build_loop,
    open_worker_sockets,
    start_plane,
)
from lbnat.engine import Engine, Event, ip_int
from lbnat.eventlog import (
    INFO,
    EventLog,
    Log,
    LogLine,
    link_line,
    reload_rejected_line,
    start_lines,
    threshold,
)
from lbnat.health import HealthChecker
from lbnat.health.checker import Report
from lbnat.linkwatch import LinkState, LinkWatch
from lbnat.messages import (
    DataPlane,
    ResetBackend,
    SetBackends,
    SetServices,
    WorkerSetup,
)
from lbnat.metrics import Instruments, ScrapeCollector
from lbnat.owners import FlowOwners
from lbnat.sdnotify import Lifecycle
from lbnat.service import Service
from lbnat.syncookie import DEFAULT_WSCALE, SECRET_BYTES, SynProxySettings, kernel_wscale

__all__ = [
    "INTERFACE_GONE",
    "Daemon",
    "StartError",
    "check_can_start",
    "check_port_free",
    "forwarding_status",
    "ready_status",
]

IP_FREEBIND = 15  # linux/in.h: bind an address this host does not hold (yet)
INTERFACE_GONE = 1  # exit code: the interface went away under lbnat (systemd restarts it)


class StartError(Exception):
    """lbnat cannot start; the message is for the user, exit code 2."""


def check_port_free(ip: str, port: int, proto: str, ip6: str | None = None) -> None:
    """A VIP port another program of this host already listens on cannot be balanced: on the
    IPv4 VIP (SRCIP or --vip) and on ip6, when given."""
    for address in (ip, ip6) if ip6 else (ip,):
        _check_port_free(address, port, proto)


def check_ports_free(vip: str, ip6: str | None, services: Iterable[ServiceConfig]) -> None:
    """`check_port_free` for every service's port."""
    for spec in services:
        check_port_free(vip, spec.service.port, spec.service.proto, ip6)


def _check_port_free(ip: str, port: int, proto: str) -> None:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, kind) as probe:
        # a pair's VIP may be on the master only (IP_FREEBIND serves IPv6 sockets too)
        probe.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
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


def check_can_start(config: Config) -> None:
    """The capabilities lbnat needs, and something to balance."""
    if lacking := privileges.missing_here():
        raise StartError(
            f"lbnat needs {' and '.join(privileges.REQUIRED)} (a packet socket and an "
            f"nftables table); this process lacks {', '.join(lacking)}: run it as root "
            "or with those capabilities (see scripts/systemd/lbnat.service)"
        )
    if not config.services:
        raise StartError("no service: give backends on the command line or services in the config")


def ring_spec(config: Config) -> RingSpec:
    return RingSpec(rx="blocks" if config.rx_ring == "blocks" else "frames")


def packet_filter(lb_ip: int, control: ControlPlane) -> bytes:
    """The packet sockets' filter: lbnat's address (and VIP), the services' ports and the NAT
    range."""
    tcp, udp = list(control.ports("tcp")), list(control.ports("udp"))
    vip = control.config.vip
    return build_filter(
        lb_ip, tcp, udp, control.config.nat_ports, None if vip is None else ip_int(vip)
    )


def packet_filters(lb_ip: int, control: ControlPlane) -> tuple[bytes, bytes | None]:
    """The IPv4 sockets' filter and the IPv6 ones' (None without --ip6)."""
    return packet_filter(lb_ip, control), packet_filter6(control)


def packet_filter6(control: ControlPlane) -> bytes | None:
    """The IPv6 packet sockets' filter (--ip6): the same services on ip6; None without it."""
    ip6 = control.config.ip6
    if ip6 is None:
        return None
    tcp, udp = list(control.ports("tcp")), list(control.ports("udp"))
    return build_filter6(addresses.parse(ip6), tcp, udp, control.config.nat_ports)


def worker_setup(
    config: Config,
    lb_ip: str,
    link: Link,
    index: int,
    nat_ports: tuple[int, int],
    specs: tuple[Service, ...],
    cursor_slots: dict[str, int],
    syn_proxy: SynProxySettings,
    offload: KernelPath | None = None,
) -> WorkerSetup:
    """What worker `index` starts with: its slice of the NAT ports and of the table cap, and
    the kernel fast path's map (an fd it inherits) when there is one."""
    return WorkerSetup(
        index=index,
        lb_ip=lb_ip,
        vip=config.vip or lb_ip,
        ip6=config.ip6,
        link=link,
        specs=specs,
        nat_ports=nat_ports,
        timeouts=config.timeouts,
        table_cap=max(1, config.table_cap // config.workers),
        io=config.io,
        rings=ring_spec(config),
        flow_events=threshold(config.log_level, config.quiet) <= INFO,
        syn_proxy=syn_proxy,
        cursor_slots=cursor_slots,
        offload_fd=-1 if offload is None else offload.map_fd,
        offload6_fd=-1 if offload is None else offload.map6_fd,
        ifindex=0 if offload is None else offload.ifindex,
        sync=config.sync is not None,
        sync_mode="pair" if config.sync is None else config.sync.mode,
    )


def inline_loop(
    engine: Engine,
    sock: socket.socket,
    link: Link,
    config: Config,
    on_events: Callable[[list[Event]], None],
    offload: KernelPath | None,
    sock6: socket.socket | None = None,
) -> PacketLoop:
    """The loop of the one-worker data plane (on the main thread), given the kernel's map
    (and the IPv6 socket with --ip6)."""
    loop = build_loop(engine, sock, link, config.io, ring_spec(config), on_events, sock6=sock6)
    if offload is not None:
        attach_fast_path(engine, offload.map_fd, loop.neighbours, offload.ifindex, offload.map6_fd)
    return loop


START_ERRORS = (GuardError, OSError, WorkerError, OffloadError, MetricsError, HandoverError)


def open_sockets(
    link: Link, control: ControlPlane, rings: RingSpec
) -> tuple[list[socket.socket], list[socket.socket], KernelPath | None, str]:
    """Every worker's packet socket (and, with --ip6, its IPv6 socket: all of them after the
    IPv4 ones, each family in a fanout group of its own), then the kernel fast path (and what
    the start-up line says of it). The sockets first: a tc filter left by a predecessor (a
    hitless restart) is replaced by one with an empty map, and its flows' packets come up from
    then on; queued in the rings, they wait there for their rows to be restored."""
    c = control.config
    program = packet_filter(link.ip_int, control)
    socks = open_worker_sockets(link, program, c.nat_ports, c.workers, c.io, rings)
    socks6: list[socket.socket] = []
    try:
        program6 = packet_filter6(control)
        if program6 is not None:
            socks6 = open_worker_sockets(
                link, program6, c.nat_ports, c.workers, c.io, rings, ipv6=True
            )
        offload, text = start_offload(c.offload, link.interface, link.ip_int, c.table_cap)
    except BaseException:
        for sock in [*socks, *socks6]:
            sock.close()
        raise
    return socks, socks6, offload, text


def syn_proxy_settings(config: Config) -> SynProxySettings:
    """The SYN proxy's settings. The secret is drawn once: every worker, and a worker restarted
    later, checks the cookies of all. The window scale is the one this host's kernel would
    offer: backends with the same defaults pick the same, and their windows then pass without
    rescaling (lbnat.synproxy)."""
    space = receive_buffer_max()
    return SynProxySettings(
        config.syn_proxy,
        config.syn_proxy_threshold,
        config.syn_proxy_mss,
        os.urandom(SECRET_BYTES),
        DEFAULT_WSCALE if space is None else kernel_wscale(space),
    )


def fit_mss(settings: SynProxySettings, mtu: int | None) -> SynProxySettings:
    """The cookie SYN-ACK must not promise segments the LB's own link cannot carry."""
    if mtu is not None and 536 <= mtu - 40 < settings.mss:
        return dataclasses.replace(settings, mss=mtu - 40)
    return settings


def ready_status(
    workers: Sequence[Mapping[str, object]], backends: Mapping[str, Sequence[Backend]]
) -> str:
    """The STATUS= line of READY=1 (what `systemctl status lbnat` shows)."""
    alive = sum(1 for worker in workers if worker.get("alive"))
    count = sum(len(service) for service in backends.values())
    return (
        f"forwarding: {alive} worker{'' if alive == 1 else 's'}, "
        f"{count} backend{'' if count == 1 else 's'}"
    )


def forwarding_status(daemon: Daemon) -> str | None:
    """The daemon's READY=1 STATUS= line; None before it has a data plane."""
    plane = daemon.plane
    return None if plane is None else ready_status(plane.info(), daemon.current_backends())


def in_thread(target: Callable[[], object], name: str) -> Callable[[int, FrameType | None], None]:
    """A signal handler that runs `target` on a thread of its own (a dump or a reload asks the
    workers and waits: never inside the handler, which interrupts the loop)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=target, name=name, daemon=True).start()

    return handler


class Daemon(ScaleOut, SyncGlue):
    def __init__(
        self,
        config: Config,
        out: TextIO = sys.stdout,
        reload_config: Callable[[], Config] | None = None,
    ) -> None:
        if config.lb_ip is None:
            raise StartError("no SRCIP: give it on the command line or as lb_ip in the config")
        self.lb_ip: str = config.lb_ip
        self.reload_config = reload_config
        self.log = Log(out, config.log_format, config.quiet, config.log_level)
        self.control = ControlPlane(config, started=time.monotonic())
        self.events = EventLog(config.workers)
        self.plane: DataPlane | None = None
        self.guard: KernelGuard | None = None
        self.health: HealthChecker | None = None
        self.link: Link | None = None
        self.link_probe: LinkProbe | None = None
        self.link_watch: LinkWatch | None = None
        self.offload: KernelPath | None = None
        self.instruments = Instruments()  # the metrics' registry: served with --metrics
        self.metrics: MetricsServer | None = None
        self.sync: SyncNode | None = None  # the session sync of a pair (lbnat.daemon_sync)
        self.exit_code = 0
        self._servers: list[RegistrationServer | AdminServer] = []
        self._lock = threading.Lock()  # every call into self.control
        # A reload plans and commits under two takes of _lock: no other reload in between.
        self._reload_lock = threading.Lock()
        self.syn_proxy = syn_proxy_settings(config)
        # --state-file: rows in files, the guard left for the next lbnat (a hitless restart)
        self.handover = None if config.state_file is None else Handover(config.state_file, self.log)
        self.systemd = Lifecycle.from_environment(lambda: forwarding_status(self), self.log)

    @property
    def config(self) -> Config:
        """The running config (a reload replaces it)."""
        return self.control.config

    # --- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to the first packet. On any failure, undo what was done."""
        c = self.config
        rings = ring_spec(c)
        check_can_start(c)
        try:
            # a pair's VIP may be absent: keepalived adds it on the master (docs/ha.md)
            self.link = link = find_link(self.lb_ip, c.interface, c.sync is not None, c.ip6)
            if (misfit := mesh_misfit(c, link)) is not None:  # (the mesh's addresses on it)
                raise LinkError(misfit)
            self.link_probe = LinkProbe(link.interface)
        except LinkError as error:
            raise StartError(str(error)) from None
        self.syn_proxy = fit_mss(self.syn_proxy, link_mtu(link.interface))
        self.link_watch = LinkWatch(time.monotonic(), self.link_probe.state())
        check_ports_free(self.vip, c.ip6, self.control.services.values())
        try:
            engine = Engine(
                self.lb_ip, self.control.specs(), c.nat_ports, c.timeouts, c.table_cap,
                syn_proxy=self.syn_proxy, vip=c.vip, ip6=c.ip6,
            )  # fmt: skip
            if c.sync is not None and c.sync.mode == "mesh":  # (a worker does the same)
                engine.owners = FlowOwners(c.timeouts)
            slices = nat_slices(c.nat_ports, c.workers)
            checks = self.control.health_checks()
        except ValueError as error:
            raise StartError(str(error)) from None
        tcp, udp = list(self.control.ports("tcp")), list(self.control.ports("udp"))
        self.guard = KernelGuard(self.lb_ip, tcp, udp, c.nat_ports, vip=c.vip, ip6=c.ip6)
        try:
            row_files = None if self.handover is None else self.handover.take(c, link.interface)
            self.guard.install()  # over a predecessor's table in one transaction
            socks, socks6, self.offload, offload_text = open_sockets(link, self.control, rings)
            self.plane = start_plane(
                socks,
                lambda: inline_loop(engine, socks[0], link, c, partial(self._on_events, 0),
                                    self.offload, socks6[0] if socks6 else None),
                lambda index: self._setup(index, slices[index]),
                self._on_events,
                self.log,
                row_files,
                self._open_sync(c),  # the engines' journals go to its node (--sync-peer)
                socks6,
            )
            self._start_sync()
            self._servers = start_servers(
                self.config.control, self.config.admin_socket, self.apply, self._refused
            )
            if c.metrics is not None:
                self.instruments.add(ScrapeCollector(self.metrics_snapshot))
                self.metrics = MetricsServer.start(*c.metrics, self.instruments.registry)
        except START_ERRORS as error:
            # a predecessor's flows still need its guard: the next try restores them
            self.close(keep=self.handover is not None and self.handover.previous is not None)
            raise StartError(str(error)) from None
        for line in start_lines(c, self.lb_ip, self.link.interface, offload_text):
            self.log.write(line)
        if self.handover is not None:
            self.handover.restored(self.plane.restored())
        if self.guard.notice is not None:
            self.log(self.guard.notice, "reserved_ports")
        self.health = HealthChecker(checks, self.current_backends, self._publish, self._report)
        self.health.start()

    def _setup(self, index: int, nat_ports: tuple[int, int]) -> WorkerSetup:
        """What worker `index` starts with (also when it is restarted: the backends as now)."""
        assert self.link is not None
        with self._lock:
            specs = self.control.specs()
            slots = dict(self.control.cursor_slots)
        return worker_setup(
            self.config, self.lb_ip, self.link, index, nat_ports, specs, slots, self.syn_proxy,
            self.offload,
        )  # fmt: skip

    def run(self) -> int:
        """Start, forward until SIGINT/SIGTERM, clean up. Returns the exit code."""
        self.start()
        assert self.plane is not None
        handlers: dict[signal.Signals, Callable[[int, FrameType | None], None]] = {
            signal.SIGINT: self._on_stop_signal,
            signal.SIGTERM: self._on_stop_signal,
            signal.SIGUSR1: in_thread(self.dump_table, "lbnat-dump"),
            signal.SIGHUP: in_thread(self.reload, "lbnat-reload"),
        }
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            self.plane.run(self._maintain)
        finally:
            self.systemd.stopping()  # STOPPING=1 here, not in the signal handler (Lifecycle)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close(keep=self.handover is not None)
            self.log("lbnat stopped", "stop")
        return self.exit_code

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.plane is not None and not self.withdraw_then_stop():  # (behind ECMP: later)
            self.plane.stop()

    def close(self, keep: bool = False) -> None:
        """Stop everything; `keep` (a stop with --state-file): leave the guard, the reserved
        ports and the tc filter to the next lbnat (lbnat.dataplane.handover)."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []
        self._close_sync()
        if self.health is not None:
            self.health.stop()
            self.health = None
        if self.plane is not None:
            self.plane.close()  # the workers stop; their row files are flushed and closed
            self.plane = None
        if keep and self.handover is not None:
            self.handover.leave(self.guard, self.offload)
        if self.offload is not None:
            self.offload.close()  # the filter off the interface: nothing rewrites for us now
            self.offload = None
        if self.guard is not None:
            self.guard.remove()
            self.guard = None
        if self.link_probe is not None:
            self.link_probe.close()
            self.link_probe = None

    # --- carrying out the control plane's effects ------------------------------------------

    def _locked(self, step: Callable[[], Sequence[Effect]]) -> None:
        """Run one control-plane step under the lock, then carry out its effects."""
        with self._lock:
            effects = step()
            self._change(effects)
        self._carry_out(effects)

    def _change(self, effects: Sequence[Effect]) -> None:
        """Hand the data-plane changes among `effects` to every engine. Called with the lock
        held, so snapshots reach every engine in the order they were made."""
        plane = self.plane
        if plane is None:
            return
        for effect in effects:
            if isinstance(effect, SetBackends | SetServices | ResetBackend):
                plane.change(effect)

    def _carry_out(self, effects: Sequence[Effect]) -> None:
        """Everything but the data-plane changes (already made), in order."""
        for effect in effects:
            match effect:
                case LogLine():
                    self.log.write(effect)
                case UpdateGuard(tcp_ports, udp_ports):
                    guard, plane, link = self.guard, self.plane, self.link
                    if guard is not None and plane is not None and link is not None:
                        guard.tcp_ports = list(tcp_ports)
                        guard.udp_ports = list(udp_ports)
                        guard.update()
                        plane.set_filter(*packet_filters(link.ip_int, self.control))
                case SetHealthChecks(checks):
                    if self.health is not None:
                        self.health.set_checks(checks)

    # --- the data plane ------------------------------------------------------------------------

    def _maintain(self, now: float) -> None:
        """Upkeep between batches (one worker) or by the supervisor (N workers): tell systemd, watch
        the interface, remove drained backends whose last flow has ended in every worker."""
        self.systemd.upkeep(now)
        self._watch_link(now)
        with self._lock:
            question = self.control.draining()
        if question is None:
            return
        try:
            answers = self.ask(question)
        except (TimeoutError, RuntimeError):
            return  # asked again at the next upkeep
        self._locked(lambda: self.control.sweep(now, answers))

    def _watch_link(self, now: float) -> None:
        """One line per transition of the interface (the loops survive a flap by themselves);
        stop when it is gone for good."""
        probe, watch, link = self.link_probe, self.link_watch, self.link
        if probe is None or watch is None or link is None:
            return
        change = watch.observe(probe.state(), now)
        if change is None:
            return
        self.log.write(link_line(link.interface, change, self.open_flows()))
        if self.health is not None:
            if change.state is LinkState.UP:
                self.health.resume()
            else:
                self.health.hold()
        if change.state is LinkState.GONE and self.plane is not None:
            self.exit_code = INTERFACE_GONE
            self.plane.stop()

    def _on_events(self, worker: int, events: list[Event]) -> None:
        """Events from worker `worker` (on its reader thread, or on the loop with one worker)."""
        for line in self.events.lines(worker, events):
            self.log.write(line)

    # --- backends and health -----------------------------------------------------------------

    def current_backends(self) -> Mapping[str, Sequence[Backend]]:
        with self._lock:
            return self.control.backends()

    def _publish(self, service: str, snapshot: tuple[Backend, ...]) -> None:
        self._locked(lambda: self.control.verdicts(service, snapshot))

    def _report(self, report: Report) -> None:
        b, result = report.backend, report.result
        self.instruments.probe(report.service, f"{b.ip}:{b.port}", result.seconds, result.ok)
        now = time.monotonic()
        self._locked(lambda: self.control.report(report, now))

    # --- requests from the control channel and the admin socket ------------------------------

    def _refused(self, peer: str, reason: str, kind: str) -> None:
        """A request refused before it was read as one (its op unknown)."""
        self.instruments.request("unknown", kind)
        self._carry_out(self.control.refused(peer, reason))

    def apply(self, request: Request, peer: str) -> bytes:
        """One request, one reply line (counted by op and result). Runs on a server thread."""
        line, refusal = self._answer(request, peer)
        self.instruments.request(request.op, refusal)
        return line

    def _answer(self, request: Request, peer: str) -> tuple[bytes, str | None]:
        """The reply line, and None or why it is a nack ("rejected", "unavailable")."""
        try:
            match request.op:
                case "status":
                    return ack(op="status", **self.status()), None
                case "sessions":
                    return ack(op="sessions", sessions=self.sessions()), None
                case "reload":
                    error = self.reload()
                    return (nack(error), "rejected") if error else (ack(op="reload"), None)
                case "ha_role" | "ha_status":
                    return self.ha_request(request)
                case "bgp_status" | "drain_node":
                    return self.scaleout_request(request)
                case _:
                    now = time.monotonic()
                    with self._lock:
                        reply = self.control.request(request, peer, now)
                        self._change(reply.effects)
                    self._carry_out(reply.effects)
                    return reply.line, None if reply.acked else "rejected"
        except (ValueError, TimeoutError, RuntimeError) as error:
            self._carry_out(self.control.refused(peer, str(error)))
            return nack(str(error)), "unavailable"

    # --- reload ------------------------------------------------------------------------------

    def reload(self) -> str | None:
        """Re-read the config and apply it without losing a session, one at a time (a SIGHUP storm
        starts a thread per signal). Returns the error (the running config stays) or None."""
        with self._reload_lock, self.systemd.reloading(time.monotonic()):
            if self.reload_config is None:
                return self._reload_failed("lbnat was started without a config file")
            try:
                new = self.reload_config()
                with self._lock:
                    plan = self.control.plan_reload(new)
                self._carry_out(plan.notes)
                if plan.error is not None:
                    return self._reload_failed(plan.error)
                check_ports_free(self.vip, self.config.ip6, plan.added)
                self._locked(lambda: self.control.commit_reload(plan))
            except (ConfigError, ValueError, OSError, GuardError, StartError) as error:
                # StartError: a new service's port is taken (before, a traceback)
                return self._reload_failed(str(error))
        self.instruments.reload(applied=True)
        return None

    def _reload_failed(self, error: str) -> str:
        self.instruments.reload(applied=False)
        self.log.write(reload_rejected_line(error))
        return error
