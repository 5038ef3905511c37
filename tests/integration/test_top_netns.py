"""`lbnat top` as a person uses it: typed at a shell in a terminal (tmux, on a private server
socket) in the LB's namespace while two clients stream through lbnat, read off the screen
(`tmux capture-pane`), told about lbnat going away, and quit with `q`, which gives the shell
its screen and its terminal settings back."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from lbnat_lab.netns import LB_IP, REPO, host_ip
from tests.integration.conftest import (
    BACKEND_PORT,
    VIP_PORT,
    WAIT,
    Bed,
    console_script,
    require,
)

pytestmark = pytest.mark.netns

T = TypeVar("T")

WIDTH, HEIGHT = 160, 40
PROMPT = "lb# "
FAST = ("--health-interval", "0.2", "--health-timeout", "0.5")
# A client that streams for as long as it runs: 64 KB, a short pause, again (about 3 MB/s), so
# every refresh of the view sees packets both ways (data to the backend, ACKs to the client),
# and a sink for it. One process each, no child (a shell loop under socat would outlive socat
# and hold the output pipes the bed reads), so SIGTERM by pid ends it all.
STREAM = """
import socket, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
while True:
    conn.sendall(bytes(65536))
    time.sleep(0.02)
"""
SINK = """
import socket, sys, threading
def drain(conn):
    while conn.recv(65536):
        pass
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    threading.Thread(target=drain, args=(server.accept()[0],), daemon=True).start()
"""
SERVING, DOWN = ("b1", "b2"), "b3"  # b3 has nothing listening: its probes fail, it is dead


class Tmux:
    """One tmux server of our own (`-L`: its own socket, no other tmux is touched), one
    window of WIDTH x HEIGHT running a shell in the LB's namespace."""

    def __init__(self, namespace: str) -> None:
        self.socket = f"lbnat-top-{secrets.token_hex(4)}"
        shell = [
            "ip", "netns", "exec", namespace, "env", f"PS1={PROMPT}", f"PYTHONPATH={REPO}",
            "bash", "--norc", "--noprofile",
        ]  # fmt: skip
        # -f /dev/null: no tmux.conf of this machine's; -u: UTF-8 (rich draws box lines)
        self.tmux("-f", "/dev/null", "-u", "new-session", "-d", "-x", str(WIDTH), "-y",
                  str(HEIGHT), "--", *shell)  # fmt: skip
        pid, self.path = self.tmux("display-message", "-p", "#{pid} #{socket_path}").stdout.split()
        self.pid = int(pid)

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True,
            timeout=10,
        )  # fmt: skip

    def type(self, line: str) -> None:
        self.tmux("send-keys", "-l", line)
        self.tmux("send-keys", "Enter")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p").stdout

    def command(self) -> str:
        """The pane's foreground process (bash at the prompt)."""
        return self.tmux("display-message", "-p", "#{pane_current_command}").stdout.strip()

    def wait(self, check: Callable[[str], T | None], what: str, timeout: float = WAIT) -> T:
        """Poll the screen until `check(screen)` gives something other than None."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if (found := check(screen)) is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; the screen:\n{screen}")
            time.sleep(0.2)

    def kill(self) -> None:
        """The server and with it the pane's processes (they get SIGHUP); then by pid, should
        the server not have gone."""
        with contextlib.suppress(subprocess.SubprocessError):
            self.tmux("kill-server")
        deadline = time.monotonic() + 5
        while _alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a killed server leaves its socket behind


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # a zombie has ended: the server daemonised, its parent is init, which may reap it late
    return not stat.rsplit(") ", 1)[-1].startswith("Z")


@pytest.fixture
def tmux(bed: Bed) -> Iterator[Tmux]:
    require("tmux")
    terminal = Tmux(bed.lab.ns("lb"))
    try:
        yield terminal
    finally:
        terminal.kill()


def backend_rows(screen: str) -> dict[str, list[str]]:
    """The view's backend rows by address: [address, health, weight, active, new/s,
    to-backend pkt/s, bit/s, to-client pkt/s, bit/s, NAT ports]."""
    rows = {}
    for line in screen.splitlines():
        words = line.split()
        if words and re.fullmatch(r"198\.18\.0\.\d+:\d+", words[0]):
            rows[words[0]] = words
    return rows


def streaming(screen: str) -> dict[str, list[str]] | None:
    """The backend rows once the serving backends show packets both ways and b3 is dead."""
    rows = backend_rows(screen)
    serving = [rows.get(f"{host_ip(h)}:{BACKEND_PORT}") for h in SERVING]
    down = rows.get(f"{host_ip(DOWN)}:{BACKEND_PORT}")
    if down is None or down[1] != "dead" or any(r is None for r in serving):
        return None
    if all(r is not None and r[1] == "alive" and r[5] != "0" and r[7] != "0" for r in serving):
        return rows
    return None


def test_top_in_tmux_during_traffic(bed: Bed, tmux: Tmux) -> None:
    for host in SERVING:
        bed.start(host, sys.executable, "-c", SINK, host_ip(host), str(BACKEND_PORT),
                  name=f"sink {host}")  # fmt: skip
        bed.lab.wait_tcp_listening(host, BACKEND_PORT)
    lbnat = bed.lbnat(*FAST)
    lbnat.expect(f"IP : {host_ip(DOWN)}, Port : {BACKEND_PORT} Server is dead")
    for client in ("c1", "c2"):  # round-robin over b1 and b2: one stream each
        bed.start(client, sys.executable, "-c", STREAM, LB_IP, str(VIP_PORT), name=client)

    sock = str(bed.tmp / "admin.sock")
    command = f"{shlex.quote(console_script('lbnat'))} top --admin-socket {shlex.quote(sock)}"
    tmux.wait(lambda s: True if s.rstrip().endswith(PROMPT.rstrip()) else None, "shell prompt")
    tmux.type(command)

    rows = tmux.wait(streaming, "view with both streams and b3 dead", timeout=20)
    screen = tmux.screen()
    header = screen.splitlines()[0].split()
    assert header[:2] == ["lbnat", LB_IP], screen
    assert "open flows" in screen and "workers" in screen and "q quits" in screen
    service = next(line.split() for line in screen.splitlines() if line.startswith("tcp:20000"))
    assert service[1:4] == [f"tcp/{VIP_PORT}", "rr", "2/3"], screen
    for host in SERVING:
        row = rows[f"{host_ip(host)}:{BACKEND_PORT}"]
        assert row[3] == "1", screen  # one open flow each
    assert rows[f"{host_ip(DOWN)}:{BACKEND_PORT}"][3:9] == ["0"] * 6, screen
    assert tmux.command() not in ("bash", ""), screen  # top is what runs in the pane

    # --once, from a script: one frame printed plain, the same numbers
    once = bed.lab.run("lb", console_script("lbnat"), "top", "--once", "--interval", "0.5",
                       "--admin-socket", sock, check=False)  # fmt: skip
    assert once.returncode == 0, once.stderr
    assert streaming(once.stdout) is not None, once.stdout
    assert "\x1b[" not in once.stdout

    # lbnat goes away: the view says so and keeps asking
    bed.stop(lbnat)
    tmux.wait(lambda s: True if "retrying every 1 s" in s else None, "the admin socket error")
    assert tmux.command() not in ("bash", "")

    # q: top exits, the shell has its screen (the alternate one is gone) and its terminal back
    tmux.tmux("send-keys", "q")
    tmux.wait(lambda s: True if "q quits" not in s else None, "the shell's screen again")
    deadline = time.monotonic() + WAIT
    while tmux.command() != "bash" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tmux.command() == "bash", tmux.screen()
    tmux.type('echo "top exited $?"; stty -a')
    after = tmux.wait(lambda s: s if "top exited" in s and "icanon" in s else None, "stty -a")
    assert "top exited 0" in after, after
    settings = set(re.split(r"[\s;]+", after))
    assert {"icanon", "echo", "isig"} <= settings, after  # line mode and echo are back
    assert not {"-icanon", "-echo"} & settings, after
    assert command in after and "Traceback" not in after, after
