"""lbnat.bgptool (`lbnat-bgp`, ExaBGP's process program): the pure decision table by table, the
reading of lbnat's reply, one ask against a stand-in admin socket, and the loop driven through
real pipes (ExaBGP's side) with a scripted lbnat."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbnat import bgptool
from lbnat.bgptool import Answer, State, answer_of, decide, stop_lines
from lbnat.config import DEFAULT_ADMIN_SOCKET
from tests.unit.fake_admin import FakeLbnat

VIP = "198.18.100.1"
OTHER = "198.18.100.2"
ANNOUNCE = f"announce route {VIP}/32 next-hop self"
WITHDRAW = f"withdraw route {VIP}/32 next-hop self"
YES = Answer(True, VIP, "serving")
NO = Answer(False, VIP, "draining the node")
GONE = Answer(False, None, "no admin socket at /x: is lbnat running?")
TOLD = State(announced=VIP, fresh=False, why="serving")
QUIET = State(announced=None, fresh=False, why="draining the node")


def test_the_default_socket_is_the_config_s() -> None:
    assert bgptool.DEFAULT_ADMIN_SOCKET == DEFAULT_ADMIN_SOCKET


# (name, state before, lbnat's answer, --vip, lines printed, announced after, log contains)
DECISIONS: list[tuple[str, State, Answer, str | None, list[str], str | None, str]] = [
    ("first yes announces", State(), YES, None, [ANNOUNCE], VIP, "announce 198.18.100.1/32"),
    ("yes again says nothing", TOLD, YES, None, [], VIP, ""),
    ("no withdraws", TOLD, NO, None, [WITHDRAW], None, "withdraw 198.18.100.1/32: draining"),
    ("no again says nothing", QUIET, NO, None, [], None, ""),
    ("lbnat gone withdraws", TOLD, GONE, None, [WITHDRAW], None, "is lbnat running?"),
    ("gone, then a new reason: logged, no line", QUIET, GONE, None, [], None, "is lbnat running"),
    # a previous lbnat-bgp may have left the route (ExaBGP respawns its processes)
    ("first no withdraws anyway", State(), NO, None, [WITHDRAW], None, "withdraw"),
    ("first gone, no VIP known: silence", State(), GONE, None, [], None, "nothing announced"),
    ("first gone, pinned VIP withdrawn", State(), GONE, VIP, [WITHDRAW], None, "withdraw"),
    # still fresh: lbnat's first answer naming the VIP withdraws what a predecessor left
    ("gone then no: the owed withdraw", State(why="gone"), NO, None, [WITHDRAW], None,
     "withdraw"),
    ("back after a withdraw", QUIET, YES, None, [ANNOUNCE], VIP, "announce"),
    (
        "the VIP changes: withdraw the old, then announce the new", TOLD,
        Answer(True, OTHER, "serving"), None,
        [WITHDRAW, f"announce route {OTHER}/32 next-hop self"], OTHER, "announce 198.18.100.2",
    ),
    ("pinned and equal", State(), YES, VIP, [ANNOUNCE], VIP, "announce"),
    (
        "pinned and different: nothing announced", TOLD, Answer(True, OTHER, "serving"), VIP,
        [WITHDRAW], None, f"lbnat serves {OTHER}, not --vip {VIP}",
    ),
    ("pinned, lbnat names none", State(), Answer(True, None, "ok"), VIP, [ANNOUNCE], VIP, ""),
    (
        "no VIP anywhere", State(), Answer(True, None, "ok"), None, [], None,
        "names no VIP",
    ),
    ("a new reason while announced is logged", TOLD, Answer(True, VIP, "2 backends"), None, [],
     VIP, "198.18.100.1/32: 2 backends"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("before", "answer", "pinned", "lines", "after", "log"),
    [d[1:] for d in DECISIONS],
    ids=[d[0] for d in DECISIONS],
)
def test_decide(
    before: State, answer: Answer, pinned: str | None, lines: list[str], after: str | None, log: str
) -> None:
    state, printed, logged = decide(before, answer, pinned)
    assert printed == lines
    assert state.announced == after
    # fresh until a VIP is known: the withdraw a respawn owes waits for one
    assert state.fresh is (before.fresh and not (pinned or answer.vip))
    if log:
        assert log in logged and logged.startswith("lbnat-bgp: ")
    elif not printed and not before.fresh and answer.why == before.why:
        assert logged == ""  # no change, no line


def test_a_flapping_lbnat_gives_one_line_per_change() -> None:
    state, logs, out = State(), [], []
    for answer in [YES, YES, NO, NO, GONE, GONE, YES, YES]:
        state, lines, log = decide(state, answer)
        out += lines
        logs += [log] if log else []
    assert out == [ANNOUNCE, WITHDRAW, ANNOUNCE]
    assert len(logs) == 4  # announce, withdraw (draining), the new reason (gone), announce


@pytest.mark.parametrize(
    ("state", "pinned", "lines"),
    [
        (TOLD, None, [WITHDRAW]),
        (QUIET, None, []),
        (State(), VIP, [WITHDRAW]),  # nothing asked yet: the pinned VIP may stand from before
        (State(), None, []),
    ],
)
def test_stop_withdraws_what_may_be_announced(
    state: State, pinned: str | None, lines: list[str]
) -> None:
    assert stop_lines(state, pinned) == lines


REPLIES: list[tuple[bytes, Answer | str]] = [
    (b'{"ok": true, "announce": true, "vip": "198.18.100.1", "why": "serving"}\n', YES),
    (b'{"ok": true, "announce": false, "vip": "198.18.100.1", "why": "draining the node"}\n', NO),
    (b'{"ok": true, "announce": true, "vip": "198.18.100.1"}\n',
     Answer(True, VIP, "lbnat serves the VIP")),
    (b'{"ok": false, "error": "unknown op \'bgp_status\'"}\n', "lbnat refused bgp_status"),
    (b'{"ok": true, "announce": "yes", "vip": "198.18.100.1"}\n', "no announce true/false"),
    (b'{"ok": true, "announce": true, "vip": "2001:db8::1"}\n', "not an IPv4 address"),
    (b'{"ok": true, "announce": true, "vip": "198.18.100.300"}\n', "not an IPv4 address"),
    (b"[1, 2]\n", "not an object"),
    (b"garbage\n", "lbnat sent no reply"),
    (b"", "lbnat closed without a reply"),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "expected"), REPLIES)
def test_answer_of(reply: bytes, expected: Answer | str) -> None:
    answer = answer_of(reply)
    if isinstance(expected, Answer):
        assert answer == expected
    else:
        assert not answer.announce and expected in answer.why


# -- against a stand-in admin socket -----------------------------------------------------------


@pytest.fixture
def lbnat(tmp_path: Path) -> Iterator[FakeLbnat]:
    fake = FakeLbnat(tmp_path / "admin.sock", {"ok": True, "announce": True, "vip": VIP,
                                               "why": "serving"})  # fmt: skip
    yield fake
    fake.close()


def test_ask_sends_bgp_status(lbnat: FakeLbnat) -> None:
    assert bgptool.ask(lbnat.path) == YES
    assert lbnat.requests[0] == {"op": "bgp_status"}


def test_ask_without_lbnat(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    answer = bgptool.ask(str(path))
    assert answer == Answer(False, None, f"no admin socket at {path}: is lbnat running?")


def test_ask_a_hung_lbnat_times_out(lbnat: FakeLbnat) -> None:
    lbnat.reply = None
    started = time.monotonic()
    answer = bgptool.ask(lbnat.path, timeout=0.2)
    assert time.monotonic() - started < 1.0
    assert not answer.announce and "did not answer within 0.2 s" in answer.why


def test_ask_a_refusing_socket(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: ECONNREFUSED
    answer = bgptool.ask(str(path))
    assert not answer.announce and "cannot ask lbnat" in answer.why


# -- the loop, through pipes as ExaBGP runs it --------------------------------------------------


class Script:
    """A scripted lbnat for `run`: the answers in order, the last one repeated."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.asked = 0

    def __call__(self, path: str, timeout: float) -> Answer:
        self.asked += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def run_until_eof(script: Script, asks: int, pinned: str | None = None) -> tuple[str, str, int]:
    """Run the loop with stdin a pipe that closes once `script` was asked `asks` times."""
    read_end, write_end = os.pipe()
    out, err = io.StringIO(), io.StringIO()

    def close_when_done() -> None:
        os.write(write_end, b"done\n")  # an ack, read and thrown away
        deadline = time.monotonic() + 5
        while script.asked < asks and time.monotonic() < deadline:
            time.sleep(0.005)
        os.close(write_end)

    closer = threading.Thread(target=close_when_done)
    closer.start()
    with os.fdopen(read_end) as stdin:
        code = bgptool.run("/x", 0.05, 1.0, pinned, stdin, out, err, asker=script)
    closer.join()
    return out.getvalue(), err.getvalue(), code


def test_the_loop_prints_each_change_once_and_exits_at_eof() -> None:
    script = Script(YES, YES, NO, NO, GONE, YES)
    out, err, code = run_until_eof(script, asks=8)
    assert code == 0
    assert out.splitlines() == [ANNOUNCE, WITHDRAW, ANNOUNCE]
    assert err.splitlines()[-1] == "lbnat-bgp: stdin closed (ExaBGP gone): exiting"
    assert len(err.splitlines()) == 5  # announce, withdraw, gone, announce, the exit


def test_sigterm_withdraws_then_exits(lbnat: FakeLbnat) -> None:
    """The real program, as ExaBGP runs it (stdin a pipe), against a stand-in lbnat; stdin
    closes right after the signal (ExaBGP stopping): the withdraw still goes out."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbnat.bgptool", "--admin-socket", lbnat.path,
         "--interval", "0.05"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().strip() == ANNOUNCE
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert out.decode().splitlines() == [WITHDRAW]
    assert "SIGTERM: withdrawing, exiting" in err.decode()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--interval", "0"], "--interval: 0 s is not within"),
        (["--interval", "soon"], "is not a number of seconds"),
        (["--timeout", "600"], "--timeout: 600 s is not within"),
        (["--vip", "198.18.100"], "--vip: '198.18.100' is not an IPv4 address"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_arguments_exit_2_with_one_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        bgptool.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_once_says_what_it_would_and_exits_0_when_it_would_announce(
    lbnat: FakeLbnat, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bgptool.main(["--admin-socket", lbnat.path, "--once"]) == 0
    out, err = capsys.readouterr()
    assert out == ANNOUNCE + "\n" and err == "lbnat-bgp: announce 198.18.100.1/32: serving\n"
    lbnat.reply = {"ok": False, "error": "unknown op 'bgp_status'"}
    assert bgptool.main(["--admin-socket", lbnat.path, "--once"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "lbnat refused bgp_status: unknown op" in err


def test_it_imports_nothing_of_lbnat_but_the_client() -> None:
    """A process beside every instance, asking twice a second: no click, no jsonschema, none
    of the daemon (their imports cost 0.35 s of CPU)."""
    code = (
        "import sys, lbnat.bgptool\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('click', 'jsonschema')\n"
        "               or (m.startswith('lbnat.') and m not in ('lbnat.bgptool',\n"
        "                   'lbnat.control', 'lbnat.control.client')))\n"
        "print(heavy)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
