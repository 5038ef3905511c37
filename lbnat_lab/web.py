"""The labs' web server: a page that names its backend, so HTTP round-robin through lbnat's
second VIP port shows where each request landed.

Every GET (any path) answers ``200`` with the text ``backend <name>\\n`` and a header
``X-Backend: <name>``; HEAD the same without the body. One flushed log line per request on
stdout::

    web server <name> listening on <host>:<port>
    web <name> : GET / from <ip>:<port> -> 200
    web server <name> stopped

    python -m lbnat_lab.web --port 80 --name b1 [--host 0.0.0.0]

Standard library only (backends need just python3); a thread per connection, so a client
that holds its connection open does not stall the others.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any


def page(name: str) -> bytes:
    return f"backend {name}\n".encode()


class WebServer(ThreadingHTTPServer):
    """Answers every GET/HEAD with the page naming `name`."""

    daemon_threads = True  # an open keep-alive connection does not hold up the stop

    def __init__(self, host: str, port: int, name: str) -> None:
        self.name = name
        self._log_lock = threading.Lock()
        super().__init__((host, port), _Handler)

    def log_line(self, text: str) -> None:
        with self._log_lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()


class _Handler(BaseHTTPRequestHandler):
    server: WebServer
    server_version = "lbnat-lab-web"
    protocol_version = "HTTP/1.1"

    def _answer(self, with_body: bool) -> None:
        body = page(self.server.name)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", self.server.name)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        host, port = self.client_address[:2]
        self.server.log_line(f"web {self.server.name} : {self.command} {self.path} "
                             f"from {host}:{port} -> {code}")  # fmt: skip

    def log_message(self, format: str, *args: Any) -> None:
        # errors (bad requests, broken connections) on stderr, as http.server does, one line
        sys.stderr.write(f"web {self.server.name} : {format % args}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbnat-web", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True, help="the backend's name, shown in the page")
    args = parser.parse_args(argv)
    server = WebServer(args.host, args.port, args.name)

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever to return: from a thread, not this handler
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    port = server.server_address[1]  # the one the kernel chose for --port 0
    server.log_line(f"web server {args.name} listening on {args.host}:{port}")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        server.log_line(f"web server {args.name} stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
