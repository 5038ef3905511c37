"""A stand-in for lbnat's admin socket that answers `bgp_status` alone, as a file says, for the
BGP tests (test_bgp_netns.py) while they need no data plane:

    python -m tests.integration.bgp_status_stub SOCKET STATE_FILE [VIP]

STATE_FILE holds one word, read at each request: `yes` (announce), `no` (do not: "draining
the node"), `hang` (accept the connection and never answer: a stuck lbnat); a missing file is
`no`. Any other op is refused as lbnat refuses an unknown one. Stops on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

VIP = "198.18.100.1"


def reply_to(request: bytes, state: str, vip: str) -> dict[str, object] | None:
    """The reply line's object (None: say nothing, the `hang` state)."""
    try:
        op = json.loads(request).get("op")
    except (ValueError, AttributeError):
        return {"ok": False, "error": "bad request"}
    if op != "bgp_status":
        return {"ok": False, "error": f"unknown op {op!r}"}
    if state == "hang":
        return None
    if state == "yes":
        return {"ok": True, "announce": True, "vip": vip, "why": "a backend is eligible"}
    return {"ok": True, "announce": False, "vip": vip, "why": "draining the node"}


def serve(path: str, state_file: Path, vip: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    def stop(_signum: int, _frame: FrameType | None) -> None:
        server.close()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"bgp_status stub listening on {path}", flush=True)
    while True:
        conn, _ = server.accept()
        conn.settimeout(2.0)
        try:
            request = conn.makefile("rb").readline()
            state = state_file.read_text().strip() if state_file.exists() else "no"
            reply = reply_to(request, state, vip)
        except OSError:
            conn.close()
            continue
        if reply is None:
            # left open and unanswered (a hung ask times out at its end), closed after 5 s
            closer = threading.Timer(5.0, conn.close)
            closer.daemon = True
            closer.start()
            continue
        with conn:
            conn.sendall(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m tests.integration.bgp_status_stub SOCKET STATE_FILE [VIP]")
    serve(sys.argv[1], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) == 4 else VIP)
