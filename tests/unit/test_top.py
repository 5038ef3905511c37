"""`lbnat top`: rates from snapshot pairs (lbnat.top), the drawn view, and the I/O around it
that needs no lbnat (lbnat.topterm: the sampler, the keyboard, the one-line errors)."""

from __future__ import annotations

import copy
import io
import os
import termios
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from lbnat import top, topterm
from lbnat.cli import main

B1, B2, B3 = ("198.18.0.21", 9000), ("198.18.0.22", 9000), ("198.18.0.23", 9000)


def backend(
    key: tuple[str, int], *, flows: int = 0, to_b: tuple[int, int] = (0, 0),
    to_c: tuple[int, int] = (0, 0), health: str = "alive", active: int = 0,
    draining: bool = False, name: str = "",
) -> dict[str, Any]:  # fmt: skip
    """One backend of a status reply; to_b, to_c: (packets, bytes)."""
    return {
        "ip": key[0], "port": key[1], "name": name or f"{key[0]}:{key[1]}", "weight": 1,
        "health": health, "draining": draining, "active": active, "flows": flows,
        "packets": to_b[0] + to_c[0], "bytes": to_b[1] + to_c[1],
        "to_backend": {"packets": to_b[0], "bytes": to_b[1]},
        "to_client": {"packets": to_c[0], "bytes": to_c[1]},
        "nat_ports": {"in_use": active, "size": 2268},
    }  # fmt: skip


def status(
    *backends: dict[str, Any], flows: int = 0, drops: dict[str, int] | None = None,
    engine_drops: dict[str, int] | None = None, uptime: float = 10.0, restarts: int = 0,
    offload_packets: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """A status reply (lbnat.control.plane.ControlPlane.status) with one service, "chat"."""
    return {
        "ok": True, "op": "status", "lb_ip": "198.18.0.2", "uptime": uptime,
        "workers": [
            {"index": 0, "pid": 10, "alive": True, "restarts": restarts},
            {"index": 1, "pid": 11, "alive": True, "restarts": 0},
        ],
        "rows": 7, "rows_cap": 1000, "open_flows": 5,
        "offload": {"rows": 3, "offloaded": 9, "packets": offload_packets, "bytes": 0},
        "drops": engine_drops or {},
        "services": [
            {
                "name": "chat", "proto": "tcp", "port": 20000, "scheduler": "rr",
                "health_check": "syn", "flows": flows, "ended": {}, "packets": 0, "bytes": 0,
                "drops": drops or {}, "backends": list(backends),
            }
        ],
    }  # fmt: skip


# --- rates --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new", "old", "seconds", "expected"),
    [
        (150, 100, 1.0, 50.0),  # grew
        (150, 100, 2.0, 25.0),  # over two seconds
        (100, 100, 1.0, 0.0),  # still
        (30, 100, 1.0, 30.0),  # went down: reset, counted from the new value
        (0, 100, 0.5, 0.0),  # reset to zero: nothing yet, never negative
        (40, None, 0.5, 80.0),  # not there before: from zero
    ],
)
def test_rate(new: float, old: float | None, seconds: float, expected: float) -> None:
    assert top.rate(new, old, seconds) == expected


def test_rate_refuses_snapshots_out_of_order() -> None:
    with pytest.raises(ValueError, match="later"):
        top.rate(1, 0, 0.0)
    with pytest.raises(ValueError, match="later"):
        top.compute(status(), status(), -1.0)


BEFORE = status(
    backend(B1, flows=10, to_b=(1000, 100_000), to_c=(500, 1_000_000), active=2),
    backend(B2, flows=4, to_b=(200, 20_000), to_c=(100, 200_000), active=1),
    flows=14, drops={"no_backend": 5}, engine_drops={"no_session": 7}, offload_packets=100,
)  # fmt: skip


