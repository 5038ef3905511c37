#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Screenshots for the README, from real runs in a network-namespace lab built on the spot.

    sudo python3 scripts/screenshots.py [--out docs/screenshots] [--prefix lbshot] [--svg]

Writes five PNGs (about 20 s on two cores):

    chat-demo.png   loadbalancerLobin's log and six chat clients' transcripts: round-robin
                    puts (test1, test4) (test2, test5) (test3, test6) on one server each
    health.png      lbnat's health log while the chat server of b2 is stopped and started again
    status.png      `lbnat status` against the running lbnat with the six clients connected
    sessions.png    `lbnat sessions`, the same moment
    top.png         `lbnat top` in a terminal (tmux) while four clients chat at different rates
                    through lbnat, a fifth connects and leaves five times a second, and b3's
                    chat server is down

Two halves:

- capture (thin, needs root): scripts/lab.sh's lab through lbnat_lab.netns's `Lab`
  (namespaces <prefix>-{c1,c2,lb,b1,b2,b3,sw}, 198.18.0.0/24), every process started by pid
  and stopped by pid; the lab is taken down whatever happens (SIGINT, SIGTERM and SIGHUP
  included). Every process runs this checkout's lbnat (PYTHONPATH is the repo this file is
  in): `lbnat` is `python3 -m lbnat.cli` and `loadbalancerLobin` is `lbnat.cli:lobin_main`,
  the functions behind the console scripts of the same names. LBNAT_ADMIN_SOCKET is set for
  all of them to the lab's own socket (/run/lbnat/<prefix>.sock), so `lbnat status` and
  `lbnat sessions` reach this lab's lbnat and no other.
