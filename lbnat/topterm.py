"""`lbnat top`'s I/O: status snapshots from the admin socket, timed, and the terminal.

lbnat.top computes and draws; this module asks the admin socket every `interval` seconds,
reads the clock between the snapshots, and shows the frames: on a terminal as one live,
full-screen view (rich's Live on the alternate screen, so quitting gives the shell its screen
back) with the keyboard in cbreak mode (`q` quits without Enter; Ctrl-C still raises SIGINT);
anything else (a pipe, a file) gets the frames printed one after another, plain.

An admin socket that stops answering (lbnat restarting, stopped) is shown in the view, above
the last good frame, and asked again every interval; one that never answered ends the command
with one line (`TopError`), before the terminal is touched.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import IO

from rich.console import Console, RenderableType
from rich.live import Live

from lbnat.control.server import AdminError, RequestRefused, ask_lbnat
from lbnat.top import Frame, Status, compute, render

QUIT_KEYS = frozenset(b"qQ")
PLAIN_WIDTH = 160  # columns of a frame printed to a pipe or a file
ASK_TIMEOUT = 2.0  # a busy lbnat answers in milliseconds; a hung one must not freeze the view


class TopError(Exception):
    """The admin socket could not be asked (one line, for the user)."""


def ask_status(path: str, timeout: float = ASK_TIMEOUT) -> Status:
    """One {"op": "status"} on the admin socket at `path`; TopError with a one-line reason."""
    try:
        return ask_lbnat(path, {"op": "status"}, timeout)
    except RequestRefused as refused:
        raise TopError(f"{path} refused: {refused.reason}") from None
    except AdminError as error:
        raise TopError(str(error)) from None


@dataclass
class Sampler:
    """The last good snapshot and its time; each `sample` makes the frame since then."""

    ask: Callable[[], Status]
    clock: Callable[[], float] = time.monotonic
    last: Status | None = None
    at: float = 0.0
    frame: Frame | None = None
    error: str | None = None

    def sample(self) -> None:
        """Ask once: a new frame (from the second good snapshot on), or the error. After an
        error the next good snapshot is measured against the last good one (a restarted lbnat's
        counters went back: lbnat.top counts them from their new values)."""
        try:
            status = self.ask()
        except TopError as error:
            self.error = str(error)
            return
        now = self.clock()
        if self.last is not None and now > self.at:
            self.frame = compute(self.last, status, now - self.at)
        self.last, self.at, self.error = status, now, None


@contextlib.contextmanager
def cbreak(stream: IO[str]) -> Iterator[int]:
    """The terminal on `stream` in cbreak mode (keys arrive one by one, unechoed; Ctrl-C still
    signals), restored whatever happens; yields its file descriptor."""
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def quit_pressed(fd: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for keys on `fd`; whether `q` was among them."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return False
        keys = os.read(fd, 64)
        if not keys:  # the terminal went away: nothing more will be typed, so quit
            return True
        if any(k in QUIT_KEYS for k in keys):
            return True
    return False


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (the terminal closed) end the view as Ctrl-C does, through every
    `finally`: the terminal is restored before the process exits."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(path: str, interval: float, once: bool, console: Console | None = None) -> int:
    """`lbnat top`: the exit code. TopError when the admin socket never answered."""
    console = console or Console(highlight=False)
    if not console.is_terminal:  # a pipe or a file has no width to fit: no column is cut
        console.width = max(console.width, PLAIN_WIDTH)
    sampler = Sampler(lambda: ask_status(path))
    sampler.sample()
    if sampler.error is not None:
        raise TopError(sampler.error)

    def draw() -> RenderableType:
        return render(sampler.frame, source=path, interval=interval, error=sampler.error)

    try:
        with stop_signals_interrupt():
            if once:
                time.sleep(interval)
                sampler.sample()
                if sampler.error is not None:
                    raise TopError(sampler.error)
                console.print(draw())
            elif console.is_terminal and sys.stdin.isatty():
                with cbreak(sys.stdin) as fd, Live(draw(), console=console, screen=True,
                                                   auto_refresh=False) as live:  # fmt: skip
                    while not quit_pressed(fd, interval):
                        sampler.sample()
                        live.update(draw(), refresh=True)
            else:  # a pipe or a file: each frame printed once, until interrupted
                while True:
                    time.sleep(interval)
                    sampler.sample()
                    console.print(draw())
                    console.print()
    except KeyboardInterrupt:
        pass
    return 0