def pair(**changes: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """BEFORE and a copy of it with `changes` (top-level keys) applied."""
    after = copy.deepcopy(BEFORE)
    after.update(changes)
    return BEFORE, after


def backends_after(*backends: dict[str, Any], flows: int = 14) -> dict[str, Any]:
    return {**BEFORE["services"][0], "backends": list(backends), "flows": flows}


# (name, after's changes, seconds, {backend: (new/s, to-b pkt/s, to-b bit/s, to-c pkt/s,
# to-c bit/s)}, service (new/s, to-b pkt/s, to-c bit/s))
CASES: list[
    tuple[str, dict[str, Any], float, dict[tuple[str, int], tuple[float, ...]], tuple[float, ...]]
] = [
    (
        "steady traffic, two seconds",
        {
            "services": [
                backends_after(
                    backend(B1, flows=14, to_b=(3000, 300_000), to_c=(1500, 3_000_000), active=2),
                    backend(B2, flows=4, to_b=(200, 20_000), to_c=(100, 200_000), active=1),
                    flows=18,
                )
            ]
        },
        2.0,
        {B1: (2.0, 1000.0, 800_000.0, 500.0, 8_000_000.0), B2: (0.0, 0.0, 0.0, 0.0, 0.0)},
        (2.0, 1000.0, 8_000_000.0),
    ),
    (
        "a worker restarted: B1's counters went down, counted from their new values",
        {
            "services": [
                backends_after(
                    backend(B1, flows=3, to_b=(400, 40_000), to_c=(100, 100_000)),
                    backend(B2, flows=5, to_b=(300, 30_000), to_c=(150, 300_000), active=1),
                    flows=8,
                )
            ],
            "workers": [
                {"index": 0, "pid": 12, "alive": True, "restarts": 1},
                {"index": 1, "pid": 11, "alive": True, "restarts": 0},
            ],
        },
        1.0,
        {
            B1: (3.0, 400.0, 320_000.0, 100.0, 800_000.0),
            B2: (1.0, 100.0, 80_000.0, 50.0, 800_000.0),
        },
        (8.0, 500.0, 1_600_000.0),
    ),
    (
        "B3 appears (counted from zero), B2 disappears (no row, not in the service's sums)",
        {
            "services": [
                backends_after(
                    backend(B1, flows=10, to_b=(1000, 100_000), to_c=(500, 1_000_000), active=2),
                    backend(B3, flows=2, to_b=(50, 5_000), to_c=(25, 2_500)),
                    flows=16,
                )
            ]
        },
        0.5,
        {B1: (0.0, 0.0, 0.0, 0.0, 0.0), B3: (4.0, 100.0, 80_000.0, 50.0, 40_000.0)},
        (4.0, 100.0, 40_000.0),
    ),
]


@pytest.mark.parametrize(("changes", "seconds", "rows", "service"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])  # fmt: skip
def test_compute_rates_per_backend_and_service(
    changes: dict[str, Any],
    seconds: float,
    rows: dict[tuple[str, int], tuple[float, ...]],
    service: tuple[float, ...],
) -> None:
    frame = top.compute(*pair(**changes), seconds)
    (chat,) = frame.services
    got = {
        (b.address.split(":")[0], int(b.address.split(":")[1])): (
            b.new_flows, b.to_backend.packets, b.to_backend.bits, b.to_client.packets,
            b.to_client.bits,
        )
        for b in chat.backends
    }  # fmt: skip
    assert got == rows
    assert (chat.new_flows, chat.to_backend.packets, chat.to_client.bits) == service
    assert chat.active == sum(b.active for b in chat.backends)


@pytest.mark.parametrize(
    ("after", "service_drops", "engine_drops", "reasons"),
    [
        (status(drops={"no_backend": 9}, engine_drops={"no_session": 7}), 4.0, 0.0, ()),
        (  # a new reason counts from zero; a reset one from its new value
            status(drops={"no_backend": 2, "table_full": 3}, engine_drops={"no_session": 1}),
            5.0,
            1.0,
            (("no_session", 1.0),),
        ),
        (
            status(engine_drops={"no_session": 10, "not_for_us": 6}),
            0.0,
            9.0,
            (("not_for_us", 6.0), ("no_session", 3.0)),
        ),
    ],
)
def test_drops_per_service_and_engine_wide(
    after: dict[str, Any],
    service_drops: float,
    engine_drops: float,
    reasons: tuple[tuple[str, float], ...],
) -> None:
    frame = top.compute(BEFORE, after, 1.0)
    assert frame.services[0].drops == service_drops
    assert frame.drops == engine_drops
    assert frame.drop_reasons == reasons  # only reasons with a rate, the highest first


@pytest.mark.parametrize(
    ("before", "after", "restarted"),
    [
        (status(restarts=0), status(restarts=0, uptime=11), False),
        (status(restarts=0), status(restarts=1, uptime=11), True),  # one worker's counters
        (status(restarts=2, uptime=90), status(restarts=0, uptime=1), False),  # a new lbnat
    ],
)
def test_frame_says_when_a_worker_restarted(
    before: dict[str, Any], after: dict[str, Any], restarted: bool
) -> None:
    assert top.compute(before, after, 1.0).restarted is restarted


def test_header_numbers() -> None:
    frame = top.compute(BEFORE, status(uptime=12.5, offload_packets=400), 2.0)
    assert (frame.lb_ip, frame.uptime, frame.seconds) == ("198.18.0.2", 12.5, 2.0)
    assert (frame.rows, frame.rows_cap, frame.open_flows) == (7, 1000, 5)
    assert (frame.offload_rows, frame.offload_packets) == (3, 150.0)
    assert (frame.workers, frame.workers_running, frame.restarts) == (2, 2, 0)


# --- units --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"), (0.04, "0.0"), (0.5, "0.5"), (9.9, "9.9"), (9.96, "10"), (42.4, "42"),
        (999.4, "999"), (999.6, "1.00k"), (1234, "1.23k"), (12_345, "12.3k"),
        (123_456, "123k"), (999_999, "1.00M"), (60_200_000, "60.2M"), (1.2e9, "1.20G"),
        (3.4e12, "3.40T"), (5e18, "5000P"),
    ],
)  # fmt: skip
def test_si(value: float, text: str) -> None:
    assert top.si(value) == text


