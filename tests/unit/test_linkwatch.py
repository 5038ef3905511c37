"""The interface's transitions (lbnat.linkwatch) and their log lines, in both formats."""

from __future__ import annotations

import io
import json

from lbnat.eventlog import Log, link_line
from lbnat.linkwatch import LinkChange, LinkState, LinkWatch

UP, DOWN, GONE = LinkState.UP, LinkState.DOWN, LinkState.GONE


def test_a_flap_is_two_transitions_and_repeats_are_none() -> None:
    watch = LinkWatch(now=10.0)
    assert watch.observe(UP, 10.2) is None
    assert watch.observe(DOWN, 10.5) == LinkChange(DOWN, UP, 0.5)
    assert watch.observe(DOWN, 10.75) is None
    assert watch.observe(UP, 12.75) == LinkChange(UP, DOWN, 2.25)
    assert watch.observe(UP, 13.0) is None


def test_gone_is_for_good() -> None:
    watch = LinkWatch(now=0.0)
    assert watch.observe(GONE, 1.0) == LinkChange(GONE, UP, 1.0)
    assert watch.observe(UP, 2.0) is None  # another interface that took its name, or nothing
    assert watch.observe(DOWN, 3.0) is None


def test_a_watch_may_start_with_the_link_down() -> None:
    watch = LinkWatch(now=0.0, state=DOWN)
    assert watch.observe(DOWN, 0.2) is None
    change = watch.observe(UP, 1.0)
    assert change is not None and change.previous is DOWN


def test_the_lines_of_a_flap_and_of_a_gone_interface() -> None:
    down = link_line("eth0", LinkChange(DOWN, UP, 30.0), 8)
    up = link_line("eth0", LinkChange(UP, DOWN, 2.14), 8)
    gone = link_line("eth0", LinkChange(GONE, UP, 5.0), None)
    assert down.text == "link eth0 down: holding 8 flows until it comes back"
    assert up.text == "link eth0 up again after 2.1 s: 8 flows kept"
    assert gone.text == "interface eth0 is gone: stopping"
    assert link_line("eth0", LinkChange(DOWN, UP, 1.0), None).text == (
        "link eth0 down: holding its flows until it comes back"
    )
    out = io.StringIO()
    log = Log(out, "json", quiet=True)  # not verbose: --quiet keeps them
    for record in (down, up, gone):
        log.write(record)
    records = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(r["event"], r["level"]) for r in records] == [
        ("link_down", "warning"),
        ("link_up", "notice"),
        ("interface_gone", "error"),
    ]
    del records[1]["time"]  # its form: tests/unit/test_eventlog.py
    assert records[1] == {
        "level": "notice",
        "event": "link_up",
        "message": "link eth0 up again after 2.1 s: 8 flows kept",
        "interface": "eth0",
        "flows": 8,
        "down_seconds": 2.1,
    }
