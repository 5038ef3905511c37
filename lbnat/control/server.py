"""The control channel's servers: thin I/O around lbnat.control.protocol.

- `RegistrationServer`: TCP, JSON lines, for backends registering and unregistering
  themselves (authenticated with HMAC when a secret is configured, loopback only otherwise).
- `AdminServer`: a Unix socket, mode 0600 in a 0700 directory (root only), for `lbnat status`,
  `sessions`, `backend add|remove|drain` and `reload`.

Each connection gets a thread (socketserver's ThreadingMixIn): requests are rare and short,
and the packet loop never waits for them. Every request line gets exactly one reply line.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from lbnat.config import ControlConfig
from lbnat.control.client import request_line
from lbnat.control.protocol import (
    MAX_LINE,
    Authenticator,
    Nack,
    Request,
    encode,
    nack,
    parse_request,
)
from lbnat.fields import host_port_text

Apply = Callable[[Request, str], bytes]  # (request, who asked) -> the reply line
# (who asked, why, one word for why: Nack.kind, or "connection", "busy") -> log and count it
Refused = Callable[[str, str, str], None]

REQUESTS_PER_CONNECTION = 100
IDLE_TIMEOUT = 10.0
"""Seconds a connection has to send a whole request line (silent or dripping a byte at a
time alike), and to take its reply."""
BACKLOG = 128
"""Connections waiting to be accepted. socketserver's default, 5, overflows as soon as a few
clients connect at once (a burst of backends registering after a restart, or a flood): the
kernel then drops their SYNs and each one waits a 1 s retransmit (tests/faults measured it)."""
MAX_CONNECTIONS = 256
"""Connections served at once, per server (a thread each); one more is refused and closed at
once, so a flood costs lbnat a bounded number of threads."""


class _LineHandler(socketserver.StreamRequestHandler):
    timeout = IDLE_TIMEOUT

    def handle(self) -> None:
        server = cast(_LineServer, self.server)
        peer = server.peer_name(self.client_address)
        pending = bytearray()
        for _ in range(REQUESTS_PER_CONNECTION):
            try:
                line = self._read_line(pending)
            except TimeoutError:
                server.refused(
                    peer, f"no request within {IDLE_TIMEOUT:g} s; connection closed", "connection"
                )
                return
            except OSError:
                return
            if not line:
                return
            if len(line) > MAX_LINE or not line.endswith(b"\n"):
                reason = f"a request is one line of at most {MAX_LINE} bytes"
                server.refused(peer, reason, "malformed")
                self._reply(nack(reason), server, peer)
                return
            if not self._reply(server.answer(line, peer), server, peer):
                return

    def _read_line(self, pending: bytearray) -> bytes:
        """The next line, its newline included, read within IDLE_TIMEOUT in all (a socket
        timeout alone would restart with every byte a slow peer drips). At most MAX_LINE + 1
        bytes (the caller refuses more); what came before EOF without a newline; b"" at EOF.
        Hand-written because a buffered readline cannot take a deadline."""
        deadline = time.monotonic() + IDLE_TIMEOUT
        while (end := pending.find(b"\n")) < 0 and len(pending) <= MAX_LINE:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.connection.settimeout(left)
            chunk = self.connection.recv(MAX_LINE + 1)
            if not chunk:
                end = len(pending) - 1
                break
            pending += chunk
        size = end + 1 if end >= 0 else MAX_LINE + 1
        line = bytes(pending[:size])
        del pending[:size]
        return line

    def _reply(self, data: bytes, server: _LineServer, peer: str) -> bool:
        """Send one reply line; False (logged) if the peer did not take it within the idle
        bound, so a client that never reads holds a thread for IDLE_TIMEOUT at most."""
        try:
            self.connection.settimeout(IDLE_TIMEOUT)
            self.wfile.write(data)
            self.wfile.flush()
        except TimeoutError:
            server.refused(
                peer, f"did not read its reply within {IDLE_TIMEOUT:g} s; dropped", "connection"
            )
            return False
        except OSError:
            return False
        return True


class _LineServer(socketserver.ThreadingMixIn):
    """What both servers share: one request line in, one reply line out; a thread per
    connection, at most MAX_CONNECTIONS at once."""

    daemon_threads = True
    admin = False
    auth: Authenticator | None = None
    apply: Apply
    refused: Refused

    def _start_counting(self) -> None:
        self._open = 0
        self._open_lock = threading.Lock()

    def peer_name(self, address: Any) -> str:
        """The peer's address as text; an IPv4 peer of a dual-stack ("::") listener, which
        the kernel shows IPv4-mapped, as its IPv4 address."""
        if self.admin:
            return "admin"
        host = str(address[0])
        if host.startswith("::ffff:"):
            with contextlib.suppress(ValueError):
                mapped = ipaddress.IPv6Address(host).ipv4_mapped
                if mapped is not None:
                    return str(mapped)
        return host

    def answer(self, line: bytes, peer: str) -> bytes:
        source = "127.0.0.1" if self.admin else peer
        request = parse_request(
            line, source_ip=source, now=time.time(), auth=self.auth, admin=self.admin
        )
        if isinstance(request, Nack):
            self.refused(peer, request.reason, request.kind)
            return nack(request.reason)
        return self.apply(request, peer)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            admitted = self._open < MAX_CONNECTIONS
            self._open += admitted
        if not admitted:
            reason = f"{MAX_CONNECTIONS} connections open already; connection closed"
            self.refused(self.peer_name(client_address), reason, "busy")
            with contextlib.suppress(OSError):  # a fresh socket's buffer takes one line
                request.send(nack(reason), socket.MSG_DONTWAIT)
                request.shutdown(socket.SHUT_WR)
            request.close()
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._open_lock:
            self._open -= 1


class RegistrationServer(_LineServer, socketserver.TCPServer):
    """The control channel on one address: an IPv4 one, or an IPv6 one; "::" takes both
    families (a dual-stack socket, whatever net.ipv6.bindv6only says)."""

    allow_reuse_address = True
    request_queue_size = BACKLOG

    def __init__(
        self, host: str, port: int, auth: Authenticator, apply: Apply, refused: Refused
    ) -> None:
        self.auth = auth
        self.apply = apply
        self.refused = refused
        self._start_counting()
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socketserver.TCPServer.__init__(self, (host, port), _LineHandler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            dual = ipaddress.IPv6Address(self.server_address[0]).is_unspecified
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        super().server_bind()


class AdminServer(_LineServer, socketserver.UnixStreamServer):
    admin = True
    request_queue_size = BACKLOG

    def __init__(self, path: str, apply: Apply, refused: Refused) -> None:
        self.apply = apply
        self.refused = refused
        self._start_counting()
        self.path = path
        prepare_socket_path(path)
        old_umask = os.umask(0o177)  # the socket is created 0600: root only
        try:
            socketserver.UnixStreamServer.__init__(self, path, _LineHandler)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def prepare_socket_path(path: str) -> None:
    """Make the socket's directory (0700) and clear a stale socket; refuse if another lbnat
    answers there."""
    directory = Path(path).parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a socket left by a crash
            return
    raise OSError(
        f"another lbnat answers on {path} "
        "(use --admin-socket or LBNAT_ADMIN_SOCKET for a second one)"
    )


def start_servers(
    control: ControlConfig | None, admin_socket: str, apply: Apply, refused: Refused
) -> list[RegistrationServer | AdminServer]:
    """The registration server (when the config has a control channel) and the admin socket
    (when it has a path), each serving on a thread of its own. OSError if one cannot listen;
    the ones already started are shut down."""
    servers: list[RegistrationServer | AdminServer] = []
    try:
        if control is not None:
            if control.secret is None and not ipaddress.ip_address(control.host).is_loopback:
                raise OSError(
                    f"the control channel on {control.host} needs a secret; without one it "
                    "listens on loopback only"
                )
            auth = Authenticator(control.secret, control.window, control.allow)
            server = RegistrationServer(control.host, control.port, auth, apply, refused)
            servers.append(server)
            serve_in_thread(server, "lbnat-control")
        if admin_socket:
            admin = AdminServer(admin_socket, apply, refused)
            servers.append(admin)
            serve_in_thread(admin, "lbnat-admin")
    except BaseException:
        for started in servers:
            started.shutdown()
            started.server_close()
        raise
    return servers


def serve_in_thread(server: socketserver.BaseServer, name: str) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, args=(0.2,), name=name, daemon=True)
    thread.start()
    return thread


class AdminError(Exception):
    """lbnat could not be asked, or its answer was not a reply (one line, for the user)."""


class RequestRefused(AdminError):
    """lbnat answered with a nack; `reason` is its error."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"refused: {reason}")
        self.reason = reason


def ask_lbnat(
    target: str | tuple[str, int], message: dict[str, object], timeout: float = 5.0
) -> dict[str, Any]:
    """One request to a running lbnat (its admin socket path, or its registration channel's
    (host, port)) and its acked reply; AdminError (RequestRefused for a nack) otherwise. The
    CLI's commands and `lbnat top` say these errors each in their own way."""
    where = target if isinstance(target, str) else host_port_text(*target)
    try:
        line = request_line(target, encode(message), timeout)
    except FileNotFoundError:
        raise AdminError(f"no admin socket at {where}: is lbnat running?") from None
    except OSError as error:
        raise AdminError(f"cannot reach lbnat at {where}: {error.strerror or error}") from None
    try:
        reply: dict[str, Any] = json.loads(line)
    except ValueError:
        raise AdminError(f"{where} did not answer with JSON") from None
    if not reply.get("ok"):
        raise RequestRefused(str(reply.get("error", "no reason given")))
    return reply
