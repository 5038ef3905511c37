"""Small clients the fault cases run inside the lab's namespaces (`python -m tests.faults.tools`).

- `send`: a paced TCP upload of a deterministic byte stream (`stream_chunks`), so a case can
  keep a transfer going through a fault (a kill, a reload storm) and check afterwards that what
  arrived is exactly a prefix (or the whole) of what was sent.
- `abuse`: the control channel's bad clients: idle connections held open, garbage, an
  over-long line, a forged MAC, a replayed request; every reply printed.
- `register`: one good, signed register request with a 1 s bound on the answer.
- `udp-flows`, `udp-echo`: many UDP rows at once; one echo through the VIP.
- `stuck-admin`: admin-socket clients that send nothing, or ask and never read.

Each prints one JSON object per line on stdout; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from lbnat.control.protocol import encode, sign

CHUNK = 64 * 1024


def stream_chunks(seed: int) -> Iterator[bytes]:
    """The endless deterministic stream `send` writes: random bytes (Random(seed)), in CHUNKs."""
    rng = random.Random(seed)
    while True:
        yield rng.randbytes(CHUNK)


def is_prefix_of_stream(path: Path, seed: int) -> tuple[bool, int]:
    """(does the file hold exactly the first bytes of stream `seed`?, its size)."""
    size = 0
    with path.open("rb") as f:
        for expected in stream_chunks(seed):
            got = f.read(CHUNK)
            if not got:
                return True, size
            if got != expected[: len(got)]:
                return False, size
            size += len(got)
            if len(got) < CHUNK:
                return f.read(1) == b"", size
    raise AssertionError("unreachable")  # pragma: no cover


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


# -- send -----------------------------------------------------------------------------------


def send(host: str, port: int, total: int, rate: float, seed: int, limit: float) -> None:
    """Send `total` bytes of stream `seed` at about `rate` bytes/s (0: as fast as possible),
    giving up after `limit` seconds; then close politely and wait for the peer's EOF."""
    sent = 0
    error = ""
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=10.0) as sock:
        emit(event="connected", local=sock.getsockname()[1])
        try:
            for chunk in stream_chunks(seed):
                if sent >= total or time.monotonic() - start > limit:
                    break
                piece = chunk[: total - sent]
                sock.sendall(piece)
                sent += len(piece)
                if rate > 0:
                    ahead = sent / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(max(1.0, limit - (time.monotonic() - start)))
            while sock.recv(65536):
                pass
        except OSError as exc:
            error = type(exc).__name__
    emit(event="done", sent=sent, error=error)


# -- the control channel --------------------------------------------------------------------


def ask(sock: socket.socket, line: bytes, deadline: float | None = None) -> str:
    """Send one line, read one reply line (or what came before EOF); with a `deadline`
    (monotonic), TimeoutError once it has passed."""
    sock.sendall(line)
    reply = b""
    while not reply.endswith(b"\n"):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply line before the deadline")
            sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    return reply.decode(errors="replace").strip()


def abuse(host: str, port: int, secret: bytes, idle: int, hold: float, service: str) -> None:
    """Open `idle` silent connections, send the bad requests (each on a connection of its own,
    each reply printed), hold the idle connections `hold` seconds, then report how many the
    server had closed by then."""
    idlers: list[socket.socket] = []
    for _ in range(idle):
        idler = socket.create_connection((host, port), timeout=5.0)
        idlers.append(idler)
    emit(event="idle", open=len(idlers))
    me = "198.18.0.12"
    register = {"op": "register", "service": service, "ip": me, "port": 9000}
    good = encode(sign(register, secret, time.time()))
    forged = dict(sign(register, secret, time.time()))
    forged["mac"] = "0" * 64
    tampered = dict(sign(register, secret, time.time()))
    tampered["port"] = 9001
    cases: list[tuple[str, bytes]] = [
        ("garbage", b"\x00\xffgarbage{{{ not json\n"),
        ("not an object", b"[1, 2, 3]\n"),
        ("over-long", b'{"op": "' + b"x" * 10_000 + b'"}\n'),
        ("unsigned", encode(register)),
        ("forged mac", encode(forged)),
        ("tampered", encode(tampered)),
        ("good", good),
        ("replay", good),
    ]
    for name, line in cases:
        with socket.create_connection((host, port), timeout=5.0) as sock:
            emit(event="reply", case=name, reply=ask(sock, line))
    deadline = time.monotonic() + hold
    closed = 0
    for idler in idlers:
        idler.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if idler.recv(1) == b"":
                closed += 1
        except TimeoutError:
            pass
        except OSError:
            closed += 1
    emit(event="held", closed=closed, of=len(idlers))
    for idler in idlers:
        idler.close()


