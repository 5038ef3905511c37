"""Tests for lbnat_lab.chat with ephemeral ports, inside a network namespace of the test's own
(tests/unit/conftest.py, address HOST): greeting, broadcast with the client's prefix,
quitting, and a server that survives rude clients. Every wait is bounded."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lbnat_lab import chat
from lbnat_lab.chat import MAX_LINE, ChatClient, ChatServer, _Client
from tests.unit.conftest import HOST

pytestmark = pytest.mark.usefixtures("private_netns")

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 5.0


class Sink:
    """A thread-safe text stream that tests can wait on."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._cond = threading.Condition()

    def write(self, text: str) -> int:
        with self._cond:
            self._parts.append(text)
            self._cond.notify_all()
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        with self._cond:
            return "".join(self._parts)

    def wait_for(self, needle: str, timeout: float = TIMEOUT) -> str:
        with self._cond:
            if not self._cond.wait_for(lambda: needle in "".join(self._parts), timeout):
                raise AssertionError(f"{needle!r} not seen in {''.join(self._parts)!r}")
            return "".join(self._parts)


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


class RunningServer:
    def __init__(self, host: str = HOST, name: str | None = "srv") -> None:
        self.log = Sink()
        self.server = ChatServer(host, 0, name, out=self.log)
        self.port = self.server.port
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,))
        self.thread.start()

    def connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=TIMEOUT)
        return sock

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()
        self.server.close()


@pytest.fixture
def server() -> Iterator[RunningServer]:
    running = RunningServer()
    try:
        yield running
    finally:
        running.stop()


def read_line(sock: socket.socket) -> bytes:
    """One line from a blocking socket with a timeout (byte at a time: tests only)."""
    out = bytearray()
    while not out.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        out += byte
    return bytes(out)