- render (pure): captured lines -> SVG (rich's terminal export, DejaVu Sans Mono) -> PNG
  (cairosvg, or rsvg-convert). The text is what the processes printed, untouched; lines are
  coloured by kind (a command line, what was typed, a note of what the script did) and a few
  words are highlighted (alive, bad, dead). tests/unit/test_screenshots.py tests this half.

Needs: pip install rich cairosvg (cairosvg needs Debian's libcairo2), Debian's
fonts-dejavu-core and tmux.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.text import Text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "screenshots"

# --- rendering (pure: text in, SVG / PNG out) ----------------------------------------------------

FONT = "DejaVu Sans Mono"
FONT_ASPECT = 0.602  # DejaVu Sans Mono's advance width / em (1233 / 2048)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

KIND_STYLES = {
    "out": "",  # what a process printed
    "prompt": "bold #e0e0e0",  # the command that was run, as typed at a shell
    "input": "bold #6fc3df",  # a line typed into a program's stdin
    "note": "italic #c397d8",  # what the script did at that moment (not program output)
}
HIGHLIGHTS: tuple[tuple[str, str], ...] = (
    (r"\balive\b", "bold #8ccf7e"),
    (r"\bbad\b", "bold #e5c76b"),
    (r"\bdead\b", "bold #e57474"),
)


@dataclass(frozen=True)
class Line:
    text: str
    kind: str = "out"  # a key of KIND_STYLES


@dataclass(frozen=True)
class Pane:
    """One terminal's lines; a titled pane is drawn in a box."""

    lines: tuple[Line, ...]
    title: str = ""


@dataclass(frozen=True)
class Screen:
    """One screenshot: a window titled `title` whose rows of panes are drawn top to bottom,
    the panes of a row side by side with equal widths."""

    name: str  # file stem
    title: str
    rows: tuple[tuple[Pane, ...], ...]


def renderer_missing() -> str | None:
    """Why render_png cannot work here, or None if it can."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return "needs rich (pip install rich)"
    try:
        import cairosvg  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401
    except (ImportError, OSError):  # OSError: cairocffi finds no libcairo
        if shutil.which("rsvg-convert") is None:
            return "needs cairosvg (pip install cairosvg; Debian libcairo2) or rsvg-convert"
    return None


def styled(line: Line) -> Text:
    from rich.text import Text

    if line.kind not in KIND_STYLES:
        raise ValueError(f"unknown line kind {line.kind!r}")
    text = Text.from_ansi(line.text, style=KIND_STYLES[line.kind])
    text.no_wrap = False
    if line.kind == "out":
        for pattern, style in HIGHLIGHTS:
            text.highlight_regex(pattern, style)
    return text


def _pane_text(pane: Pane) -> Text:
    from rich.text import Text

    return Text("\n").join(styled(line) for line in pane.lines)


def _longest(pane: Pane) -> int:
    from rich.text import Text

    return max((Text.from_ansi(line.text).cell_len for line in pane.lines), default=0)


def screen_width(screen: Screen) -> int:
    """Columns the window needs so that no captured line wraps."""
    width = len(screen.title) + 12  # the title between the window buttons
    for row in screen.rows:
        boxed = len(row) > 1 or any(p.title for p in row)
        if boxed:
            cell = max(max(_longest(p), len(p.title) + 4) for p in row) + 5  # border, padding
            width = max(width, cell * len(row))
        else:
            width = max(width, _longest(row[0]))
    return width


def render_svg(screen: Screen) -> str:
    """The screen as an SVG terminal window (rich's export, with a local monospace font)."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    console = Console(
        record=True,
        width=screen_width(screen),
        file=io.StringIO(),
        force_terminal=True,
        color_system="truecolor",
        highlight=False,
        emoji=False,
        markup=False,
    )
    for row in screen.rows:
        if len(row) == 1 and not row[0].title:
            console.print(_pane_text(row[0]), overflow="fold")
            continue
        grid = Table.grid(expand=True, padding=(0, 1, 0, 0))
        for _ in row:
            grid.add_column(ratio=1)
        grid.add_row(
            *(
                Panel(
                    _pane_text(p),
                    title=p.title or None,
                    title_align="left",
                    border_style="#707880",
                )
                for p in row
            )
        )
        console.print(grid)
    svg = console.export_svg(
        title=screen.title,
        font_aspect_ratio=FONT_ASPECT,
        unique_id=f"lbnat-{re.sub(r'[^A-Za-z0-9]', '-', screen.name)}",
        code_format=svg_format(),
    )
    return svg


def svg_format() -> str:
    """rich's SVG template with the web font (fetched from a CDN) replaced by a local one:
    an SVG renderer with no network and no Fira Code would fall back to a proportional font,
    and the columns would no longer line up."""
    from rich._export_format import CONSOLE_SVG_FORMAT

    template = re.sub(r"\s*@font-face \{\{.*?\}\}", "", CONSOLE_SVG_FORMAT, flags=re.S)
    template = template.replace("font-family: Fira Code, monospace;", f'font-family: "{FONT}";')
    template = template.replace("font-family: arial;", 'font-family: "DejaVu Sans";')
    if "cdnjs" in template or FONT not in template:
        raise RuntimeError("rich's SVG template changed; update svg_format()")
    return template


def svg_to_png(svg: str) -> bytes:
    """Rasterise with cairosvg, or else rsvg-convert."""
    try:
        import cairosvg
    except (ImportError, OSError):
        return _rsvg_convert(svg)
    png: bytes = cairosvg.svg2png(bytestring=svg.encode("utf-8"), unsafe=False)
    return png


def _rsvg_convert(svg: str) -> bytes:
    tool = shutil.which("rsvg-convert")
    if tool is None:
        raise RuntimeError(renderer_missing() or "no SVG renderer")
    done = subprocess.run(
        [tool, "--format", "png"], input=svg.encode(), capture_output=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"rsvg-convert failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def svg_size(svg: str) -> tuple[float, float]:
    match = re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg)
    if match is None:
        raise ValueError("SVG without a viewBox")
    return float(match[1]), float(match[2])


def render_png(screen: Screen) -> bytes:
    return svg_to_png(render_svg(screen))


# --- capture (thin: root, the lab, real processes) -----------------------------------------------

LB_IP = "198.18.0.2"
VIP_PORT = 20000
BACKEND_PORT = 9000
BACKEND_HOSTS = ("b1", "b2", "b3")
HEALTH_INTERVAL = 0.5
SETTLE = 2.0  # seconds between the chat and `lbnat status`
WAIT = 15.0  # bound of every wait for a line


class Stream:
    """Every line one pipe gives, with the time it came, read by a daemon thread."""

    def __init__(self, pipe: IO[bytes], name: str) -> None:
        self.name = name
        self.lines: list[tuple[float, str]] = []
        self.closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe: IO[bytes]) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                with self._cond:
                    self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def texts(self) -> list[str]:
        with self._cond:
            return [text for _, text in self.lines]

    def wait_for(self, pattern: str, start: int = 0, timeout: float = WAIT) -> int:
        """Index of the first line from `start` on that matches `pattern` (a regex)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for index in range(start, len(self.lines)):
                    if regex.search(self.lines[index][1]):
                        return index
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    tail = "\n".join(text for _, text in self.lines[-20:])
                    why = "output ended" if self.closed else f"{timeout:.0f} s passed"
                    raise TimeoutError(f"{self.name}: {why} before /{pattern}/:\n{tail}")
                self._cond.wait(left)


@dataclass
class Terminal:
    """One process's output plus the notes and typed lines around it, in time order."""

    name: str
    out: Stream
    err: Stream
    extra: list[tuple[float, Line]] = field(default_factory=list)

    def note(self, text: str, kind: str = "note") -> None:
        self.extra.append((time.monotonic(), Line(text, kind)))

    def lines(self) -> tuple[Line, ...]:
        with self.out._cond, self.err._cond:
            printed = [(t, Line(text)) for t, text in self.out.lines + self.err.lines]
        merged = sorted(printed + self.extra, key=lambda item: item[0])
        return tuple(line for _, line in merged)


class Capture:
    """The lab and the processes of one run of this script."""

    def __init__(self, prefix: str) -> None:
        sys.path.insert(0, str(REPO))
        from lbnat_lab.netns import CHAT, LAB_SH, Lab, checkout_env, skip_reason

        if (reason := skip_reason()) is not None:
            raise SystemExit(f"screenshots: cannot build the lab: {reason}")
        self.chat = CHAT
        # a lab of this prefix left by a killed run: its processes by pid, then its namespaces
        subprocess.run(
            ["bash", str(LAB_SH), "down"],
            env={**os.environ, "LAB_PREFIX": prefix},
            capture_output=True,
            timeout=60,
            check=False,
        )
        self.lab = Lab(prefix=prefix)
        self.admin_socket = self.lab.admin_socket
        self.env = checkout_env(PYTHONUNBUFFERED="1", LBNAT_ADMIN_SOCKET=self.admin_socket)

    def close(self) -> None:
        self.lab.close()

    def start(self, host: str, argv: Sequence[str], stdin: bool = False) -> tuple[Any, Terminal]:
        popen = self.lab.popen(
            host, *argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, env=self.env
        )
        name = f"{host}: {' '.join(argv[2:4])}"
        assert popen.stdout is not None and popen.stderr is not None
        return popen, Terminal(name, Stream(popen.stdout, name), Stream(popen.stderr, name))

    def chat_server(self, host: str) -> Any:
        popen, term = self.start(
            host, [*self.chat, "server", "--port", str(BACKEND_PORT), "--name", host]
        )
        term.out.wait_for("listening")
        return popen

    def lbnat(self, argv: Sequence[str]) -> tuple[Any, Terminal]:
        popen, term = self.start("lb", [sys.executable, *argv])
        term.out.wait_for(r"^srcIP : ")
        for host in BACKEND_HOSTS:
            term.out.wait_for(rf"IP : {self.lab.ip(host)}, Port : {BACKEND_PORT} Server is")
        return popen, term

    def admin(self, command: str) -> Pane:
        done = self.lab.run("lb", sys.executable, "-m", "lbnat.cli", command, env=self.env)
        shown = f"lb# lbnat {command}"
        return Pane((Line(shown, "prompt"), *(Line(x) for x in done.stdout.splitlines())))


def backend_words(capture: Capture) -> list[str]:
    words: list[str] = []
    for host in BACKEND_HOSTS:
        words += [capture.lab.ip(host), str(BACKEND_PORT)]
    return words


def capture_chat(capture: Capture) -> list[Screen]:
    """loadbalancerLobin and six clients (screen 1), then status and sessions (3, 4)."""
    words = [LB_IP, *backend_words(capture)]
    lobin = [
        "-c",
        "import sys; from lbnat.cli import lobin_main; sys.argv[0] = 'loadbalancerLobin'; "
        "lobin_main()",
        *words,
    ]
    lb_popen, lb = capture.lbnat(lobin)
    lb.extra.insert(0, (0.0, Line(f"lb# loadbalancerLobin {' '.join(words)}", "prompt")))

    clients: list[tuple[str, str, Any, Terminal]] = []
    for i in range(1, 7):
        name, host = f"test{i}", f"c{(i - 1) % 2 + 1}"
        popen, term = capture.start(
            host, [*capture.chat, "client", LB_IP, str(VIP_PORT), name], stdin=True
        )
        term.out.wait_for(r"^\* connected to ")
        lb.out.wait_for(rf"new client <{capture.lab.ip(host)},")
        clients.append((name, host, popen, term))
    for name, _, popen, term in clients:
        line = f"hello from {name}"
        term.note(line, "input")
        popen.stdin.write(line.encode() + b"\n")
        popen.stdin.flush()
        term.out.wait_for(rf"^\[{name}\] {line}$")
    for i, (_, _, _, term) in enumerate(clients):  # each hears its partner's line too
        partner = clients[(i + 3) % 6][0]
        term.out.wait_for(rf"^\[{partner}\] hello from {partner}$")
    time.sleep(0.3)  # anything that should not arrive would have by now

    landed = {}
    for name, host, _, term in clients:
        server = term.out.texts()[0].removeprefix("* connected to ")
        landed[name] = (host, server)
    panes = [
        Pane(term.lines(), f"{name} on {host} -> {landed[name][1]}")
        for name, host, _, term in clients
    ]
    demo = Screen(
        "chat-demo",
        "lbnat: six chat clients through loadbalancerLobin (round-robin over b1 b2 b3)",
        (
            (Pane(lb.lines(), f"lb {LB_IP}: lbnat"),),
            tuple(panes[:3]),
            tuple(panes[3:]),
        ),
    )
    time.sleep(SETTLE)  # flows a few seconds old, as an operator would find them
    status = Screen(
        "status", "lbnat status (six chat clients connected)", ((capture.admin("status"),),)
    )
    sessions = Screen(
        "sessions", "lbnat sessions (six chat clients connected)", ((capture.admin("sessions"),),)
    )

    for _, _, popen, _ in clients:
        popen.stdin.write(b"q\n")
        popen.stdin.flush()
    lb.out.wait_for(r"Current NAT table length : 0")
    capture.lab.stop(lb_popen)
    return [demo, status, sessions]


def capture_health(capture: Capture, servers: dict[str, Any]) -> Screen:
    """lbnat with short health checks while the chat server of b2 stops and starts."""
    b2 = capture.lab.ip("b2")
    options = ["--health-interval", str(HEALTH_INTERVAL), "--health-timeout", "0.3"]
    words = [LB_IP, *backend_words(capture), *options]
    popen, lb = capture.lbnat(["-m", "lbnat.cli", "run", *words])
    shown = f"lb# lbnat run {' '.join(words)}"
    lb.extra.insert(0, (0.0, Line(shown, "prompt")))

    at = lb.out.wait_for(rf"IP : {b2}, Port : {BACKEND_PORT} Server is alive")
    at = lb.out.wait_for(rf"IP : {b2}, Port : {BACKEND_PORT} Server is alive", at + 1)
    lb.note(f"# b2: stop the chat server (kill -TERM {servers['b2'].pid})")
    capture.lab.stop(servers["b2"])
    at = lb.out.wait_for(rf"IP : {b2}, Port : {BACKEND_PORT} Server is dead", at + 1)
    lb.note("# b2: start the chat server again")
    servers["b2"] = capture.chat_server("b2")
    at = lb.out.wait_for(rf"IP : {b2}, Port : {BACKEND_PORT} Server is alive", at + 1)
    lb.out.wait_for(rf"IP : {b2}, Port : {BACKEND_PORT} Server is alive", at + 1)
    lb.note(f"# ^C (kill -INT {popen.pid})")
    popen.send_signal(signal.SIGINT)
    popen.wait(WAIT)
    deadline = time.monotonic() + 2.0  # the reader thread takes the last lines
    while not lb.out.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    return Screen(
        "health",
        "lbnat health checks: b2's chat server stops, then starts again",
        ((Pane(lb.lines()),),),
    )


# A chat client that talks without pause (for `lbnat top`): 500-byte lines at RATE a second,
# every line the server relays back read and dropped. One process, ended by pid.
CHATTER = """
import socket, sys, threading, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def read():
    while conn.recv(65536):
        pass
threading.Thread(target=read, daemon=True).start()
line, pause = b"x" * 499 + b"\\n", 1 / float(sys.argv[3])
while True:
    conn.sendall(line)
    time.sleep(pause)
"""
CHATTERS = (("c1", 400), ("c2", 200), ("c1", 100), ("c2", 50))  # (host, lines a second)
# A client that connects, reads the greeting and leaves, about five times a second: new flows.
CHURNER = """
import socket, sys, time
while True:
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as conn:
            conn.recv(100)
    except OSError:
        pass
    time.sleep(0.2)
"""
TOP_SIZE = (132, 14)  # the terminal `lbnat top` runs in: wide enough for its full table
ROW_RE = re.compile(r"^\s*(?P<address>198\.18\.0\.\d+:\d+)\s+(?P<health>\w+)(?P<rest>.*)$")


def top_ready(screen: str, up: Sequence[str], down: str) -> bool:
    """Whether `lbnat top` shows the backends `up` alive with packets both ways and `down`
    dead: the moment to take the screenshot."""
    rows = {}
    for line in screen.splitlines():
        if (m := ROW_RE.match(line)) is not None:
            rows[m["address"]] = (m["health"], m["rest"].split())
    if rows.get(down, ("", []))[0] != "dead":
        return False
    service = next((line.split() for line in screen.splitlines() if line.startswith("tcp:")), [])
    if len(service) < 7 or service[6] == "0":  # name proto/port scheduler n/m alive active new/s
        return False
    # rest: weight, active, new/s, to-backend pkt/s, bit/s, to-client pkt/s, bit/s, NAT ports
    return all(
        a in rows and rows[a][0] == "alive" and rows[a][1][3] != "0" and rows[a][1][5] != "0"
        for a in up
    )


def tmux_screen(
    capture: Capture, argv: Sequence[str], ready: Callable[[str], bool]
) -> tuple[Line, ...]:
    """Run `argv` in the lb namespace in a terminal (a tmux server of our own, its own socket),
    wait until its screen is `ready`, and return that screen with its colours (SGR escapes);
    then `q`, and the server is killed."""
    name = f"{capture.lab.prefix}-top"
    tmux = ["tmux", "-L", name]
    width, height = TOP_SIZE
    env = [
        f"PYTHONPATH={REPO}",
        f"LBNAT_ADMIN_SOCKET={capture.admin_socket}",
        "TERM=xterm-256color",  # rich then draws with 256 colours, as in most terminals
    ]
    command = ["ip", "netns", "exec", capture.lab.ns("lb"), "env", *env, *argv]
    subprocess.run([*tmux, "-f", "/dev/null", "-u", "new-session", "-d", "-x", str(width),
                    "-y", str(height), "--", *command], check=True, timeout=10)  # fmt: skip
    where = [*tmux, "display-message", "-p", "#{socket_path}"]
    socket_path = subprocess.run(where, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        deadline = time.monotonic() + WAIT
        while True:
            plain = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True,
                                   text=True, check=True, timeout=10).stdout  # fmt: skip
            if ready(plain):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"lbnat top: the view never showed what it should:\n{plain}")
            time.sleep(0.25)
        shown = subprocess.run([*tmux, "capture-pane", "-p", "-e"], capture_output=True,
                               text=True, check=True, timeout=10).stdout  # fmt: skip
        subprocess.run([*tmux, "send-keys", "q"], check=True, timeout=10)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10, check=False)
        if socket_path:  # a killed tmux server leaves its socket behind
            Path(socket_path).unlink(missing_ok=True)
    lines = [Line(text) for text in shown.rstrip("\n").split("\n")]
    while lines and not lines[-1].text.strip():
        lines.pop()
    return tuple(lines)


