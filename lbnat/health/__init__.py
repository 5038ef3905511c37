"""Health checking: probes (one file per kind), the alive/bad/dead state machine (pure), and
the checker thread that runs them and publishes backend snapshots."""

from __future__ import annotations

import re

from lbnat.health.checker import HealthCheck, HealthChecker
from lbnat.health.hello import HelloProbe
from lbnat.health.http import HttpProbe
from lbnat.health.probe import Probe, ProbeResult
from lbnat.health.state import Verdict, judge
from lbnat.health.syn import SynProbe
from lbnat.health.tcp import TcpProbe
from lbnat.health.udp import UdpProbe
from lbnat.health_settings import (
    PROBE_KINDS,
    HealthPolicy,
    ProbeSettings,
    probe_kind,
    probe_misfit,
)


def make_probe(settings: ProbeSettings, proto: str) -> Probe:
    """The probe a service of protocol `proto` gets from these settings."""
    misfit = probe_misfit(settings, proto)
    if misfit:
        raise ValueError(misfit)
    kind = probe_kind(settings, proto)
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
    raise AssertionError(f"probe_misfit let the unknown kind {kind!r} through")


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
