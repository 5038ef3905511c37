"""lbnat.sdnotify: systemd's notify protocol, against a real AF_UNIX datagram socket the test
binds (a path in tmp_path, or an abstract name), and the daemon's use of it (READY=1 once,
watchdog pings at half the interval, a reload framed by RELOADING=1 and READY=1) with a fake
data plane: no root, no namespace."""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from lbnat.backends import Backend
from lbnat.config import ConfigError, parse_config
from lbnat.daemon import Daemon, ready_status
from lbnat.sdnotify import Lifecycle, Notifier, message, notify_address, ping_due, watchdog_interval


class Listener:
    """The systemd end: a bound datagram socket and what arrived on it."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value  # what $NOTIFY_SOCKET would say
        sock.setblocking(False)  # take() returns what is there: sends are synchronous

    def take(self) -> list[bytes]:
        """Every datagram waiting now (none more is waited for)."""
        got = []
        while True:
            try:
                got.append(self.sock.recv(4096))
            except BlockingIOError:
                return got

    def notifier(self, watchdog: float | None = None) -> Notifier:
        return Notifier.from_environment(
            environ=self.environ(watchdog), pid=os.getpid(), on_error=pytest.fail
        )

    def environ(self, watchdog: float | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": self.env_value}
        if watchdog is not None:
            env["WATCHDOG_USEC"] = str(int(watchdog * 1_000_000))
        return env


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if request.param == "path":
            path = tmp_path / "notify"
            if len(bytes(path)) >= 108:  # sun_path; pytest's tmp_path is short on Debian
                pytest.skip(f"tmp_path too long for an AF_UNIX address: {path}")
            sock.bind(str(path))
            yield Listener(sock, str(path))
        else:
            name = f"lbnat-test-{os.getpid()}-{os.urandom(4).hex()}"
            sock.bind(b"\0" + name.encode())
            yield Listener(sock, "@" + name)
    finally:
        sock.close()


# --- pure helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address"),
    [
        (None, None),
        ("", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@/org/freedesktop/systemd1/notify/1", b"\0/org/freedesktop/systemd1/notify/1"),
        ("@", b"\0"),
        ("relative/path", None),
        ("vsock:2:1234", None),
    ],
)
def test_notify_address(value: str | None, address: str | bytes | None) -> None:
    assert notify_address(value) == address


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "10000000"}, 10.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5),  # our pid
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "not a pid"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "ten seconds"}, None),
        ({"WATCHDOG_PID": "4242"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(environ, pid=4242) == interval


@pytest.mark.parametrize(
    ("last", "interval", "now", "due"),
    [
        (None, 10.0, 0.0, True),  # the first ping: at once
        (100.0, 10.0, 100.1, False),
        (100.0, 10.0, 104.9, False),
        (100.0, 10.0, 105.0, True),  # half the interval
        (100.0, 10.0, 130.0, True),  # late: due all the same
        (100.0, 1.0, 100.4, False),
        (100.0, 1.0, 100.5, True),
    ],
)
def test_ping_due(last: float | None, interval: float, now: float, due: bool) -> None:
    assert ping_due(last, interval, now) is due


@pytest.mark.parametrize(
    ("fields", "wire"),
    [
        (("READY=1",), b"READY=1"),
        (("READY=1", "STATUS=forwarding"), b"READY=1\nSTATUS=forwarding"),
        (("STATUS=two\nlines",), b"STATUS=two lines"),  # one field stays one line
    ],
)
def test_message(fields: tuple[str, ...], wire: bytes) -> None:
    assert message(*fields) == wire


# --- the notifier on a real socket -----------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "wire"),
    [
        (lambda n: n.ready("forwarding: 2 workers, 3 backends"),
         b"READY=1\nSTATUS=forwarding: 2 workers, 3 backends"),
        (lambda n: n.reloading(1234.5678901),
         b"RELOADING=1\nMONOTONIC_USEC=1234567890\nSTATUS=reloading the config"),
        (lambda n: n.stopping(), b"STOPPING=1\nSTATUS=stopping"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.status("3 backends"), b"STATUS=3 backends"),
    ],
    ids=["ready", "reloading", "stopping", "watchdog", "status"],
)  # fmt: skip
def test_each_notification_is_one_datagram(listener: Listener, call: Any, wire: bytes) -> None:
    notifier = listener.notifier()
    assert notifier.enabled
    assert call(notifier) is True
    assert listener.take() == [wire]


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    errors: list[str] = []
    notifier = Notifier.from_environment(errors.append, environ={"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None  # no socket: nobody to ping
    assert notifier.ready("x") is False
    assert notifier.ping_if_due(0.0) is False
    assert errors == []


def test_a_failed_send_is_reported_once_and_never_raises(tmp_path: Path) -> None:
    errors: list[str] = []
    gone = str(tmp_path / "gone")  # systemd is not listening there (any more)
    notifier = Notifier(notify_address(gone), 1.0, errors.append)
    assert notifier.ready("x") is False
    assert notifier.stopping() is False
    assert notifier.ping_if_due(10.0) is False
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"cannot notify systemd at {gone}: "), errors
    assert "No such file or directory" in errors[0], errors


def test_a_full_queue_does_not_block(listener: Listener) -> None:
    """Nobody reads the socket (systemd hung): sends fail at once instead of blocking the
    packet loop, reported once."""
    errors: list[str] = []
    notifier = Notifier(notify_address(listener.env_value), None, errors.append)
    sent = 0
    for _ in range(5000):  # far beyond net.unix.max_dgram_qlen (512 by default)
        if not notifier.watchdog():
            break
        sent += 1
    assert 0 < sent < 5000
    assert len(errors) == 1 and "Resource temporarily unavailable" in errors[0], errors


def test_watchdog_pings_at_half_the_interval(listener: Listener) -> None:
    notifier = listener.notifier(watchdog=1.0)
    # an upkeep every 0.1 s for 2.05 s: pings at 0, 0.5, 1.0, 1.5, 2.0
    sent = [t / 10 for t in range(21) if notifier.ping_if_due(100.0 + t / 10)]
    assert sent == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert listener.take() == [b"WATCHDOG=1"] * 5


def test_no_pings_for_another_process(listener: Listener) -> None:
    env = {**listener.environ(watchdog=1.0), "WATCHDOG_PID": str(os.getpid() + 1)}
    notifier = Notifier.from_environment(pytest.fail, environ=env, pid=os.getpid())
    assert notifier.watchdog_interval is None
    assert [notifier.ping_if_due(t) for t in (0.0, 5.0, 10.0)] == [False] * 3
    assert notifier.ready("x") is True  # the rest of the protocol still goes out
    assert listener.take() == [b"READY=1\nSTATUS=x"]


# --- what the daemon says when: Lifecycle ---------------------------------------------------


def test_lifecycle_says_ready_once_then_pings(listener: Listener) -> None:
    statuses: list[str | None] = [None, "forwarding: 1 worker, 3 backends"]
    life = Lifecycle(listener.notifier(watchdog=1.0), lambda: statuses.pop(0))
    for t in range(12):  # upkeeps 0.1 s apart; at the first, nothing to say yet (no plane)
        life.upkeep(50.0 + t / 10)
    assert statuses == []  # asked twice, never again once READY=1 was said
    assert listener.take() == [
        b"WATCHDOG=1",  # 50.0
        b"READY=1\nSTATUS=forwarding: 1 worker, 3 backends",  # 50.1
        b"WATCHDOG=1",  # 50.5
        b"WATCHDOG=1",  # 51.0
    ]


def test_lifecycle_frames_a_reload_once_ready(listener: Listener) -> None:
    life = Lifecycle(listener.notifier(), lambda: "up")
    with life.reloading(5.0):  # before READY=1: systemd would take the reload's for start-up's
        pass
    assert listener.take() == []
    life.upkeep(6.0)
    with pytest.raises(RuntimeError), life.reloading(7.25):  # a reload that fails: READY=1 too
        raise RuntimeError("bug")
    assert listener.take() == [
        b"READY=1\nSTATUS=up",
        b"RELOADING=1\nMONOTONIC_USEC=7250000\nSTATUS=reloading the config",
        b"READY=1\nSTATUS=up",
    ]


def test_lifecycle_says_no_ready_after_stopping(listener: Listener) -> None:
    life = Lifecycle(listener.notifier(), lambda: "up")
    life.upkeep(1.0)
    with life.reloading(2.0):
        life.stopping()  # SIGTERM while a reload runs
    assert listener.take() == [
        b"READY=1\nSTATUS=up",
        b"RELOADING=1\nMONOTONIC_USEC=2000000\nSTATUS=reloading the config",
        b"STOPPING=1\nSTATUS=stopping",
    ]


def test_lifecycle_without_systemd_never_asks_for_the_status() -> None:
    def status() -> str:
        raise AssertionError("asked")

    life = Lifecycle(Notifier(None), status)
    life.upkeep(1.0)
    with life.reloading(2.0):
        pass
    life.stopping()


# --- the daemon's use of it -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("alive", "backends", "status"),
    [
        ([True], {"chat": 3}, "forwarding: 1 worker, 3 backends"),
        ([True, True], {"chat": 3, "web": 3}, "forwarding: 2 workers, 6 backends"),
        ([True, False], {"chat": 1}, "forwarding: 1 worker, 1 backend"),
    ],
)
def test_ready_status(alive: list[bool], backends: dict[str, int], status: str) -> None:
    workers = [{"index": i, "alive": a} for i, a in enumerate(alive)]
    snapshot = {
        name: tuple(Backend("198.18.0.21", 9000 + i) for i in range(count))
        for name, count in backends.items()
    }
    assert ready_status(workers, snapshot) == status


class FakePlane:
    """What the daemon asks of a data plane between its upkeeps, nothing more."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def info(self) -> list[dict[str, object]]:
        return [{"index": i, "alive": True} for i in range(self.workers)]

    def change(self, change: object) -> None:
        pass


