"""`lbnat-bgp`: ExaBGP's `process` program for one lbnat instance behind an ECMP router
(docs/scale-out.md), on the standard library alone.

    lbnat-bgp [--admin-socket PATH] [--interval 0.5] [--timeout 1] [--vip IP] [--once]

ExaBGP starts it (`process lbnat { run .../lbnat-bgp ...; encoder text; }`) and reads its
stdout: every `--interval` seconds it asks lbnat's admin socket `{"op": "bgp_status"}` and,
when the answer changes, prints

    announce route 198.18.100.1/32 next-hop self
    withdraw route 198.18.100.1/32 next-hop self

which ExaBGP turns into BGP UPDATEs to the router. When lbnat cannot be asked (no socket,
refused, no reply within `--timeout`, a reply it cannot read) the VIP is withdrawn: a router
should not send flows to an instance that cannot say it serves them. One line on stderr per
change says why (a process shares ExaBGP's stderr: the journal, or the lab's log file). It
exits when its stdin ends (ExaBGP is gone) and on SIGTERM or SIGINT, withdrawing first.

`--vip` pins the VIP: lbnat's answer must name the same one (or none), else nothing is
announced and the line says why. A pinned VIP never makes the tool announce an address lbnat
does not serve: a router would send it flows lbnat drops.

Why not the click CLI: like `lbnat-ha`, this runs beside every instance for as long as ExaBGP
does and asks twice a second; importing the whole package costs 0.35 s of CPU. The decision
is in pure functions (`answer_of`, `decide`), tested table by table in
tests/unit/test_bgptool.py; `run` is the thin loop around them.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from lbnat.control.client import request_line

DEFAULT_ADMIN_SOCKET = "/run/lbnat/lbnat.sock"  # lbnat.config.DEFAULT_ADMIN_SOCKET (a test
# keeps them equal: importing lbnat.config here would cost what this module saves)
ADMIN_SOCKET_ENV = "LBNAT_ADMIN_SOCKET"
INTERVAL = 0.5  # seconds between asks: a change reaches ExaBGP within about this
TIMEOUT = 1.0  # seconds for lbnat's reply: a slower lbnat is treated as gone
MIN_INTERVAL = 0.05  # below this the loop would spin; above MAX, a change waits too long
MAX_INTERVAL = 60.0
PROG = "lbnat-bgp"


@dataclasses.dataclass(frozen=True)
class Answer:
    """What one ask of lbnat gave: announce or not, the VIP lbnat serves (None when it named
    none, or could not be asked), and why (for the log)."""

    announce: bool
    vip: str | None
    why: str


@dataclasses.dataclass(frozen=True)
class State:
    """What this tool has told ExaBGP: `announced` is the VIP announced now (None: none).
    `fresh`: nothing said yet, so a route a previous lbnat-bgp announced may still stand
    (ExaBGP respawns a process that died and keeps what it announced): the first withdraw is
    said even though this process announced nothing. `why`: the reason last logged."""

    announced: str | None = None
    fresh: bool = True
    why: str = ""


def route(verb: str, vip: str) -> str:
    """One ExaBGP API line (text encoder) for the VIP as a host route."""
    return f"{verb} route {vip}/32 next-hop self"


def vip_or_none(value: object) -> str | None:
    """`value` as an IPv4 address string, or None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        return None


def answer_of(reply: bytes) -> Answer:
    """lbnat's reply line to bgp_status, read; never raises (a reply it cannot read is an
    answer not to announce)."""
    try:
        message: Any = json.loads(reply)
    except ValueError:
        text = reply.decode(errors="replace").strip()
        return Answer(False, None, f"lbnat sent no reply ({text[:60]!r})" if text else
                      "lbnat closed without a reply")  # fmt: skip
    if not isinstance(message, dict):
        return Answer(False, None, f"lbnat sent {reply[:60]!r}, not an object")
    if not message.get("ok"):
        return Answer(False, None, f"lbnat refused bgp_status: {message.get('error', message)}")
    announce = message.get("announce")
    if not isinstance(announce, bool):
        return Answer(False, None, f"lbnat's reply has no announce true/false: {reply[:80]!r}")
    vip = vip_or_none(message.get("vip"))
    if message.get("vip") is not None and vip is None:
        return Answer(False, None, f"lbnat names {message.get('vip')!r}, not an IPv4 address")
    why = str(message.get("why") or ("lbnat serves the VIP" if announce else "lbnat says no"))
    return Answer(announce, vip, why)


def decide(state: State, answer: Answer, pinned: str | None = None) -> tuple[State, list[str], str]:
    """The pure step: from what was told (`state`) and lbnat's answer, the new state, the API
    lines to print (withdraw before announce) and the log line ('' when nothing changed)."""
    target: str | None = None
    why = answer.why
    if answer.announce:
        if pinned is not None and answer.vip is not None and answer.vip != pinned:
            why = f"lbnat serves {answer.vip}, not --vip {pinned}: nothing announced"
        elif answer.vip is None and pinned is None:
            why = "lbnat names no VIP (and no --vip given): nothing announced"
        else:
            target = pinned or answer.vip
    lines: list[str] = []
    if state.announced is not None and state.announced != target:
        lines.append(route("withdraw", state.announced))
    elif state.fresh and target is None and (pinned or answer.vip):
        # a route a previous lbnat-bgp left (ExaBGP respawned this one): withdrawing a route
        # that is not announced is harmless
        lines.append(route("withdraw", str(pinned or answer.vip)))
    if target is not None and target != state.announced:
        lines.append(route("announce", target))
    # fresh until a VIP is known: a respawn that cannot ask lbnat yet still owes the withdraw
    new = State(announced=target, fresh=state.fresh and not (pinned or answer.vip), why=why)
    if not lines and not state.fresh and why == state.why:
        return new, [], ""
    if target is not None:
        log = f"{PROG}: announce {target}/32: {why}" if lines else f"{PROG}: {target}/32: {why}"
    elif lines:
        withdrawn = lines[0].split()[2]
        log = f"{PROG}: withdraw {withdrawn}: {why}"
    else:
        log = f"{PROG}: nothing announced: {why}"
    return new, lines, log


