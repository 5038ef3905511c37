"""Health checking: probes (one file per kind), the alive/bad/dead state machine (pure), and
the checker thread that runs them and publishes backend snapshots."""

from __future__ import annotations

import re

from lbnat.health.checker import HealthCheck, HealthChecker
from lbnat.health.hello import HelloProbe
from lbnat.health.http import HttpProbe
from lbnat.health.probe import Probe, ProbeResult, ProbeSettings
from lbnat.health.state import HealthPolicy, Verdict, judge
from lbnat.health.syn import SynProbe
from lbnat.health.tcp import TcpProbe
from lbnat.health.udp import UdpProbe

PROBE_KINDS = ("syn", "tcp", "hello", "udp", "http")


def probe_kind(settings: ProbeSettings, proto: str) -> str:
    """The probe kind a service of protocol `proto` gets: the one asked for, else syn for TCP
    and udp for UDP."""
    return settings.kind or ("syn" if proto == "tcp" else "udp")


def make_probe(settings: ProbeSettings, proto: str) -> Probe:
    """The probe a service of protocol `proto` gets from these settings."""
    kind = probe_kind(settings, proto)
    if (kind == "udp") != (proto == "udp"):
        raise ValueError(f"a {kind} health check cannot probe a {proto} service")
    if kind == "syn":
        return SynProbe()
    if kind == "tcp":
        return TcpProbe()
    try:
        if kind == "hello":
            return HelloProbe(settings.send, settings.expect)
        if kind == "udp":
            return UdpProbe(settings.send, settings.expect)
    except re.error as error:
        raise ValueError(
            f"the expected-reply pattern {settings.expect!r} is invalid: {error}"
        ) from None
    if kind == "http":
        return HttpProbe(settings.http_path, settings.http_status)
    raise ValueError(f"unknown health check {kind!r}; known: {', '.join(PROBE_KINDS)}")


__all__ = [
    "PROBE_KINDS",
    "HealthCheck",
    "HealthChecker",
    "HealthPolicy",
    "Probe",
    "ProbeResult",
    "ProbeSettings",
    "Verdict",
    "judge",
    "make_probe",
    "probe_kind",
]
