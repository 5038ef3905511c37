"""`http`: GET a path and expect a status (default 200)."""

from __future__ import annotations

import http.client

from lbnat.health.probe import ProbeResult, error_detail

MAX_BODY = 64 * 1024  # bytes of the body read (so the connection closes cleanly)


class HttpProbe:
    kind = "http"

    def __init__(self, path: str = "/", status: int = 200) -> None:
        if not path.startswith("/"):
            raise ValueError(f"the HTTP check path {path!r} must start with /")
        self.path = path
        self.status = status

    def check(self, ip: str, port: int, timeout: float) -> ProbeResult:
        host = f"[{ip}]" if ":" in ip else ip  # an IPv6 address in the Host header: [..]
        connection = http.client.HTTPConnection(ip, port, timeout=timeout)
        try:
            connection.request(
                "GET",
                self.path,
                headers={
                    "Host": f"{host}:{port}",
                    "User-Agent": "lbnat-health",
                    "Connection": "close",
                },
            )
            response = connection.getresponse()
            response.read(MAX_BODY)
        except (OSError, http.client.HTTPException) as error:
            detail = error_detail(error) if isinstance(error, OSError) else type(error).__name__
            return ProbeResult(False, detail)
        finally:
            connection.close()
        if response.status == self.status:
            return ProbeResult(True, f"status {response.status}")
        return ProbeResult(False, f"status {response.status}")