def capture_top(capture: Capture, servers: dict[str, Any]) -> Screen:
    """lbnat with b3's chat server stopped, four clients chatting at different rates, one
    coming and going, and `lbnat top` in a terminal in the lb namespace."""
    b3 = capture.lab.ip("b3")
    capture.lab.stop(servers["b3"])
    options = ["--health-interval", str(HEALTH_INTERVAL), "--health-timeout", "0.3"]
    popen, lb = capture.lbnat(["-m", "lbnat.cli", "run", LB_IP, *backend_words(capture), *options])
    lb.out.wait_for(rf"IP : {b3}, Port : {BACKEND_PORT} Server is dead")
    chatters = [
        capture.start(host, [sys.executable, "-c", CHATTER, LB_IP, str(VIP_PORT), str(rate)])[0]
        for host, rate in CHATTERS
    ]
    chatters.append(capture.start("c2", [sys.executable, "-c", CHURNER, LB_IP, str(VIP_PORT)])[0])
    up = [f"{capture.lab.ip(h)}:{BACKEND_PORT}" for h in ("b1", "b2")]
    lines = tmux_screen(
        capture,
        [sys.executable, "-m", "lbnat.cli", "top"],
        lambda screen: top_ready(screen, up, f"{b3}:{BACKEND_PORT}"),
    )
    for chatter in chatters:
        capture.lab.stop(chatter)
    capture.lab.stop(popen)
    return Screen(
        "top",
        "lbnat top: four clients chatting, one coming and going, b3's chat server stopped",
        ((Pane(lines),),),
    )


