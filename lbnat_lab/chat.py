"""A small line-based chat server and client, our own take on the C++ guideline's
chat_serv / chat_clnt, used as the backend application and the client in the lab tests.

Server (one thread, one selector): every line a client sends is broadcast, byte for byte, to
every client of that server, the sender included. On connect a client first gets one greeting
line, ``* connected to <server-name>``, so a client (and a test) can tell which backend it
landed on. The server never decodes what it relays, so any bytes are fine; a line longer than
``MAX_LINE`` bytes is cut to ``MAX_LINE - 1`` bytes plus a newline and the rest of it dropped.
A client that stops reading is dropped once ``MAX_PENDING`` bytes are queued for it.

Address families: the server listens on IPv4 (``--family 4``, 0.0.0.0, the default), IPv6
only (``--family 6``, ::) or both (``--family dual``, one :: socket taking IPv4 too, whose
IPv4 peers are shown as plain IPv4); ``--host`` with a ``:`` is IPv6. The client connects to
whichever family its HOST is (an IPv6 literal such as fd18::2 is fine). IPv6 endpoints are
written ``[address]:port``.

Server log, one flushed line per event on stdout::

    chat server <name> listening on <host>:<port>
    connected client : <ip>:<port> (total <n>)
    closed client : <ip>:<port> (total <n>)
    chat server <name> stopped

Client: prints every line it receives; sends each line read from stdin as
``[NAME] <line>\\n``; a line ``q`` or ``Q``, or the end of stdin, closes the connection.

    python -m lbnat_lab.chat server [--host H] [--family 4|6|dual] --port P [--name NAME]
    python -m lbnat_lab.chat client HOST PORT NAME
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Protocol

MAX_LINE = 4096
"""Longest line the server relays, newline included."""
MAX_PENDING = 1 << 20
"""Bytes queued for one client before the server gives up on it."""
RECV_SIZE = 65536
GREETING_PREFIX = "* connected to "
QUIT_LINES = (b"q", b"Q")
DRAIN_TIMEOUT = 2.0
"""Seconds a quitting client waits for the server to close after its own FIN."""

_WILDCARDS = ("", "0.0.0.0", "::")
FAMILIES = {"4": "0.0.0.0", "6": "::", "dual": "::"}
"""--family -> the wildcard address the server listens on by default"""
_MAPPED = "::ffff:"


class TextSink(Protocol):
    """Where the server logs and the client prints: sys.stdout or anything like it."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


