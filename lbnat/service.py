"""A virtual service: one protocol and port on the LB address, and the backends behind it."""

from __future__ import annotations

from dataclasses import dataclass, field

from lbnat.backends import Backend, BackendKey
from lbnat.drops import DropReason
from lbnat.packet import PORT_PAIR, TCP, UDP
from lbnat.scheduler import Scheduler

PROTOCOLS = {"tcp": TCP, "udp": UDP}
MODES = ("nat", "dr")  # full NAT, or direct routing (lbnat.direct, docs/dr.md)


def dr_misfit(name: str, port: int, backends: tuple[Backend, ...]) -> str | None:
    """Why these backends cannot serve a direct-routing service, or None: the packet reaches
    the backend unchanged (dst VIP:port), so each backend listens on the service's port, and
    only IPv4 is routed directly."""
    for backend in backends:
        if backend.port != port:
            return (
                f"service {name} is in mode dr: backend {backend.ip}:{backend.port} must listen "
                f"on the service's port {port} (a direct-routed packet is not rewritten)"
            )
        if backend.ip_int > 0xFFFFFFFF:
            return f"service {name} is in mode dr: backend {backend.ip} is IPv6 (dr is IPv4 only)"
    return None


def proxy_protocol_misfit(version: str | None, proto: str, mode: str) -> str | None:
    """Why a service cannot send the PROXY protocol header, or None (docs/proxy-protocol.md)."""
    if version is None:
        return None
    if version != "v2":
        return f"proxy_protocol {version!r} is not v2 (the only version lbnat sends)"
    if proto != "tcp":
        return "proxy_protocol v2 is for TCP services (lbnat inserts it in the TCP stream)"
    if mode != "nat":
        return "proxy_protocol v2 needs mode nat (in mode dr lbnat does not see the stream)"
    return None


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    proto: str  # "tcp" or "udp"
    port: int
    scheduler: str = "rr"
    affinity_timeout: float = 0.0  # seconds a client IP stays with its backend; 0 = off
    backends: tuple[Backend, ...] = field(default=())
    mode: str = "nat"  # or "dr": direct routing (lbnat.direct)
    proxy_protocol: str | None = None  # "v2": the PROXY header to backends (lbnat.proxyproto)

    def __post_init__(self) -> None:
        misfit = proxy_protocol_misfit(self.proxy_protocol, self.proto, self.mode)
        if misfit:
            raise ValueError(misfit)
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not nat or dr")
        if self.mode == "dr":
            misfit = dr_misfit(self.name, self.port, self.backends)
            if misfit:
                raise ValueError(misfit)
        if self.proto not in PROTOCOLS:
            raise ValueError(f"protocol {self.proto!r} is not tcp or udp")
        if not 0 < self.port < 65536:
            raise ValueError(f"{self.port} is not a valid port")
        if self.affinity_timeout < 0:
            raise ValueError("affinity timeout is negative")

    @property
    def proto_number(self) -> int:
        return PROTOCOLS[self.proto]


class ServiceState:
    """A service at run time: its current backend snapshot, scheduler and counters.

    Owned by the packet loop. `backends` is replaced whole (never mutated) when the health
    checker or the control channel publishes a new snapshot.
    """

    def __init__(self, spec: Service, scheduler: Scheduler) -> None:
        self.spec = spec
        self.name = spec.name
        self.port = spec.port
        self.proto = spec.proto_number
        self.scheduler = scheduler
        self.dr = spec.mode == "dr"
        self.proxy_protocol = spec.proxy_protocol is not None  # PROXY v2 (lbnat.proxyproto)
        self.backends: tuple[Backend, ...] = ()
        self.by_key: dict[BackendKey, Backend] = {}
        self.packets = 0
        self.bytes = 0
        self.flows = 0
        self.ended: dict[str, int] = {}  # flows ended, by lbnat.nat.EndReason value
        self.drops: dict[DropReason, int] = {}
        # The SYN proxy's counters (lbnat.synproxy): cookies sent, ACKs that proved one, not.
        self.syn_cookies = {"sent": 0, "validated": 0, "invalid": 0}
        # (service port, client port) as bytes, shared by every row of a client port: the
        # reply rewrite writes these 4 bytes, and most clients reuse few source ports.
        self._reply_ports: list[bytes | None] = [None] * 65536
        self.publish(spec.backends)

    def reply_ports(self, client_port: int) -> bytes:
        ports = self._reply_ports[client_port]
        if ports is None:
            ports = self._reply_ports[client_port] = PORT_PAIR.pack(self.port, client_port)
        return ports

    def publish(self, backends: tuple[Backend, ...]) -> None:
        keys = [b.key for b in backends]
        if self.dr:
            misfit = dr_misfit(self.name, self.port, backends)
            if misfit:
                raise ValueError(misfit)
        if len(set(keys)) != len(keys):
            raise ValueError(f"service {self.name}: a backend is listed twice")
        self.backends = backends
        self.by_key = dict(zip(keys, backends, strict=True))
        self.scheduler.update(backends)

    def count_end(self, reason: str) -> None:
        self.ended[reason] = self.ended.get(reason, 0) + 1

    def count_drop(self, reason: DropReason) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
