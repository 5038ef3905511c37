"""systemd's notify protocol (sd_notify(3)): tell the service manager that lbnat is ready, is
reloading, is stopping, and is still alive (the watchdog).

The protocol is one datagram per notification, "KEY=VALUE" lines, sent to the AF_UNIX socket
named by $NOTIFY_SOCKET (a path, or an abstract name written with a leading '@'). It is written
here by hand because there is no maintained pure-Python implementation to depend on:
python-systemd (the libsystemd bindings) builds a C extension, so installing it from PyPI
needs libsystemd-dev and a compiler on the LB; the `sdnotify` package on PyPI is unmaintained
and is itself these few lines. systemd declares the protocol stable
(systemd.io/PORTABILITY_AND_STABILITY): owning it costs nothing later. Without $NOTIFY_SOCKET
(lbnat run by hand, in a container, in the tests) every call is a no-op.

The helpers that read the environment and decide when a watchdog ping is due are pure (the
time comes in as an argument); `Notifier` is the I/O; `Lifecycle` is what the daemon says
when.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

__all__ = [
    "Lifecycle",
    "Notifier",
    "message",
    "notify_address",
    "ping_due",
    "watchdog_interval",
]

# Never wait for systemd: with one worker the watchdog is pinged from the packet loop itself,
# and a full queue (systemd hung) must not stall forwarding. A notification that fails (systemd
# gone, its queue full) is dropped; the error is said once, the failures after it are silent
# (a ping every few seconds would otherwise fill the log). MSG_NOSIGNAL: no SIGPIPE, ever.
SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


def notify_address(value: str | None) -> str | bytes | None:
    """Where $NOTIFY_SOCKET says to send: an absolute path, or an abstract socket's name
    ('@' becomes the leading NUL byte of the Linux abstract namespace). None for an absent or
    empty variable and for what sd_notify itself does not take (a relative path; the vsock:
    addresses of newer systemd versions are not supported here: lbnat runs on the host)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog's timeout in seconds from $WATCHDOG_USEC, or None when systemd expects no
    pings from this process: no (or a malformed, or zero) $WATCHDOG_USEC, or a $WATCHDOG_PID
    naming another process (the variable was inherited, as sd_watchdog_enabled(3) describes:
    only the process systemd watches may ping)."""
    owner = environ.get("WATCHDOG_PID")
    if owner is not None:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


def ping_due(last_ping: float | None, interval: float, now: float) -> bool:
    """Is a watchdog ping due at `now`? systemd kills the service when `interval` passes
    without one; pinging at half of it (what sd_watchdog_enabled(3) recommends) leaves the
    other half for an upkeep that runs late. The first ping is due at once."""
    return last_ping is None or now - last_ping >= interval / 2


def message(*fields: str) -> bytes:
    """One notification: the fields as newline-separated lines. A field's value is one line
    (a newline in a STATUS= text would start a field systemd does not know)."""
    return "\n".join(" ".join(field.splitlines()) for field in fields).encode()


class Notifier:
    """Sends notifications to systemd, or nothing at all when `address` is None."""

    def __init__(
        self,
        address: str | bytes | None,
        watchdog: float | None = None,
        on_error: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.address = address
        self.watchdog_interval = watchdog if address is not None else None
        self.on_error = on_error
        self.last_ping: float | None = None
        self.failed = False  # a send failed (and was reported)

    @classmethod
    def from_environment(
        cls,
        on_error: Callable[[str], None] = lambda text: None,
        environ: Mapping[str, str] | None = None,
        pid: int | None = None,
    ) -> Notifier:
        """The notifier systemd's variables describe ($NOTIFY_SOCKET, $WATCHDOG_USEC,
        $WATCHDOG_PID); os.environ and this process by default."""
        env = os.environ if environ is None else environ
        me = os.getpid() if pid is None else pid
        return cls(notify_address(env.get("NOTIFY_SOCKET")), watchdog_interval(env, me), on_error)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram; True if it left. Never raises: a failure is reported once."""
        if self.address is None:
            return False
        try:
            # A socket per notification, as sd_notify does: nothing to share between the threads
            # that notify (the main loop, a reload), and notifications are seconds apart.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message(*fields), SEND_FLAGS, self.address)
        except OSError as error:
            if not self.failed:
                self.failed = True
                reason = error.strerror or str(error)
                self.on_error(
                    f"cannot notify systemd at {self._where()}: {reason} (said once; lbnat "
                    "keeps running)"
                )
            return False
        return True

    def _where(self) -> str:
        address = self.address
        if isinstance(address, bytes):
            return "@" + address[1:].decode(errors="replace")
        return str(address)

    def ready(self, status: str) -> bool:
        """Start-up (or a reload) is complete; `status` is what `systemctl status` shows."""
        return self.send("READY=1", f"STATUS={status}")

    def reloading(self, now_monotonic: float, status: str = "reloading the config") -> bool:
        """A reload starts (READY=1 ends it). MONOTONIC_USEC is CLOCK_MONOTONIC in µs (Python's
        time.monotonic on Linux), which Type=notify-reload requires with RELOADING=1."""
        return self.send(
            "RELOADING=1", f"MONOTONIC_USEC={int(now_monotonic * 1_000_000)}", f"STATUS={status}"
        )

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def ping_if_due(self, now: float) -> bool:
        """A watchdog ping, if systemd asked for them and one is due at `now` (see `ping_due`).
        True if one was sent."""
        interval = self.watchdog_interval
        if interval is None or not ping_due(self.last_ping, interval, now):
            return False
        # Due again half an interval from now even when this one failed: no retry per upkeep.
        self.last_ping = now
        return self.watchdog()