def _endpoint(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """ip:port, [ipv6]:port; an IPv4-mapped IPv6 address (a dual-stack socket's IPv4 peer) as
    the IPv4 address it is."""
    host = address[0]
    if host.startswith(_MAPPED) and "." in host:
        host = host[len(_MAPPED) :]
    if ":" in host:
        return f"[{host}]:{address[1]}"
    return f"{host}:{address[1]}"


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    peer: str
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    discarding: bool = False  # inside an over-long line: drop until the next newline


class ChatServer:
    """Broadcast chat server on one TCP port. `serve_forever` runs it; `stop` (from a signal
    handler or another thread) makes it return; `close` releases every socket."""

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 0,
        name: str | None = None,
        out: TextSink | None = None,
        dual: bool = False,
    ) -> None:
        """`dual`: an IPv6 `host` takes IPv4 clients too (IPV6_V6ONLY off); otherwise an IPv6
        socket is IPv6 only."""
        self._out = out if out is not None else sys.stdout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                self._listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(not dual))
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(128)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._fixed_name = name
        if name is None and host not in _WILDCARDS:
            self._fixed_name = _endpoint((host, self.port))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._clients: dict[socket.socket, _Client] = {}
        self._stopping = False

    @property
    def name(self) -> str:
        """The configured name; with a wildcard host and no name, each client is greeted with
        the address it connected to instead."""
        return self._fixed_name or _endpoint((self.host or "*", self.port))

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def log(self, message: str) -> None:
        # one write per line: with PYTHONUNBUFFERED, print() writes the text and the newline
        # apart, and a web server sharing the stdout (provision-backend.sh) could land between
        with contextlib.suppress(OSError, ValueError):
            self._out.write(message + "\n")
            self._out.flush()

    def stop(self) -> None:
        """Ask `serve_forever` to return; safe from a signal handler or another thread."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def serve_forever(self, poll_interval: float = 1.0) -> None:
        self.log(f"chat server {self.name} listening on {_endpoint((self.host, self.port))}")
        while not self._stopping:
            for key, events in self._sel.select(poll_interval):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                else:
                    client = key.data
                    assert isinstance(client, _Client)
                    if client.sock not in self._clients:
                        continue  # dropped earlier in this batch
                    if events & selectors.EVENT_READ:
                        self._read(client)
                    if events & selectors.EVENT_WRITE and client.sock in self._clients:
                        self._flush(client)
        self.log(f"chat server {self.name} stopped")

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client, log=False)
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            sock.close()
        self._sel.close()

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _accept(self) -> None:
        # Several connections may wait; take them all, but bounded so one busy listener
        # cannot starve the clients.
        for _ in range(64):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ECONNABORTED, EMFILE, ...: log and carry on
                if exc.errno != errno.ECONNABORTED:
                    self.log(f"accept failed : {exc.strerror or exc}")
                return
            sock.setblocking(False)
            client = _Client(sock=sock, peer=_endpoint(address))
            self._clients[sock] = client
            self._sel.register(sock, selectors.EVENT_READ, client)
            self.log(f"connected client : {client.peer} (total {len(self._clients)})")
            name = self._fixed_name
            if name is None:
                try:
                    name = _endpoint(sock.getsockname())
                except OSError:
                    name = self.name
            self._queue(client, f"{GREETING_PREFIX}{name}\n".encode())
            if client.sock in self._clients:
                self._flush(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ECONNRESET, ETIMEDOUT, ...
            self._drop(client)
            return
        if not data:
            self._drop(client)
            return
        lines = self._split(client, data)
        if lines:
            self._broadcast(b"".join(lines))

    @staticmethod
    def _split(client: _Client, data: bytes) -> list[bytes]:
        """Complete lines (each ending in a newline, at most MAX_LINE bytes) from `data`."""
        buf = client.inbuf
        buf += data
        lines: list[bytes] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            end = len(buf) if nl < 0 else nl + 1
            if client.discarding:
                if nl < 0:
                    start = len(buf)
                    break
                client.discarding = False
            elif end - start > MAX_LINE:
                lines.append(bytes(buf[start : start + MAX_LINE - 1]) + b"\n")
                client.discarding = nl < 0
            elif nl >= 0:
                lines.append(bytes(buf[start:end]))
            else:
                break
            start = end
        del buf[:start]
        return lines

    def _broadcast(self, payload: bytes) -> None:
        for client in list(self._clients.values()):
            self._queue(client, payload)
        for client in list(self._clients.values()):
            if client.outbuf:
                self._flush(client)

    def _queue(self, client: _Client, payload: bytes) -> None:
        if len(client.outbuf) + len(payload) > MAX_PENDING:
            self.log(f"slow client : {client.peer} ({len(client.outbuf)} bytes pending)")
            self._drop(client)
            return
        client.outbuf += payload

    def _flush(self, client: _Client) -> None:
        while client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # EPIPE, ECONNRESET: the client is gone
                self._drop(client)
                return
            del client.outbuf[:sent]
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outbuf else 0)
        if self._sel.get_key(client.sock).events != wanted:
            self._sel.modify(client.sock, wanted, client)

    def _drop(self, client: _Client, log: bool = True) -> None:
        if self._clients.pop(client.sock, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        client.sock.close()
        if log:
            self.log(f"closed client : {client.peer} (total {len(self._clients)})")


# -- client -----------------------------------------------------------------------------------


class ChatClient:
    """Interactive client: one selector loop over the socket and stdin (no threads).

    `select` (not epoll) so that stdin may be a terminal, a pipe or a regular file."""

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        stdin_fd: int,
        out: TextSink,
        err: TextSink,
    ) -> None:
        self._sock = sock
        self._prefix = f"[{name}] ".encode()
        self._stdin_fd = stdin_fd
        self._out = out
        self._err = err
        self._inbuf = bytearray()  # from the server
        self._linebuf = bytearray()  # from stdin
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> int:
        sel = selectors.SelectSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        sel.register(self._stdin_fd, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for key, _ in sel.select(0.5):
                    if key.fileobj is self._sock:
                        if not self._receive():
                            self._print_rest()
                            self._note("connection closed by server")
                            return 0
                    elif not self._from_stdin():
                        return self._quit()
            return self._quit()
        except OSError as exc:
            self._note(f"connection lost: {exc.strerror or exc}")
            return 1
        finally:
            sel.close()

    def _note(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            print(f"chat client: {message}", file=self._err, flush=True)

    def _receive(self) -> bool:
        data = self._sock.recv(RECV_SIZE)
        if not data:
            return False
        self._inbuf += data
        end = self._inbuf.rfind(b"\n") + 1
        if end == 0 and len(self._inbuf) >= RECV_SIZE:
            end = len(self._inbuf)  # an endless line from a server that is not ours
        if end:
            self._write(bytes(self._inbuf[:end]))
            del self._inbuf[:end]
        return True

    def _print_rest(self) -> None:
        if self._inbuf:
            self._write(bytes(self._inbuf) + b"\n")
            self._inbuf.clear()

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._out.write(data.decode("utf-8", errors="replace"))
            self._out.flush()

    def _from_stdin(self) -> bool:
        """Send the complete lines typed so far; False once the user quits (q, Q or EOF)."""
        data = os.read(self._stdin_fd, RECV_SIZE)
        eof = not data
        self._linebuf += data
        if eof and self._linebuf and not self._linebuf.endswith(b"\n"):
            self._linebuf += b"\n"  # last line without a newline still counts
        while (nl := self._linebuf.find(b"\n")) >= 0:
            line = bytes(self._linebuf[:nl]).rstrip(b"\r")
            del self._linebuf[: nl + 1]
            if line in QUIT_LINES:
                return False
            self._sock.sendall(self._prefix + line + b"\n")
        return not eof

    def _quit(self) -> int:
        """Close politely: send our FIN, show what still arrives until the server closes too
        (bounded by DRAIN_TIMEOUT), then close."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while (left := deadline - time.monotonic()) > 0:
                self._sock.settimeout(left)
                if not self._receive():
                    break
        self._print_rest()
        return 0