def stop_lines(state: State, pinned: str | None = None) -> list[str]:
    """What to print on SIGTERM: the withdraw of what is (or may be) announced."""
    vip = state.announced or (pinned if state.fresh else None)
    return [route("withdraw", vip)] if vip else []


def ask(path: str, timeout: float = TIMEOUT) -> Answer:
    """Ask lbnat's admin socket once; its answer (an unreachable lbnat is an answer too)."""
    try:
        reply = request_line(path, b'{"op": "bgp_status"}\n', timeout)
    except FileNotFoundError:
        return Answer(False, None, f"no admin socket at {path}: is lbnat running?")
    except TimeoutError:
        return Answer(False, None, f"lbnat at {path} did not answer within {timeout:g} s")
    except OSError as error:
        return Answer(False, None, f"cannot ask lbnat at {path}: {error.strerror or error}")
    return answer_of(reply)


def run(
    path: str,
    interval: float,
    timeout: float,
    pinned: str | None,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    asker: Callable[[str, float], Answer] = ask,
) -> int:
    """The loop: ask, print what changed, wait `interval` reading (and discarding) ExaBGP's
    acks ("done" a line, exabgp.api.ack) from stdin's descriptor, until stdin ends or a
    SIGTERM/SIGINT arrives (through a wakeup pipe: a signal never cuts a line in two)."""
    acks = stdin.fileno()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    old_wakeup = signal.set_wakeup_fd(wake_w)

    def say(lines: list[str], log: str) -> None:
        if lines:
            stdout.write("".join(f"{line}\n" for line in lines))
            stdout.flush()
        if log:
            stderr.write(f"{log}\n")
            stderr.flush()

    state = State()
    try:
        while True:
            state, lines, log = decide(state, asker(path, timeout), pinned)
            say(lines, log)
            next_ask = time.monotonic() + interval
            while not stopping and (left := next_ask - time.monotonic()) > 0:
                readable, _, _ = select.select([acks, wake_r], [], [], left)
                if wake_r in readable:
                    os.read(wake_r, 64)
                    continue  # a signal first: its withdraw goes out even if stdin ended too
                if acks in readable and not os.read(acks, 4096):
                    if select.select([wake_r], [], [], 0)[0]:
                        # A signal came with the end (ExaBGP stopping): the kernel delivered it
                        # before this select returned, its byte is in the pipe, but Python may
                        # not have run its handler yet. Its withdraw goes out first.
                        woke = os.read(wake_r, 64)[:1]  # the signal's number
                        stopping.append(woke[0] if woke else int(signal.SIGTERM))
                        break
                    say([], f"{PROG}: stdin closed (ExaBGP gone): exiting")
                    return 0
            if stopping:
                name = signal.Signals(stopping[0]).name
                say(stop_lines(state, pinned), f"{PROG}: {name}: withdrawing, exiting")
                return 0
    except BrokenPipeError:  # ExaBGP went away between two lines
        return 0
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(wake_r)
        os.close(wake_w)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:
        raise argparse.ArgumentTypeError(f"{text} s is not within {MIN_INTERVAL}-{MAX_INTERVAL:g}")
    return value


def ipv4(text: str) -> str:
    vip = vip_or_none(text)
    if vip is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address")
    return vip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="ExaBGP's process program: announce lbnat's VIP while lbnat says it "
        "serves it, withdraw it otherwise (docs/scale-out.md)",
    )
    p.add_argument(
        "--admin-socket",
        default=None,
        help=f"lbnat's admin socket (${ADMIN_SOCKET_ENV}, else {DEFAULT_ADMIN_SOCKET})",
    )
    p.add_argument(
        "--interval",
        type=positive_seconds,
        default=INTERVAL,
        help=f"seconds between asks ({INTERVAL:g})",
    )
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=TIMEOUT,
        help=f"seconds for lbnat's reply; slower is a withdraw ({TIMEOUT:g})",
    )
    p.add_argument(
        "--vip",
        type=ipv4,
        default=None,
        help="announce this VIP only: lbnat's answer must name the same one",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="ask once, print what would be said, exit 0 if it would announce, "
        "1 if not (for a person or a script, not ExaBGP)",
    )
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # bad arguments: argparse's message, exit 2
    path = args.admin_socket or os.environ.get(ADMIN_SOCKET_ENV, DEFAULT_ADMIN_SOCKET)
    if args.once:
        state, lines, log = decide(State(fresh=False), ask(path, args.timeout), args.vip)
        for line in lines:
            print(line)
        print(log, file=sys.stderr)
        return 0 if state.announced else 1
    return run(path, args.interval, args.timeout, args.vip, sys.stdin, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