def test_si_refuses_a_negative_rate() -> None:
    with pytest.raises(ValueError, match="negative"):
        top.si(-1)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (42.9, "42s"), (60, "1m00s"), (187, "3m07s"), (7380, "2h03m"),
     (3 * 86400 + 7200, "3d02h")],
)  # fmt: skip
def test_duration(seconds: float, text: str) -> None:
    assert top.duration(seconds) == text


# --- the view -----------------------------------------------------------------------------------


def drawn(renderable: Any, width: int = 160) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True)
    console.print(renderable)
    return console.export_text()


def busy_frame() -> top.Frame:
    after = status(
        backend(B1, flows=20, to_b=(31_000, 40_100_000), to_c=(1500, 1_100_000), active=3),
        backend(B2, flows=4, to_b=(200, 20_000), to_c=(100, 200_000), health="dead",
                draining=True, name="b2"),
        flows=24, drops={"no_backend": 8}, engine_drops={"no_session": 9}, uptime=3725,
        offload_packets=2100,
    )  # fmt: skip
    return top.compute(BEFORE, after, 1.0)


def test_render_shows_header_services_backends_and_rates() -> None:
    text = drawn(top.render(busy_frame(), source="/run/lbnat/lbnat.sock", interval=1.0))
    lines = text.splitlines()
    assert lines[0].split() == [
        "lbnat", "198.18.0.2", "up", "1h02m", "rows", "7/1,000", "open", "flows", "5",
        "offload", "rows", "3", "(2.00k", "pkt/s)", "workers", "2/2", "restarts", "0",
        "drops", "2.0/s",
    ]  # fmt: skip
    row = {line.split()[0]: line.split() for line in lines if line.strip()}
    # service: name proto/port scheduler, health, active, new/s, pkt/s, bit/s (both ways), drops/s
    assert row["chat"] == [
        "chat", "tcp/20000", "rr", "1/2", "alive", "3", "10", "30.0k", "320M", "1.00k", "800k",
        "3.0",
    ]  # fmt: skip
    assert row["198.18.0.21:9000"] == [
        "198.18.0.21:9000", "alive", "1", "3", "10", "30.0k", "320M", "1.00k", "800k", "3/2268",
    ]  # fmt: skip
    assert row["b2"] == [
        "b2", "198.18.0.22:9000", "dead", "draining", "1", "0", "0", "0", "0", "0", "0", "0/2268",
    ]  # fmt: skip
    assert "drops/s: no_session 2.0" in text
    assert lines[-1].split() == ["/run/lbnat/lbnat.sock", "every", "1", "s", "q", "quits"]