class Log(Protocol):
    """lbnat.eventlog.Log, as far as this module uses it."""

    def __call__(self, text: str, event: str, *, level: int | None = None) -> None: ...


class Lifecycle:
    """What lbnat tells systemd, and when (lbnat.daemon calls these).

    READY=1 at the first upkeep of the main loop, not at the end of start-up: only the loop
    turning proves that what READY promises answers. By then start_plane has returned, after
    every worker process sent its Ready (N workers) or with the loop built on this very thread
    (one worker: before it runs, a status question waits); the nftables guard, the
    registration and admin servers and the health thread are up; the stop and reload signal
    handlers are installed (a SIGHUP before them would kill lbnat).

    The upkeep runs every TICK_EVERY (0.1 s) between batches on the one-worker loop, also under
    load (a batch is bounded), and every SUPERVISE_EVERY (0.2 s) on the N-worker supervisor;
    each finds out whether a watchdog ping is due. A main loop that hangs stops pinging, and
    systemd restarts lbnat (WatchdogSec= in scripts/systemd/lbnat.service).

    A reload is framed by RELOADING=1 and READY=1, whatever its outcome (lbnat runs on with the
    old config or the new), once READY=1 was said: before that, systemd would take the reload's
    READY=1 for the end of start-up. STOPPING=1 comes on the way out, from the main thread (a
    failed send is logged, and a signal handler may have interrupted that thread inside the
    log's lock); no READY=1 after it, from a reload that ends late.
    """

    def __init__(self, notifier: Notifier, status: Callable[[], str | None]) -> None:
        self.notifier = notifier
        self.status = status  # the STATUS= line of a READY=1; None: nothing to say yet
        self.ready = False
        self.stopped = False

    @classmethod
    def from_environment(cls, status: Callable[[], str | None], log: Log) -> Lifecycle:
        """The notifier of os.environ; a failed send goes to `log` as event "sdnotify_failed"."""

        def failed(text: str) -> None:
            log(text, "sdnotify_failed", level=logging.WARNING)

        return cls(Notifier.from_environment(failed), status)

    def upkeep(self, now: float) -> None:
        """One turn of the main loop: READY=1 the first time, then a ping when one is due."""
        if not self.ready:
            self.ready = self._say_ready()
        self.notifier.ping_if_due(now)

    def _say_ready(self) -> bool:
        if self.stopped or not self.notifier.enabled:
            return True  # nothing to say, or too late to say it
        status = self.status()
        if status is None:
            return False
        self.notifier.ready(status)
        return True

    @contextmanager
    def reloading(self, now_monotonic: float) -> Iterator[None]:
        """Around one reload (`now_monotonic`: time.monotonic() as it starts)."""
        framed = self.ready
        if framed:
            self.notifier.reloading(now_monotonic)
        try:
            yield
        finally:
            if framed:
                self._say_ready()

    def stopping(self) -> None:
        self.stopped = True
        self.notifier.stopping()