class InProcessClient:
    """A ChatClient whose stdin is a pipe the test writes to."""

    def __init__(self, port: int, name: str) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
        self.sock.settimeout(None)
        self.stdin_r, self.stdin_w = os.pipe()
        self.out = Sink()
        self.err = Sink()
        self.client = ChatClient(
            self.sock,
            name,
            self.stdin_r,
            self.out,
            self.err,
        )
        self.result: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.result = self.client.run()

    def type(self, text: str) -> None:
        os.write(self.stdin_w, text.encode())

    def finish(self) -> int | None:
        self.thread.join(TIMEOUT)
        return self.result

    def close(self) -> None:
        self.client.stop()
        self.thread.join(TIMEOUT)
        for fd in (self.stdin_r, self.stdin_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock.close()


def test_greeting_names_the_server(server: RunningServer) -> None:
    with server.connect() as sock:
        assert read_line(sock) == b"* connected to srv\n"
    server.log.wait_for(f"closed client : {HOST}:")


def test_default_name_is_the_address_the_client_reached() -> None:
    running = RunningServer(host="0.0.0.0", name=None)
    try:
        with running.connect() as sock:
            assert read_line(sock) == f"* connected to {HOST}:{running.port}\n".encode()
    finally:
        running.stop()
    running = RunningServer(host=HOST, name=None)
    try:
        with running.connect() as sock:
            assert read_line(sock) == f"* connected to {HOST}:{running.port}\n".encode()
    finally:
        running.stop()


@pytest.mark.parametrize("dual", [True, False])
def test_ipv6_and_dual_stack_servers(dual: bool) -> None:
    """--family dual: one :: socket takes IPv6 and IPv4 clients, each logged in its own form
    ([::1]:port, HOST:port); --family 6: IPv6 only."""
    log = Sink()
    server = ChatServer("::", 0, "v6", out=log, dual=dual)
    thread = threading.Thread(target=server.serve_forever, args=(0.1,))
    thread.start()
    try:
        with socket.create_connection(("::1", server.port), timeout=TIMEOUT) as six:
            assert read_line(six) == b"* connected to v6\n"
            log.wait_for(f"connected client : [::1]:{six.getsockname()[1]} (total ")
        if dual:
            with socket.create_connection((HOST, server.port), timeout=TIMEOUT) as four:
                assert read_line(four) == b"* connected to v6\n"
                log.wait_for(f"connected client : {HOST}:{four.getsockname()[1]} (total ")
        else:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((HOST, server.port), timeout=TIMEOUT).close()
        assert log.text.splitlines()[0] == f"chat server v6 listening on [::]:{server.port}"
    finally:
        server.stop()
        thread.join(TIMEOUT)
        server.close()


def test_log_lines(server: RunningServer) -> None:
    with server.connect() as first:
        read_line(first)
        port = first.getsockname()[1]
        text = server.log.wait_for(f"connected client : {HOST}:{port} (total 1)")
        assert text.splitlines()[0] == f"chat server srv listening on {HOST}:{server.port}"
        with server.connect() as second:
            read_line(second)
            server.log.wait_for("(total 2)")
    server.log.wait_for(f"closed client : {HOST}:{port} (total 0)")


def test_broadcast_reaches_every_client_with_the_prefix(server: RunningServer) -> None:
    alice = InProcessClient(server.port, "alice")
    bob = InProcessClient(server.port, "bob")
    try:
        with server.connect() as raw:
            assert read_line(raw) == b"* connected to srv\n"
            alice.out.wait_for("* connected to srv\n")
            bob.out.wait_for("* connected to srv\n")
            wait_until(lambda: server.server.client_count == 3)
            alice.type("hello all\n")
            for sink in (alice.out, bob.out):  # the sender gets its own line too
                sink.wait_for("[alice] hello all\n")
            assert read_line(raw) == b"[alice] hello all\n"
            bob.type("hi al")  # a line is only sent once complete
            bob.type("ice\r\n")
            alice.out.wait_for("[bob] hi alice\n")
            assert read_line(raw) == b"[bob] hi alice\n"
            raw.sendall(b"raw lines are relayed as written\n")
            alice.out.wait_for("raw lines are relayed as written\n")
            bob.out.wait_for("raw lines are relayed as written\n")
    finally:
        alice.close()
        bob.close()


@pytest.mark.parametrize("quit_with", ["q\n", "Q\n", "EOF"])
def test_q_or_eof_quits(server: RunningServer, quit_with: str) -> None:
    client = InProcessClient(server.port, "carol")
    try:
        client.out.wait_for("* connected to srv\n")
        client.type("before\n")
        client.out.wait_for("[carol] before\n")
        if quit_with == "EOF":
            client.type("last line without newline")
            os.close(client.stdin_w)
        else:
            client.type(quit_with + "after\n")
        assert client.finish() == 0
        server.log.wait_for("closed client : ")
        if quit_with == "EOF":
            client.out.wait_for("[carol] last line without newline\n")
        # "q" itself and anything typed after it are never sent
        assert "q\n" not in client.out.text.replace("[carol] before\n", "")
        assert "after" not in client.out.text
    finally:
        client.close()


def test_client_notices_the_server_closing() -> None:
    running = RunningServer()
    client = InProcessClient(running.port, "dave")
    try:
        client.out.wait_for("* connected to srv\n")
        running.stop()
        assert client.finish() == 0
        client.err.wait_for("connection closed by server")
    finally:
        client.close()


def test_server_survives_rude_clients(server: RunningServer) -> None:
    # connect and close at once, as a TCP health check does
    for _ in range(5):
        socket.create_connection((HOST, server.port), timeout=TIMEOUT).close()
    # connect and reset
    rst = server.connect()
    rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rst.close()
    with server.connect() as listener, server.connect() as rude:
        read_line(listener)
        read_line(rude)
        # bytes that are not UTF-8, NULs, an over-long line, a half line then a reset
        rude.sendall(b"\xff\xfe\x00 bad \xc3\x28\n")
        assert read_line(listener) == b"\xff\xfe\x00 bad \xc3\x28\n"
        rude.sendall(b"x" * (3 * MAX_LINE) + b"tail\nnext\n")
        cut = read_line(listener)
        assert cut == b"x" * (MAX_LINE - 1) + b"\n"
        assert read_line(listener) == b"next\n"
        rude.sendall(b"half a line")
        rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.log.wait_for("(total 0)")
    wait_until(lambda: server.server.client_count == 0)
    assert server.thread.is_alive()
    with server.connect() as sock:  # still serving
        assert read_line(sock) == b"* connected to srv\n"
        sock.sendall(b"ok\n")
        assert read_line(sock) == b"ok\n"


def test_slow_reader_is_dropped(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat, "MAX_PENDING", 64 * 1024)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(TIMEOUT)
    slow.connect((HOST, server.port))
    slow_peer = f"{HOST}:{slow.getsockname()[1]}"
    with slow, server.connect() as talker:
        read_line(talker)
        wait_until(lambda: server.server.client_count == 2)
        burst = (b"y" * (MAX_LINE - 1) + b"\n") * 16
        talker.settimeout(0.01)
        deadline = time.monotonic() + TIMEOUT
        while "slow client" not in server.log.text:
            assert time.monotonic() < deadline, "slow reader never dropped"
            talker.sendall(burst)
            try:  # the talker reads its own echo, so only `slow` falls behind
                while talker.recv(1 << 20):
                    pass
            except TimeoutError:
                pass
        server.log.wait_for(f"slow client : {slow_peer} (")
        server.log.wait_for(f"closed client : {slow_peer} (total 1)")
        assert server.server.client_count == 1


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"a\nb\n"], [b"a\n", b"b\n"]),
        ([b"a", b"b", b"\n"], [b"ab\n"]),
        ([b"\n"], [b"\n"]),
        ([b"z" * (MAX_LINE - 1) + b"\n"], [b"z" * (MAX_LINE - 1) + b"\n"]),
        ([b"z" * MAX_LINE + b"\n"], [b"z" * (MAX_LINE - 1) + b"\n"]),
        ([b"z" * MAX_LINE, b"z" * 10, b"\nok\n"], [b"z" * (MAX_LINE - 1) + b"\n", b"ok\n"]),
        ([b"z" * (2 * MAX_LINE), b"zz", b"zz\n"], [b"z" * (MAX_LINE - 1) + b"\n"]),
    ],
)
def test_line_splitting(chunks: list[bytes], expected: list[bytes]) -> None:
    a, b = socket.socketpair()
    with a, b:
        client = _Client(sock=a, peer="test")
        lines: list[bytes] = []
        for chunk in chunks:
            lines += ChatServer._split(client, chunk)
        assert lines == expected
        assert len(client.inbuf) <= MAX_LINE


