"""lbnat under systemd's notify protocol (lbnat.sdnotify, scripts/systemd/lbnat.service's
Type=notify and WatchdogSec=), with the test playing systemd: it binds the datagram socket
that $NOTIFY_SOCKET names and sets $WATCHDOG_USEC before it starts lbnat in the lab.

Asserted: READY=1 comes once lbnat answers (an admin `status` sent the moment READY=1 arrives
already shows every worker alive); WATCHDOG=1 keeps coming at about half the interval; a SIGHUP
gives RELOADING=1 with a MONOTONIC_USEC taken after the signal, then READY=1, also when the new
config is rejected; SIGTERM gives STOPPING=1 and nothing after it. Every datagram comes from
lbnat's main process (NotifyAccess=main drops the others), checked with SCM_CREDENTIALS.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lbnat.control.client import request_line
from lbnat.control.protocol import encode
from lbnat_lab.netns import LB_IP, host_ip
from tests.integration.conftest import (
    BACKEND_PORT,
    WAIT,
    Bed,
    console_script,
    variant_id,
)

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s: a few seconds show the cadence
BACKENDS = ("b1", "b2", "b3")


@dataclass(frozen=True)
class Datagram:
    fields: tuple[str, ...]
    pid: int  # the sender's, from SCM_CREDENTIALS
    at: float  # time.monotonic() when the test read it

    def has(self, field: str) -> bool:
        return field in self.fields

    def value(self, key: str) -> str | None:
        for field in self.fields:
            name, _, value = field.partition("=")
            if name == key:
                return value
        return None


class FakeSystemd:
    """The notify socket and what arrived on it, read by a thread; `on_ready` runs on that
    thread the moment a READY=1 is read (before the next datagram is)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)  # so that the reader sees `closing` in time
        self.got: list[Datagram] = []
        self.on_ready: list[Any] = []  # what each READY=1's callback returned
        self.ready_callback: Any = None
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._read, name="fake-systemd", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        creds = struct.calcsize("3i")
        while not self._closing:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:creds])[0]
            datagram = Datagram(tuple(data.decode().split("\n")), pid, time.monotonic())
            if datagram.has("READY=1") and self.ready_callback is not None:
                result = self.ready_callback()
                with self._cond:
                    self.on_ready.append(result)
            with self._cond:
                self.got.append(datagram)
                self._cond.notify_all()

    def snapshot(self) -> list[Datagram]:
        with self._cond:
            return list(self.got)

    def wait_for(self, field: str, after: int = 0, timeout: float = WAIT) -> int:
        """The index of the first datagram at or after `after` holding `field`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for index in range(after, len(self.got)):
                    if self.got[index].has(field):
                        return index
                left = deadline - time.monotonic()
                if left <= 0:
                    fields = [d.fields for d in self.got]
                    raise AssertionError(f"no {field} within {timeout} s; got {fields}")
                self._cond.wait(left)

    def close(self) -> None:
        self._closing = True
        self._thread.join(2.0)
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    """The socket, and lbnat's environment naming it (Lab.popen passes os.environ on)."""
    path = tmp_path / "notify"
    assert len(bytes(path)) < 108, f"tmp_path too long for an AF_UNIX address: {path}"
    fake = FakeSystemd(path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)  # lbnat's pid is not known before it runs
    try:
        yield fake
    finally:
        fake.close()


def write_config(path: Path, backends: tuple[str, ...]) -> None:
    service = {
        "name": "chat",
        "protocol": "tcp",
        "port": 20000,
        "health": {"interval": 0.2, "timeout": 0.3},
        "backends": [{"ip": host_ip(b), "port": BACKEND_PORT} for b in backends],
    }
    path.write_text(json.dumps({"lb_ip": LB_IP, "services": [service]}))


