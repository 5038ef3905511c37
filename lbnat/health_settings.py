"""What a service's health checking is configured with: the policy, the probe settings, the
probe kinds and which kind fits which protocol. Pure (data and rules only).

It sits outside `lbnat/health/` so that the config module can build and check these objects
without importing the probes and the checker thread; `lbnat.health` re-exports every name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PROBE_KINDS: Final = ("syn", "tcp", "hello", "udp", "http")


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    interval: float = 5.0
    timeout: float = 2.0
    fall: int = 3
    rise: int = 1

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError("health interval and timeout must be positive")
        if self.fall < 1 or self.rise < 1:
            raise ValueError("fall and rise must be at least 1")


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    """The command line's (or config's) probe options; each kind reads the ones it needs."""

    kind: str | None = None  # None: syn for TCP services, udp for UDP services
    send: str = "HealthCheck"  # hello: the line sent; udp: the datagram sent
    expect: str | None = None  # hello/udp: a regular expression the reply must match
    http_path: str = "/"
    http_status: int = 200


def probe_kind(settings: ProbeSettings, proto: str) -> str:
    """The probe kind a service of protocol `proto` gets: the one asked for, else syn for TCP
    and udp for UDP."""
    return settings.kind or ("syn" if proto == "tcp" else "udp")


def probe_misfit(settings: ProbeSettings, proto: str) -> str | None:
    """Why these settings cannot probe a service of protocol `proto`, or None when they can."""
    kind = probe_kind(settings, proto)
    if kind not in PROBE_KINDS:
        return f"unknown health check {kind!r}; known: {', '.join(PROBE_KINDS)}"
    if (kind == "udp") != (proto == "udp"):
        return f"a {kind} health check cannot probe a {proto} service"
    return None