# -- command line -----------------------------------------------------------------------------


def _install_stop_handlers(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_server(host: str, port: int, name: str | None, dual: bool = False) -> int:
    try:
        server = ChatServer(host, port, name, dual=dual)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"chat server: cannot listen on {_endpoint((host, port))}: {reason}",
              file=sys.stderr)  # fmt: skip
        return 1
    _install_stop_handlers(server.stop)
    with server:
        server.serve_forever()
    return 0


def run_client(host: str, port: int, name: str, connect_timeout: float) -> int:
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        print(f"chat client: cannot connect to {_endpoint((host, port))}: {reason}",
              file=sys.stderr)  # fmt: skip
        return 1
    with sock:
        sock.settimeout(None)
        client = ChatClient(sock, name, sys.stdin.fileno(), sys.stdout, sys.stderr)
        _install_stop_handlers(client.stop)
        return client.run()


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"{value} is not a port number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lbnat_lab.chat", description="Broadcast chat server and client (lbnat lab)."
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    server = sub.add_parser("server", help="run a broadcast chat server")
    server.add_argument(
        "--host", default=None, help="address to listen on (default: the --family's wildcard)"
    )
    server.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default="4",
        help="4: IPv4 (0.0.0.0, the default); 6: IPv6 only (::); dual: IPv6 and IPv4 on one "
        "socket (::). A --host with a ':' is IPv6.",
    )
    server.add_argument("--port", type=_port, required=True, help="TCP port (0: any)")
    server.add_argument(
        "--name",
        default=None,
        help="name in the greeting (default host:port; the address the client reached when "
        "listening on a wildcard)",
    )
    client = sub.add_parser("client", help="connect to a chat server")
    client.add_argument("host")
    client.add_argument("port", type=_port)
    client.add_argument("name")
    client.add_argument(
        "--connect-timeout", type=float, default=5.0, help="seconds to wait for the connection"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "server":
        host = FAMILIES[args.family] if args.host is None else args.host
        return run_server(host, args.port, args.name, dual=args.family == "dual")
    return run_client(args.host, args.port, args.name, args.connect_timeout)


if __name__ == "__main__":
    sys.exit(main())