def test_render_colours_health() -> None:
    assert str(top.health_text("alive", False).style) == "green"
    assert str(top.health_text("bad", False).style) == "yellow"
    dead = top.health_text("dead", True)
    assert str(dead.style) == "bold red"
    assert [(dead.plain[s.start : s.end], str(s.style)) for s in dead.spans] == [
        (" draining", top.DRAINING_STYLE)
    ]


def test_render_on_a_narrow_terminal_is_compact_and_cuts_no_number() -> None:
    wide = drawn(top.render(busy_frame(), source="s", interval=1.0), width=160)
    assert "to backend  to backend" in wide and "NAT ports" in wide
    assert top.COMPACT_LEGEND not in wide
    narrow = drawn(top.render(busy_frame(), source="s", interval=1.0), width=100)
    assert "to backend  to backend" not in narrow and "NAT ports" not in narrow
    assert top.COMPACT_LEGEND in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 100
    row = {line.split()[0]: line.split() for line in narrow.splitlines() if line.strip()}
    assert row["198.18.0.21:9000"] == ["198.18.0.21:9000", "alive", "1", "3", "10", "30.0k",
                                       "320M", "1.00k", "800k"]  # fmt: skip


def test_render_before_the_first_rates_and_after_an_error() -> None:
    waiting = drawn(top.render(None, source="/tmp/a.sock", interval=0.5))
    assert "/tmp/a.sock: first snapshot taken, rates in 0.5 s" in waiting
    assert "service / backend" not in waiting
    error = "cannot reach lbnat at /tmp/a.sock: Connection refused"
    failed = drawn(top.render(busy_frame(), source="/tmp/a.sock", interval=2.0, error=error))
    assert f"{error}: retrying every 2 s" in failed
    assert "198.18.0.21:9000" in failed  # the last good frame stays in view


def test_render_says_when_rates_are_off_after_a_worker_restart() -> None:
    frame = top.compute(status(), status(restarts=1), 1.0)
    assert "a worker restarted" in drawn(top.render(frame, source="s", interval=1.0))


# --- the I/O around it --------------------------------------------------------------------------


class Script:
    """Answers and clock readings in order, for a Sampler."""

    def __init__(self, answers: list[dict[str, Any] | str], times: list[float]) -> None:
        self.answers, self.times = iter(answers), iter(times)

    def ask(self) -> top.Status:
        answer = next(self.answers)
        if isinstance(answer, str):
            raise topterm.TopError(answer)
        return answer

    def clock(self) -> float:
        return next(self.times)


def test_sampler_keeps_the_last_good_snapshot_through_errors() -> None:
    one = status(backend(B1, to_b=(100, 0)))
    two = status(backend(B1, to_b=(300, 0)))
    three = status(backend(B1, to_b=(900, 0)))
    script = Script([one, two, "lbnat went away", three], [10.0, 11.0, 14.0])
    sampler = topterm.Sampler(script.ask, script.clock)
    sampler.sample()
    assert sampler.frame is None and sampler.error is None
    sampler.sample()
    assert sampler.frame is not None
    assert sampler.frame.services[0].backends[0].to_backend.packets == 200.0
    sampler.sample()
    assert sampler.error == "lbnat went away"
    assert sampler.frame.services[0].backends[0].to_backend.packets == 200.0  # kept in view
    sampler.sample()  # measured against the last good snapshot, 3 s before
    assert sampler.error is None
    assert sampler.frame.services[0].backends[0].to_backend.packets == 200.0
    assert sampler.frame.seconds == 3.0


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


