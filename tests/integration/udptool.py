"""UDP clients for the netns tests, run inside a lab host (HOST may be IPv4 or IPv6):

python -m tests.integration.udptool clients HOST PORT --clients 6 --count 5
    each client (its own socket, so its own source port) sends `count` datagrams in turn
    and records which backend answered each; prints JSON {"<port>": ["b1", "b1", ...]}
python -m tests.integration.udptool flood HOST PORT --count 10000 --window 32
    one client, `count` numbered datagrams, at most `window` unanswered at a time (bounded
    in count and time); checks every echo byte for byte; prints JSON counts
python -m tests.integration.udptool once HOST PORT [--source-port P]
    one datagram, one answer or error; prints JSON {"answer": ...} or {"error": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import socket
import time

NAME = re.compile(rb"^\[([^\]]+)\] ")


def _socket(target: tuple[str, int], source_port: int = 0, timeout: float = 2.0) -> socket.socket:
    v6 = ":" in target[0]  # an IPv6 HOST (fd18::2): an IPv6 socket
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::" if v6 else "0.0.0.0", source_port))
    sock.connect(target)
    sock.settimeout(timeout)
    return sock


def clients(target: tuple[str, int], count: int, rounds: int) -> dict[str, list[str]]:
    socks = [_socket(target) for _ in range(count)]
    seen: dict[str, list[str]] = {str(s.getsockname()[1]): [] for s in socks}
    try:
        for r in range(rounds):
            for sock in socks:
                sock.send(f"round {r}".encode())
                match = NAME.match(sock.recv(65535))
                seen[str(sock.getsockname()[1])].append(match.group(1).decode() if match else "?")
    finally:
        for sock in socks:
            sock.close()
    return seen


def flood(
    target: tuple[str, int], count: int, window: int, size: int, limit: float
) -> dict[str, int]:
    sock = _socket(target)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    payloads = {}
    sent = received = altered = 0
    deadline = time.monotonic() + limit
    try:
        while received < count and time.monotonic() < deadline:
            while sent < count and sent - received < window:
                payload = sent.to_bytes(8, "big") + os.urandom(size - 8)
                payloads[sent] = payload
                sock.send(payload)
                sent += 1
            if not select.select([sock], [], [], 1.0)[0]:
                break  # a second without an answer: the rest counts as lost
            while True:
                try:
                    reply = sock.recv(65535)
                except BlockingIOError:
                    break
                match = NAME.match(reply)
                body = reply[match.end() :] if match else reply
                number = int.from_bytes(body[:8], "big")
                if payloads.pop(number, None) != body:
                    altered += 1
                received += 1
    finally:
        sock.close()
    return {"sent": sent, "received": received, "altered": altered, "lost": sent - received}


def once(target: tuple[str, int], source_port: int) -> dict[str, str]:
    sock = _socket(target, source_port)
    try:
        sock.send(b"hello")
        return {"answer": sock.recv(65535).decode(errors="replace")}
    except ConnectionRefusedError:
        return {"error": "refused"}
    except TimeoutError:
        return {"error": "timeout"}
    finally:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["clients", "flood", "once"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--limit", type=float, default=60.0, help="seconds at most (flood)")
    parser.add_argument("--source-port", type=int, default=0)
    args = parser.parse_args()
    target = (args.host, args.port)
    result: object
    if args.mode == "clients":
        result = clients(target, args.clients, args.count)
    elif args.mode == "flood":
        result = flood(target, args.count, args.window, max(args.size, 8), args.limit)
    else:
        result = once(target, args.source_port)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
