"""`udp`: send a datagram (default "HealthCheck") and expect a reply matching a pattern
(default "OK"). An ICMP port-unreachable is an immediate failure: on a connected UDP socket
the kernel turns it into ECONNREFUSED on the next receive."""

from __future__ import annotations

import re
import socket

from lbnat.health.probe import ProbeResult, error_detail


class UdpProbe:
    kind = "udp"

    def __init__(self, send: str = "HealthCheck", expect: str | None = None) -> None:
        self.payload = send.encode()
        self.pattern = re.compile((expect if expect is not None else "OK").encode())

    def check(self, ip: str, port: int, timeout: float) -> ProbeResult:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect((ip, port))
                sock.send(self.payload)
                reply = sock.recv(65535)
            except ConnectionRefusedError:
                return ProbeResult(False, "port unreachable")
            except OSError as error:
                return ProbeResult(False, error_detail(error))
        if self.pattern.search(reply):
            return ProbeResult(True, "matching reply")
        return ProbeResult(False, "unexpected reply")
