"""The metrics server: GET /metrics in Prometheus' text format (or OpenMetrics, as the scraper
asks), served from lbnat's registry (lbnat.metrics) on a thread of its own. Thin on purpose:
what a scrape contains is lbnat.metrics' business; when it is taken, the daemon's
(`Questions.metrics_snapshot`).

prometheus-client's WSGI app and threading server do the work. We make the server ourselves
instead of calling `start_http_server` because we must stop it on the way out, and Debian 12's
prometheus-client (0.16, what the provisioned LB runs) returns no handle to stop.
"""

from __future__ import annotations

import socket
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

__all__ = ["MetricsError", "MetricsServer"]


class MetricsError(Exception):
    """The metrics server cannot listen; the message is for the user."""


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape on stderr (one every 15 s per Prometheus)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server6(ThreadingWSGIServer):
    """The metrics server on an IPv6 address; on "::" dual stack (IPv4 scrapers too)."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        dual = self.server_address[0] == "::"
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        super().server_bind()


class MetricsServer:
    """Serving from `start` until `close`. A scrape runs on a thread of the server's."""

    def __init__(self, server: ThreadingWSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @classmethod
    def start(cls, host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
        """Listen on host:port (an IPv4 host, or an IPv6 one: "::" takes both families), or
        raise MetricsError (the port is taken, the address is not one of this host's)."""
        server_class = _Server6 if ":" in host else ThreadingWSGIServer
        try:
            server = make_server(
                host, port, make_wsgi_app(registry), server_class,
                handler_class=_QuietHandler,
            )  # fmt: skip
        except OSError as error:
            reason = error.strerror or str(error)
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise MetricsError(f"cannot serve metrics on {shown}: {reason}") from None
        thread = threading.Thread(target=server.serve_forever, name="lbnat-metrics", daemon=True)
        thread.start()
        return cls(server, thread)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