# The systemd side does not depend on the fast path: one worker and N, Python path only.
@pytest.mark.parametrize("bed", [(1, "off"), (2, "off")], ids=variant_id, indirect=True)
def test_systemd_hears_ready_watchdog_reload_and_stop(bed: Bed, systemd: FakeSystemd) -> None:
    workers = int(os.environ["LBNAT_WORKERS"])  # the bed's variant
    for b in BACKENDS:
        bed.chat_server(b)
    config = bed.tmp / "lbnat.json"
    write_config(config, BACKENDS[:2])
    admin = str(bed.tmp / "admin.sock")

    def status_now() -> Any:
        try:
            return json.loads(request_line(admin, encode({"op": "status"})))
        except OSError as error:  # no admin socket yet: READY=1 came too early
            return f"status failed: {error!r}"

    systemd.ready_callback = status_now
    lbnat = bed.start(
        "lb", console_script("lbnat"), "run", "--config", str(config), "--admin-socket", admin,
        name="lbnat",
    )  # fmt: skip

    # READY=1, once lbnat answers
    ready = systemd.wait_for("READY=1", timeout=30.0)
    status = systemd.on_ready[0]
    assert isinstance(status, dict) and status.get("ok"), status
    assert [w["alive"] for w in status["workers"]] == [True] * workers, status["workers"]
    first = systemd.got[ready]
    expected = f"forwarding: {workers} worker{'s' if workers > 1 else ''}, 2 backends"
    assert first.value("STATUS") == expected, first
    assert lbnat.out.count("srcIP : ") == 1  # the start lines were written before it

    # WATCHDOG=1 every 0.5 s (lbnat's clock), counted over about 3 s after READY=1
    time.sleep(3.0)
    since_ready = [d for d in systemd.snapshot()[ready:] if d.at - first.at <= 3.0]
    pings = sum(d.has("WATCHDOG=1") for d in since_ready)
    # 0.5 s apart at least: at most 7 in 3 s (an upkeep each, 0.1 or 0.2 s apart, would be
    # 15 or more); a busy machine may delay some, not all
    assert 2 <= pings <= 8, [(round(d.at - first.at, 2), d.fields) for d in since_ready]

    # SIGHUP with a good config: RELOADING=1 (MONOTONIC_USEC after the signal), READY=1
    for backends, outcome in ((BACKENDS, "reload : applied"), (None, "reload : rejected")):
        mark = len(systemd.snapshot())
        if backends is None:
            config.write_text('{"services": [{"port": "not a port"}]}')
        else:
            write_config(config, backends)
        before = time.monotonic()
        lbnat.signal(signal.SIGHUP)
        reloading = systemd.wait_for("RELOADING=1", after=mark)
        usec = systemd.got[reloading].value("MONOTONIC_USEC")
        assert usec is not None and usec.isdigit(), systemd.got[reloading]
        assert before * 1_000_000 <= int(usec) <= systemd.got[reloading].at * 1_000_000
        again = systemd.wait_for("READY=1", after=reloading)
        lbnat.expect(outcome)
        backends_now = 3  # b3 joined in the first reload; the rejected one keeps it
        assert systemd.got[again].value("STATUS") == (
            f"forwarding: {workers} worker{'s' if workers > 1 else ''}, {backends_now} backends"
        )
        between = systemd.snapshot()[reloading + 1 : again]
        assert all(d.fields == ("WATCHDOG=1",) for d in between), between

    # SIGTERM: STOPPING=1, then nothing (the main loop is over: no more pings)
    mark = len(systemd.snapshot())
    assert bed.stop(lbnat) == 0
    stopping = systemd.wait_for("STOPPING=1", after=mark)
    time.sleep(0.5)  # anything sent after it would be here by now
    assert systemd.snapshot()[stopping + 1 :] == []
    assert lbnat.out.snapshot()[-1] == "lbnat stopped"

    # every datagram from lbnat's main process (NotifyAccess=main), never a worker
    assert {d.pid for d in systemd.snapshot()} == {lbnat.pid}
    assert len(systemd.on_ready) == 3  # start-up and the two reloads