CHAT: Mapping[str, Any] = {
    "name": "chat",
    "protocol": "tcp",
    "port": 20000,
    "backends": [{"ip": f"198.18.0.{20 + i}", "port": 9000} for i in (1, 2, 3)],
}
CONFIG: Mapping[str, Any] = {"lb_ip": "198.18.0.2", "services": [CHAT]}


def daemon(
    listener: Listener,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
    reload_to: Mapping[str, Any] | None,
) -> Daemon:
    """A daemon whose environment names the listener (as systemd's would), with a fake data
    plane; `reload_to`: the config a reload reads (None: a broken file)."""
    for key, value in listener.environ(watchdog=1.0).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    def reload_config() -> Any:
        if reload_to is None:
            raise ConfigError("services[0].port", "not a port", "lbnat.json")
        return parse_config(reload_to)

    d = Daemon(parse_config(CONFIG), out=io.StringIO(), reload_config=reload_config)
    d.plane = FakePlane(workers)  # type: ignore[assignment]
    return d


@pytest.mark.parametrize("workers", [1, 2])
def test_the_daemon_says_ready_at_its_first_upkeep_then_pings(
    listener: Listener, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    d = daemon(listener, monkeypatch, workers, CONFIG)
    assert listener.take() == []  # nothing before the main loop turns
    for t in range(12):  # upkeeps 0.1 s apart
        d._maintain(50.0 + t / 10)
    ready = f"READY=1\nSTATUS=forwarding: {workers} worker{'s' if workers > 1 else ''}, 3 backends"
    assert listener.take() == [ready.encode(), b"WATCHDOG=1", b"WATCHDOG=1", b"WATCHDOG=1"]


@pytest.mark.parametrize("taken", [True, False], ids=["applied", "rejected"])
def test_a_reload_is_framed_by_reloading_and_ready(
    listener: Listener, monkeypatch: pytest.MonkeyPatch, taken: bool
) -> None:
    more = {
        **CONFIG,
        "services": [
            {**CHAT, "backends": [*CHAT["backends"], {"ip": "198.18.0.24", "port": 9000}]}
        ],
    }
    d = daemon(listener, monkeypatch, 2, more if taken else None)
    d._maintain(10.0)
    listener.take()
    before = time.monotonic()
    error = d.reload()
    assert (error is None) is taken, error
    reloading, ready = listener.take()
    assert reloading.startswith(b"RELOADING=1\nMONOTONIC_USEC="), reloading
    usec = int(reloading.split(b"\n")[1].split(b"=")[1])
    assert before * 1_000_000 <= usec <= time.monotonic() * 1_000_000
    backends = 4 if taken else 3
    assert ready == f"READY=1\nSTATUS=forwarding: 2 workers, {backends} backends".encode()


def test_a_failed_notification_is_one_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))  # systemd went away
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a ping due every other upkeep: all fail
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    out = io.StringIO()
    d = Daemon(parse_config(CONFIG), out=out)
    d.plane = FakePlane(1)  # type: ignore[assignment]
    for t in range(30):
        d._maintain(float(t))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cannot notify systemd at "), lines
