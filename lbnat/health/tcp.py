"""`tcp`: connect and close, the C++ original's check. The verdict is the connect alone."""

from __future__ import annotations

import socket

from lbnat.health.probe import ProbeResult, close_politely, error_detail


class TcpProbe:
    kind = "tcp"

    def check(self, ip: str, port: int, timeout: float) -> ProbeResult:
        try:
            sock = socket.create_connection((ip, port), timeout=timeout)
        except OSError as error:
            return ProbeResult(False, error_detail(error))
        close_politely(sock, timeout)
        return ProbeResult(True, "connected")