def capture_all(prefix: str) -> list[Screen]:
    capture = Capture(prefix)
    try:
        servers = {host: capture.chat_server(host) for host in BACKEND_HOSTS}
        screens = capture_chat(capture)
        screens.insert(1, capture_health(capture, servers))
        screens.append(capture_top(capture, servers))
        return screens
    finally:
        capture.close()


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the run with KeyboardInterrupt, so every `finally` runs
    (SIGINT too when the shell started us with it ignored, as `cmd &` does); a second signal
    during the cleanup is ignored, so the cleanup is not cut short."""
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def handler(signum: int, frame: FrameType | None) -> None:
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def write(screens: Sequence[Screen], out: Path, svg: bool, log: Callable[[str], None]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for screen in screens:
        image = render_svg(screen)
        png = svg_to_png(image)
        (out / f"{screen.name}.png").write_bytes(png)
        if svg:
            (out / f"{screen.name}.svg").write_text(image)
        w, h = png_size(png)
        log(f"screenshots: {out / screen.name}.png  {w}x{h}  {len(png) // 1024} KB")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the PNGs go")
    parser.add_argument(
        "--prefix",
        default=os.environ.get("LAB_PREFIX", "lbshot"),
        help="lab namespace prefix (default $LAB_PREFIX or lbshot)",
    )
    parser.add_argument("--svg", action="store_true", help="keep the SVGs too")
    args = parser.parse_args(argv)
    if (reason := renderer_missing()) is not None:
        print(f"screenshots: {reason}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("screenshots: run as root (sudo): the lab uses network namespaces", file=sys.stderr)
        return 2
    if shutil.which("tmux") is None:
        print("screenshots: needs tmux (apt-get install tmux) for lbnat top", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        with signals_raise():
            screens = capture_all(args.prefix)
    except KeyboardInterrupt as stop:
        print(f"screenshots: interrupted ({stop or 'SIGINT'}); lab taken down", file=sys.stderr)
        return 130
    write(screens, args.out, args.svg, print)
    print(f"screenshots: done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
