"""A stand-in for lbnat's admin socket, for the tools that ask it (lbnat-ha, lbnat-bgp): a Unix
socket in the test's directory that answers each request line with a canned reply."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path


class FakeLbnat:
    """Answers each request line with `self.reply` (a dict, or bytes sent as they are; None:
    accept and say nothing, as a hung lbnat would); keeps the requests, parsed."""

    def __init__(self, path: Path, reply: dict[str, object] | bytes | None) -> None:
        self.path = str(path)
        self.reply = reply
        self.requests: list[dict[str, object]] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                line = conn.makefile("rb").readline()
                if not line:  # a client that went before it asked (a tool stopping)
                    continue
                self.requests.append(json.loads(line))
                reply = self.reply
                if reply is None:
                    time.sleep(1.5)
                    continue
                line = reply if isinstance(reply, bytes) else json.dumps(reply).encode() + b"\n"
                conn.sendall(line)

    def close(self) -> None:
        self.server.close()
