"""`hello`: connect, send a line (default "HealthCheck", the Java original's), and expect a
line back that matches a pattern (default: the same word, as an echoing server answers)."""

from __future__ import annotations

import re
import socket
import time

from lbnat.health.probe import ProbeResult, close_politely, error_detail

MAX_REPLY = 64 * 1024  # bytes read at most while looking for the expected line


class HelloProbe:
    kind = "hello"

    def __init__(self, send: str = "HealthCheck", expect: str | None = None) -> None:
        self.line = send.encode() + b"\n"
        self.pattern = re.compile((expect if expect is not None else re.escape(send)).encode())

    def check(self, ip: str, port: int, timeout: float) -> ProbeResult:
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection((ip, port), timeout=timeout)
        except OSError as error:
            return ProbeResult(False, error_detail(error))
        received = b""
        try:
            sock.sendall(self.line)
            while len(received) < MAX_REPLY:
                left = deadline - time.monotonic()
                if left <= 0:
                    return ProbeResult(False, "no matching reply")
                sock.settimeout(left)
                chunk = sock.recv(4096)
                if not chunk:
                    return ProbeResult(False, "closed without a matching reply")
                received += chunk
                # Lines are judged whole (the server may greet first: any line may match).
                *lines, received_tail = received.split(b"\n")
                if any(self.pattern.search(line) for line in lines):
                    return ProbeResult(True, "matching reply")
                received = received_tail
            return ProbeResult(False, "no matching reply")
        except OSError as error:
            return ProbeResult(False, error_detail(error))
        finally:
            close_politely(sock, max(0.0, deadline - time.monotonic()))