@pytest.mark.parametrize(("typed", "quits"), [(b"q", True), (b"xyQ", True), (b"x ", False)])
def test_quit_pressed(pipe: tuple[int, int], typed: bytes, quits: bool) -> None:
    r, w = pipe
    os.write(w, typed)
    assert topterm.quit_pressed(r, 0.05) is quits


def test_quit_pressed_when_the_terminal_is_gone() -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        assert topterm.quit_pressed(r, 1.0) is True
    finally:
        os.close(r)


def test_cbreak_turns_off_line_mode_and_echo_and_restores_them() -> None:
    master, slave = os.openpty()
    with os.fdopen(slave, "r") as terminal:
        before = termios.tcgetattr(slave)
        with topterm.cbreak(terminal) as fd:
            lflag = termios.tcgetattr(fd)[3]
            assert not lflag & termios.ICANON and not lflag & termios.ECHO
            assert lflag & termios.ISIG  # Ctrl-C still interrupts
        assert termios.tcgetattr(slave) == before
        with pytest.raises(RuntimeError), topterm.cbreak(terminal):
            raise RuntimeError("the view failed")
        assert termios.tcgetattr(slave) == before
    os.close(master)


def test_top_without_lbnat_is_one_line_and_exit_1(tmp_path: Any) -> None:
    result = CliRunner().invoke(main, ["top", "--admin-socket", str(tmp_path / "none.sock")])
    assert result.exit_code == 1
    assert (
        result.output == f"lbnat: no admin socket at {tmp_path / 'none.sock'}: is lbnat running?\n"
    )


def test_top_once_prints_one_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([BEFORE, busy_frame_status()])
    monkeypatch.setattr(topterm, "ask_status", lambda path, timeout=2.0: next(answers))
    result = CliRunner().invoke(main, ["top", "--once", "--interval", "0.1", "--admin-socket", "x"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("lbnat 198.18.0.2  up 1h02m")
    assert "198.18.0.21:9000" in result.output and "\x1b[" not in result.output  # plain: a pipe


def test_top_once_when_lbnat_goes_away_between_the_snapshots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def ask(path: str, timeout: float = 2.0) -> top.Status:
        if answers:
            return answers.pop()
        raise topterm.TopError(f"cannot reach lbnat at {path}: Connection refused")

    answers = [BEFORE]
    monkeypatch.setattr(topterm, "ask_status", ask)
    result = CliRunner().invoke(main, ["top", "--once", "--interval", "0.1", "--admin-socket", "x"])
    assert result.exit_code == 1
    assert result.output == "lbnat: cannot reach lbnat at x: Connection refused\n"


def busy_frame_status() -> dict[str, Any]:
    return status(
        backend(B1, flows=20, to_b=(31_000, 40_100_000), to_c=(1500, 1_100_000), active=3),
        uptime=3725,
    )


def test_top_to_a_pipe_prints_each_frame_plain_until_interrupted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def ask(path: str, timeout: float = 2.0) -> top.Status:
        if not answers:
            raise KeyboardInterrupt  # Ctrl-C while asking: the command ends, exit 0
        return answers.pop(0)

    answers: list[dict[str, Any]] = [BEFORE, busy_frame_status(), busy_frame_status()]
    monkeypatch.setattr(topterm, "ask_status", ask)
    out = io.StringIO()
    console = Console(file=out, width=80, highlight=False)
    assert topterm.run("x", 0.01, once=False, console=console) == 0
    text = out.getvalue()
    assert text.count("lbnat 198.18.0.2  up 1h02m") == 2  # two frames, one per new snapshot
    assert "\x1b[" not in text and "NAT ports" in text  # plain, and the full table (PLAIN_WIDTH)