def register(host: str, port: int, secret: bytes, service: str, ip: str, bport: int) -> None:
    """One good signed register; its whole reply must come within 1 s of the connect."""
    line = encode(sign({"op": "register", "service": service, "ip": ip, "port": bport}, secret,
                       time.time()))  # fmt: skip
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            reply = ask(sock, line, deadline=start + 1.0)
    except OSError as exc:
        reply = f"error: {type(exc).__name__}"
    emit(event="register", reply=reply, seconds=round(time.monotonic() - start, 4))


def udp_flows(host: str, port: int, count: int, first_port: int) -> None:
    """One datagram from each of `count` source ports (first_port, first_port + 1, ...): that
    many UDP rows in lbnat, which linger for its UDP timeout. Paced (at most 5,000/s) so the
    LB's receive ring is not overrun."""
    for n, source in enumerate(range(first_port, first_port + count)):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("0.0.0.0", source))
            sock.sendto(b"row", (host, port))
        if n % 5 == 4:
            time.sleep(0.001)
    emit(event="udp-flows", sent=count)


def udp_echo(host: str, port: int, text: str) -> None:
    """One datagram to the VIP and its echo (2 s bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.sendto(text.encode(), (host, port))
        try:
            answer = sock.recv(65536).decode(errors="replace")
        except OSError as exc:
            answer = f"error: {type(exc).__name__}"
    emit(event="udp-echo", answer=answer)


# -- the admin socket -----------------------------------------------------------------------


def stuck_admin(path: str, wait: float) -> None:
    """Two stuck clients: one sends nothing, one asks for `sessions` and does not read. After
    `wait` seconds, report whether the server closed each (EOF, or a truncated reply)."""
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(path)
    unread = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up soon
    unread.connect(path)
    unread.sendall(b'{"op": "sessions"}\n')
    emit(event="stuck")
    time.sleep(wait)
    results: dict[str, object] = {}
    for name, sock in (("silent", silent), ("unread", unread)):
        sock.settimeout(5.0)
        data = b""
        try:
            while chunk := sock.recv(1 << 20):
                data += chunk
            results[name] = {"closed": True, "bytes": len(data), "whole": data.endswith(b"\n")}
        except TimeoutError:
            results[name] = {"closed": False, "bytes": len(data)}
        sock.close()
    emit(event="stuck-result", **results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("send")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--limit", type=float, default=60.0)
    p = sub.add_parser("abuse")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--secret-file", required=True)
    p.add_argument("--idle", type=int, default=200)
    p.add_argument("--hold", type=float, default=1.0)
    p.add_argument("--service", required=True)
    p = sub.add_parser("register")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--secret-file", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--ip", required=True)
    p.add_argument("--backend-port", type=int, required=True)
    p = sub.add_parser("udp-flows")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--first-port", type=int, default=30000)
    p = sub.add_parser("udp-echo")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--text", default="ping")
    p = sub.add_parser("stuck-admin")
    p.add_argument("path")
    p.add_argument("--wait", type=float, required=True)
    args = parser.parse_args(argv)
    if args.command == "send":
        send(args.host, args.port, args.bytes, args.rate, args.seed, args.limit)
    elif args.command == "abuse":
        secret = Path(args.secret_file).read_text().strip().encode()
        abuse(args.host, args.port, secret, args.idle, args.hold, args.service)
    elif args.command == "register":
        secret = Path(args.secret_file).read_text().strip().encode()
        register(args.host, args.port, secret, args.service, args.ip, args.backend_port)
    elif args.command == "udp-flows":
        udp_flows(args.host, args.port, args.count, args.first_port)
    elif args.command == "udp-echo":
        udp_echo(args.host, args.port, args.text)
    else:
        stuck_admin(args.path, args.wait)


if __name__ == "__main__":
    main()
