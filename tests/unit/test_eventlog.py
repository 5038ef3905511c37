"""The log lines, byte for byte, in both formats (the integration tests and `make demo` compare
them), and the NAT table length summed over workers."""

from __future__ import annotations

import io

import pytest

from lbnat.backends import Backend, Health
from lbnat.engine import Event, FlowEnded, FlowOpened, NoBackend
from lbnat.eventlog import EventLog, Log, LogLine, health_line, table_lines
from lbnat.health.checker import Report
from lbnat.health.probe import ProbeResult
from lbnat.nat import EndReason

CLIENT = ("198.18.0.11", 40000)
B1 = ("198.18.0.21", 9000)


def opened(open_flows: int) -> FlowOpened:
    return FlowOpened("chat", CLIENT, B1, 61000, open_flows)


def ended(open_flows: int) -> FlowEnded:
    return FlowEnded("chat", CLIENT, B1, EndReason.FIN, open_flows)


def written(lines: list[LogLine], fmt: str = "text", quiet: bool = False) -> str:
    out = io.StringIO()
    log = Log(out, fmt, quiet)
    for line in lines:
        log.write(line)
    return out.getvalue()


@pytest.mark.parametrize(
    ("events", "text", "json"),
    [
        (
            [opened(1)],
            "new client <198.18.0.11,40000> -> server 198.18.0.21:9000 (NAT port 61000)\n",
            '{"event": "flow_opened", "message": "new client <198.18.0.11,40000> -> server '
            '198.18.0.21:9000 (NAT port 61000)", "client": "198.18.0.11:40000", "backend": '
            '"198.18.0.21:9000", "nat_port": 61000}\n',
        ),
        (
            [ended(0)],
            "\nclient <198.18.0.11,40000> terminated \nCurrent NAT table length : 0\n",
            '{"event": "flow_ended", "message": "client <198.18.0.11,40000> terminated", '
            '"client": "198.18.0.11:40000", "backend": "198.18.0.21:9000", "reason": "fin"}\n'
            '{"event": "table_length", "message": "Current NAT table length : 0", '
            '"length": 0}\n',
        ),
        (
            [NoBackend("chat", CLIENT)],
            "no backend available for client <198.18.0.11,40000> (service chat)\n",
            '{"event": "no_backend", "message": "no backend available for client '
            '<198.18.0.11,40000> (service chat)", "client": "198.18.0.11:40000", '
            '"service": "chat"}\n',
        ),
    ],
)
def test_engine_events_in_both_formats(events: list[Event], text: str, json: str) -> None:
    assert written(EventLog().lines(0, events)) == text
    assert written(EventLog().lines(0, events), "json") == json


def test_quiet_keeps_only_what_is_not_verbose() -> None:
    lines = EventLog().lines(0, [opened(1), NoBackend("chat", CLIENT), ended(0)])
    assert written(lines, quiet=True) == (
        "no backend available for client <198.18.0.11,40000> (service chat)\n"
    )


def test_the_table_length_is_the_sum_over_workers() -> None:
    log = EventLog(workers=2)
    log.lines(0, [opened(1), opened(2)])
    log.lines(1, [opened(1)])
    assert log.lines(0, [ended(1)])[1].text == "Current NAT table length : 2"
    assert log.lines(1, [ended(0)])[1].text == "Current NAT table length : 1"


@pytest.mark.parametrize(
    ("changed", "transitions_only", "text", "verbose"),
    [
        (True, False, "IP : 198.18.0.21, Port : 9000 Server is dead", False),
        (False, False, "IP : 198.18.0.21, Port : 9000 Server is dead", True),
        (True, True, "IP : 198.18.0.21, Port : 9000 Server is dead", False),
        (False, True, None, None),
    ],
)
def test_health_lines(
    changed: bool, transitions_only: bool, text: str | None, verbose: bool | None
) -> None:
    report = Report("chat", Backend(*B1), Health.DEAD, changed, ProbeResult(False, "timed out"))
    line = health_line(report, transitions_only)
    if text is None:
        assert line is None
        return
    assert line is not None and (line.text, line.verbose) == (text, verbose)
    assert written([line], "json") == (
        '{"event": "health", "message": "IP : 198.18.0.21, Port : 9000 Server is dead", '
        f'"service": "chat", "backend": "198.18.0.21:9000", "health": "dead", "changed": '
        f'{"true" if changed else "false"}, "probe": "timed out"}}\n'
    )


def test_the_nat_table_dump() -> None:
    rows: list[dict[str, object]] = [
        {"proto": "tcp", "client": "198.18.0.11:40000", "backend": "198.18.0.21:9000",
         "nat_port": 61000, "state": "ESTABLISHED", "age": 12.0},
        {"proto": "tcp", "client": "198.18.0.12:40000", "backend": "198.18.0.22:9000",
         "nat_port": 61001, "state": "TIME_WAIT", "age": 3.0},
    ]  # fmt: skip
    assert written(table_lines(rows)) == (
        "NAT table : 2 rows, 1 open\n"
        "  tcp client 198.18.0.11:40000 <-> server 198.18.0.21:9000 NAT port 61000 "
        "ESTABLISHED age 12.0s\n"
        "  tcp client 198.18.0.12:40000 <-> server 198.18.0.22:9000 NAT port 61001 "
        "TIME_WAIT age 3.0s\n"
    )
