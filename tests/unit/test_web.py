"""The labs' web server (lbnat_lab.web), run as the backends run it, in a network namespace of
the test's own: each request answered with the page naming the backend, one log line per
request, a clean stop on SIGTERM."""

from __future__ import annotations

import http.client
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from lbnat_lab.netns import REPO
from tests.unit.conftest import HOST

pytestmark = pytest.mark.usefixtures("private_netns")

TIMEOUT = 10.0


@pytest.fixture
def web() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbnat_lab.web", "--host", HOST, "--port", "0", "--name", "b7"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.fullmatch(rf"web server b7 listening on {re.escape(HOST)}:(\d+)\n", first)
        assert match is not None, first
        yield proc, int(match.group(1))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)


def test_every_request_gets_the_backends_page_and_a_log_line(
    web: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = web
    assert proc.stdout is not None
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    for method, path in (("GET", "/"), ("GET", "/any/path?x=1"), ("HEAD", "/")):
        conn.request(method, path)
        reply = conn.getresponse()
        body = reply.read()
        assert reply.status == 200
        assert reply.getheader("X-Backend") == "b7"
        assert reply.getheader("Content-Length") == "11"
        assert body == (b"backend b7\n" if method == "GET" else b"")
        logged = proc.stdout.readline()
        assert re.fullmatch(
            rf"web b7 : {method} {re.escape(path)} from {re.escape(HOST)}:\d+ -> 200\n", logged
        ), logged
    conn.close()
    # other methods are http.server's 501, logged as well
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    conn.request("POST", "/", body=b"x")
    assert conn.getresponse().status == 501
    conn.close()

    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
    assert out.splitlines()[-1] == "web server b7 stopped"
