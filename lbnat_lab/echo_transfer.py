"""A long transfer through a chat server's echo, checked byte for byte (scripts/demo-ha.sh).

A chat server (lbnat_lab.chat) sends every line back to every client of its server, the
sender included. This client connects to HOST:PORT (the VIP), reads the greeting line, then
for --seconds sends lines of random base64 text at --rate bytes/s while it reads their echo
and checks every byte against what it sent. It must be alone on its chat server (the others
there would get every line too), and it closes only once everything came back (the chat
server drops a client at its FIN, with whatever it still had to send it). Its lines::

    transfer: connected to b3, sending 16.0 MB over 40 s
    transfer: 4.0 MB of 16.0 MB echoed back intact
    transfer: stalled 3.62 s; bytes flowing again at 1796657656.008  (the echo's gaps > 0.5 s)
    transfer: 16.0 MB sent and echoed back byte-identical in 41.2 s (longest stall 3.62 s)

The time after "flowing again at" is the Unix time (time.time()) of the first byte after the
gap. Exit 0 when every byte came back identical within --timeout; 1 otherwise (a byte that
differs, the connection reset or closed, the time up); 2 on a usage mistake.

    python -m lbnat_lab.echo_transfer HOST PORT [--rate BYTES] [--seconds S] [--timeout S]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import random
import selectors
import socket
import sys
import time

STALL = 0.5
"""A gap in the echo longer than this (while bytes are outstanding) is reported."""
PROGRESS_EVERY = 5.0
MB = 1_000_000


class TransferFailed(Exception):
    pass


def payload(size: int, seed: int) -> bytes:
    """About `size` bytes of random base64 text in lines of 77 bytes (newline included)."""
    raw = random.Random(seed).randbytes(max(57, size * 3 // 4 // 57 * 57))
    return base64.encodebytes(raw)


def say(message: str) -> None:
    print(f"transfer: {message}", flush=True)


def read_greeting(sock: socket.socket, deadline: float) -> tuple[str, bytes]:
    """The server's greeting line (without its newline) and whatever came after it."""
    buf = b""
    while b"\n" not in buf:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError as error:
            raise TransferFailed("no greeting from the chat server") from error
        if not data:
            raise TransferFailed("closed before the greeting")
        buf += data
    line, _, rest = buf.partition(b"\n")
    return line.decode(errors="replace"), rest


def transfer(host: str, port: int, rate: int, seconds: float, timeout: float) -> float:
    """Send and check; the longest stall in seconds. Raises TransferFailed."""
    data = payload(int(rate * seconds), seed=port)
    total = len(data)
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=10)
    try:
        greeting, early = read_greeting(sock, deadline)
        if early:
            raise TransferFailed(f"unexpected bytes after the greeting: {early[:40]!r}")
        say(f"{greeting.removeprefix('* ')}, sending {total / MB:.1f} MB over {seconds:.0f} s")
        sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        interest = selectors.EVENT_READ
        start = last_byte = time.monotonic()
        sent = received = 0
        longest = 0.0
        next_progress = start + PROGRESS_EVERY
        while received < total:
            now = time.monotonic()
            if now > deadline:
                raise TransferFailed(
                    f"time up: {sent / MB:.1f} MB sent, {received / MB:.1f} MB echoed back"
                )
            due = min(total, int((now - start) * rate) + 1)
            # writable is asked for only while bytes are due: no busy loop while paced
            wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if sent < due else 0)
            if wanted != interest:
                sel.modify(sock, wanted)
                interest = wanted
            for key, events in sel.select(timeout=0.02):
                del key
                if events & selectors.EVENT_WRITE and sent < due:
                    with contextlib.suppress(BlockingIOError):
                        sent += sock.send(data[sent:due])
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError as error:
                        raise TransferFailed(
                            f"{error.strerror or error} after {received} bytes echoed"
                        ) from error
                    if not chunk:
                        raise TransferFailed(f"closed by the server after {received} bytes")
                    arrived = time.monotonic()
                    gap = arrived - last_byte
                    if gap > STALL and sent > received:
                        longest = max(longest, gap)
                        say(f"stalled {gap:.2f} s; bytes flowing again at {time.time():.3f}")
                    last_byte = arrived
                    expected = data[received : received + len(chunk)]
                    if chunk != expected:
                        at = next(i for i, (a, b) in enumerate(zip(chunk, expected, strict=False))
                                  if a != b)  # fmt: skip
                        raise TransferFailed(f"byte {received + at} differs from what was sent")
                    received += len(chunk)
            if received >= sent:
                last_byte = time.monotonic()  # nothing outstanding: no stall to measure
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY
                say(f"{received / MB:.1f} MB of {total / MB:.1f} MB echoed back intact")
        say(f"{total / MB:.1f} MB sent and echoed back byte-identical in "
            f"{time.monotonic() - start:.1f} s (longest stall {longest:.2f} s)")  # fmt: skip
        return longest
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echo_transfer", description=__doc__.split("\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--rate", type=int, default=500_000, help="bytes/s (500000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="sending time (30)")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after (120)")
    args = parser.parse_args(argv)
    if args.rate < 1000 or args.seconds <= 0 or args.timeout <= args.seconds:
        parser.error("--rate >= 1000, --seconds > 0, --timeout > --seconds")
    try:
        transfer(args.host, args.port, args.rate, args.seconds, args.timeout)
    except (TransferFailed, OSError) as error:
        say(f"FAILED: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
