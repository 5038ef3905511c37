"""The log lines, byte for byte, in both formats (the integration tests and `make demo` compare
them); every line's level; what --quiet and --log-level leave out; the journal's priority
prefix (and no second timestamp there); the NAT table length summed over workers."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from lbnat.backends import Backend, Health
from lbnat.config import Config, ServiceConfig
from lbnat.engine import Event, FlowEnded, FlowOpened, NoBackend
from lbnat.eventlog import (
    ERROR,
    INFO,
    JOURNAL_STREAM,
    LEVELS,
    NOTICE,
    WARNING,
    EventLog,
    Log,
    LogLine,
    backend_change_line,
    drained_line,
    health_line,
    line,
    link_line,
    on_journal,
    refused_line,
    reload_applied_line,
    reload_note_line,
    reload_rejected_line,
    start_lines,
    table_error_line,
    table_lines,
)
from lbnat.health.checker import Report
from lbnat.health.probe import ProbeResult
from lbnat.linkwatch import LinkChange, LinkState
from lbnat.nat import EndReason
from lbnat.service import Service

CLIENT = ("198.18.0.11", 40000)
B1 = ("198.18.0.21", 9000)
TIME = re.compile(r'^\{"time": "(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)", ')


def opened(open_flows: int) -> FlowOpened:
    return FlowOpened("chat", CLIENT, B1, 61000, open_flows)


def ended(open_flows: int) -> FlowEnded:
    return FlowEnded("chat", CLIENT, B1, EndReason.FIN, open_flows)


def report(health: Health, changed: bool) -> Report:
    return Report("chat", Backend(*B1), health, changed, ProbeResult(False, "timed out"))


def written(
    lines: list[LogLine], fmt: str = "text", quiet: bool = False, level: str = "info"
) -> str:
    out = io.StringIO()
    log = Log(out, fmt, quiet, level)
    for record in lines:
        log.write(record)
    return out.getvalue()


def untimed(text: str) -> str:
    """JSON lines with their leading "time" key checked (ISO-8601 UTC, milliseconds) and cut."""
    out = []
    for json_line in text.splitlines(keepends=True):
        match = TIME.match(json_line)
        assert match is not None, json_line
        out.append("{" + json_line[match.end() :])
    return "".join(out)


@pytest.mark.parametrize(
    ("events", "text", "json"),
    [
        (
            [opened(1)],
            "new client <198.18.0.11,40000> -> server 198.18.0.21:9000 (NAT port 61000)\n",
            '{"level": "info", "event": "flow_opened", "message": "new client '
            '<198.18.0.11,40000> -> server 198.18.0.21:9000 (NAT port 61000)", "client": '
            '"198.18.0.11:40000", "backend": "198.18.0.21:9000", "nat_port": 61000}\n',
        ),
        (
            [ended(0)],
            "\nclient <198.18.0.11,40000> terminated \nCurrent NAT table length : 0\n",
            '{"level": "info", "event": "flow_ended", "message": "client <198.18.0.11,40000> '
            'terminated", "client": "198.18.0.11:40000", "backend": "198.18.0.21:9000", '
            '"reason": "fin"}\n'
            '{"level": "info", "event": "table_length", "message": "Current NAT table length '
            ': 0", "length": 0}\n',
        ),
        (
            [NoBackend("chat", CLIENT)],
            "no backend available for client <198.18.0.11,40000> (service chat)\n",
            '{"level": "warning", "event": "no_backend", "message": "no backend available for '
            'client <198.18.0.11,40000> (service chat)", "client": "198.18.0.11:40000", '
            '"service": "chat"}\n',
        ),
    ],
)
def test_engine_events_in_both_formats(events: list[Event], text: str, json: str) -> None:
    assert written(EventLog().lines(0, events)) == text
    assert untimed(written(EventLog().lines(0, events), "json")) == json


def test_the_json_time_is_when_the_line_was_written_in_utc() -> None:
    before = time.time()
    text = written([line("srcIP : 198.18.0.2", "start")], "json")
    after = time.time()
    stamp = json.loads(text)["time"]
    assert TIME.match(text) and stamp.endswith("Z")
    # milliseconds are cut, not rounded: the stamp is at most 1 ms before the write began
    assert before - 0.001 <= datetime.fromisoformat(stamp).timestamp() <= after


def test_text_is_never_percent_formatted() -> None:
    """The logging module formats a message with its args; a line holding % (a peer's reason)
    must come out as it is."""
    record = refused_line("198.18.0.24", "bad name %s %(x)d 100%")
    expected = "control : refused a request from 198.18.0.24: bad name %s %(x)d 100%\n"
    assert written([record]) == expected


CONFIG = Config(
    lb_ip="198.18.0.2",
    workers=2,
    offload="auto",
    services=(ServiceConfig(Service("chat", "tcp", 20000, backends=(Backend(*B1),))),),
)
FLAP = LinkChange(LinkState.DOWN, LinkState.UP, 1.0)
BACK = LinkChange(LinkState.UP, LinkState.DOWN, 1.0)
GONE = LinkChange(LinkState.GONE, LinkState.UP, 1.0)
_healthy = health_line(report(Health.ALIVE, True), False)
_bad = health_line(report(Health.BAD, True), False)
_dead = health_line(report(Health.DEAD, True), False)
_alive_again = health_line(report(Health.ALIVE, False), False)
_dead_again = health_line(report(Health.DEAD, False), False)
assert None not in (_healthy, _bad, _dead, _alive_again, _dead_again)
LEVEL_CASES: list[tuple[str, LogLine | None, int]] = [
    ("start", start_lines(CONFIG, "198.18.0.2", "eth0", "tc offload")[0], NOTICE),
    ("data plane as asked", start_lines(CONFIG, "198.18.0.2", "eth0", "tc offload")[1], INFO),
    ("offload fell back", start_lines(CONFIG, "198.18.0.2", "eth0", "no offload (x)")[1],
     WARNING),
    ("a configured backend", start_lines(CONFIG, "198.18.0.2", "eth0", "tc offload")[2], INFO),
    ("flow opened", EventLog().lines(0, [opened(1)])[0], INFO),
    ("flow ended", EventLog().lines(0, [ended(0)])[0], INFO),
    ("table length", EventLog().lines(0, [ended(0)])[1], INFO),
    ("no backend", EventLog().lines(0, [NoBackend("chat", CLIENT)])[0], WARNING),
    ("turned alive", _healthy, NOTICE),
    ("turned bad", _bad, WARNING),
    ("turned dead", _dead, WARNING),
    ("alive again (a repeat)", _alive_again, INFO),
    ("dead again (a repeat)", _dead_again, INFO),
    ("register", backend_change_line("register", "chat", "b", "joins", "p"), NOTICE),
    ("unregister", backend_change_line("unregister", "chat", "b", "drains from", "p"), NOTICE),
    ("refused", refused_line("p", "bad signature"), WARNING),
    ("drained", drained_line("chat", "b"), NOTICE),
    ("reload applied", reload_applied_line(1, 0), NOTICE),
    ("reload: needs a restart", reload_note_line("table_cap"), WARNING),
    ("reload rejected", reload_rejected_line("x"), WARNING),
    ("link down", link_line("eth0", FLAP, 3), WARNING),
    ("link up", link_line("eth0", BACK, 3), NOTICE),
    ("interface gone", link_line("eth0", GONE, None), ERROR),
    ("the table dump", table_lines([])[0], NOTICE),
    ("no table", table_error_line("timed out"), WARNING),
]  # fmt: skip


@pytest.mark.parametrize(("what", "record", "level"), LEVEL_CASES, ids=[c[0] for c in LEVEL_CASES])
def test_each_line_has_its_level(what: str, record: LogLine | None, level: int) -> None:
    assert record is not None
    assert record.level == level
    assert record.verbose == (level == INFO)  # --quiet's old meaning, unchanged
    assert json.loads(written([record], "json"))["level"] == logging.getLevelName(level).lower()


def test_a_callers_level_and_verbose_reach_the_line() -> None:
    """lbnat.dataplane.workers logs through `Log.__call__` with a level of its own."""
    out = io.StringIO()
    log = Log(out, "json")
    log("worker 1 : restart failed: x", "worker_failed", level=ERROR, worker=1)
    log("new client", "flow_opened", verbose=True)
    log("lbnat stopped", "stop")
    levels = [(r["event"], r["level"]) for r in map(json.loads, out.getvalue().splitlines())]
    assert levels == [("worker_failed", "error"), ("flow_opened", "info"), ("stop", "notice")]


ONE_OF_EACH = [line(name, name, level=level) for name, level in LEVELS.items()]


@pytest.mark.parametrize(
    ("log_level", "quiet", "kept"),
    [
        ("info", False, "info notice warning error"),
        ("info", True, "notice warning error"),  # --quiet: no per-flow and per-probe lines
        ("notice", False, "notice warning error"),
        ("notice", True, "notice warning error"),
        ("warning", False, "warning error"),
        ("warning", True, "warning error"),  # quiet never lowers a level
        ("error", False, "error"),
    ],
)
def test_quiet_and_the_log_level_leave_lines_out(log_level: str, quiet: bool, kept: str) -> None:
    assert written(ONE_OF_EACH, quiet=quiet, level=log_level).split() == kept.split()


def test_quiet_keeps_only_what_is_not_verbose() -> None:
    lines = EventLog().lines(0, [opened(1), NoBackend("chat", CLIENT), ended(0)])
    assert written(lines, quiet=True) == (
        "no backend available for client <198.18.0.11,40000> (service chat)\n"
    )


def test_logs_do_not_leak_into_each_other_or_the_root_logger() -> None:
    seen: list[logging.LogRecord] = []

    class Catcher(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    catcher = Catcher()
    root = logging.getLogger()
    root.addHandler(catcher)
    try:
        first, second = io.StringIO(), io.StringIO()
        one, _two = Log(first, "text"), Log(second, "json")  # both alive while one writes
        one.write(line("one", "start"))
    finally:
        root.removeHandler(catcher)
    assert (first.getvalue(), second.getvalue(), seen) == ("one\n", "", [])


# --- the journal -------------------------------------------------------------------------------


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[io.TextIOWrapper]:
    """A real file, standing in for the journal's socket (JOURNAL_STREAM names any fd)."""
    with open(tmp_path / "journal", "w+", encoding="utf-8") as out:
        yield out


def identity(out: io.TextIOWrapper) -> str:
    st = os.fstat(out.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def test_journal_stream_names_the_stream_by_device_and_inode(
    stream: io.TextIOWrapper, tmp_path: Path
) -> None:
    other = os.stat(tmp_path)  # another inode on the same device
    assert on_journal(stream, {JOURNAL_STREAM: identity(stream)})
    assert not on_journal(stream, {})
    assert not on_journal(stream, {JOURNAL_STREAM: f"{other.st_dev}:{other.st_ino}"})
    assert not on_journal(stream, {JOURNAL_STREAM: "garbage"})
    # inherited by a child whose output is a pipe or a buffer: no file descriptor of its own
    assert not on_journal(io.StringIO(), {JOURNAL_STREAM: identity(stream)})


@pytest.mark.parametrize(
    ("fmt", "record", "expected"),
    [
        ("text", line("srcIP : 198.18.0.2", "start"), "<5>srcIP : 198.18.0.2\n"),
        (
            "text",
            EventLog().lines(0, [ended(0)])[0],
            # journald reads the prefix per line: the original's blank line carries one too
            "<6>\n<6>client <198.18.0.11,40000> terminated \n",
        ),
        (
            "text",
            link_line("eth0", FLAP, 3),
            "<4>link eth0 down: holding 3 flows until it comes back\n",
        ),
        ("text", link_line("eth0", GONE, None), "<3>interface eth0 is gone: stopping\n"),
        (
            "json",
            link_line("eth0", GONE, None),
            '<3>{"level": "error", "event": "interface_gone", "message": "interface eth0 is '
            'gone: stopping", "interface": "eth0", "flows": null}\n',  # no "time": journald's
        ),
        (
            "json",
            refused_line("p", "no"),
            '<4>{"level": "warning", "event": "control_refused", "message": "control : refused '
            'a request from p: no", "peer": "p", "reason": "no"}\n',
        ),
    ],
)
def test_on_the_journal_each_line_carries_its_syslog_priority(
    stream: io.TextIOWrapper,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    record: LogLine,
    expected: str,
) -> None:
    monkeypatch.setenv(JOURNAL_STREAM, identity(stream))
    log = Log(stream, fmt)
    assert log.journal
    log.write(record)
    stream.seek(0)
    assert stream.read() == expected


def test_off_the_journal_the_same_file_gets_no_prefix(
    stream: io.TextIOWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(JOURNAL_STREAM, "1:2")  # someone else's journal stream
    Log(stream, "text").write(link_line("eth0", GONE, None))
    stream.seek(0)
    assert stream.read() == "interface eth0 is gone: stopping\n"


# --- the lines themselves ------------------------------------------------------------------------


def test_the_table_length_is_the_sum_over_workers() -> None:
    log = EventLog(workers=2)
    log.lines(0, [opened(1), opened(2)])
    log.lines(1, [opened(1)])
    assert log.lines(0, [ended(1)])[1].text == "Current NAT table length : 2"
    assert log.lines(1, [ended(0)])[1].text == "Current NAT table length : 1"


@pytest.mark.parametrize(
    ("changed", "transitions_only", "text", "level"),
    [
        (True, False, "IP : 198.18.0.21, Port : 9000 Server is dead", "warning"),
        (False, False, "IP : 198.18.0.21, Port : 9000 Server is dead", "info"),
        (True, True, "IP : 198.18.0.21, Port : 9000 Server is dead", "warning"),
        (False, True, None, None),
    ],
)
def test_health_lines(
    changed: bool, transitions_only: bool, text: str | None, level: str | None
) -> None:
    record = health_line(report(Health.DEAD, changed), transitions_only)
    if text is None:
        assert record is None
        return
    assert record is not None
    assert written([record]) == text + "\n"
    assert untimed(written([record], "json")) == (
        f'{{"level": "{level}", "event": "health", "message": "IP : 198.18.0.21, Port : 9000 '
        f'Server is dead", "service": "chat", "backend": "198.18.0.21:9000", "health": "dead", '
        f'"changed": {"true" if changed else "false"}, "probe": "timed out"}}\n'
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


def test_ipv6_addresses_are_bracketed_before_a_port() -> None:
    from lbnat.eventlog import flow_opened_line

    opened = flow_opened_line(
        FlowOpened("chat", ("2001:db8::7", 40000), ("2001:db8::21", 9000), 61000)
    )
    assert (
        opened.text
        == "new client <2001:db8::7,40000> -> server [2001:db8::21]:9000 (NAT port 61000)"
    )
    assert opened.fields["client"] == "[2001:db8::7]:40000"
    assert opened.fields["backend"] == "[2001:db8::21]:9000"


def test_the_start_line_names_the_ipv6_address() -> None:
    import dataclasses

    dual = dataclasses.replace(CONFIG, ip6="fd18::2")
    assert start_lines(dual, "198.18.0.2", "eth0")[0].text == "srcIP : 198.18.0.2  IPv6 : fd18::2"
    assert start_lines(CONFIG, "198.18.0.2", "eth0")[0].text == "srcIP : 198.18.0.2"