# -- the command line, as the lab runs it -----------------------------------------------------


def python_m(*argv: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
    """`python -m lbnat_lab.chat ARGV` with stdout and stderr piped."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "lbnat_lab.chat", *argv],
        env=env,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_server_and_client(signum: int) -> None:
    port = free_port()
    srv = python_m("server", "--host", HOST, "--port", str(port), "--name", "b1")
    try:
        assert srv.stdout is not None
        ready, _, _ = select.select([srv.stdout], [], [], TIMEOUT)
        assert ready, "server printed nothing"
        first = srv.stdout.readline()
        assert first == f"chat server b1 listening on {HOST}:{port}\n".encode()
        cli = python_m("client", HOST, str(port), "eve", stdin=subprocess.PIPE)
        out, err = cli.communicate(b"hello\nq\nnot sent\n", timeout=TIMEOUT)
        assert cli.returncode == 0, err
        assert out.decode().splitlines() == ["* connected to b1", "[eve] hello"]
        srv.send_signal(signum)
        rest, err = srv.communicate(timeout=TIMEOUT)
        assert srv.returncode == 0, err
        assert err == b""
        log = rest.decode().splitlines()
        assert log[0].startswith(f"connected client : {HOST}:")
        assert log[0].endswith(" (total 1)")
        assert log[1].startswith(f"closed client : {HOST}:")
        assert log[1].endswith(" (total 0)")
        assert log[-1] == "chat server b1 stopped"
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(TIMEOUT)


def test_cli_client_connection_refused() -> None:
    port = free_port()  # nothing listens there
    cli = python_m("client", HOST, str(port), "frank", stdin=subprocess.DEVNULL)
    out, err = cli.communicate(timeout=TIMEOUT)
    assert cli.returncode == 1
    assert out == b""
    assert err.decode() == f"chat client: cannot connect to {HOST}:{port}: Connection refused\n"


def test_cli_server_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = python_m("server", "--host", HOST, "--port", str(port))
        _out, err = srv.communicate(timeout=TIMEOUT)
    assert srv.returncode == 1
    assert b"Traceback" not in err
    assert err.decode().startswith(f"chat server: cannot listen on {HOST}:{port}: ")
