"""How the daemon takes its log settings: the Log's level, and whether workers send the
per-flow events at all (they are INFO lines: below the level, not worth the pipe)."""

from __future__ import annotations

import io
import ipaddress

import pytest

from lbnat.backends import Backend
from lbnat.config import Config, ServiceConfig
from lbnat.daemon import Daemon, syn_proxy_settings, worker_setup
from lbnat.dataplane.link import Link
from lbnat.eventlog import INFO, NOTICE, WARNING, LogLine
from lbnat.service import Service

SERVICE = ServiceConfig(Service("chat", "tcp", 20000, backends=(Backend("198.18.0.21", 9000),)))
LINK = Link("eth0", "198.18.0.2", ipaddress.IPv4Network("198.18.0.0/24"), b"\0" * 6)


@pytest.mark.parametrize(
    ("log_level", "quiet", "least", "flow_events"),
    [
        ("info", False, INFO, True),
        ("info", True, NOTICE, False),
        ("notice", False, NOTICE, False),
        ("warning", False, WARNING, False),
    ],
)
def test_the_daemon_logs_from_its_configs_level(
    log_level: str, quiet: bool, least: int, flow_events: bool
) -> None:
    config = Config(lb_ip="198.18.0.2", services=(SERVICE,), log_level=log_level, quiet=quiet)
    out = io.StringIO()
    daemon = Daemon(config, out)
    for level in (INFO, NOTICE, WARNING):
        daemon.log.write(LogLine(f"at {level}", "test", level))
    assert out.getvalue().split("\n")[:-1] == [
        f"at {level}" for level in (INFO, NOTICE, WARNING) if level >= least
    ]
    setup = worker_setup(
        config, "198.18.0.2", LINK, 0, (61000, 65535), (SERVICE.service,), {},
        syn_proxy_settings(config),
    )  # fmt: skip
    assert setup.flow_events is flow_events
