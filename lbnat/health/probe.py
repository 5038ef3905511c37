"""What every probe kind is: one interface, one file per kind beside this one (seesaw's way).

A probe answers one question, "does ip:port answer as a live backend would?", within a
timeout, from the LB host's own stack (its source ports are ephemeral ones, outside lbnat's
NAT range, so the guard never drops the answers). It runs on a worker thread of the health
checker and never touches the packet loop.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Protocol

DRAIN_SECONDS = 0.5  # how long a probe waits for the server's side of a polite close


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str = ""  # why, for the JSON log: "connection refused", "status 503", ...
    seconds: float = 0.0  # how long the probe took (set by the checker, which times it)


class Probe(Protocol):
    kind: str

    def check(self, ip: str, port: int, timeout: float) -> ProbeResult: ...


def error_detail(error: OSError) -> str:
    if isinstance(error, TimeoutError | socket.timeout):
        return "timeout"
    return (error.strerror or str(error)).lower()


def close_politely(sock: socket.socket, timeout: float) -> None:
    """Send a FIN, then read what the server sent until it closes too, for a short while.

    Closing a TCP socket with unread data (a greeting) makes the kernel send a RST instead of
    a FIN; a backend should not see a reset every probe interval. Never raises.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + min(timeout, DRAIN_SECONDS)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                break
    except OSError:
        pass  # the server kept the connection open, or reset it
    finally:
        sock.close()
