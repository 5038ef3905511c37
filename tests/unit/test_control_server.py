"""The control servers against misbehaving clients, on loopback: a burst of connections is
queued (not dropped), a silent client, a client that drips its request and a client that never
reads its reply are each dropped after the idle bound and logged in one line, an over-long line
is refused and logged, and connections past the cap are refused at once."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbnat.control import server as control_server
from lbnat.control.protocol import Authenticator, Request, ack
from lbnat.control.server import BACKLOG, AdminServer, RegistrationServer, serve_in_thread

BOUND = 0.3  # the idle bound in these tests (seconds)


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.kinds: list[str] = []  # the metrics' word for each refusal
        self.seen = threading.Event()

    def __call__(self, peer: str, reason: str, kind: str) -> None:
        self.lines.append((peer, reason))
        self.kinds.append(kind)
        self.seen.set()


@pytest.fixture
def refused(monkeypatch: pytest.MonkeyPatch) -> Log:
    monkeypatch.setattr(control_server, "IDLE_TIMEOUT", BOUND)
    monkeypatch.setattr(control_server._LineHandler, "timeout", BOUND)
    return Log()


def big_reply(request: Request, peer: str) -> bytes:
    return ack(op=request.op, rows=["x" * 100] * 100_000)  # ~10 MB: more than socket buffers


@pytest.fixture
def registration(refused: Log) -> Iterator[RegistrationServer]:
    server = RegistrationServer("127.0.0.1", 0, Authenticator(None), big_reply, refused)
    yield server
    server.server_close()


def test_a_burst_of_connections_is_queued_not_dropped(registration: RegistrationServer) -> None:
    """The server does not accept at all here: every connection must fit in the backlog (with
    socketserver's default of 5 the sixth SYN is dropped and its connect times out)."""
    target = address(registration)
    clients = []
    try:
        for _ in range(BACKLOG // 2):
            clients.append(socket.create_connection(target, timeout=0.5))
    finally:
        for client in clients:
            client.close()
    assert len(clients) == BACKLOG // 2


def address(server: RegistrationServer) -> tuple[str, int]:
    host, port = server.server_address[:2]
    return str(host), int(port)


@contextlib.contextmanager
def served(server: RegistrationServer | AdminServer) -> Iterator[None]:
    serve_in_thread(server, "test-server")
    try:
        yield
    finally:
        server.shutdown()


def test_a_silent_client_is_dropped_and_logged(
    registration: RegistrationServer, refused: Log
) -> None:
    with served(registration):
        with socket.create_connection(address(registration), timeout=10) as client:
            assert client.recv(1) == b""  # closed by the server after the bound
        assert refused.seen.wait(10)
    [(peer, reason)] = refused.lines
    assert peer == "127.0.0.1" and reason == f"no request within {BOUND:g} s; connection closed"


def test_a_client_that_never_reads_is_dropped_and_logged(
    registration: RegistrationServer, refused: Log
) -> None:
    with served(registration):
        with socket.create_connection(address(registration), timeout=10) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(b'{"op": "register", "service": "s", "ip": "1.2.3.4", "port": 1}\n')
            assert refused.seen.wait(10)  # the server gave up writing, and it goes on:
        with socket.create_connection(address(registration), timeout=10) as other:
            other.sendall(b"x" * 10_000 + b"\n")
            assert b"at most 4096 bytes" in other.makefile("rb").readline()
    assert refused.lines[0][1] == f"did not read its reply within {BOUND:g} s; dropped"


def test_an_over_long_line_is_refused_and_logged(
    registration: RegistrationServer, refused: Log
) -> None:
    with (
        served(registration),
        socket.create_connection(address(registration), timeout=10) as client,
    ):
        client.sendall(b"x" * 10_000 + b"\n")
        reply = client.makefile("rb").readline()
    assert b"at most 4096 bytes" in reply
    [(_, reason)] = refused.lines
    assert reason == "a request is one line of at most 4096 bytes"
    assert refused.kinds == ["malformed"]


def test_the_admin_socket_drops_a_silent_client(tmp_path: Path, refused: Log) -> None:
    path = str(tmp_path / "admin.sock")
    admin = AdminServer(path, big_reply, refused)
    try:
        with served(admin):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(10)
                client.connect(path)
                assert client.recv(1) == b""
            assert refused.seen.wait(10)
    finally:
        admin.server_close()
    assert refused.lines == [("admin", f"no request within {BOUND:g} s; connection closed")]
    assert refused.kinds == ["connection"]


def test_a_client_that_drips_its_request_is_dropped_after_the_bound(
    registration: RegistrationServer, refused: Log
) -> None:
    """A byte every BOUND / 3 s: a socket timeout alone would never fire."""
    with (
        served(registration),
        socket.create_connection(address(registration), timeout=10) as client,
    ):
        closed = False
        for byte in b'{"op": "register", "service": "s"':
            try:
                client.send(bytes([byte]))
            except OSError:
                closed = True
                break
            if refused.seen.is_set():
                break
            time.sleep(BOUND / 3)
        assert refused.seen.wait(10)
        if not closed:  # closed: EOF, or a reset if bytes sent after its last read were unread
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(1) == b""
    assert refused.lines == [("127.0.0.1", f"no request within {BOUND:g} s; connection closed")]


def echo_op(request: Request, peer: str) -> bytes:
    return ack(op=request.op)


def test_a_request_split_over_reads_and_two_on_one_connection(refused: Log) -> None:
    small = RegistrationServer(
        "127.0.0.1", 0, Authenticator(None), lambda r, p: ack(op=r.op), refused
    )
    try:
        with served(small), socket.create_connection(address(small), timeout=10) as client:
            line = b'{"op": "register", "service": "s", "ip": "1.2.3.4", "port": 1}\n'
            client.sendall(line[:10])
            time.sleep(0.05)
            client.sendall(line[10:] + line)  # the rest, and a second request at once
            replies = client.makefile("rb")
            assert replies.readline() == replies.readline() == ack(op="register")
    finally:
        small.server_close()
    assert refused.lines == []


def test_connections_past_the_cap_are_refused_at_once(
    registration: RegistrationServer, refused: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_server, "MAX_CONNECTIONS", 3)
    with served(registration):
        held = [socket.create_connection(address(registration), timeout=10) for _ in range(3)]
        try:
            with socket.create_connection(address(registration), timeout=10) as extra:
                reply = extra.makefile("rb").readline()
        finally:
            for client in held:
                client.close()
    assert b"3 connections open already" in reply
    assert ("127.0.0.1", "3 connections open already; connection closed") in refused.lines
    assert "busy" in refused.kinds


def test_the_control_channel_on_ipv6_and_dual_stack(refused: Log) -> None:
    """An IPv6 listen address; on "::" IPv4 peers too, seen (and allow-listed) as IPv4."""
    from lbnat.control.client import request_line
    from lbnat.control.protocol import encode

    peers: list[str] = []

    def note(request: Request, peer: str) -> bytes:
        peers.append(peer)
        return ack(op=request.op)

    line = encode({"op": "unregister", "service": "web", "ip": "2001:db8::21", "port": 80})
    for host, clients in (("::1", ["::1"]), ("::", ["::1", "127.0.0.1"])):
        server = RegistrationServer(host, 0, Authenticator(None), note, refused)
        port = int(server.server_address[1])
        with served(server):
            for client in clients:
                assert request_line((client, port), line) == b'{"ok":true,"op":"unregister"}\n'
    assert peers == ["::1", "::1", "127.0.0.1"]


@pytest.mark.usefixtures("private_netns")
def test_a_service_port_taken_on_ip6_is_found_before_start() -> None:
    from lbnat.daemon import StartError, check_port_free

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartError, match=f"tcp port {port} on ::1 is already used"):
            check_port_free("::1", port, "tcp")
    check_port_free("::1", port, "tcp")  # free again
    check_port_free("2001:db8::99", port, "udp")  # not (yet) this host's: free-bound
