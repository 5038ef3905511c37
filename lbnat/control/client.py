"""The client side of the control wire: one request line to a Unix socket path or a
(host, port), and its reply line.

On the standard library alone, and imported by `lbnat.hatool`, whose check keepalived runs
every second, and `lbnat.bgptool`, which asks twice a second for ExaBGP:
`lbnat.control.server` (the ask_lbnat helper built on this) imports the config
and its jsonschema, about 0.1 s.
"""

from __future__ import annotations

import socket

HA_ROLES = ("master", "backup", "fault", "stop")
"""keepalived's states, as its notify script names them: the roles `ha_role` takes (here, where
lbnat-ha, the protocol's parser and the CLI all find them)."""


def request_line(target: str | tuple[str, int], line: bytes, timeout: float = 5.0) -> bytes:
    """The client side: send one request line to a Unix socket path or a (host, port), return
    the reply line."""
    if isinstance(target, str):
        family = socket.AF_UNIX
    else:
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.sendall(line)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply
